"""Experiment tracking (orchestrator/tracking.py): a fake run (a config, step records with NaN, list and string
fields, a summary, the curves) through each backend, read back with the backend's own library: TensorBoard's event
reader, the MLflow client, W&B's offline run file decoded with W&B's own protobuf records. No Ray, no network.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from opsd.configlib import ConfigError, to_dict
from orchestrator.config import OPSDConfig, load_config
from orchestrator.metrics import MetricsSink
from orchestrator.tracking import Trackers, scalars, wandb_mode

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"
LONG_PATH = "data/" + "x" * 7000 + ".jsonl"  # a config value over MLflow's 6000-character limit for a param


def config(run_dir: Path, *overrides: str) -> OPSDConfig:
    return load_config(None, [f"data.path={LONG_PATH}", f"train.run_dir={run_dir}", "learner.optim.lr=3e-4",
                              *overrides])


def step_record(step: int) -> dict:
    record = {"step": step, "epoch": 0, "loss": 1.0 / step, "gjs": float("nan") if step == 2 else 0.1 * step,
              "skipped": step == 2, "skip_reason": "nan teacher" if step == 2 else None,
              "sample_ids": [f"gsm8k-{step}@e0r0"], "policy_versions": [step - 1],
              "step_seconds": 2.0, "stage_seconds/rollout": 1.0, "tokens_per_second/rollout": 100.0 * step,
              "student_accuracy": float("inf") if step == 1 else 0.5}
    if step == 2:
        record["eval/gsm8k/avg@2"] = 0.75
    if step == 3:
        record["heldout_gjs"] = 0.2
    return record


def fake_run(cfg: OPSDConfig, fail: bool = False) -> Path:
    """What train() does with its trackers, without Ray: three steps, an evaluation before and at step 2, the
    held-out GJS before and at the end, then summary.json and the curves."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sink = MetricsSink(run_dir, export_to_ray=False)
    with Trackers(cfg) as trackers:
        trackers.log_metrics(0, {"heldout_gjs": 0.4, "eval/gsm8k/avg@2": 0.25})
        for step in (1, 2, 3):
            sink.record(step_record(step))
            trackers.log_metrics(step, step_record(step))
            if fail and step == 2:
                raise RuntimeError("a stage died")
        sink.close()
        summary = {"steps": 3, "heldout_gjs": {"0": 0.4, "3": 0.2}, "tokens_per_second": {"rollout": 230.0}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        trackers.finish(summary)
    return run_dir


@pytest.fixture(autouse=True)
def no_credentials(tmp_path, monkeypatch):
    """No W&B key, no MLflow server, a HOME of the test's own: the machine's settings never leak in."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    (tmp_path / "home").mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def all_backends(tmp_path_factory) -> tuple[OPSDConfig, Path]:
    """One fake run logged to all three backends (W&B offline: no key is configured)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "MLFLOW_TRACKING_URI"):
            mp.delenv(name, raising=False)
        mp.setenv("HOME", str(home))
        mp.setenv("NETRC", str(home / ".netrc"))
        cfg = config(tmp_path_factory.mktemp("runs") / "run-a", "tracking.backends=[tensorboard,wandb,mlflow]")
        return cfg, fake_run(cfg)


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard


def event_reader(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    reader.Reload()
    return reader


def tb_series(reader, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value)) for e in reader.Scalars(tag)]


def test_tensorboard_has_every_finite_number_per_step_the_config_as_hparams_and_the_curves(all_backends):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    cfg, run_dir = all_backends
    reader = event_reader(run_dir)
    assert tb_series(reader, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert tb_series(reader, "gjs") == [(1, 0.1), (3, 0.3)]  # NaN at step 2: no point
    assert tb_series(reader, "student_accuracy") == [(2, 0.5), (3, 0.5)]  # inf at step 1: no point
    assert tb_series(reader, "skipped") == [(1, 0.0), (2, 1.0), (3, 0.0)]
    assert tb_series(reader, "heldout_gjs") == [(0, 0.4), (3, 0.2)]  # before training, then as recorded
    assert tb_series(reader, "eval/gsm8k/avg@2") == [(0, 0.25), (2, 0.75)]
    assert tb_series(reader, "run/tokens_per_second/rollout") == [(3, 230.0)]
    tags = set(reader.Tags()["scalars"])
    assert not tags & {"step", "sample_ids", "policy_versions", "skip_reason"}

    content = reader.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert set(start) == set(_flat(to_dict(cfg)))  # every key of the config
    assert start["learner.optim.lr"].number_value == pytest.approx(3e-4)
    assert start["data.path"].string_value == LONG_PATH
    assert json.loads(start["learner.lora.target_modules"].string_value) == cfg.learner.lora.target_modules
    assert "_hparams_/session_end_info" in content  # the run completed

    (image,) = reader.Images("curves")
    from PIL import Image

    with Image.open(run_dir / "curves.png") as png:
        assert (image.step, image.width, image.height) == (3, *png.size)
    assert "summary.json/text_summary" in reader.Tags()["tensors"]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# MLflow


def mlflow_run(uri: str, experiment: str = "opsd"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_mlflow_local_store_has_the_params_the_metric_history_per_step_and_the_artifacts(all_backends, tmp_path):
    cfg, run_dir = all_backends
    client, run = mlflow_run(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    params = run.data.params
    assert len(params) == len(_flat(to_dict(cfg)))
    assert float(params["learner.optim.lr"]) == pytest.approx(3e-4)
    assert params["data.path"] == LONG_PATH[:6000]  # cut at MLflow's limit ...
    assert json.loads(params["learner.lora.target_modules"]) == cfg.learner.lora.target_modules

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, pytest.approx(m.value)) for m in client.get_metric_history(run.info.run_id, key))

    assert history("loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert history("gjs") == [(1, 0.1), (3, 0.3)]
    assert history("heldout_gjs") == [(0, 0.4), (3, 0.2)]
    assert history("eval/gsm8k/avg_at_2") == [(0, 0.25), (2, 0.75)]  # MLflow refuses '@' in a name
    assert history("run/tokens_per_second/rollout") == [(3, 230.0)]
    assert not set(run.data.metrics) & {"step", "sample_ids", "skip_reason"}

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "curves.png", "summary.json"}
    assert str(run_dir / "mlartifacts") in run.info.artifact_uri  # the run directory's own store
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(local).read_text())["data"]["path"] == LONG_PATH  # ... and whole in config.yaml
    assert (Path(client.download_artifacts(run.info.run_id, "curves.png", str(tmp_path))).read_bytes()
            == (run_dir / "curves.png").read_bytes())


def test_mlflow_uses_the_tracking_uri_when_one_is_set_and_every_backend_marks_a_failed_run(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)  # a SQLite URI without a server keeps artifacts in ./mlruns, MLflow's default
    cfg = config(tmp_path / "run-b", "tracking.backends=[mlflow,tensorboard,wandb]", "tracking.project=opsd-tests",
                 "tracking.run_name=attempt-1")
    with pytest.raises(RuntimeError, match="a stage died"):
        fake_run(cfg, fail=True)
    client, run = mlflow_run(store, "opsd-tests")
    assert run.info.run_name == "attempt-1" and run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert not (tmp_path / "run-b" / "mlflow.db").exists()
    content = event_reader(tmp_path / "run-b").PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content and "_hparams_/session_end_info" not in content
    (exit_record,) = [r.exit for r in wandb_records(tmp_path / "run-b") if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1


# ---------------------------------------------------------------------------------------------------------------
# W&B


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline file, decoded with W&B's own protobuf classes. The file is a LevelDB-style
    log: a 7-byte header, then 32 KiB blocks of chunks, each a 7-byte header (CRC-32 of type and data, length,
    type: 1 full, 2 first, 3 middle, 4 last) and its data."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pending, pos = pending + chunk, pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_run_has_the_config_every_number_per_step_and_the_curves(all_backends):
    cfg, run_dir = all_backends
    records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("opsd", "run-a")
    settings = {}
    for record in records:
        items = (record.run.config.update if record.WhichOneof("record_type") == "run"
                 else record.config.update if record.WhichOneof("record_type") == "config" else ())
        settings.update({item.key: json.loads(item.value_json) for item in items})
    settings.pop("_wandb", None)
    assert settings == _flat(to_dict(cfg))

    history: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = history.setdefault(record.history.step.num, {})
            row.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                        for item in record.history.item})
    assert sorted(history) == [0, 1, 2, 3]
    assert [history[s]["loss"] for s in (1, 2, 3)] == pytest.approx([1.0, 0.5, 1 / 3])
    assert "gjs" not in history[2] and history[3]["gjs"] == pytest.approx(0.3)
    assert history[0]["heldout_gjs"] == 0.4 and history[2]["eval/gsm8k/avg@2"] == 0.75
    assert history[3]["run/tokens_per_second/rollout"] == 230.0
    assert not {"sample_ids", "skip_reason", "step"} & set().union(*history.values())
    files = next((run_dir / "wandb").glob("offline-run-*/files"))
    assert (files / history[3]["curves/path"]).read_bytes() == (run_dir / "curves.png").read_bytes()
    assert json.loads((files / "summary.json").read_text())["steps"] == 3
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def test_wandb_goes_online_only_with_a_key_and_respects_wandb_mode(tmp_path, monkeypatch):
    assert wandb_mode() == "offline"  # no key anywhere
    from urllib.parse import urlparse

    from wandb.sdk import wandb_setup

    host = urlparse(wandb_setup.singleton().settings.base_url).netloc
    (tmp_path / "home" / ".netrc").write_text(f"machine {host}\n  login user\n  password {'a1' * 20}\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"  # `wandb login` wrote a key
    (tmp_path / "home" / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b2" * 20)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"  # the user's choice stands


def test_wandb_never_prints_or_writes_the_api_key(tmp_path, monkeypatch, capfd):
    secret = "local-" + "c3" * 20
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key, but no network here
    run_dir = fake_run(config(tmp_path / "run-c", "tracking.backends=[wandb]"))
    out, err = capfd.readouterr()
    assert "offline" in err  # W&B said where the run is
    assert secret not in out + err
    assert wandb_records(run_dir)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
            assert secret[6:].encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------------------------
# Packages, config, records


@pytest.mark.parametrize("backend, package", [
    ("tensorboard", "tensorboard"),
    ("wandb", "wandb"),
    ("mlflow", "mlflow"),
    ("mlflow", "sqlalchemy"),  # the local store's database
])
def test_a_chosen_backend_without_its_package_fails_in_one_line_naming_it(tmp_path, monkeypatch, backend, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    cfg = config(tmp_path / "run", f"tracking.backends=[{backend}]")
    with pytest.raises(ConfigError) as info:
        Trackers(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("tracking.backends: ")
    assert f"'{backend}' needs the Python package '{package}'" in message
    assert "pip install 'opsd[tracking]'" in message
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_mlflow_with_a_server_does_not_need_the_local_store_packages(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    Trackers(config(tmp_path / "run", "tracking.backends=[mlflow]",
                    "tracking.mlflow_tracking_uri=http://mlflow.example:5000"))  # checked only, not started


def test_train_fails_on_a_missing_package_before_ray_starts(tmp_path, monkeypatch, tiny_model_dir):
    import ray

    from orchestrator.train import train

    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = config(tmp_path / "run", f"data.path={DATA}", "data.mapping=gsm8k", "tracking.backends=[tensorboard,wandb]",
                 f"model.path={tiny_model_dir}")
    with pytest.raises(ConfigError, match=r"'wandb' needs the Python package 'wandb'"):
        train(cfg, print_fn=lambda line: None)
    assert not ray.is_initialized()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]  # no tracker started


def test_tracking_section_validates(tmp_path):
    cfg = config(tmp_path / "runs" / "exp-7", "tracking.backends=[tensorboard]")
    assert Trackers(cfg).name == "exp-7"  # run_name None: the run directory's name
    assert config(tmp_path, "tracking.run_name=lr-sweep-3").tracking.run_name == "lr-sweep-3"
    assert config(tmp_path).tracking.backends == []
    bad = {
        "tracking.backends=[tensorbord]": "tracking.backends[0]: must be one of 'tensorboard', 'wandb', 'mlflow'; "
                                          "got 'tensorbord' (str); did you mean 'tensorboard'?",
        "tracking.backends=[wandb,wandb]": "tracking.backends[1]: 'wandb' is listed twice",
        "tracking.backends=wandb": "tracking.backends: expected list[",
        "tracking.project=": "tracking.project: must not be empty",
        "tracking.run_name=": "tracking.run_name: must be a name or null",
        "tracking.mlflow_tracking_uri=": "tracking.mlflow_tracking_uri: must be a URI or null",
        "tracking.wandb_project=x": "tracking.wandb_project: unknown key",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError) as info:
            config(tmp_path, override)
        assert message in str(info.value), str(info.value)


def test_scalars_keeps_finite_numbers_only():
    record = step_record(2) | {"student_graded": 3, "note": "x", "nothing": None, "minus_inf": float("-inf")}
    assert scalars(record) == {"epoch": 0.0, "loss": 0.5, "skipped": 1.0, "step_seconds": 2.0,
                               "stage_seconds/rollout": 1.0, "tokens_per_second/rollout": 200.0,
                               "student_accuracy": 0.5, "eval/gsm8k/avg@2": 0.75, "student_graded": 3.0}


def test_no_backend_writes_nothing_and_needs_no_package(tmp_path, monkeypatch):
    for package in ("tensorboard", "wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, package, None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Trackers(config(run_dir)) as trackers:
        trackers.log_metrics(1, step_record(1))
        trackers.finish({"steps": 1, "tokens_per_second": {}})
    assert list(run_dir.iterdir()) == []  # not even curves.png
