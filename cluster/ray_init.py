"""Connect to a Ray cluster, or start an embedded local one (the laptop default)."""
from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """address (or RAY_ADDRESS) joins that cluster; neither starts a fresh local Ray for this process.

    Token authentication is left as Ray sets it; only the embedded instance takes num_cpus.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address)
    else:
        # The dashboard (on 127.0.0.1 only) serves the State API, which Ray Train's placement-group cleaner
        # needs: without it, every trial that Tune stops keeps its workers' CPUs and later trials' reads hang.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
