"""The whole opsd config: the run's sections, composed, loaded from YAML with command-line overrides.

    cfg = load_config("recipes/opsd-qwen3-1.7b.yaml", ["data.path=data/train.parquet", "learner.optim.lr=1e-4"])
    save_config(cfg, run_dir / "config.yaml")

Each component's own section lives with the component (``rollout.config``, ``teacher.config``, ``learner.config``,
``opsd.prompts``) so it can be used alone; this module adds the sections only the orchestrator needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import ClassVar, Iterable, Literal

from learner.config import LearnerConfig, LearnerObjective
from opsd.configlib import ConfigError, apply_overrides, check, from_dict, load_yaml, save_yaml, to_dict
from opsd.model import ModelSpec, cpu_has_native_bf16
from opsd.prompts import PromptConfig
from evaluation.config import EvalConfig
from rollout.config import RolloutConfig
from teacher.config import TeacherConfig

DATA_COLUMNS = ("problem", "solution", "answer", "id")


@dataclass
class DataConfig:
    """The training problems with their verified solutions."""

    path: str = field(
        default="",
        metadata={"doc": "Training data: a .jsonl or .parquet file with a problem and a solution per row, or a "
                  "Hugging Face dataset id (owner/name or hf://owner/name; downloaded once into the local cache). "
                  "Required."},
    )
    split: str = field(default="train", metadata={"doc": "Split of a Hugging Face dataset (ignored for files)."})
    revision: str | None = field(
        default=None, metadata={"doc": "Revision (branch, tag, commit) of a Hugging Face dataset. None: main."}
    )
    mapping: Literal["gsm8k", "openthoughts", "opsd-math30k", "opsd", "eval"] = field(
        default="openthoughts",
        metadata={"doc": "Preset naming the dataset's source columns for problem, solution, answer and id. "
                  "'opsd-math30k': the OPSD authors' training set (siyanzhao/Openthoughts_math_30k_opsd; the "
                  "answer is the solution's last \\boxed{}). 'opsd': the columns `opsd data convert` writes."},
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
    order: Literal["shuffled", "curriculum"] = field(
        default="shuffled",
        metadata={"doc": "Order of the rows in each epoch: 'shuffled' (seeded by train.seed), or 'curriculum', "
                  "easiest first by data.difficulty (ties shuffled)."},
    )
    difficulty: str | None = field(
        default=None,
        metadata={"doc": "With order 'curriculum': an `opsd eval` output directory of the training problems "
                  "(difficulty = 1 - the base model's pass rate per problem, matched by id). None: the reference "
                  "solution's length."},
    )

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "shuffle_seed": "the per-epoch shuffle is seeded by train.seed",
    }

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
        check(self.difficulty is None or self.order == "curriculum", "difficulty",
              "orders rows only with data.order=curriculum")
        check(self.difficulty is None or os.path.isdir(self.difficulty), "difficulty",
              f"must be an `opsd eval` output directory, {self.difficulty!r} is not a directory")


METHODS = ("opsd", "sft", "grpo")


@dataclass
class TrainConfig:
    """The training loop: method, length, batch, staleness, evaluation and checkpoints."""

    method: Literal["opsd", "sft", "grpo"] = field(
        default="opsd",
        metadata={"doc": "What the learner trains on. 'opsd': distillation from the teacher (learner.loss). The "
                  "baselines, on the same learner, LoRA, checkpoints and evaluation: 'sft': cross-entropy on the "
                  "reference solutions after the student prompt (no rollouts, no teacher; rollout workers only for "
                  "eval.every); 'grpo': rollout.n traces per prompt rewarded 1 when the final answer matches the "
                  "problem's answer (math-verify), group-normalised advantages, the clipped policy gradient (grpo "
                  "section; no KL term, no teacher)."},
    )
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
    heldout_rows: int = field(
        default=0,
        metadata={"doc": "Problems held out of training (the data's last rows): their traces, sampled once from the "
                  "initial model and scored once, give the held-out GJS. 0: no held-out GJS."},
    )
    heldout_every: int = field(
        default=0, metadata={"doc": "Held-out GJS every N steps (and always before and after training). 0: only "
                             "before and after."}
    )
    checkpoint_every: int = field(default=0, metadata={"doc": "Write a checkpoint every N steps. 0: off."})
    keep_checkpoints: int | None = field(
        default=None,
        metadata={"doc": "Keep only the newest N checkpoints (>= 1; older ones are deleted after each save). None: "
                  "keep all."},
    )
    checkpoint_failure: Literal["stop", "warn"] = field(
        default="stop",
        metadata={"doc": "A checkpoint or adapter directory that cannot be written (a full disk): 'stop' ends the run "
                  "with the path and the space needed; 'warn' reports it and trains on. The previous checkpoints "
                  "stay intact either way."},
    )
    keep_best_checkpoint: bool = field(
        default=False,
        metadata={"doc": "With keep_checkpoints: also keep the checkpoint with the lowest held-out GJS (measured at "
                  "its step; needs heldout_rows and heldout_every matching checkpoint_every)."},
    )
    seed: int = field(default=0, metadata={"doc": "Seed of the per-epoch shuffle of the data, the learner's LoRA "
                                            "initialisation, and everything not seeded elsewhere."})
    run_dir: str = field(
        default="runs/opsd", metadata={"doc": "Directory for the config used, metrics, adapters and checkpoints."}
    )
    resume: str | None = field(
        default=None,
        metadata={"doc": "Continue from a checkpoint: 'latest' (the newest in run_dir/checkpoints) or a checkpoint "
                  "directory. The learner state, the data cursor and the step count are restored; the rollout "
                  "workers get the checkpoint's adapter. None: start from the base model."},
    )
    learner_restarts: int = field(
        default=2,
        metadata={"doc": "Times a run rebuilds its learner group after a rank dies (its state comes from the newest "
                  "checkpoint that verifies, or the start; the steps since are trained again with the same rows "
                  "and seeds). Past that the run stops. 0: a dead rank stops the run."},
    )
    student_accuracy: bool = field(
        default=True,
        metadata={"doc": "Grade each training trace's final answer (read as prompt.answer_format says) against its problem's "
                  "reference answer (math-verify, in the background) and log student_accuracy per step. OPSD never "
                  "uses it; GRPO's rewards are these grades (so it must be true with method grpo). Rows without a "
                  "reference answer are not graded."},
    )
    time_budget_s: float | None = field(
        default=None,
        metadata={"doc": "Wall-clock budget of the training loop in seconds (from its first step, in this process): "
                  "the step that starts past it is the last, and the run ends as at train.steps (final adapter, "
                  "held-out GJS, evaluation). None: no budget. Compares methods at equal compute."},
    )
    stage_timeout_s: float = field(
        default=3600.0,
        metadata={"doc": "Longest wait for one call on a stage's actors: an engine or model start, a shard's "
                  "rollouts, a teacher scoring, a learner step, an adapter load. A rollout or teacher actor that "
                  "does not answer in time is replaced and its shard sent again."},
    )

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "eval_rows": "renamed train.heldout_rows (evaluation on eval sets is the eval section)",
        "eval_every": "renamed train.heldout_every (evaluation on eval sets is the eval section)",
    }

    def validate(self) -> None:
        check(self.steps is None or self.steps >= 1, "steps", f"must be >= 1 or null, got {self.steps}")
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        check(self.max_staleness in (0, 1), "max_staleness", f"must be 0 or 1, got {self.max_staleness}")
        check(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "keep_checkpoints",
              f"must be >= 1 or null, got {self.keep_checkpoints}")
        check(self.heldout_every >= 0, "heldout_every", f"must be >= 0 (0 is off), got {self.heldout_every}")
        check(self.heldout_rows >= 0, "heldout_rows", f"must be >= 0 (0 is off), got {self.heldout_rows}")
        check(self.learner_restarts >= 0, "learner_restarts", f"must be >= 0, got {self.learner_restarts}")
        check(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s",
              f"must be > 0 or null, got {self.time_budget_s}")
        check(self.stage_timeout_s > 0, "stage_timeout_s", f"must be > 0, got {self.stage_timeout_s}")
        check(
            self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0 (0 is off), got {self.checkpoint_every}"
        )
        check(bool(self.run_dir.strip()), "run_dir", "must name a directory")
        check(self.resume is None or bool(self.resume.strip()), "resume",
              "must be 'latest', a checkpoint directory, or null")


@dataclass
class GRPOConfig:
    """GRPO (train.method=grpo): the group of a prompt is its rollout.n traces."""

    clip_eps: float = field(
        default=0.2,
        metadata={"doc": "Clip range of the importance ratio r = exp(logp - old_logp): the per-token loss is "
                  "-min(r A, clip(r, 1 - clip_eps, 1 + clip_eps) A). In (0, 1)."},
    )

    def validate(self) -> None:
        check(0 < self.clip_eps < 1, "clip_eps", f"must be in (0, 1), got {self.clip_eps}")


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
            "doc": "Seconds to wait for the placement groups (time for the autoscaler to add nodes) before failing. "
            "Calls on the actors are bounded by train.stage_timeout_s."
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
class TrackingConfig:
    """Experiment tracking besides metrics.jsonl: the config, every step's metrics, evaluations and the curves."""

    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = field(
        default_factory=list,
        metadata={"doc": "Trackers to log to, any of tensorboard (event files in RUN_DIR/tensorboard), wandb "
                  "(offline into RUN_DIR/wandb unless an API key is configured or WANDB_MODE is set) and mlflow "
                  "(mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else a SQLite store RUN_DIR/mlflow.db). Each "
                  "needs its package: pip install 'opsd[tracking]'. []: metrics.jsonl only."},
    )
    project: str = field(
        default="opsd", metadata={"doc": "W&B project and MLflow experiment the run is logged under."}
    )
    run_name: str | None = field(
        default=None,
        metadata={"doc": "The run's name in W&B and MLflow. None: the last component of train.run_dir."},
    )
    mlflow_tracking_uri: str | None = field(
        default=None,
        metadata={"doc": "MLflow tracking server or store URI. None: MLFLOW_TRACKING_URI if set, else "
                  "sqlite:///RUN_DIR/mlflow.db with artifacts in RUN_DIR/mlartifacts."},
    )

    def validate(self) -> None:
        for i, name in enumerate(self.backends):
            check(name not in self.backends[:i], f"backends[{i}]", f"{name!r} is listed twice")
        check(bool(self.project.strip()), "project", "must not be empty")
        check(self.run_name is None or bool(self.run_name.strip()), "run_name",
              "must be a name or null (the last component of train.run_dir)")
        check(self.mlflow_tracking_uri is None or bool(self.mlflow_tracking_uri.strip()), "mlflow_tracking_uri",
              "must be a URI or null (MLFLOW_TRACKING_URI, else a SQLite store in the run directory)")


@dataclass
class OPSDConfig:
    """One OPSD run."""

    model: ModelSpec = field(default_factory=ModelSpec, metadata={"doc": "Base model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Training data."})
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"doc": "Student and teacher prompts."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"doc": "Student sampling (vLLM)."})
    teacher: TeacherConfig = field(default_factory=TeacherConfig,
                                   metadata={"doc": "The teacher (frozen or EMA) and its scoring."})
    learner: LearnerConfig = field(default_factory=LearnerConfig, metadata={"doc": "LoRA learner and loss."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Training loop."})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"doc": "GRPO baseline (train.method=grpo)."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Evaluation on eval sets during training."})
    placement: PlacementConfig = field(default_factory=PlacementConfig, metadata={"doc": "Ray placement."})
    tracking: TrackingConfig = field(default_factory=TrackingConfig,
                                     metadata={"doc": "Experiment tracking (TensorBoard, W&B, MLflow)."})

    def validate(self) -> None:
        # Sections have validated themselves; only rules that span sections belong here (keys are absolute).
        loss = self.learner.loss
        sampled_at = self.rollout.temperature if self.rollout.temperature > 0 else 1.0
        if loss.temperature is None:  # derived: the loss sees the distribution the traces were sampled from
            loss.temperature = sampled_at
        elif abs(loss.temperature - sampled_at) > 1e-12 and not loss.allow_temperature_mismatch:
            raise ConfigError(
                "learner.loss.temperature",
                f"{loss.temperature} differs from rollout.temperature ({self.rollout.temperature}): the loss would "
                "compare distributions the traces were not sampled from. Leave it unset (it follows "
                "rollout.temperature) or set learner.loss.allow_temperature_mismatch=true",
            )
        if self.teacher.kind == "ema" and self.learner.zero_stage == 3 and not loss.loss_kind.needs_teacher_stage:
            raise ConfigError(
                "teacher.kind",
                f"'ema' with learner.loss.kind={loss.kind} and learner.zero_stage=3 is not supported: the learner's "
                "in-process teacher swaps the EMA into the LoRA weights, which ZeRO-3 partitions. Use "
                "learner.zero_stage 0 to 2, or a loss kind with teacher actors (topk_tail, topk_renorm, "
                "sampled_token)",
            )
        self._validate_method()
        if self.teacher.max_context_tokens is not None:
            check(
                self.teacher.max_context_tokens > self.rollout.max_response_tokens,
                "teacher.max_context_tokens",
                f"must be > rollout.max_response_tokens ({self.rollout.max_response_tokens}): the teacher context "
                f"holds the prompt, the solution and a full-length response; got {self.teacher.max_context_tokens}",
            )


    def _validate_method(self) -> None:
        """What the baselines (train.method sft, grpo) cannot do, or need."""
        method = self.train.method
        if method != "opsd":
            if self.train.heldout_rows:
                raise ConfigError("train.heldout_rows", f"must be 0 with train.method={method}: the held-out GJS "
                                  f"measures the distance to OPSD's teacher, which {method} does not run; evaluate "
                                  "with eval.every instead")
            if self.teacher.kind == "ema":
                raise ConfigError("teacher.kind", f"'ema' with train.method={method}: {method} runs no teacher")
        if method != "grpo":
            return
        check(self.rollout.n >= 2, "rollout.n", f"must be >= 2 with train.method=grpo: the advantage is the reward "
              f"normalised within the group of a prompt's rollout.n traces; got {self.rollout.n}")
        check(self.rollout.temperature > 0, "rollout.temperature", "must be > 0 with train.method=grpo: greedy "
              "traces of one prompt are all the same, so every group's advantage would be 0")
        check(self.train.student_accuracy, "train.student_accuracy", "must be true with train.method=grpo: GRPO's "
              "rewards are those grades")

    @property
    def runs_rollout_workers(self) -> bool:
        """Rollout workers: every method that samples traces, and SFT only to evaluate (eval.every)."""
        return self.train.method != "sft" or self.eval.every > 0

    @property
    def runs_teacher_actors(self) -> bool:
        return self.train.method == "opsd" and self.learner.loss.loss_kind.needs_teacher_stage

    @property
    def grades_traces(self) -> bool:
        """The training traces' answers are graded (train.student_accuracy; GRPO's rewards). SFT samples none."""
        return self.train.student_accuracy and self.train.method != "sft"

    def learner_objective(self) -> LearnerObjective:
        """What the learner minimises: OPSD's loss (learner.loss), SFT's cross-entropy on solutions cut at
        rollout.max_response_tokens (the traces' budget), or GRPO's clipped policy gradient."""
        return LearnerObjective(self.train.method, clip_eps=self.grpo.clip_eps,
                                max_target_tokens=self.rollout.max_response_tokens)


# Keys of the teacher section that only the teacher actors read (the rest shape the teacher context, which the
# learner builds too).
TEACHER_ACTOR_KEYS = ("num_workers", "gpus_per_worker", "top_k", "token_budget", "logits_chunk", "dtype")
CPU_ONLY_ROLLOUT_KEYS = ("cpu_kv_cache_gib", "cpu_threads_per_worker")
GPU_ONLY_ROLLOUT_KEYS = ("gpu_memory_utilization", "tensor_parallel_size")


def ineffective_keys(cfg: OPSDConfig, on_cpu: bool) -> list[str]:
    """Keys set to a non-default value that do nothing in this run (an EMA decay with the frozen teacher; the loss kind
    runs no teacher actors; what a baseline method does not use; CPU-only settings on GPU and the reverse), each with
    why; GRPO's sampling filters that make its ratios start away from 1; bfloat16 where a CPU run pays for it. The
    driver prints them as warnings."""
    notes = _method_notes(cfg)
    if cfg.train.method == "opsd" and cfg.teacher.kind == "frozen":
        notes += [f"teacher.{key} has no effect: teacher.kind=frozen keeps no EMA"
                  for key in _changed(cfg.teacher, ("ema_decay",))]
    if cfg.train.method == "opsd" and not cfg.learner.loss.loss_kind.needs_teacher_stage:
        notes += [f"teacher.{key} has no effect: learner.loss.kind={cfg.learner.loss.kind} runs no teacher actors "
                  "(the learner scores with its own frozen base)" for key in _changed(cfg.teacher, TEACHER_ACTOR_KEYS)]
    if on_cpu:
        notes += [f"rollout.{key} has no effect on CPU engines" for key in _changed(cfg.rollout, GPU_ONLY_ROLLOUT_KEYS)]
        notes += _cpu_bf16_notes(cfg)
    else:
        notes += [f"rollout.{key} has no effect on GPU engines" for key in _changed(cfg.rollout, CPU_ONLY_ROLLOUT_KEYS)]
    return notes


def _cpu_bf16_notes(cfg: OPSDConfig) -> list[str]:
    """bfloat16 on CPU: slow where the CPU emulates it; on the rollout engines, merged adapters rounded away."""
    asked = [key for key, value in (("model.dtype", cfg.model.dtype), ("teacher.dtype", cfg.teacher.dtype),
                                    ("learner.dtype", cfg.learner.dtype)) if value == "bfloat16"
             and (key != "teacher.dtype" or cfg.runs_teacher_actors)]  # else reported as without effect
    notes = []
    if asked and not cpu_has_native_bf16():
        notes.append(f"{', '.join(asked)}=bfloat16 on a CPU without AVX512-BF16 or AMX: PyTorch emulates bfloat16 "
                     "there, slower than float32 (set them to float32 or auto)")
    if "model.dtype" in asked and cfg.rollout.adapter_serving in ("auto", "merged"):
        notes.append("model.dtype=bfloat16 on CPU engines: each merged weight (base + adapter) is rounded to bfloat16, "
                     "so adapter changes smaller than ~0.4% of a weight never reach the samples (float32 keeps them)")
    return notes


def _method_notes(cfg: OPSDConfig) -> list[str]:
    method = cfg.train.method
    notes = []
    if method != "grpo":
        notes += [f"grpo.{key} has no effect: train.method={method}" for key in _changed(cfg.grpo, ("clip_eps",))]
    if method == "opsd":
        return notes
    notes += [f"teacher.{key} has no effect: train.method={method} runs no teacher"
              for key in _changed(cfg.teacher, [f.name for f in fields(cfg.teacher)])]
    loss_keys = ["kind", "beta", "clip_mode", "clip"]
    if method == "sft":  # cross-entropy at temperature 1, on solutions: no sampling either (eval has its own)
        loss_keys += ["allow_temperature_mismatch"]
        notes += [f"rollout.{key} has no effect: train.method=sft samples no traces (evaluation uses eval.*)"
                  for key in _changed(cfg.rollout, ("n", "temperature", "top_p", "top_k", "seed"))]
        notes += [f"train.{key} has no effect: train.method=sft samples no traces"
                  for key in _changed(cfg.train, ("max_staleness",))]
    notes += [f"learner.loss.{key} has no effect: train.method={method} does not distil"
              for key in _changed(cfg.learner.loss, loss_keys)]
    if method == "grpo" and (cfg.rollout.top_p < 1 or cfg.rollout.top_k != -1):
        notes.append("rollout.top_p/top_k with train.method=grpo: the behaviour log-probs are vLLM's after the "
                     "top-p/top-k filter, the learner's are over the whole vocabulary, so the ratios start away "
                     "from 1 and more tokens are clipped")
    return notes


def _changed(section, keys: Iterable[str]) -> list[str]:
    defaults = type(section)()
    by_name = {f.name for f in fields(section)}
    return [k for k in keys if k in by_name and getattr(section, k) != getattr(defaults, k)]


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
