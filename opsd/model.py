"""The base model every stage loads (the run config's ``model`` section), and the dtype rule the stages share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from opsd.configlib import check

if TYPE_CHECKING:
    import torch

DtypeName = Literal["auto", "float32", "bfloat16"]


@dataclass
class ModelSpec:
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
    dtype: DtypeName = field(
        default="auto",
        metadata={
            "doc": "Weight dtype of the rollout engines (vLLM). 'auto': bfloat16 on GPU, float32 on CPU. "
            "teacher.dtype and learner.dtype set the other stages."
        },
    )

    def validate(self) -> None:
        check(bool(self.path.strip()), "path", "must name a Hugging Face model id or a local directory")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path

    def load_tokenizer(self) -> Any:
        from opsd.hf import load_tokenizer

        return load_tokenizer(self.tokenizer_path, self.revision, self.trust_remote_code)

    def load_config(self) -> Any:
        """The model's Hugging Face config (``AutoConfig``)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, revision=self.revision, trust_remote_code=self.trust_remote_code)

    def check(self) -> None:
        """Load the model's config and tokenizer (small files): a path, id or revision that cannot be used fails here,
        in one line naming it, before any actor starts."""
        from opsd.errors import UserInputError

        try:
            self.load_config()
        except (OSError, ValueError) as exc:
            raise UserInputError(f"model.path {self.path!r}: cannot load a model config: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.load_tokenizer()  # raises UserInputError naming the tokenizer path
        from pathlib import Path

        local = Path(self.path)
        if local.is_dir() and not any(local.glob("*.safetensors")):
            pickles = sorted(p.name for p in local.glob("*.bin")) + sorted(p.name for p in local.glob("*.pt"))
            raise UserInputError(f"model.path {self.path!r} has no safetensors weights"
                                 + (f" (only {', '.join(pickles[:3])}: pickle files are never loaded)" if pickles
                                    else "") + "; convert them with transformers' save_pretrained")

    def context_length(self) -> int | None:
        """The model's longest sequence (``max_position_embeddings``): what vLLM uses when max_model_len is unset."""
        from opsd.errors import UserInputError

        try:
            config = self.load_config()
        except (OSError, ValueError) as exc:
            raise UserInputError(f"cannot read the model config of {self.path!r}: {exc}") from exc
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if value else None

    def engine_dtype(self, on_cpu: bool) -> str:
        """The rollout engines' dtype name."""
        return dtype_name(self.dtype, on_gpu=not on_cpu)


def as_model_spec(model: ModelSpec | str) -> ModelSpec:
    return ModelSpec(path=model) if isinstance(model, str) else model


def dtype_name(name: DtypeName | str, on_gpu: bool) -> str:
    """``auto`` is bfloat16 on GPU and float32 on CPU: float32 is exact, and on CPUs without native bfloat16 it is
    also the fastest. On a CPU that computes bfloat16 natively (:func:`cpu_has_native_bf16`) ``bfloat16`` runs the
    teacher ~2x and the learner ~1.5x faster; the quickstart asks for it there."""
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return name


def resolve_dtype(name: DtypeName | str, on_gpu: bool) -> torch.dtype:
    import torch

    return getattr(torch, dtype_name(name, on_gpu))


def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU multiplies bfloat16 in hardware, by PyTorch's x86 probes (AVX512-BF16 or AMX).
    There, bfloat16 matmuls run at about twice the float32 rate; elsewhere PyTorch emulates them, slower than float32.
    Other CPUs (ARM included) answer False: float32 is kept, never a slow bfloat16."""
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and bool(probe()) for probe in probes)
