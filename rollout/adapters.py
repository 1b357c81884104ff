"""Checking a LoRA adapter version against the engine before it is loaded.

A rollout worker that is sent a bad adapter must say why, in terms of the adapter and the model (vLLM reports
some of these problems itself, but from inside the engine and in its own module names), and keep serving the
previous version. So everything that can be checked on the payload alone is checked here, before the engine sees
it:

* the PEFT config: a plain LoRA (no DoRA, no bias, no ``modules_to_save``), rank <= the engine's ``max_lora_rank``
  (vLLM pads smaller ranks, so any rank up to it is fine);
* the base model it was trained on, when the adapter records one;
* its target modules: linear layers of the transformer blocks (not the output head: rollout, teacher and learner
  all keep the base model's head and embeddings);
* its weights: a readable safetensors file of ``lora_A`` / ``lora_B`` pairs, each with the shapes the model's layer
  and the rank imply, all values finite.

The model's layers are read from a meta-device instance of its Hugging Face class (no weights, no memory), so the
names are the ones PEFT writes in the adapter file. These checks are shared by both ways of serving an adapter
(``rollout.adapter_serving``). What vLLM still refuses after this in ``lora`` mode (an unsupported PEFT option) is
reported by the worker as an :class:`AdapterError` too; ``merged`` mode refuses such options itself
(:func:`rollout.merge.check_mergeable`).
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
