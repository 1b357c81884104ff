"""Configuration of the learner: LoRA adapter, GJS loss, optimizer and the DeepSpeed group that trains them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from typing import TYPE_CHECKING

from opsd.configlib import check
from opsd.lora import VLLM_LORA_RANKS

if TYPE_CHECKING:
    from learner.kinds import LossKind

NON_LORA_MODULES = ("lm_head", "embed_tokens")
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """The LoRA adapter the student trains (the base weights stay frozen: they are also the teacher)."""

    rank: int = field(
        default=64,
        metadata={"doc": "LoRA rank r. One of vLLM's LoRA ranks: 1, 8, 16, 32, 64, 128, 256, 320, 512."},
    )
    alpha: int = field(default=128, metadata={"doc": "LoRA alpha; the update is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"doc": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"doc": "Names of the linear modules that get an adapter (attention and MLP projections)."},
    )

    def validate(self) -> None:
        ranks = ", ".join(str(r) for r in VLLM_LORA_RANKS)
        check(
            self.rank in VLLM_LORA_RANKS,
            "rank",
            f"must be one of the LoRA ranks vLLM can serve ({ranks}), got {self.rank}",
        )
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.target_modules) > 0, "target_modules", "must name at least one module")
        for i, name in enumerate(self.target_modules):
            check(bool(name.strip()), f"target_modules[{i}]", "must be a non-empty module name")
            # The loss multiplies by the base lm_head, and the rollout engines put adapters on the transformer
            # blocks' linear layers only: an adapter on these would be trained but never served.
            check(name.split(".")[-1] not in NON_LORA_MODULES, f"target_modules[{i}]",
                  f"{name!r} cannot carry an adapter here: only the attention and MLP projections can "
                  f"(not {', '.join(NON_LORA_MODULES)})")


@dataclass
class LossConfig:
    """The distillation loss: generalized Jensen-Shannon divergence between student and teacher per token."""

    kind: Literal["full", "topk_tail", "topk_renorm", "sampled_token"] = field(
        default="full",
        metadata={
            "doc": "'full': GJS over the whole vocabulary (the paper's default). 'topk_tail': over the teacher's "
            "top-k ids plus one tail bucket (a lower bound of 'full'). 'topk_renorm': over the top-k ids "
            "renormalised, no tail (ablation; a different objective). 'sampled_token': on the sampled token only "
            "(the paper's ablation)."
        },
    )
    beta: float = field(
        default=0.5,
        metadata={"doc": "GJS weight beta in [0, 1]: 0 is forward KL(teacher || student), 1 is reverse KL."},
    )
    temperature: float | None = field(
        default=None,
        metadata={
            "doc": "Loss temperature tau (> 0): student and teacher logits are divided by it before the divergence; "
            "the teacher's top-k is tempered with the same tau. None: rollout.temperature (1.0 for greedy "
            "sampling), so that the loss sees the distribution the traces were sampled from."
        },
    )
    allow_temperature_mismatch: bool = field(
        default=False,
        metadata={"doc": "Accept a temperature that differs from rollout.temperature (otherwise refused: the loss "
                  "would compare distributions the traces were not sampled from)."},
    )
    chunk_size: int = field(
        default=1024,
        metadata={"doc": "Response positions per chunk of lm_head + log-softmax + divergence (memory bound)."},
    )
    clip_mode: Literal["none", "token", "pointwise"] = field(
        default="none",
        metadata={
            "doc": "'token': a token's divergence is capped at clip (a capped token gives no gradient). "
            "'pointwise': each vocabulary entry's term (for top-k+tail, each of the k + 1 categories) is capped at "
            "clip before the sum, so a token's loss can be negative with beta 0 or 1 (the authors' current "
            "--jsd_token_clip). 'none': no clipping."
        },
    )
    clip: float | None = field(
        default=None,
        metadata={"doc": "The cap of clip_mode (> 0). Required with 'token' or 'pointwise', null with 'none'."},
    )

    @property
    def tau(self) -> float:
        """The temperature the loss divides logits by (1.0 when unset; a run config sets it, see temperature)."""
        return 1.0 if self.temperature is None else self.temperature

    @property
    def loss_kind(self) -> LossKind:
        from learner.kinds import loss_kind

        return loss_kind(self.kind)

    def validate(self) -> None:
        check(0 <= self.beta <= 1, "beta", f"must be in [0, 1], got {self.beta}")
        check(self.temperature is None or self.temperature > 0, "temperature",
              f"must be > 0 or null, got {self.temperature}")
        check(self.chunk_size >= 1, "chunk_size", f"must be >= 1, got {self.chunk_size}")
        if self.clip_mode == "none":
            check(self.clip is None, "clip", f"must be null with clip_mode 'none' (got {self.clip}); set "
                  "clip_mode to 'token' or 'pointwise' to clip")
        else:
            check(self.clip is not None and self.clip > 0, "clip",
                  f"must be > 0 with clip_mode {self.clip_mode!r}, got {self.clip}")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (per optimizer step)."""

    lr: float = field(default=1e-5, metadata={"doc": "Peak learning rate (after warmup)."})
    weight_decay: float = field(default=0.0, metadata={"doc": "AdamW decoupled weight decay, >= 0."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"doc": "AdamW (beta1, beta2), each in [0, 1)."})
    eps: float = field(default=1e-8, metadata={"doc": "AdamW epsilon, > 0."})
    warmup_steps: int = field(default=0, metadata={"doc": "Steps of linear warmup from 0 to lr."})
    schedule: Literal["cosine", "constant", "linear"] = field(
        default="cosine",
        metadata={"doc": "Decay after warmup, down to lr * min_lr_ratio at the last step."},
    )
    min_lr_ratio: float = field(
        default=0.0, metadata={"doc": "Final learning rate as a fraction of lr, in [0, 1] (cosine and linear)."}
    )
    grad_clip: float | None = field(
        default=1.0, metadata={"doc": "Clip the global gradient norm to this value (> 0). None: no clipping."}
    )

    def validate(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.betas), "betas", f"each must be in [0, 1), got {list(self.betas)}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(
            self.grad_clip is None or self.grad_clip > 0, "grad_clip", f"must be > 0 or null, got {self.grad_clip}"
        )


@dataclass(frozen=True)
class LearnerObjective:
    """What the learner minimises: the distillation loss of ``learner.loss`` ('opsd'), or a baseline on the same
    learner: cross-entropy on reference solutions ('sft') or GRPO's clipped policy gradient ('grpo').
    docs/ARCHITECTURE.md ("Baselines: SFT and GRPO")."""

    method: Literal["opsd", "sft", "grpo"] = "opsd"
    clip_eps: float = 0.2  # grpo: r is clipped to [1 - clip_eps, 1 + clip_eps]
    max_target_tokens: int | None = None  # sft: a reference solution (+ EOS) is cut at this many tokens

    def kind(self, loss: LossConfig) -> LossKind:
        """The loss kind that trains this objective."""
        if self.method == "opsd":
            return loss.loss_kind
        from learner.objectives import objective_kind

        return objective_kind(self)


@dataclass
class LearnerConfig:
    """The learner group: one actor per rank (DeepSpeed ZeRO data parallel) training the LoRA adapter."""

    num_workers: int = field(default=1, metadata={"doc": "Learner ranks (actors), data parallel."})
    gpus_per_worker: float = field(
        default=1.0, metadata={"doc": "GPUs reserved per learner rank. 0 on CPU-only machines."}
    )
    zero_stage: int = field(
        default=2, metadata={"doc": "DeepSpeed ZeRO stage: 0, 1, 2 or 3 (3 also shards the frozen base weights)."}
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={"doc": "Learner weight and compute dtype. 'auto': bfloat16 on GPU, float32 on CPU. On a "
                         "CPU with AVX512-BF16 or AMX, bfloat16 runs ~1.5x faster (the quickstart uses it)."},
    )
    micro_batch_tokens: int = field(
        default=8192,
        metadata={"doc": "Most tokens (prompt + response, summed over rows) per forward/backward micro-batch."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"doc": "Recompute activations in backward: less memory, about a third more compute."}
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "LoRA adapter."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"doc": "Distillation loss."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "Optimizer and schedule."})

    def validate(self) -> None:
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.micro_batch_tokens >= 1, "micro_batch_tokens", f"must be >= 1, got {self.micro_batch_tokens}")
