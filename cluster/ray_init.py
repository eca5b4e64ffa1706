"""Connect to a Ray cluster, or start an embedded local one (the laptop default)."""
from __future__ import annotations

import os
import socket
from typing import Any

import ray

ADDRESS_VARIABLE = "RAY_ADDRESS"
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """address (or RAY_ADDRESS) joins that cluster; neither starts a fresh local Ray for this process.

    Token authentication is left as Ray sets it; only the embedded instance takes num_cpus and kwargs
    (ray.init's, e.g. object_store_memory).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get(ADDRESS_VARIABLE)
    if address and address != "local":
        ray.init(address=address)
        return
    # The embedded instance's GCS port is chosen here and its address put in the environment its processes
    # inherit. Ray Train's placement-group cleaner asks the State API (served by the dashboard, on 127.0.0.1
    # only) whether a stopped run's controller is gone; without the dashboard every trial that Tune stops
    # keeps its workers' CPUs, and without RAY_ADDRESS the cleaner cannot tell which of two Ray instances on
    # one machine is its own ("Found multiple active Ray instances") when another gradcon job runs beside.
    port = _free_port()
    saved = {k: os.environ.get(k) for k in (ADDRESS_VARIABLE, GCS_PORT_VARIABLE)}
    os.environ[GCS_PORT_VARIABLE] = str(port)
    os.environ[ADDRESS_VARIABLE] = f"127.0.0.1:{port}"  # ignored by ray.init(address="local") itself
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", **kwargs)
    finally:  # this process's later init_ray calls must not join a cluster that has since stopped
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def data_context() -> ray.data.DataContext:
    """This process's Ray Data settings, as every job here wants them (call before building a dataset).

    Ray 2.60's DataSourceV2 parquet reader starts a pool of 32 footer-reader actors (a Python process each)
    for every read; on a small cluster starting them costs far more than the read itself (a 2-worker train
    run of 160 rows on 2 cores: 138 s with it, 45 s with the classic reader). The classic reader does the
    same reads without the pool.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    return ctx
