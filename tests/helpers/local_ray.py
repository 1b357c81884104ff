"""An embedded single-node Ray cluster for tests: loopback only, token auth off, always shut down.

Two Ray settings must be explicit here:

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every listener on 127.0.0.1. Ray reads it once, when ``ray`` is
  first imported, so this module sets it at import time: import it before anything that imports ``ray``.
* ``RAY_AUTH_MODE=disabled``: otherwise ``ray.init()`` turns token auth on and writes ``~/.ray/auth_token``, which
  later clusters of the same user then pick up. Set while the cluster starts, restored after shutdown.

Never ``ray stop``: it kills every Ray process of the user on the machine.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextmanager
def local_ray(num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None,
              dashboard_port: int | None = None) -> Iterator[None]:
    """``num_gpus``: fake GPUs for placement tests (Ray assigns their ids and ``CUDA_VISIBLE_DEVICES`` per actor;
    nothing runs on them). ``resources``: extra custom resources. ``dashboard_port``: start the dashboard (and its
    job server) on 127.0.0.1 at that port; None: no dashboard."""
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set, so its listeners would bind to "
            "every interface; import tests/helpers/local_ray.py before anything that imports ray"
        )
    if ray.is_initialized():
        raise RuntimeError("a Ray cluster is already initialised in this process")
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, include_dashboard=dashboard_port is not None,
                 dashboard_host="127.0.0.1", dashboard_port=dashboard_port, _node_ip_address="127.0.0.1")
        yield
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous
