"""LoRA adapters: the ranks a vLLM engine serves, and every check of an adapter against a base model.

A rollout worker that is sent a bad adapter must say why, in terms of the adapter and the model, and keep serving
the previous version; ``opsd eval`` and ``opsd export`` refuse a bad adapter before any heavy work. What is checked
(a plain LoRA, its rank, its base model, its target modules, its weights' names, shapes and values):
docs/ARCHITECTURE.md ("Adapters").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opsd.adapter import AdapterError, AdapterPayload

if TYPE_CHECKING:
    import torch

_LORA_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
    "use_qalora": "QALoRA",
}

# The ranks a vLLM engine can be built for (vllm.config.lora.MaxLoRARanks). An adapter of any rank up to the
# engine's maximum loads: vLLM pads smaller ranks.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_lora_rank(rank: int) -> int:
    """The smallest engine LoRA rank that holds an adapter of ``rank``."""
    for choice in VLLM_LORA_RANKS:
        if choice >= rank:
            return choice
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest, {VLLM_LORA_RANKS[-1]}")


# init_lora_weights values that only choose the adapter's initial A and B: the saved adapter is a plain LoRA
# (the same list vLLM 0.32 accepts, vllm.lora.peft_helper).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# PEFT config keys whose (non-empty) value means something W0 + scale * B @ A cannot express.
_UNMERGEABLE = {
    "alora_invocation_tokens": "activated LoRA (applies only after its invocation tokens)",
    "layer_replication": "layer_replication (changes the model's layers)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (changes the embeddings)",
}


def model_linear_shapes(path: str, revision: str | None = None, trust_remote_code: bool = False
                        ) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of the model's linear layers, output head excluded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


@dataclass(frozen=True)
class AdapterTarget:
    """What an engine can serve: its base model, its largest LoRA rank, and the model's linear layers."""

    base_model: str
    max_rank: int
    linear_shapes: Mapping[str, tuple[int, int]]

    @property
    def layer_names(self) -> list[str]:
        """The short names of the linear layers (``q_proj``, ...), what PEFT's ``target_modules`` usually lists."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.linear_shapes})


def same_base_model(recorded: str, served: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names the model this worker serves (same id, or the
    same directory reached by another path)."""
    if recorded == served:
        return True
    if os.path.isdir(recorded) and os.path.isdir(served):
        return Path(recorded).resolve() == Path(served).resolve()
    return False


@dataclass(frozen=True)
class LoraWeights:
    """One layer's LoRA pair as PEFT stores it: ``a`` (rank, in_features), ``b`` (out_features, rank)."""

    a: torch.Tensor
    b: torch.Tensor


def validate_adapter(payload: AdapterPayload, target: AdapterTarget) -> int:
    """Raise :class:`AdapterError` naming the first problem of ``payload`` for ``target``; else return the number
    of LoRA layers it holds."""
    return len(validated_lora_weights(payload, target))


def validated_lora_weights(payload: AdapterPayload, target: AdapterTarget) -> dict[str, LoraWeights]:
    """:func:`validate_adapter`, returning the checked weights: ``{module name: LoraWeights}``."""
    where = f"adapter version {payload.version}"
    _check_config(payload, target, where)
    return _check_weights(payload, target, where)


def _check_config(payload: AdapterPayload, target: AdapterTarget, where: str) -> None:
    config = payload.config
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters can be served")
    for flag, name in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"{where}: {name} ({flag}) is not supported by the rollout engine (vLLM)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={config['bias']!r}; only bias='none' is supported by vLLM")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{where}: modules_to_save={config['modules_to_save']} (fully trained modules) cannot be served as a "
            "LoRA adapter; train LoRA layers only"
        )

    rank = payload.rank
    if rank < 1:
        raise AdapterError(f"{where}: adapter_config.json has no LoRA rank r >= 1 (got {config.get('r')!r})")
    ranks = {"r": rank} | {f"rank_pattern[{k!r}]": int(v) for k, v in (config.get("rank_pattern") or {}).items()}
    for key, value in ranks.items():
        if value > target.max_rank:
            raise AdapterError(
                f"{where}: LoRA rank {key}={value} is larger than this engine's max_lora_rank {target.max_rank}; "
                "the engines are built for learner.lora.rank: an adapter of another run needs engines sized for it"
            )

    recorded = payload.base_model
    if recorded and not same_base_model(recorded, target.base_model):
        raise AdapterError(
            f"{where} was trained on base model {recorded!r}, but this worker serves {target.base_model!r}"
        )

    targets = config.get("target_modules")
    if not targets:
        raise AdapterError(f"{where}: adapter_config.json lists no target_modules")
    if isinstance(targets, str):
        if targets != "all-linear" and not any(re.fullmatch(targets, n) for n in target.linear_shapes):
            raise AdapterError(f"{where}: target_modules pattern {targets!r} matches no linear layer of the model")
        return
    for module in targets:
        if not any(name == module or name.endswith("." + module) for name in target.linear_shapes):
            raise AdapterError(
                f"{where}: target module {module!r} is not a linear layer of the model's transformer blocks, "
                f"the layers the rollout engine serves LoRA on ({', '.join(target.layer_names)})"
            )


def _check_weights(payload: AdapterPayload, target: AdapterTarget, where: str) -> dict[str, LoraWeights]:
    import torch
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(payload.weights)
    except Exception as exc:  # any parse failure means the bytes are not a usable safetensors file
        raise AdapterError(f"{where}: weights are not a readable safetensors file ({exc})") from exc
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY_RE.match(key)
        if match is None:
            raise AdapterError(
                f"{where}: unexpected tensor {key!r} in the weights "
                "(expected base_model.model.<module>.lora_A.weight / .lora_B.weight only)"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise AdapterError(f"{where}: the weights file holds no LoRA tensors")

    patterned = bool(payload.config.get("rank_pattern"))
    for module, pair in sorted(pairs.items()):
        if module not in target.linear_shapes:
            raise AdapterError(
                f"{where}: the weights hold LoRA tensors for {module!r}, which is not a linear layer of the model's "
                "transformer blocks"
            )
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"{where}: {module} has no {missing} weight")
        a, b = pair["A"], pair["B"]
        in_features, out_features = target.linear_shapes[module]
        rank = a.shape[0] if a.dim() == 2 else -1
        expected_rank = rank if patterned else payload.rank
        if a.dim() != 2 or b.dim() != 2 or a.shape != (expected_rank, in_features) or b.shape != (out_features, rank):
            raise AdapterError(
                f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; this model's layer "
                f"and rank {expected_rank} need lora_A ({expected_rank}, {in_features}) and lora_B "
                f"({out_features}, {expected_rank})"
            )
        if rank > target.max_rank:
            raise AdapterError(f"{where}: {module} has rank {rank} > max_lora_rank {target.max_rank}")
        for name, tensor in (("lora_A", a), ("lora_B", b)):
            if not tensor.is_floating_point():
                raise AdapterError(f"{where}: {module}.{name} has dtype {tensor.dtype}, expected a float type")
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{where}: {module}.{name} holds NaN or infinite values")
    return {module: LoraWeights(a=pair["A"], b=pair["B"]) for module, pair in sorted(pairs.items())}


def check_mergeable(payload: AdapterPayload) -> None:
    """Raise :class:`AdapterError` if the adapter uses a PEFT feature that merging does not reproduce."""
    where = f"adapter version {payload.version}"
    config = payload.config
    for key, feature in _UNMERGEABLE.items():
        if config.get(key):
            raise AdapterError(f"{where}: {feature} ({key}) cannot be served as merged weights")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        raise AdapterError(
            f"{where}: init_lora_weights={init!r} cannot be served as merged weights: PEFT changes the base weights "
            "when it loads such an adapter (PiSSA, OLoRA, CorDA, LoftQ). Convert it to a plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion when saving"
        )
    if not isinstance(config.get("lora_alpha"), (int, float)) or isinstance(config.get("lora_alpha"), bool):
        raise AdapterError(f"{where}: adapter_config.json has no numeric lora_alpha (got {config.get('lora_alpha')!r})")
