"""A LoRA adapter version as it travels from the learner to the rollout workers.

The learner serialises the adapter once (safetensors bytes + the PEFT ``adapter_config.json``), puts it in Ray's
object store, and every rollout worker loads it as a new version. The same payload written to a directory is a plain
PEFT adapter directory: ``PeftModel.from_pretrained`` and vLLM's ``--lora-modules`` load it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from opsd.atomic import atomic_directory
from opsd.errors import UserInputError

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class AdapterError(UserInputError):
    """An adapter that cannot be used here (wrong base model, rank, target modules, or a broken file)."""


@dataclass(frozen=True)
class AdapterPayload:
    """One adapter version: ``version`` >= 1 (0 is the base model, which has no payload)."""

    version: int
    weights: bytes  # safetensors file contents
    config: dict = field(default_factory=dict)  # PEFT adapter_config.json contents

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    @property
    def target_modules(self) -> list[str]:
        modules = self.config.get("target_modules") or []
        return sorted([modules] if isinstance(modules, str) else modules)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def write_adapter_dir(payload: AdapterPayload, out_dir: str | os.PathLike) -> Path:
    """Write the payload as a PEFT adapter directory, atomically (an existing one is replaced)."""
    with atomic_directory(out_dir, overwrite=True) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(payload.weights)
        (tmp / CONFIG_FILE).write_text(json.dumps(payload.config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def read_adapter_dir(path: str | os.PathLike, version: int) -> AdapterPayload:
    """A PEFT adapter directory (safetensors weights only) as a payload."""
    folder = Path(path)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter directory: it needs {WEIGHTS_FILE} and {CONFIG_FILE}")
    try:
        parsed = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config}: invalid JSON ({exc})") from exc
    return AdapterPayload(version=version, weights=weights.read_bytes(), config=parsed)
