"""Experiment tracking besides ``metrics.jsonl``: TensorBoard, Weights & Biases and MLflow (``tracking.backends``).

    trackers = Trackers(cfg)                 # the chosen backends' packages checked; nothing started yet
    with trackers:                           # each backend's run started and given the whole config
        trackers.log_metrics(step, record)   # a step record: its finite numbers, on the step axis
        trackers.finish(summary)             # run-level numbers, curves.png and summary.json
                                             # leaving the block closes every run (failed on an exception)

What each backend writes and where: docs/ARCHITECTURE.md ("The loop").
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

from opsd.configlib import ConfigError, to_dict
from orchestrator.config import OPSDConfig, TrackingConfig
from orchestrator.metrics import run_name as default_run_name

INSTALL = "pip install 'opsd[tracking]'"
# Declared as the metrics of the TensorBoard hparams view (their values are the scalars of the same names).
HPARAM_METRICS = ("loss", "gjs", "heldout_gjs", "student_accuracy")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"learner.optim.lr": 1e-4, ...}``; an empty mapping stays a leaf (``{}``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a step record, ``step`` (the axis) aside. Lists (``sample_ids``), strings (``skip_reason``)
    and None are not scalars; NaN and infinities are left out, as for the Ray gauges: a point not measured."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}


def _text(value: Any) -> str:
    """A config value as a tracker's string parameter: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class Tracker:
    """One backend's run. Started by the constructor; ``close`` ends it."""

    packages: ClassVar[tuple[str, ...]]  # what must import for this backend

    @classmethod
    def required_packages(cls, settings: TrackingConfig) -> tuple[str, ...]:
        return cls.packages

    def log_config(self, config: dict[str, Any]) -> None:
        """The whole config (nested, as ``config.yaml`` has it), once, before any metric."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Finite numbers at ``step``; steps only increase."""

    def log_artifact(self, path: Path) -> None:
        """A file of the run (the curves PNG, summary.json)."""

    def close(self, failed: bool = False) -> None:
        """End the run (marked failed when ``failed``); flush everything to disk."""


class TensorBoardTracker(Tracker):
    """Event files in ``RUN_DIR/tensorboard``: scalars per step, the config as hparams, the curves as an image."""

    packages = ("tensorboard",)

    def __init__(self, settings: TrackingConfig, run_dir: Path, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.step = 0
        self.session_end = None

    def log_config(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (bool, int, float, str)) else _text(v) for k, v in flatten(config).items()}
        experiment, session_start, self.session_end = hparams(values, dict.fromkeys(HPARAM_METRICS))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        self.writer.flush()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.step = step
        self.writer.flush()  # once per step: a crash loses nothing that was logged

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(path.stem, pixels, self.step, dataformats="HWC")
        else:
            text = path.read_text(encoding="utf-8")
            self.writer.add_text(path.name, "    " + text.replace("\n", "\n    "), self.step)  # Markdown code

    def close(self, failed: bool = False) -> None:
        if self.session_end is not None and not failed:
            self.writer.file_writer.add_summary(self.session_end)  # the hparams session's status: success
        self.writer.close()


def wandb_logged_in() -> bool:
    """Whether a W&B API key is configured: WANDB_API_KEY, an identity token file, or a .netrc entry for the W&B
    host. Read locally (no request is made) and never printed."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # the .netrc entry, as wandb itself reads it (`wandb login` writes it)
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        return bool(wbauth.read_netrc_auth(host=settings.base_url) or settings.api_key)
    except Exception:  # noqa: BLE001 - another wandb's internals: no key found means offline, the safe side
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` when set, else online when logged in, else offline. (Passed to ``wandb.init`` explicitly:
    wandb reads the environment once per process, so a later change of WANDB_MODE would go unseen.)"""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_logged_in() else "offline"


class WandbTracker(Tracker):
    """A W&B run under ``RUN_DIR/wandb``: the flattened config, ``log(step=)`` per step, the curves as an image.
    Offline (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later) unless an API key is configured."""

    packages = ("wandb",)

    def __init__(self, settings: TrackingConfig, run_dir: Path, name: str):
        import wandb

        self.wandb = wandb
        # console="off": the driver's stdout stays opsd's (and Ray's), unwrapped; quiet: W&B prints where the run
        # is and how to sync it, not a table of every metric at the end.
        self.run = wandb.init(project=settings.project, name=name, dir=str(run_dir), mode=wandb_mode(),
                              settings=wandb.Settings(console="off", quiet=True))
        self.step = 0

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(flatten(config), allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)
        self.step = step

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            self.run.log({path.stem: self.wandb.Image(str(path))}, step=self.step)
        else:  # a file in the run's files directory is part of the run (uploaded with it)
            shutil.copy2(path, Path(self.run.dir) / path.name)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        # finish() can return before W&B's service has written the run's file (seen offline with wandb 0.31);
        # stopping the service waits for it. Only when no other run of this process still needs the service.
        if self.wandb.run is None:
            self.wandb.teardown()


class MLflowTracker(Tracker):
    """An MLflow run in experiment ``tracking.project``: the flattened config as params (and whole, as the artifact
    config.yaml), metrics per step, files as artifacts. Store: ``tracking.mlflow_tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else SQLite in ``RUN_DIR/mlflow.db`` with artifacts in ``RUN_DIR/mlartifacts``."""

    packages = ("mlflow",)
    LOCAL_STORE_PACKAGES = ("sqlalchemy", "alembic")  # MLflow's SQLite store (in mlflow; not in mlflow-skinny)
    MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
    PARAMS_PER_CALL, METRICS_PER_CALL = 100, 1000  # MLflow's limits for one log_batch

    @staticmethod
    def tracking_uri(settings: TrackingConfig) -> str | None:
        """The URI the user chose; None: the run directory's own store."""
        return settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    @classmethod
    def required_packages(cls, settings: TrackingConfig) -> tuple[str, ...]:
        return cls.packages + (() if cls.tracking_uri(settings) else cls.LOCAL_STORE_PACKAGES)

    def __init__(self, settings: TrackingConfig, run_dir: Path, name: str):
        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri(settings)
        local = uri is None
        if local:
            uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(settings.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = (run_dir / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(settings.project, artifact_location=location)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id

    @staticmethod
    def key(name: str) -> str:
        """A name MLflow accepts (letters, digits, ``_ - . : / `` and space): ``avg@4`` -> ``avg_at_4``."""
        return re.sub(r"[^\w\-.:/ ]", "_", name.replace("@", "_at_"))

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(self.key(k), _text(v)[: self.MAX_PARAM_LENGTH]) for k, v in flatten(config).items()]
        for i in range(0, len(params), self.PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i:i + self.PARAMS_PER_CALL])
        self.client.log_dict(self.run_id, config, "config.yaml")  # whole: a param value may have been cut

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), self.METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=batch[i:i + self.METRICS_PER_CALL])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


BACKENDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                      "mlflow": MLflowTracker}


def check_packages(settings: TrackingConfig) -> None:
    """Every chosen backend's packages import; else one line naming backend, package and the install command."""
    for backend in settings.backends:
        for package in BACKENDS[backend].required_packages(settings):
            try:
                importlib.import_module(package)
            except ImportError:
                raise ConfigError("tracking.backends", f"{backend!r} needs the Python package {package!r}, which "
                                  f"is not installed: {INSTALL}") from None


class Trackers:
    """The run's trackers, one per ``tracking.backends`` entry, fed the same calls. Empty: every call does nothing."""

    def __init__(self, cfg: OPSDConfig):
        """Checks the packages (a missing one fails here, before any actor starts); starts nothing."""
        check_packages(cfg.tracking)
        self.settings = cfg.tracking
        self.config = to_dict(cfg)
        self.run_dir = Path(cfg.train.run_dir)
        self.name = cfg.tracking.run_name or default_run_name(self.run_dir)
        self.trackers: list[Tracker] = []

    def __enter__(self) -> Trackers:
        """Start each backend's run and log the config."""
        try:
            for backend in self.settings.backends:
                self.trackers.append(BACKENDS[backend](self.settings, self.run_dir, self.name))
            for tracker in self.trackers:
                tracker.log_config(self.config)
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        """A step record (or any flat record) at ``step``: its finite numbers only (:func:`scalars`)."""
        values = scalars(record)
        if values:
            for tracker in self.trackers:
                tracker.log_metrics(step, values)

    def finish(self, summary: dict[str, Any]) -> None:
        """The end of a run that completed: tokens/s of each stage over the whole run (``run/tokens_per_second/
        <stage>``, at the last step), the curves (drawn into RUN_DIR/curves.png) and summary.json."""
        if not self.trackers:
            return
        from orchestrator.plot import plot_run

        self.log_metrics(summary["steps"], {f"run/tokens_per_second/{stage}": rate
                                            for stage, rate in summary["tokens_per_second"].items()})
        files = [plot_run(self.run_dir), self.run_dir / "summary.json"]
        for tracker in self.trackers:
            for path in files:
                tracker.log_artifact(path)

    def close(self, failed: bool = False) -> None:
        """End every run; all are closed even if one fails (its error is raised after)."""
        error = None
        for tracker in reversed(self.trackers):
            try:
                tracker.close(failed)
            except Exception as e:  # noqa: BLE001 - close the others first
                error = error or e
        self.trackers = []
        if error is not None:
            raise error
