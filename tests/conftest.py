import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcon_core.data.idx import load_mnist

# Tests that start Ray, an S3 server or a Ray head are slow (seconds to minutes): `make test-fast` leaves them out.
SLOW_FIXTURES = {"ray_local", "seaweed_s3", "head"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


MNIST_DIR = Path(os.environ.get("GRADCON_MNIST_DIR", Path(__file__).resolve().parents[1] / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_train() -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST (make data puts it in data/mnist); the tests fail, not skip, without it."""
    return load_mnist(MNIST_DIR, "train")


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(MNIST_DIR, "test")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store: str):
    """A gloo process group of spawned test processes that meet through the file `store` (no port to pick that
    another process may take meanwhile); every rank waits for the others before the group is torn down."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    yield
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def start_moto_s3(bucket: str, access_key: str, secret_key: str):
    """moto's S3 on 127.0.0.1 (in-process) with `bucket`: (the server, cluster.storage.S3Options for it)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cluster.storage import S3Options

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = S3Options(endpoint=f"http://{host}:{port}", access_key=access_key, secret_key=secret_key,
                        region="us-east-1")
    client = boto3.client("s3", endpoint_url=options.endpoint, aws_access_key_id=options.access_key,
                          aws_secret_access_key=options.secret_key, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return server, options


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 with the bucket gradcon-test; yields cluster.storage.S3Options for it."""
    server, options = start_moto_s3("gradcon-test", "testing-key", "testing-secret")
    yield options
    server.stop()


@pytest.fixture(scope="session")
def seaweed_s3():
    """A real S3 server (SeaweedFS) on 127.0.0.1 that checks credentials; yields cluster.local_s3.LocalS3."""
    from cluster.local_s3 import LocalS3

    with LocalS3() as server:
        server.create_bucket("gradcon-test")
        yield server


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships them (uint8 payload, big-endian header)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def small_mnist_idx(tmp_path_factory, mnist_train, mnist_test) -> Path:
    """A real MNIST subset as IDX files: 300 train and 200 test images."""
    root = tmp_path_factory.mktemp("mnist-idx")
    for prefix, (x, y), n in (("train", mnist_train, 300), ("t10k", mnist_test, 200)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", x[:n])
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y[:n])
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every test that needs it (starting one costs seconds)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster; token auth stays on elsewhere
    import ray

    from cluster.ray_init import init_ray, stop_ray

    init_ray("local", num_cpus=4, object_store_memory=300 * 2**20, log_to_driver=False)
    yield ray
    stop_ray()
