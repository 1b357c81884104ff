"""Faults a user makes before anything runs: every config key given a bad value, unknown keys, bad override syntax,
a model or tokenizer that cannot load. Each is one line on stderr naming the key or path, exit code 2, no traceback.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from opsd.configlib import describe
from orchestrator.cli import main
from orchestrator.config import OPSDConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"
KEYS = describe(OPSDConfig)
BASE = [f"data.path={DATA}"]


def wrong_type_value(type_text: str) -> str:
    """An override value (YAML) that no key of this type accepts."""
    if type_text.startswith(("list", "tuple")) or "list[" in type_text:
        return "{a: 1}"  # a mapping where a list is expected
    if type_text.startswith("dict"):
        return "[1, 2]"
    if "bool" in type_text:
        return "maybe"
    if "int" in type_text or "float" in type_text:
        return "many"
    if "'" in type_text:  # a Literal
        return "no-such-choice"
    return "[1, 2]"  # a list where text is expected


def run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_naming(code: int, err: str, name: str) -> None:
    assert code == 2, err
    assert err.startswith("opsd: error: ") and err.count("\n") == 1, err
    assert name in err, err
    assert "Traceback" not in err


def test_the_generated_list_covers_every_key():
    assert len(KEYS) >= 90 and len({k.key for k in KEYS}) == len(KEYS)


@pytest.mark.parametrize("field", KEYS, ids=lambda f: f.key)
def test_every_key_refuses_a_wrong_type_in_one_line(capsys, field):
    if field.key == "data.path":
        pytest.skip("the data path is text: any YAML scalar is a path (a missing file is refused when it loads)")
    code, err = run(capsys, ["config", "show", *BASE, f"{field.key}={wrong_type_value(field.type)}"])
    assert_one_line_naming(code, err, field.key)


NUMERIC = [f for f in KEYS if ("int" in f.type or "float" in f.type) and "list" not in f.type]


@pytest.mark.parametrize("field", NUMERIC, ids=lambda f: f.key)
@pytest.mark.parametrize("value", ["-1000000", "1e30"])
def test_out_of_range_numbers_are_refused_naming_the_key_or_accepted(capsys, field, value):
    code, err = run(capsys, ["config", "show", *BASE, f"{field.key}={value}"])
    if code != 0:
        assert_one_line_naming(code, err, field.key)


@pytest.mark.parametrize("section", sorted({k.key.split(".")[0] for k in KEYS}))
def test_unknown_keys_in_every_section(capsys, section):
    code, err = run(capsys, ["config", "show", *BASE, f"{section}.no_such_key=1"])
    assert_one_line_naming(code, err, f"{section}.no_such_key")


@pytest.mark.parametrize("override", ["learner.lora.rank", "=5", "learner..rank=8", "learner.lora.rank=[1,"])
def test_bad_override_syntax(capsys, override):
    code, err = run(capsys, ["config", "show", *BASE, override])
    assert code == 2 and err.startswith("opsd: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("override, named", [
    ("model.path=/no/such/model", "/no/such/model"),
    ("model.path=no-such-owner/no-such-model", "no-such-owner/no-such-model"),
])
def test_a_model_that_cannot_load_fails_before_any_work(capsys, tmp_path, override, named):
    run_dir = tmp_path / "run"
    code, err = run(capsys, ["train", "--config", str(REPO_ROOT / "recipes" / "tiny-cpu.yaml"), *BASE,
                             f"train.run_dir={run_dir}", override])
    assert_one_line_naming(code, err, named)
    assert not run_dir.exists()  # nothing written, no cluster started


def test_a_tokenizer_that_cannot_load_fails_before_any_work(capsys, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    code, err = run(capsys, ["train", "--config", str(REPO_ROOT / "recipes" / "tiny-cpu.yaml"), *BASE,
                             f"model.path={tiny_model_dir}", "model.tokenizer=/no/such/tokenizer",
                             f"train.run_dir={run_dir}"])
    assert_one_line_naming(code, err, "/no/such/tokenizer")
    assert not run_dir.exists()


# -- faults while running --------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (a real filesystem that fills up); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    """Take all of the disk's free space but ``leave_bytes``."""
    import shutil

    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        remaining = free - leave_bytes
        while remaining > 0:
            f.write(chunk[: min(len(chunk), remaining)])
            remaining -= len(chunk)
        f.flush()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "warn"])
def test_a_full_disk_while_saving_keeps_the_last_checkpoint(small_disk, tmp_path, tiny_model_dir, policy):
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from local_ray import local_ray

    from orchestrator import checkpoints
    from orchestrator.checkpoints import CheckpointWriteError
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.train import train

    run_dir = small_disk / "run"
    cfg = load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", [
        f"model.path={tiny_model_dir}", f"data.path={DATA}", "data.limit=null", "train.steps=3",
        "train.prompts_per_step=1", "rollout.max_response_tokens=4", "rollout.cpu_threads_per_worker=1",
        "train.checkpoint_every=1", f"train.run_dir={run_dir}", f"train.checkpoint_failure={policy}"])
    lines: list[str] = []

    def print_fn(line: str) -> None:
        lines.append(line)
        if line.startswith("step 2/"):  # step 2 recorded, its adapter and checkpoint not yet written: disk full
            fill(small_disk, leave_bytes=64 << 10)  # room for metrics lines, not for an adapter or a checkpoint

    with local_ray(num_cpus=4):
        if policy == "stop":
            with pytest.raises(CheckpointWriteError) as error:
                train(cfg, print_fn=print_fn)
            message = str(error.value)
            assert f"could not write {run_dir}" in message and "free there" in message
            assert "the last checkpoint took" in message and "previous checkpoints are intact" in message
        else:
            train(cfg, print_fn=print_fn)
            assert any("warning: could not write" in line and "the run goes on" in line for line in lines)
            assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert checkpoints.checkpoint_steps(run_dir) == [1]  # steps 2 (and 3) could not be saved; step 1 is intact
    for step in checkpoints.checkpoint_steps(run_dir):
        assert checkpoints.verify(checkpoints.checkpoint_dir(run_dir, step)) is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written dir
    if policy == "stop":  # and the run resumes from what was kept, elsewhere
        elsewhere = tmp_path / "moved"
        shutil.copytree(run_dir, elsewhere)
        with local_ray(num_cpus=4):
            train(load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", [
                f"model.path={tiny_model_dir}", f"data.path={DATA}", "data.limit=null", "train.steps=3",
                "train.prompts_per_step=1", "rollout.max_response_tokens=4", "rollout.cpu_threads_per_worker=1",
                "train.checkpoint_every=1", f"train.run_dir={elsewhere}", "train.resume=latest"]),
                print_fn=lines.append)
        assert [r["step"] for r in read_metrics(elsewhere)] == [1, 2, 3]


@pytest.mark.slow
def test_an_adapter_one_rollout_worker_fails_to_load_never_mixes_policy_versions(tiny_model_dir, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from local_ray import local_ray

    from opsd.adapter import AdapterError
    from opsd.model import ModelSpec
    from rollout.pool import RolloutPool

    adapter, problems, config = two_worker_setup(tiny_model_dir, tmp_path, max_response_tokens=4)
    with local_ray(num_cpus=2):
        log: list[str] = []
        pool = RolloutPool(ModelSpec(str(tiny_model_dir)), config, max_lora_rank=8, call_timeout_s=300,
                           log=log.append)
        try:
            # A bad adapter: every worker refuses it and keeps serving the base model.
            bad = type(adapter)(version=1, weights=adapter.weights, config={**adapter.config, "r": 16})
            with pytest.raises(AdapterError):
                pool.load_adapter(bad)
            assert pool.version == 0 and [i.policy_version for i in pool.infos()] == [0, 0]

            def broken_switch(self):  # worker 1's engine fails to take any new weights
                def fail(version, serve):
                    raise RuntimeError("injected: the engine refused the weights")
                self._switch = fail

            import ray

            ray.get(pool.actors[1].__ray_call__.remote(broken_switch), timeout=60)
            pool.load_adapter(adapter)  # worker 0 loads it, worker 1 fails: replaced by a fresh worker that loads it
            assert pool.replaced == 1 and any("rollout worker 1 failed to load adapter v1" in line for line in log)
            assert [i.policy_version for i in pool.infos()] == [1, 1]
            rollouts = pool.collect(pool.launch(problems))
            assert set(rollouts.summary.policy_versions) == {1}  # no batch ever sampled with two versions
        finally:
            pool.shutdown()


def wait_for(condition, timeout_s: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def records_of(run_dir: Path) -> list[dict]:
    from orchestrator.metrics import read_metrics

    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def train_args(model_dir: Path, run_dir: Path, *more: str) -> list[str]:
    return ["--config", str(REPO_ROOT / "recipes" / "tiny-cpu.yaml"), f"model.path={model_dir}", f"data.path={DATA}",
            "data.limit=null", "train.prompts_per_step=1", "rollout.max_response_tokens=8",
            "rollout.cpu_threads_per_worker=1", "train.checkpoint_every=1", "learner.optim.lr=5e-3",
            f"train.run_dir={run_dir}", *more]


@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_with_the_same_rows_and_losses(tiny_model_dir, tmp_path):
    """SIGKILL (no cleanup at all) after a checkpoint; the embedded cluster dies with its driver; train.resume=latest
    then trains exactly what an uninterrupted run trains."""
    import os
    import signal
    import sys

    import psutil

    from orchestrator import checkpoints

    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO_ROOT)}
    straight = tmp_path / "straight"
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", *train_args(tiny_model_dir, straight)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train",
                               *train_args(tiny_model_dir, killed)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: 2 in checkpoints.checkpoint_steps(killed), 300, "the step-2 checkpoint")
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    wait_for(lambda: not [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 60,
             "the embedded cluster to die with its driver")

    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train",
                           *train_args(tiny_model_dir, killed, "train.resume=latest")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    resumed, reference = records_of(killed), records_of(straight)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]  # every step once
    for a, b in zip(resumed, reference):
        assert a["sample_ids"] == b["sample_ids"] and a["policy_versions"] == b["policy_versions"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_ray_job_stop_mid_step_ends_stopped_leaves_nothing_and_the_checkpoint_resumes(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    import os
    import socket
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from local_ray import local_ray

    from orchestrator import checkpoints
    from orchestrator.config import load_config
    from orchestrator.train import train

    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    with local_ray(num_cpus=4, dashboard_port=port):
        import ray
        from ray.util.state import list_actors, list_placement_groups

        client = JobSubmissionClient(f"http://127.0.0.1:{port}")
        entrypoint = " ".join(["python", "-m", "orchestrator.train",
                               *train_args(tiny_model_dir, run_dir, "train.steps=50")])
        deadline = time.monotonic() + 120
        while True:  # the job agent comes up a few seconds after the head
            try:
                job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO_ROOT)})
                break
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        wait_for(lambda: 2 in checkpoints.checkpoint_steps(run_dir), 300, "the step-2 checkpoint")
        stopped_at = time.monotonic()
        client.stop_job(job)
        wait_for(lambda: client.get_job_status(job) == JobStatus.STOPPED, 60, "the job to end STOPPED")
        assert time.monotonic() - stopped_at < 60
        wait_for(lambda: not [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                              if a.class_name in ("RolloutWorker", "TeacherScorer", "LearnerRank")], 60,
                 "the job's actors to be gone")
        assert not [g for g in list_placement_groups() if g.state == "CREATED"]
        steps = checkpoints.checkpoint_steps(run_dir)
        assert steps and all(checkpoints.verify(checkpoints.checkpoint_dir(run_dir, s)) is None for s in steps)
        last = steps[-1]
        lines: list[str] = []
        overrides = train_args(tiny_model_dir, run_dir, f"train.steps={last + 1}", "train.resume=latest")[2:]
        train(load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", overrides), print_fn=lines.append)
        assert any("resumed from" in line and f"step-{last}" in line for line in lines)
        assert ray.is_initialized()
    assert records_of(run_dir)[-1]["step"] == last + 1


@pytest.mark.slow
def test_a_learner_rank_killed_mid_run_is_rebuilt_and_the_run_ends_as_if_nothing_happened(tiny_model_dir, tmp_path):
    import os
    import signal
    import sys

    import psutil
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from local_ray import local_ray

    from orchestrator.config import load_config
    from orchestrator.train import train

    def config(run_dir: Path):
        return load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", train_args(tiny_model_dir, run_dir, "train.steps=4")
                           [2:] + ["train.checkpoint_every=2"])

    killed: list[int] = []

    def kill_a_learner_rank(line: str) -> None:
        lines.append(line)
        if line.startswith("step 3/") and not killed:  # step 4 will find its learner dead
            for process in psutil.process_iter(["cmdline"]):
                if "LearnerRank" in " ".join(process.info["cmdline"] or []):
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(process.pid)

    lines: list[str] = []
    with local_ray(num_cpus=4):
        train(config(tmp_path / "straight"), print_fn=lambda line: None)
        train(config(tmp_path / "killed"), print_fn=kill_a_learner_rank)
    assert killed
    assert any("a learner rank died" in line and "continues from step 2" in line for line in lines)
    straight, again = records_of(tmp_path / "straight"), records_of(tmp_path / "killed")
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # one record per step
    assert again[-1]["learner_restarts"] == 1
    for a, b in zip(again, straight):
        assert a["sample_ids"] == b["sample_ids"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-12)
    final = {name: load_file(tmp_path / name / "adapters" / "v4" / "adapter_model.safetensors")
             for name in ("straight", "killed")}
    for key, tensor in final["straight"].items():
        torch_close(final["killed"][key], tensor, atol=1e-6)


def torch_close(a, b, atol: float) -> None:
    import torch

    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.slow
def test_a_shard_redone_after_a_push_is_sampled_on_its_batchs_version(tiny_model_dir, tmp_path):
    """max_staleness 1: a batch launched on adapter n, then adapter n+1 pushed, then a worker dies: its shard is
    redone on version n, like the rest of the batch, and the fresh worker serves n+1 afterwards."""
    import sys

    import ray

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from local_ray import local_ray

    from opsd.model import ModelSpec
    from rollout.pool import RolloutPool

    adapter, problems, config = two_worker_setup(tiny_model_dir, tmp_path, max_response_tokens=32)
    with local_ray(num_cpus=2):
        pool = RolloutPool(ModelSpec(str(tiny_model_dir)), config, max_lora_rank=8, call_timeout_s=300,
                           log=lambda line: None)
        try:
            batch = pool.launch(problems)  # on the base model, v0
            ray.kill(pool.actors[1])  # dies while its shard samples
            pool.load_adapter(adapter)  # v1 pushed (the dead worker's replacement loads it) before the collect
            rollouts = pool.collect(batch)
            assert pool.replaced == 2 and set(rollouts.summary.policy_versions) == {0}
            after = pool.collect(pool.launch(problems))
            assert set(after.summary.policy_versions) == {1}
        finally:
            pool.shutdown()


@pytest.mark.slow
def test_an_error_raised_in_an_actor_reaches_the_terminal_with_its_message(tiny_model_dir, tmp_path, capsys):
    """The actors' output goes to RUN_DIR/logs, but an error they raise still ends the run with its own message."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from local_ray import local_ray

    with local_ray(num_cpus=4):
        code = main(["train", *train_args(tiny_model_dir, tmp_path / "run", "rollout.max_model_len=64")])
    # (The test's own cluster copies its workers' logs to this terminal too: look for the CLI's line.)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("opsd: error: ")]
    assert code == 2 and len(errors) == 1 and "student prompt(s) too long for the rollout engine" in errors[0]


def two_worker_setup(model_dir: Path, tmp_path: Path, max_response_tokens: int):
    """A rank-8 adapter (version 1), four GSM8K problems, and a config of two one-core CPU rollout engines."""
    import sys

    import pyarrow as pa

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from rollout_reference import make_lora_adapter

    from opsd.adapter import read_adapter_dir
    from opsd.data import load_problems
    from opsd.schema import PROBLEM_SCHEMA, sample_id
    from rollout.config import RolloutConfig

    adapter = read_adapter_dir(make_lora_adapter(model_dir, tmp_path / "v1", rank=8, seed=1), version=1)
    rows, _ = load_problems(DATA, "gsm8k")
    problems = pa.table({"sample_id": [sample_id(r, 0, 0) for r in rows.column("id").to_pylist()[:4]],
                         "problem": rows.column("problem").to_pylist()[:4], "solution": [None] * 4,
                         "answer": [None] * 4}, schema=PROBLEM_SCHEMA)
    config = RolloutConfig(num_workers=2, gpus_per_worker=0, cpu_threads_per_worker=1, cpu_kv_cache_gib=0.25,
                           max_model_len=512, max_response_tokens=max_response_tokens, temperature=1.0)
    return adapter, problems, config
