import gzip
from dataclasses import dataclass, field

import numpy as np
import pytest

from gradcon_core.config import load_config, save_config
from gradcon_core.data.idx import find_idx, load_mnist, read_idx


@dataclass
class Example:
    epochs: int = 3
    lr: float = 1e-3
    name: str = "x"
    gpu: bool = False
    classes: list[int] = field(default_factory=lambda: [0, 1])
    limit: int | None = None


def test_yaml_then_overrides_win(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nname: from-yaml\n")
    cfg = load_config(Example, tmp_path / "c.yaml", ["lr=0.5", "gpu=true", "classes=3,4", "limit=10"])
    assert cfg == Example(epochs=7, lr=0.5, name="from-yaml", gpu=True, classes=[3, 4], limit=10)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Example, tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize(("override", "message"), [("epoch=3", "unknown config key"), ("epochs=many", "expected int"),
                                                    ("gpu=maybe", "boolean"), ("epochs", "key=value")])
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(Example, None, [override])


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip_raw_and_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5))
    x, y = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, np.arange(5))


def test_idx_errors_name_the_problem(tmp_path):
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="make data"):
        find_idx(tmp_path, "train-images-idx3-ubyte")


def test_real_mnist_has_the_expected_shape(mnist_test):
    x, y = mnist_test
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert sorted(np.unique(y)) == list(range(10))
