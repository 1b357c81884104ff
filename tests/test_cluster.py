"""The embedded cluster of `opsd train` / `opsd eval`: stopped with the job, also when the job is killed (SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

CHILD = """
import os, sys, time
os.environ["RAY_AUTH_MODE"] = "disabled"
from orchestrator.cluster import ray_session
import psutil
with ray_session(None, num_cpus=1, dashboard=False) as session:
    print(session.where, *[p.pid for p in psutil.Process().children(recursive=True)], flush=True)
    time.sleep(300)
"""


def test_sigterm_shuts_the_embedded_cluster_down():
    import psutil

    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    try:
        line = child.stdout.readline().split()  # bounded by the test timeout; Ray starts in ~10 s
        assert line and line[0] == "embedded", line
        ray_pids = [int(pid) for pid in line[1:]]
        assert ray_pids  # gcs, raylet, agents: children of the driver
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(psutil.pid_exists(pid) and
                                                   psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                                                   for pid in ray_pids):
            time.sleep(0.5)
        alive = [pid for pid in ray_pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"Ray processes left behind: {alive}"
    finally:
        if child.poll() is None:
            child.kill()
