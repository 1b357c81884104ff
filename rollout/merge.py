"""An adapter version as merged weights: ``W = W0 + scale * B @ A`` (as PEFT computes it), and the base weights ``W0``
read once from the model's safetensors. Used by the ``merged`` way of serving adapters (:mod:`rollout.serving`);
nothing here touches vLLM. The rules and what is refused: docs/ARCHITECTURE.md ("Adapters").
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsd.adapter import AdapterError, AdapterPayload
from opsd.lora import check_mergeable
from opsd.configlib import ConfigError

if TYPE_CHECKING:
    import torch

    from opsd.lora import LoraWeights

_CONFIG_KEY = "rollout.adapter_serving"


def _pattern_value(patterns: Mapping[str, Any] | None, module: str) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first pattern that ``module`` ends with at a ``.`` boundary."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def lora_scale(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """``(rank, scale)`` PEFT uses for ``module`` (a name like ``model.layers.0.self_attn.q_proj``)."""
    rank = _pattern_value(config.get("rank_pattern"), module)
    rank = int(config["r"] if rank is None else rank)
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    alpha = float(config["lora_alpha"] if alpha is None else alpha)
    return rank, (alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)


@dataclass(frozen=True)
class BaseWeights:
    """``W0`` (and bias) of the layers an adapter may target, by Hugging Face tensor name, checkpoint dtype."""

    tensors: Mapping[str, torch.Tensor]  # "<module>.weight" / "<module>.bias"
    modules: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_base_weights(model: str, linear_shapes: Mapping[str, tuple[int, int]], revision: str | None = None
                      ) -> BaseWeights:
    """Read ``W0`` of every layer in ``linear_shapes`` (``{module: (in_features, out_features)}``) from the
    model's safetensors files. Raises :class:`ConfigError` (key ``rollout.adapter_serving``) if the checkpoint
    does not hold them as plain tensors of those shapes."""
    from safetensors import safe_open

    files = _safetensors_files(model, revision)
    wanted = {f"{m}.weight" for m in linear_shapes} | {f"{m}.bias" for m in linear_shapes}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in wanted:
                    tensors[name] = f.get_tensor(name)
    for module, (in_features, out_features) in linear_shapes.items():
        weight = tensors.get(f"{module}.weight")
        if weight is None:
            raise ConfigError(
                _CONFIG_KEY,
                f"'merged' reads the base weight of each layer an adapter may target from {model}'s safetensors, by "
                f"its Hugging Face name; {module}.weight is not there (quantized or renamed checkpoint?). Use "
                "'lora' for this model",
            )
        if tuple(weight.shape) != (out_features, in_features) or not weight.is_floating_point():
            raise ConfigError(
                _CONFIG_KEY,
                f"'merged' needs {module}.weight of {model} as a float ({out_features}, {in_features}) tensor, the "
                f"torch.nn.Linear layout; the checkpoint holds {weight.dtype} {tuple(weight.shape)}. Use 'lora' "
                "for this model",
            )
    return BaseWeights(tensors=tensors, modules=tuple(sorted(linear_shapes)))


def _safetensors_files(model: str, revision: str | None) -> list[Path]:
    folder = Path(model)
    if not folder.is_dir():  # a hub id: the snapshot the engine loaded, from the local cache
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(_CONFIG_KEY, f"'merged' reads the base weights from safetensors files; {os.fspath(folder)} "
                                       "has none. Use 'lora' for this model")
    return files


def merged_weights(payload: AdapterPayload, lora: Mapping[str, LoraWeights], base: BaseWeights,
                   dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Every base tensor in ``dtype``, with ``scale * B @ A`` added to the weight of each layer ``lora`` holds.

    Layers the adapter does not hold are their base weight, so the result does not depend on what the engine
    served before. ``lora`` is the adapter's validated weights (:func:`opsd.lora.validated_lora_weights`).
    Raises :class:`AdapterError` if a layer's rank disagrees with the config or a merged weight is not finite in
    ``dtype``.
    """
    import torch

    where = f"adapter version {payload.version}"
    check_mergeable(payload)
    unknown = sorted(set(lora) - set(base.modules))
    if unknown:
        raise AdapterError(f"{where}: no base weights for {unknown[0]}")
    out: list[tuple[str, torch.Tensor]] = []
    for name, w0 in _by_module(base):
        module, _, kind = name.rpartition(".")
        pair = lora.get(module) if kind == "weight" else None
        if pair is None:
            out.append((name, w0.to(dtype)))
            continue
        rank, scale = lora_scale(payload.config, module)
        if pair.a.shape[0] != rank:
            raise AdapterError(f"{where}: {module} has lora_A of rank {pair.a.shape[0]}, its config says rank {rank}")
        merged = torch.addmm(w0.to(torch.float32), pair.b.to(torch.float32), pair.a.to(torch.float32), alpha=scale)
        merged = merged.to(dtype)
        if not bool(torch.isfinite(merged).all()):
            raise AdapterError(f"{where}: the merged weight of {module} is not finite in {dtype}")
        out.append((name, merged))
    return out


def base_weights_in(base: BaseWeights, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """The base tensors in ``dtype``, as written to serve the base model (version 0)."""
    return [(name, tensor.to(dtype)) for name, tensor in _by_module(base)]


def _by_module(base: BaseWeights) -> Iterator[tuple[str, torch.Tensor]]:
    # Layer by layer: vLLM's in-place reload buffers a layer until all its tensors have arrived.
    for module in base.modules:
        for kind in ("weight", "bias"):
            name = f"{module}.{kind}"
            if name in base.tensors:
                yield name, base.tensors[name]
