"""The EMA teacher's weights (``teacher.kind=ema``): an exponential moving average of the student's LoRA weights.

    ema = EmaWeights(decay=0.999)
    ema.update(student)          # after each applied optimizer step; the first call copies the student
    ema.params                   # {parameter name: fp32 tensor}, None before the first update (teacher = base model)

The update rule is the official OPSD code's (siyan-zhao/OPSD, ``opsd_trainer.py``, ``_update_ema``); where the EMA
lives and how it reaches the teachers: docs/ARCHITECTURE.md ("The teacher").
"""

from __future__ import annotations

import os
from typing import Mapping

import torch


class EmaWeights:
    """An EMA of named tensors, kept in float32 on the tensors' device.

    The first :meth:`update` copies the student's weights and applies no decay; each later one computes
    ``ema = decay * ema + (1 - decay) * student``. ``version`` counts the updates: it is the learner's adapter version
    the EMA was last updated at (0: none yet, the teacher is the base model)."""

    def __init__(self, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params: dict[str, torch.Tensor] | None = None
        self.version = 0

    def update(self, student: Mapping[str, torch.Tensor]) -> None:
        if self.params is None:
            self.params = {name: value.detach().float().clone() for name, value in student.items()}
        else:
            if student.keys() != self.params.keys():
                raise ValueError("the student's parameters differ from the EMA's")
            for name, ema in self.params.items():
                ema.mul_(self.decay).add_(student[name].detach().float(), alpha=1.0 - self.decay)
        self.version += 1

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: the tensors (none before the first update) and the version in its metadata."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in (self.params or {}).items()}
        save_file(tensors, str(path), metadata={"version": str(self.version), "decay": repr(self.decay)})

    def load(self, path: str | os.PathLike, names: set[str], device: str | torch.device) -> None:
        """Restore what :meth:`save` wrote; ``names`` are the student's parameter names, which the file must hold
        (unless it was saved before the first update)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            version = int((f.metadata() or {}).get("version", -1))
            tensors = {name: f.get_tensor(name).to(device) for name in f.keys()}
        if version < 0:
            raise ValueError(f"{path} holds no EMA version")
        if version > 0 and set(tensors) != names:
            missing = sorted(names - set(tensors)) or sorted(set(tensors) - names)
            raise ValueError(f"{path}: the EMA's tensors do not match the student's parameters (e.g. {missing[0]!r})")
        self.params = tensors if version > 0 else None
        self.version = version
