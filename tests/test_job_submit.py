"""`ray job submit` of a training run to a local head that the test starts and stops itself.

The head listens on 127.0.0.1 only (dashboard and job server included); the job's working directory is this
repository, uploaded by Ray as it would be from a user's clone; the run writes to the test's temporary directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

from orchestrator.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_trains_on_a_local_head(tiny_model_dir, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # The job's `python` is this interpreter: the head (and so the job's driver) inherits this PATH.
    bin_dir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    port, run_dir = free_port(), tmp_path / "run"
    with local_ray(num_cpus=4, dashboard_port=port):
        address = f"http://127.0.0.1:{port}"
        command = [
            str(Path(bin_dir) / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT),
            "--submission-id", "opsd-test-job", "--",
            "python", "-m", "orchestrator.train", "--config", "recipes/tiny-cpu.yaml",
            f"model.path={tiny_model_dir}", f"data.path={DATA}", "data.limit=3", "train.prompts_per_step=1",
            "rollout.max_response_tokens=8", "rollout.cpu_threads_per_worker=1", f"train.run_dir={run_dir}",
        ]
        # The head's job agent comes up a few seconds after the head: Ray answers "No available agent" until then.
        deadline = time.monotonic() + 120
        while True:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
            if "No available agent" not in done.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        logs = done.stdout[-4000:] + done.stderr[-4000:]
        assert done.returncode == 0, logs
        status = JobSubmissionClient(address).get_job_status("opsd-test-job")
    assert status == JobStatus.SUCCEEDED, logs
    assert "step 3/3" in done.stdout  # the job's own output streams back to `ray job submit`
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert (run_dir / "adapters" / "v3" / "adapter_model.safetensors").is_file()
