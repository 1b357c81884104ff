"""The whole opsd config: the run's sections, composed, loaded from YAML with command-line overrides.

    cfg = load_config("recipes/opsd-qwen3-1.7b.yaml", ["data.path=data/train.parquet", "learner.optim.lr=1e-4"])
    save_config(cfg, run_dir / "config.yaml")

Each component's own section lives with the component (``rollout.config``, ``teacher.config``, ``learner.config``,
``opsd.prompts``) so it can be used alone; this module adds the sections only the orchestrator needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Literal

from learner.config import LearnerConfig
from opsd.configlib import ConfigError, apply_overrides, check, from_dict, load_yaml, save_yaml, to_dict
from opsd.prompts import PromptConfig
from orchestrator.evaluation.config import EvalConfig
from rollout.config import RolloutConfig
from teacher.config import TeacherConfig

DATA_COLUMNS = ("problem", "solution", "answer", "id")


@dataclass
class ModelConfig:
    """The model that is both student (plus LoRA) and frozen teacher."""

    path: str = field(
        default="Qwen/Qwen3-1.7B", metadata={"doc": "Hugging Face model id or local directory of the base model."}
    )
    tokenizer: str | None = field(
        default=None, metadata={"doc": "Tokenizer id or directory. None: the same as path."}
    )
    revision: str | None = field(
        default=None,
        metadata={"doc": "Hub revision (branch, tag or commit) of path and tokenizer. None: the default branch."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "doc": "Run Python code shipped with the model repository. Off unless you turn it on for a model you trust."
        },
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={
            "doc": "Weight dtype of the rollout engines (vLLM). 'auto': bfloat16 on GPU, float32 on CPU. "
            "teacher.dtype and learner.dtype set the other stages."
        },
    )

    def validate(self) -> None:
        check(bool(self.path.strip()), "path", "must name a Hugging Face model id or a local directory")


@dataclass
class DataConfig:
    """The training problems with their verified solutions."""

    path: str = field(
        default="",
        metadata={"doc": "Training data file (.jsonl or .parquet) with a problem and a solution per row. Required."},
    )
    mapping: Literal["gsm8k", "openthoughts", "eval"] = field(
        default="openthoughts",
        metadata={"doc": "Preset naming the dataset's source columns for problem, solution, answer and id."},
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "doc": "Source column per field, overriding the preset's, e.g. {problem: question, solution: answer}. "
            "Fields: problem, solution, answer, id."
        },
    )
    format: Literal["auto", "jsonl", "parquet"] = field(
        default="auto", metadata={"doc": "File format. 'auto': from the file extension."}
    )
    on_bad_row: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "doc": "A row without a usable problem or solution: 'error' stops before training, naming file, row "
            "and field; 'skip' leaves it out and counts it."
        },
    )
    limit: int | None = field(default=None, metadata={"doc": "Use only the first N rows (>= 1). None: all rows."})
    shuffle_seed: int = field(default=0, metadata={"doc": "Seed of the per-epoch shuffle of the rows."})

    def validate(self) -> None:
        check(
            bool(self.path.strip()),
            "path",
            "required: the training data file (.jsonl or .parquet); set data.path in the config or pass "
            "data.path=FILE as an override",
        )
        for name in self.columns:
            check(
                name in DATA_COLUMNS,
                f"columns.{name}",
                f"unknown field {name!r}; the fields are {', '.join(DATA_COLUMNS)}",
            )
        for name, source in self.columns.items():
            check(bool(source.strip()), f"columns.{name}", "must name a source column")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")


@dataclass
class TrainConfig:
    """The training loop: length, batch, staleness, evaluation and checkpoints."""

    steps: int | None = field(
        default=None, metadata={"doc": "Training steps to run (>= 1). None: run `epochs` passes over the data."}
    )
    epochs: int = field(default=1, metadata={"doc": "Passes over the data when steps is None."})
    prompts_per_step: int = field(
        default=32, metadata={"doc": "Prompts per step (each sampled rollout.n times); one optimizer step each."}
    )
    max_staleness: int = field(
        default=0,
        metadata={
            "doc": "Adapter versions a rollout may lag behind the learner: 0 is strictly on-policy as in the paper; "
            "1 overlaps the rollouts of step n+1 with the learning of step n."
        },
    )
    eval_every: int = field(
        default=0, metadata={"doc": "Held-out GJS every N steps (and always before and after training). 0: only "
                             "before and after."}
    )
    eval_rows: int = field(
        default=0,
        metadata={"doc": "Problems held out of training (the data's last rows): their traces, sampled once from the "
                  "initial model and scored once, give the held-out GJS. 0: no held-out evaluation."},
    )
    checkpoint_every: int = field(default=0, metadata={"doc": "Write a checkpoint every N steps. 0: off."})
    seed: int = field(default=0, metadata={"doc": "Seed of the learner and of everything not seeded elsewhere."})
    run_dir: str = field(
        default="runs/opsd", metadata={"doc": "Directory for the config used, metrics, adapters and checkpoints."}
    )
    resume: str | None = field(
        default=None,
        metadata={"doc": "Continue from a checkpoint: 'latest' (the newest in run_dir/checkpoints) or a checkpoint "
                  "directory. The learner state, the data cursor and the step count are restored; the rollout "
                  "workers get the checkpoint's adapter. None: start from the base model."},
    )

    def validate(self) -> None:
        check(self.steps is None or self.steps >= 1, "steps", f"must be >= 1 or null, got {self.steps}")
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        check(self.max_staleness in (0, 1), "max_staleness", f"must be 0 or 1, got {self.max_staleness}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0 (0 is off), got {self.eval_every}")
        check(self.eval_rows >= 0, "eval_rows", f"must be >= 0 (0 is off), got {self.eval_rows}")
        check(
            self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0 (0 is off), got {self.checkpoint_every}"
        )
        check(bool(self.run_dir.strip()), "run_dir", "must name a directory")
        check(self.resume is None or bool(self.resume.strip()), "resume",
              "must be 'latest', a checkpoint directory, or null")


@dataclass
class PlacementConfig:
    """Where the stages run: the Ray cluster and how GPUs are shared."""

    mode: Literal["auto", "split", "colocate", "cpu"] = field(
        default="auto",
        metadata={
            "doc": "'split': each stage gets its own GPUs; 'colocate': all stages time-share one GPU; 'cpu': no GPUs, "
            "each engine gets its own cores; 'auto': from the resources the cluster has."
        },
    )
    address: str | None = field(
        default=None,
        metadata={
            "doc": "Ray cluster address. None: RAY_ADDRESS if set, else start an embedded Ray on 127.0.0.1."
        },
    )
    placement_timeout_s: float = field(
        default=600.0,
        metadata={
            "doc": "Seconds to wait for the placement groups (time for the autoscaler to add nodes) before failing."
        },
    )
    autoscaling: bool = field(
        default=False,
        metadata={
            "doc": "The cluster's autoscaler adds nodes on demand: a plan the cluster cannot hold now is requested "
            "anyway (the request is what makes the autoscaler add nodes) and waited for, up to placement_timeout_s, "
            "then fails naming what is missing. False: such a plan fails at once, naming what is missing. An "
            "embedded cluster (no address) never autoscales."
        },
    )

    def validate(self) -> None:
        check(
            self.placement_timeout_s > 0,
            "placement_timeout_s",
            f"must be > 0, got {self.placement_timeout_s}",
        )
        check(
            isinstance(self.autoscaling, bool),
            "autoscaling",
            f"must be true or false, got {self.autoscaling!r}",
        )


@dataclass
class OPSDConfig:
    """One OPSD run."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Base model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Training data."})
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"doc": "Student and teacher prompts."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"doc": "Student sampling (vLLM)."})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"doc": "Frozen teacher scoring."})
    learner: LearnerConfig = field(default_factory=LearnerConfig, metadata={"doc": "LoRA learner and loss."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Training loop."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Benchmark evaluation during training."})
    placement: PlacementConfig = field(default_factory=PlacementConfig, metadata={"doc": "Ray placement."})

    def validate(self) -> None:
        # Sections have validated themselves; only rules that span sections belong here (keys are absolute).
        serves_lora = self.rollout.adapter_serving == "lora" or (
            self.rollout.adapter_serving == "auto" and self.rollout.gpus_per_worker > 0)
        if serves_lora:
            check(
                self.learner.lora.rank <= self.rollout.max_lora_rank,
                "learner.lora.rank",
                f"{self.learner.lora.rank} is above rollout.max_lora_rank ({self.rollout.max_lora_rank}): the vLLM "
                "engines would refuse every adapter the learner exports; raise rollout.max_lora_rank or lower the rank",
            )
        if self.teacher.max_context_tokens is not None:
            check(
                self.teacher.max_context_tokens > self.rollout.max_response_tokens,
                "teacher.max_context_tokens",
                f"must be > rollout.max_response_tokens ({self.rollout.max_response_tokens}): the teacher context "
                f"holds the prompt, the solution and a full-length response; got {self.teacher.max_context_tokens}",
            )


def load_config(path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()) -> OPSDConfig:
    """Load a YAML config (None: all defaults), apply ``key=value`` overrides, check and validate it.

    Errors are ``ConfigError`` naming the dotted key and where the value came from (the file or the override).
    """
    overrides = list(overrides)
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(OPSDConfig, data)
    except ConfigError as e:
        source = _source_of(e.key, path, overrides)
        raise (e.with_source(source) if source else e) from None


def _source_of(key: str, path: str | os.PathLike[str] | None, overrides: list[str]) -> str | None:
    """The last override that set ``key`` or a section above it, else the file; None when unknown."""
    for item in reversed(overrides):
        set_key = item.split("=", 1)[0].strip()
        if key and (_within(key, set_key) or _within(set_key, key)):
            return f"override {item!r}"
    return os.fspath(path) if path is not None else None


def _within(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".") or key.startswith(section + "[")


def save_config(cfg: OPSDConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML (atomically: temp file, then rename); ``load_config(path)`` reads it back equal."""
    save_yaml(to_dict(cfg), path, header="# opsd config: the values this run used (load with load_config).\n")
