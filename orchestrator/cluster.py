"""Which Ray cluster a job runs on: the caller's, the one at an address, or an embedded one on 127.0.0.1.

``opsd train`` and ``opsd eval`` both run here. An embedded cluster keeps every Ray listener on 127.0.0.1:
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray reads once at import, so this module sets it before importing
``ray`` and the entrypoints import it before anything else that imports ``ray``. A job attached to a real cluster
(``RAY_ADDRESS`` set, as ``ray job submit`` does) keeps Ray's own default.
"""

from __future__ import annotations

import os

if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import signal  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Iterator  # noqa: E402

import ray  # noqa: E402


@dataclass(frozen=True)
class RaySession:
    where: str  # "existing", "embedded", or the cluster address
    dashboard: str | None  # the dashboard's URL when this call started or joined the cluster and Ray reported it


@contextmanager
def ray_session(address: str | None, *, num_cpus: int, dashboard: bool = True,
                log_to_driver: bool = True) -> Iterator[RaySession]:
    """The caller's Ray (``existing``: a test, a notebook), the cluster at ``address`` / ``RAY_ADDRESS``, or an
    embedded one (a local Ray on 127.0.0.1 with ``num_cpus`` logical CPUs; its dashboard on 127.0.0.1 when
    ``dashboard``). A cluster this call started or joined is left (shut down for an embedded one) on exit.
    ``log_to_driver`` False: the actors' output is not copied to this process's terminal."""
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        yield RaySession("existing", None)
        return
    if address:
        context = ray.init(address=address, log_to_driver=log_to_driver)
    else:
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                           dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=log_to_driver)
    url = getattr(context, "dashboard_url", None)
    previous = _exit_on_sigterm() if not address else None
    watchdog = _watchdog() if not address else None
    try:
        yield RaySession(address or "embedded", f"http://{url}" if url and "://" not in url else url)
    finally:
        ray.shutdown()
        if watchdog is not None:
            watchdog.kill()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# Run in its own session by the driver of an embedded cluster: when the driver dies without cleaning up (SIGKILL,
# the OOM killer), stop the cluster's processes, which would otherwise live on, holding memory and ports.
_WATCHDOG = """
import os, sys, time
import psutil
driver = psutil.Process(int(sys.argv[1]))
procs = []
while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
    try:  # the driver's descendants now: Ray's head processes, its agents, the workers they started
        procs = [p for p in driver.children(recursive=True) if p.pid != os.getpid()]
    except psutil.NoSuchProcess:
        break
    time.sleep(1.0)
for p in procs:
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
gone, alive = psutil.wait_procs(procs, timeout=10)
for p in alive:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
"""


def _watchdog():
    """A process that outlives the driver and stops the embedded cluster's processes when the driver dies."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _exit_on_sigterm():
    """Make SIGTERM (``kill``, a scheduler stopping the job) raise ``SystemExit`` in the main thread, so that the
    ``finally`` blocks run: actors stopped, the embedded cluster shut down. Python's default for SIGTERM is to die at
    once, which orphans the cluster's agent processes. Returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)
