"""The two ways a rollout engine serves an adapter version (``rollout.adapter_serving``): ``lora`` (vLLM's LoRA
support, the GPU default) and ``merged`` (written into the engine's weights, the CPU default).

Both take an adapter :mod:`opsd.lora` has validated, and either serve it completely or raise
:class:`opsd.adapter.AdapterError` with the engine still serving the previous version. How and why:
docs/ARCHITECTURE.md ("Adapters").
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from opsd.adapter import AdapterError, AdapterPayload, write_adapter_dir
from opsd.configlib import ConfigError
from opsd.lora import LoraWeights
from rollout.config import AdapterServing
from rollout.merge import BaseWeights, base_weights_in, merged_weights


class EngineWeightsError(RuntimeError):
    """Writing weights into the engine failed part-way: what it serves is unknown, so it must not sample."""


class AdapterServer(Protocol):
    """What the worker needs from a serving mode."""

    mode: AdapterServing

    @property
    def lora_request(self) -> Any:
        """The ``lora_request`` for ``LLM.generate`` (None: the engine's own weights)."""

    def serve(self, payload: AdapterPayload, lora: Mapping[str, LoraWeights]) -> None:
        """Serve ``payload`` (validated; ``lora`` its weights) from the next ``generate`` on."""

    def serve_base(self) -> None:
        """Serve the base model (version 0)."""


class LoraServing:
    """Adapters as vLLM LoRA requests (docs/ARCHITECTURE.md, "Adapters")."""

    mode: AdapterServing = "lora"

    def __init__(self, llm: Any, adapter_root: Path):
        self.llm = llm
        self.adapter_root = adapter_root
        self._request: Any = None  # vllm LoRARequest of the version served, None for the base model
        self._dir: Path | None = None
        self._loads = 0  # LoRA int ids: one per load, never reused

    @property
    def lora_request(self) -> Any:
        return self._request

    def serve(self, payload: AdapterPayload, lora: Mapping[str, LoraWeights]) -> None:
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.exceptions import EngineDeadError

        version = payload.version
        self._loads += 1
        lora_id = self._loads
        folder = write_adapter_dir(payload, self.adapter_root / f"v{version}-{lora_id}")
        request = LoRARequest(lora_name=f"opsd-v{version}-{lora_id}", lora_int_id=lora_id, lora_path=str(folder))
        try:
            added = self.llm.llm_engine.add_lora(request)
        except EngineDeadError:
            raise
        except Exception as exc:  # vLLM refused this adapter; the engine and the version it serves are intact
            shutil.rmtree(folder, ignore_errors=True)
            raise AdapterError(f"adapter version {version}: the engine refused it ({type(exc).__name__}: {exc})"
                               ) from exc
        if not added:
            shutil.rmtree(folder, ignore_errors=True)
            raise AdapterError(f"adapter version {version}: the engine did not add it")
        self._switch(request, folder)

    def serve_base(self) -> None:
        self._switch(None, None)

    def _switch(self, request: Any, folder: Path | None) -> None:
        """Switch to ``request`` (None: base model), then drop the previous version from the engine and disk."""
        previous, previous_dir = self._request, self._dir
        self._request, self._dir = request, folder
        if previous is not None:
            # False when vLLM already evicted it from its cache: either way it is gone.
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        if previous_dir is not None:
            shutil.rmtree(previous_dir, ignore_errors=True)


class MergedServing:
    """Adapters written into the engine's weights (docs/ARCHITECTURE.md, "Adapters"). Needs the in-process (CPU)
    engine."""

    mode: AdapterServing = "merged"

    def __init__(self, llm: Any, base: BaseWeights):
        model_config = llm.llm_engine.model_config
        if model_config.quantization is not None:
            raise ConfigError("rollout.adapter_serving", f"'merged' cannot add LoRA deltas to {model_config.model}'s "
                              f"{model_config.quantization}-quantized weights; use 'lora' for this model")
        self.llm = llm
        self.base = base
        self.dtype = model_config.dtype
        self._merged = False  # whether the engine holds an adapter's weights (else W0, as loaded)
        # Write W0 once: the engine already holds it, but this checks now, not at the first adapter, that vLLM's
        # loader takes every tensor under the names merged writes use.
        try:
            self._write(base_weights_in(base, self.dtype))
        except EngineWeightsError as exc:
            raise ConfigError("rollout.adapter_serving", f"'merged' cannot write {model_config.model}'s layers into "
                              f"the vLLM engine ({exc.__cause__}); use 'lora' for this model") from exc

    @property
    def lora_request(self) -> Any:
        return None

    def serve(self, payload: AdapterPayload, lora: Mapping[str, LoraWeights]) -> None:
        weights = merged_weights(payload, lora, self.base, self.dtype)  # raises AdapterError before any write
        self._write(weights)
        self._merged = True

    def serve_base(self) -> None:
        if self._merged:
            self._write(base_weights_in(self.base, self.dtype))
            self._merged = False

    def _write(self, weights: list[tuple[str, Any]]) -> None:
        """Write whole layers into the engine, then drop every prefix-cache entry (KV of the old weights)."""
        try:
            with _expected_partial_reload():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                                  "is_checkpoint_format": True})
        except Exception as exc:
            raise EngineWeightsError(f"writing {len(weights)} tensors into the engine failed part-way "
                                     f"({type(exc).__name__}: {exc})") from exc
        if not self.llm.reset_prefix_cache():
            raise EngineWeightsError("the engine refused to reset its prefix cache after a weight write")


class _PartialReloadFilter(logging.Filter):
    """vLLM's in-place reload warns about every layer it got no tensors for: in a merged write that is every layer
    an adapter cannot target (embeddings, norms, output head), by design, at every version."""

    MESSAGES = ("%s: Failed to load weights", "Following weights were not loaded from checkpoint: %s")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.MESSAGES


@contextmanager
def _expected_partial_reload() -> Iterator[None]:
    loggers = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}") for name in ("layerwise",
                                                                                                 "inplace")]
    quiet = _PartialReloadFilter()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
