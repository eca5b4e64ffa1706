"""Connect to a Ray cluster, or start an embedded local one (the laptop default), and stop it completely."""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import ray
import ray._private.ray_constants as ray_constants
from ray.data.context import DEFAULT_RETRIED_IO_ERRORS

from cluster.processes import DISMISS, descendants, start_reaper, stop

ADDRESS_VARIABLE = "RAY_ADDRESS"
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
# Ray's switch for "a local Ray without a cluster" (its default on macOS and Windows): the node's address is
# then 127.0.0.1, and every server Ray starts listens on loopback only.
CLUSTER_VARIABLE = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class _Embedded:
    processes: list[psutil.Process]  # the processes ray.init started (GCS, raylet, dashboard, ...)
    reaper: subprocess.Popen  # cluster/processes.py, watching this process


_embedded: _Embedded | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """These variables set while Ray starts its processes (which inherit them), restored afterwards: this
    process's later init_ray calls must not join a cluster that has since stopped."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Ray on Linux replaces a node address of 127.0.0.1 by the machine's network address, and then binds its
    gRPC servers (GCS, raylet, workers), its agents and its Prometheus /metrics on all interfaces. With
    ENABLE_RAY_CLUSTER off (read by ray.init in this process; the variable carries it to Ray's processes) the
    node keeps 127.0.0.1 and they listen on loopback only. tests/test_local_ray.py lists the sockets."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environment({CLUSTER_VARIABLE: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def embedded_cpus(min_cpus: float = 0) -> int:
    """Logical CPUs of an embedded Ray: the machine's, or min_cpus where a job needs more.

    A job sized for its own machine (the tour's 2-worker train on a 2-core laptop needs 2 CPUs for its
    workers and 2 for Ray Data's reads) then runs time-sliced instead of being refused; a real cluster
    keeps its own count and the jobs' honest checks.
    """
    from ray._private.utils import get_num_cpus  # what Ray itself would detect (cgroup limits included)

    return max(int(get_num_cpus()), math.ceil(min_cpus))


def check_token_path() -> None:
    """RAY_AUTH_TOKEN_PATH naming no file: say so, instead of Ray's failure to authenticate much later."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise ValueError(f"RAY_AUTH_TOKEN_PATH={path} is not a file: point it at the cluster's token "
                         "(`ray get-auth-token` on the head writes one) or unset it")


# Ray Train 2.60 hands Ray Data's deprecated `exclude_resources` on by itself (ray/train/_internal/data_config.py),
# so its DatasetManager printed a two-line RayDeprecationWarning in every train run. The embedded instance's
# processes inherit this filter for that one message (a -W filter: the message's start, then the category).
RAY_OWN_DEPRECATION = "ignore:`ExecutionOptions.exclude_resources` is deprecated:DeprecationWarning"
# What a long-lived cluster's workers should import before they take work (Ray's preload_python_modules; the
# `ray start --head --system-config` of ray_cluster.yaml): a worker Ray started ahead of time then holds torch and
# gradcon_core already, and a scoring actor that takes one skips the second or two those imports cost on 2 cores
# (docs/benchmarks.md). Each idle worker then holds them too (hundreds of MB of RSS, much of it shared
# libraries), so a command's own embedded Ray, which lives for one job, does not preload.
PRELOAD = ["gradcon_core"]


def init_ray(address: str | None = None, num_cpus: int | None = None, min_cpus: float = 0, **kwargs: Any) -> None:
    """address (or RAY_ADDRESS) joins that cluster; neither starts a fresh local Ray for this process.

    The embedded Ray listens on 127.0.0.1 only, has num_cpus logical CPUs (default: embedded_cpus(min_cpus)),
    is stopped, and waited for, when this process exits (stop_ray), and its processes are stopped by a
    reaper if this process is killed. Token authentication is left as Ray sets it; only the embedded instance
    takes num_cpus, min_cpus and kwargs (ray.init's, e.g. object_store_memory).
    """
    global _embedded
    check_token_path()
    if ray.is_initialized():
        return
    address = address or os.environ.get(ADDRESS_VARIABLE)
    if address and address != "local":
        # Joining an embedded Ray of this machine (127.0.0.1:PORT) takes the same loopback node, or Ray would
        # knock at the machine's network address, where nothing listens.
        host = address.rsplit(":", 1)[0].strip("[]")
        with _loopback_node() if host in LOOPBACK_HOSTS else contextlib.nullcontext():
            ray.init(address=address)
        return
    if _embedded is not None:  # a previous embedded Ray, shut down without stop_ray
        stop_ray()
    # The embedded instance's GCS port is chosen here and its address put in the environment its processes
    # inherit. Ray Train's placement-group cleaner asks the State API (served by the dashboard, on 127.0.0.1
    # only) whether a stopped run's controller is gone; without the dashboard every trial that Tune stops
    # keeps its workers' CPUs, and without RAY_ADDRESS the cleaner cannot tell which of two Ray instances on
    # one machine is its own ("Found multiple active Ray instances") when another gradcon job runs beside.
    port = _free_port()
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    warning_filters = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), RAY_OWN_DEPRECATION]))
    with _loopback_node(), _environment({GCS_PORT_VARIABLE: str(port), ADDRESS_VARIABLE: f"127.0.0.1:{port}",
                                         "PYTHONWARNINGS": warning_filters}):
        ray.init(address="local", num_cpus=num_cpus or embedded_cpus(min_cpus), include_dashboard=True,
                 dashboard_host="127.0.0.1", **kwargs)
    _embedded = _Embedded([p for p in me.children() if p.pid not in before], start_reaper())
    atexit.unregister(stop_ray)
    atexit.register(stop_ray)  # runs before Ray's own atexit shutdown (registered earlier)


def size_torch_threads() -> None:
    """torch's threads as Ray sized this worker: OMP_NUM_THREADS, which Ray sets to a task's or an actor's CPUs. A
    worker that preloaded torch (PRELOAD) read the variable before Ray set it, and would run one thread per core:
    two scoring actors on 2 cores then scored at a fifth of their speed."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))


def stop_ray(grace_s: float = 10.0) -> None:
    """ray.shutdown(); for an embedded Ray, also wait until every process it started has exited (stopping
    those that linger), so that a command leaves nothing running when it returns."""
    global _embedded
    embedded, _embedded = _embedded, None
    started = descendants(embedded.processes) if embedded else []  # before the raylet's children are orphaned
    ray.shutdown()
    if embedded:
        stop(started, grace_s)
        embedded.reaper.communicate(DISMISS)  # Ray is stopped; this process's other children are its own affair


def check_shared_storage(storage: str, shared: bool) -> None:
    """A local storage path on a Ray cluster of more than one node: refused, unless every node mounts it.

    Ray Train writes each checkpoint from the worker that reports it, and a restarted worker, a resumed run
    or a score job on another node reads it there: on a path that is each node's own disk they miss it."""
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if nodes > 1 and not str(storage).startswith("s3://") and not shared:
        raise ValueError(f"storage={storage} is a local path, and this Ray cluster has {nodes} nodes: checkpoints "
                         "written on one node's disk are not on the others'. Use storage=s3://BUCKET/PREFIX, or, if "
                         "every node mounts that path (NFS), say so with shared_storage=true")


def data_context(verbose: bool = False) -> ray.data.DataContext:
    """This process's Ray Data settings, as every job here wants them (call before building a dataset).

    Ray 2.60's DataSourceV2 parquet reader starts a pool of 32 footer-reader actors (a Python process each)
    for every read; on a small cluster starting them costs far more than the read itself (a 2-worker train
    run of 160 rows on 2 cores: 138 s with it, 45 s with the classic reader). The classic reader does the
    same reads without the pool.

    Ray Data retries a read that fails with a storage error it deems transient at three nested levels (opening
    the file, reading its fragments, the read task), each up to 10 times with back-offs up to 32 s: with the
    S3 endpoint gone, a training run waited on its reads for hours instead of failing. An unreachable endpoint
    (NETWORK_CONNECTION: no connection could be made) is left to the S3 client's own retries (pyarrow's
    default: a few, within a second or two); throttling and 5xx answers, which a busy S3 does give, are still
    retried by Ray Data.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    # As regular expressions: Ray Data is retiring its substring matching.
    ctx.retried_io_errors = [re.escape(e) for e in DEFAULT_RETRIED_IO_ERRORS if "NETWORK_CONNECTION" not in e]
    data_logs(verbose)
    return ctx


def data_logs(verbose: bool = False) -> None:
    """Ray Data's INFO lines (read estimates, execution plans) and progress bars (parquet sampling, execution)
    off this process's console unless verbose: the jobs print their own progress. (Ray Data warns once per
    process that its bars are off: that line too.)"""
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
