"""Security defaults: a local, token-protected embedded cluster whose token never leaks; remote code only when asked;
weights and adapters only as safetensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsd.errors import UserInputError
from opsd.model import ModelSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"

PROBE = r"""
import json, sys, urllib.error, urllib.request
import psutil
from orchestrator.cluster import ray_session
with ray_session(None, num_cpus=1, dashboard=True) as session:
    url = session.dashboard.rstrip("/") + "/api/version"
    def status(headers):
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30).status
        except urllib.error.HTTPError as e:
            return e.code
    token = open(sys.argv[1]).read().strip()
    listening = sorted({c.laddr.ip for p in psutil.Process().children(recursive=True)
                        for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
    print(json.dumps({"dashboard": session.dashboard, "without": status({}),
                      "with": status({"Authorization": f"Bearer {token}"}), "listening": listening}))
"""


@pytest.fixture
def ray_tmp():
    """Ray's temp dir for the test: short (its socket paths must stay under 108 bytes), removed after."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="opsd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def isolated_env(tmp_path: Path, ray_tmp: Path) -> dict[str, str]:
    """A home and a Ray temp dir of the test's own (the token file goes there), loopback only, token auth as the
    product leaves it (not turned off as the other tests do)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=str(ray_tmp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(REPO_ROOT))
    (tmp_path / "home").mkdir()
    return env


@pytest.mark.slow
def test_embedded_cluster_listens_on_loopback_and_its_dashboard_needs_the_token(tmp_path, ray_tmp):
    env = isolated_env(tmp_path, ray_tmp)
    token_file = tmp_path / "home" / ".ray" / "auth_token"
    script = PROBE.replace("open(sys.argv[1])", f"open({str(token_file)!r})")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["dashboard"].startswith("http://127.0.0.1:")
    assert seen["without"] == 401 and seen["with"] == 200
    assert seen["listening"] and set(seen["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, seen["listening"]


@pytest.mark.slow
def test_the_token_never_appears_in_logs_metrics_or_run_files(tmp_path, ray_tmp, tiny_model_dir):
    env = isolated_env(tmp_path, ray_tmp)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "train", "--config", str(REPO_ROOT / "recipes" / "tiny-cpu.yaml"),
         f"model.path={tiny_model_dir}", f"data.path={DATA}", "data.limit=null", "train.steps=2",
         "train.prompts_per_step=1", "rollout.max_response_tokens=4", "rollout.cpu_threads_per_worker=1",
         "train.checkpoint_every=1", f"train.run_dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    token = (tmp_path / "home" / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 16  # the run had token auth on
    leaks = [str(p) for root in (run_dir, ray_tmp) for p in root.rglob("*")
             if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert token not in done.stdout and token not in done.stderr
    assert (run_dir / "metrics.jsonl").is_file() and list((run_dir / "checkpoints").iterdir())
    # A quiet console: the driver prints its plan, progress and summary; each actor's output has a file of its own.
    logs = {p.name: p.read_text() for p in (run_dir / "logs").iterdir()}
    assert set(logs) == {"rollout-0.log", "teacher-0.log", "learner-0.log"}
    assert "Loading safetensors checkpoint shards" in logs["rollout-0.log"]  # vLLM's own output went there
    terminal = done.stdout + done.stderr
    assert "pid=" not in terminal and "Loading safetensors" not in terminal and "Loading weights" not in terminal
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and "ETA" in steps[0]


def test_remote_code_runs_only_when_the_user_turns_it_on(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "custom_config.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import Qwen3Config\n"
        "class CustomConfig(Qwen3Config):\n    model_type = 'opsd-custom'\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="opsd-custom", auto_map={"AutoConfig": "custom_config.CustomConfig"})
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="model.path.*custom.*cannot load a model config"):
        ModelSpec(str(model)).check()
    assert not marker.exists()  # nothing of the model repository ran
    ModelSpec(str(model), trust_remote_code=True).load_config()
    assert marker.exists()  # and it runs when asked


def test_weights_and_adapters_only_as_safetensors(tmp_path, tiny_model_dir):
    import shutil

    import torch

    from opsd.adapter import AdapterError, read_adapter_dir

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model.bin")
    with pytest.raises(UserInputError, match=r"no safetensors weights \(only pytorch_model.bin: pickle files"):
        ModelSpec(str(model)).check()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    torch.save({"w": torch.zeros(1)}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match=f"{adapter}.*adapter_model.safetensors"):
        read_adapter_dir(adapter, version=1)
