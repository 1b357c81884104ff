"""One learner rank: a DeepSpeed engine around a PEFT LoRA model, trained on the distillation loss (or a
baseline's: SFT, GRPO).

    worker = LearnerWorker(model, LearnerConfig(), rank=0, world_size=1, total_steps=100)
    metrics = worker.train_step(micro_batches, global_tokens=..., num_micro_batches=...)

A plain class; ``learner.group`` runs one per Ray actor. Gradient bookkeeping and non-finite steps: see
docs/ARCHITECTURE.md ("The learner"); the EMA teacher: ("The teacher").
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from learner.batch import MicroBatch, empty_micro_batch
from learner.config import LearnerConfig, LearnerObjective
from learner.ema import EmaWeights
from learner.kinds import LearnerTeacher
from learner.schedule import build_scheduler
from opsd.adapter import AdapterPayload
from opsd.model import ModelSpec, as_model_spec, resolve_dtype


@dataclass
class StepMetrics:
    loss: float = 0.0  # this rank's share of the global loss (the group sums them)
    divergence_sum: float = 0.0  # unclipped per-token divergences, summed
    tokens: int = 0  # response tokens trained on by this rank
    clipped: int = 0  # clipped tokens (clip_mode token) or entries (pointwise)
    clip_entries: int = 0  # what could be clipped: tokens, or tokens x categories
    grad_norm: float = float("nan")
    lr: float = 0.0
    skipped: bool = False
    skip_reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LearnerWorker:
    def __init__(
        self,
        model: ModelSpec | str,
        config: LearnerConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        total_steps: int = 1,
        seed: int = 0,
        ema_decay: float | None = None,
        objective: LearnerObjective | None = None,
    ):
        """``ema_decay``: keep an EMA of the LoRA weights as the teacher (``teacher.kind=ema``); None: the teacher is
        the frozen base model. ``objective``: what to minimise (default: the distillation loss of ``config.loss``;
        SFT and GRPO: docs/ARCHITECTURE.md, "Baselines")."""
        model_spec = as_model_spec(model)
        self.config = config
        self.kind = (objective or LearnerObjective()).kind(config.loss)
        self.model_path = model_spec.path
        self.rank, self.world_size = rank, world_size
        self.total_steps = total_steps
        self.ema = EmaWeights(ema_decay) if ema_decay is not None else None
        if self.ema is not None and self.kind.runs_teacher_in_learner and config.zero_stage == 3:
            raise ValueError(f"an EMA teacher with loss kind {self.kind.name!r} needs zero_stage 0 to 2: the "
                             "in-process teacher swaps the EMA into the LoRA weights, which ZeRO-3 partitions")
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import
        # One process per rank; Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the local rank is 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port or free_port()), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        import deepspeed
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo", auto_mpi_discovery=False)
        self.device = f"cuda:{torch.cuda.current_device()}" if self.on_gpu else "cpu"
        self.dtype = resolve_dtype(config.dtype, self.on_gpu)
        model = AutoModelForCausalLM.from_pretrained(
            model_spec.path, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code,
            dtype=self.dtype, use_safetensors=True, attn_implementation="sdpa",
        )
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        _seed_everything(seed)  # the same LoRA initialisation on every rank
        lora = config.lora
        model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optim = config.optim
        optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      weight_decay=optim.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,  # set per step to the step's number of micro-batches
            "gradient_clipping": optim.grad_clip or 0.0,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        # ZeRO wraps the optimizer but steps the same param groups: the schedule drives the torch optimizer's lr.
        self.scheduler = build_scheduler(optimizer, total_steps, optim)
        self.step_count = 0
        self.pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def peft_model(self):
        return self.engine.module

    def _decoder(self):
        return self.peft_model.get_base_model().base_model  # the transformer stack, LoRA layers inside

    def _lm_head(self) -> torch.nn.Module:
        return self.peft_model.get_base_model().get_output_embeddings()

    def _teacher(self, frozen: bool = False) -> LearnerTeacher:
        """The teacher, for kinds that run it here (see :meth:`_teacher_weights`); ``frozen``: the base model
        whatever the teacher kind."""

        def hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self._teacher_weights(frozen):
                return self._decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return LearnerTeacher(hidden, self._lm_head())

    @contextmanager
    def _teacher_weights(self, frozen: bool = False):
        """The teacher's weights in the model for the body: the base model (adapter off) while there is no EMA
        (frozen teacher, or before the first applied step), else the EMA copied into the LoRA weights and the
        student's copied back afterwards, bit for bit (the official OPSD code's ``_ema_teacher_context``). The model
        is in eval mode inside (no LoRA dropout), as on the teacher actors."""
        training = self.peft_model.training
        self.peft_model.eval()
        saved: dict[str, torch.Tensor] = {}
        try:
            if frozen or self.ema is None or self.ema.params is None:
                with self.peft_model.disable_adapter():
                    yield
                return
            with torch.no_grad():
                for name, p in self.peft_model.named_parameters():
                    if name in self.ema.params:
                        saved[name] = p.data.clone()
                        p.data.copy_(self.ema.params[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.peft_model.named_parameters():
                    if name in saved:
                        p.data.copy_(saved[name])
            self.peft_model.train(training)

    def _full_lora(self) -> dict[str, torch.Tensor]:
        """Full fp32 values of the trainable (LoRA) parameters on this rank's device: DeepSpeed's fp32 master copy
        where it keeps one (gathered under ZeRO), else the parameter itself. A collective: all ranks must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.peft_model.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
                out[name] = (full if full is not None else p).detach().float()
        return out

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Full (gathered) fp32 copies of the LoRA tensors, for tests and checks. All ranks must call it."""
        return {name: value.cpu().clone() for name, value in self._full_lora().items()}

    @property
    def teacher_version(self) -> int:
        """The version of the teacher this learner runs or keeps: the EMA's (0 before its first update), 0 for the
        frozen base."""
        return self.ema.version if self.ema is not None else 0

    # ------------------------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch], global_tokens: int, num_micro_batches: int) -> StepMetrics:
        """One optimizer step over this rank's micro-batches (padded to ``num_micro_batches`` with empty ones)."""
        metrics = StepMetrics(lr=self.scheduler.get_last_lr()[0])
        timings = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        batches = list(micro_batches) + [empty_micro_batch(self.pad_id)] * (num_micro_batches - len(micro_batches))
        self.engine.set_train_batch_size(num_micro_batches * self.world_size)  # accumulation steps = micro-batches
        self.engine.train()
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            start = time.perf_counter()
            if batch.num_tokens == 0:
                # Run the same forwards as a real micro-batch (ZeRO-3 gathers weights in them) with a zero loss, so
                # this rank's gradient hooks and collectives stay in step with the others.
                self._idle_forwards(batch)
                loss = self._decoder()(input_ids=batch.input_ids).last_hidden_state.sum() * 0.0
            else:
                out = self._loss(batch, normalizer=global_tokens)
                loss = out.loss
                metrics.loss += float(out.loss.detach())
                metrics.divergence_sum += float(out.divergence_sum)
                metrics.tokens += out.num_tokens
                metrics.clipped += out.num_clipped
                metrics.clip_entries += out.num_clip_entries
            timings["forward"] += time.perf_counter() - start
            start = time.perf_counter()
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            timings["backward"] += time.perf_counter() - start
            start = time.perf_counter()
            if i == len(batches) - 1 and self.config.zero_stage == 0:
                self._check_gradients_zero0(metrics)
            self.engine.step()
            timings["optimizer"] += time.perf_counter() - start

        applied = self.engine.was_step_applied() and not metrics.skipped
        if not applied and not metrics.skipped:
            metrics.skipped, metrics.skip_reason = True, "non-finite gradient"
        if applied:
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self._full_lora())  # after every applied optimizer step, as the official code
        if self.config.zero_stage > 0:
            norm = self.engine.get_global_grad_norm()
            metrics.grad_norm = float(norm) if norm is not None and applied else float("nan")
        self.step_count += 1
        metrics.seconds = timings
        return metrics

    @torch.no_grad()
    def evaluate(self, micro_batches: list[MicroBatch], num_micro_batches: int) -> tuple[float, int]:
        """Sum of per-token divergences and token count under the current adapter, no update; an in-process
        teacher is the frozen base here, whatever the teacher kind (the held-out yardstick). All ranks must call it
        with the same ``num_micro_batches`` (ZeRO-3 gathers weights in the forwards)."""
        self.engine.eval()
        total, tokens = 0.0, 0
        batches = list(micro_batches) + [empty_micro_batch(self.pad_id)] * (num_micro_batches - len(micro_batches))
        for batch in batches:
            batch = batch.to(self.device)
            if batch.num_tokens == 0:
                self._idle_forwards(batch)
                self._decoder()(input_ids=batch.input_ids)
                continue
            out = self._loss(batch, normalizer=None, frozen_teacher=True)
            total += float(out.divergence_sum)
            tokens += out.num_tokens
        return total, tokens

    def _loss(self, batch: MicroBatch, normalizer: float | None, frozen_teacher: bool = False):
        """The student's forward on ``batch`` and the fused loss against the batch's teacher (``frozen_teacher``:
        an in-process teacher is the base model, whatever the teacher kind)."""
        import deepspeed

        # The teacher first: an EMA swapped into the LoRA weights is undone before the student's forward records its
        # graph.
        teacher_model = self._teacher(frozen_teacher)
        teacher = self.kind.loss_teacher(batch.teacher, teacher_model)
        hidden = self._decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        lm_head = teacher_model.lm_head
        # The fused loss reads lm_head's weight directly, outside the module's forward: under ZeRO-3 it must be
        # gathered first (read-only: lm_head is frozen under LoRA).
        with deepspeed.zero.GatheredParameters(list(lm_head.parameters()), enabled=self.config.zero_stage == 3):
            return self.kind.loss(hidden[batch.response_mask], lm_head, teacher, self.config.loss, normalizer)

    def _idle_forwards(self, batch: MicroBatch) -> None:
        """The teacher forward an empty micro-batch stands in for (kinds that run the teacher here)."""
        if self.kind.runs_teacher_in_learner:
            self._teacher().hidden(batch.input_ids, batch.attention_mask)

    def _check_gradients_zero0(self, metrics: StepMetrics) -> None:
        """ZeRO-0 has no overflow check and reports no norm: compute the global gradient norm here, and if it is not
        finite on any rank, every rank drops its gradients (AdamW skips parameters without one: no update, no
        moment change)."""
        import torch.distributed as dist

        grads = [p.grad for p in self.peft_model.parameters() if p.requires_grad and p.grad is not None]
        squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        squares = squares.reshape(1).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(squares)
        metrics.grad_norm = float(squares.sqrt())
        if not math.isfinite(metrics.grad_norm):
            for p in self.peft_model.parameters():
                p.grad = None
            metrics.skipped, metrics.skip_reason = True, "non-finite gradient"

    @torch.no_grad()
    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        """The student's (base + LoRA) logits for equal-length sequences, float32 on CPU. All ranks must call it."""
        self.engine.eval()
        out = self.peft_model(input_ids=torch.tensor(input_ids, device=self.device)).logits
        return out.float().cpu()

    # ------------------------------------------------------------------------------------------------------------
    def export_adapter(self, version: int) -> AdapterPayload | None:
        """The LoRA weights (gathered under ZeRO-3) as safetensors bytes + PEFT config. Every rank must call it; rank 0
        returns the payload, the others None."""
        import deepspeed
        from peft import get_peft_model_state_dict

        lora = [p for n, p in self.peft_model.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(lora, enabled=self.config.zero_stage == 3):
            if self.rank != 0:
                return None
            state = get_peft_model_state_dict(self.peft_model)
            tensors = {k: v.detach().to(torch.float32).cpu().contiguous().clone() for k, v in state.items()}
        if any(t.numel() == 0 for t in tensors.values()):
            raise RuntimeError("adapter export produced empty tensors (ZeRO-3 parameters not gathered)")
        return self._payload(version, tensors)

    def export_teacher_adapter(self) -> AdapterPayload | None:
        """The EMA teacher's LoRA weights as a payload of version ``teacher_version`` (the same PEFT config and
        tensor names as :meth:`export_adapter`); None while the teacher is the base model (no EMA, or none yet).
        Every rank holds the whole EMA: no collective."""
        from peft import get_peft_model_state_dict

        if self.ema is None or self.ema.params is None:
            return None
        state = get_peft_model_state_dict(self.peft_model, state_dict=self.ema.params)
        tensors = {k: v.detach().to(torch.float32).cpu().contiguous().clone() for k, v in state.items()}
        return self._payload(self.ema.version, tensors)

    def _payload(self, version: int, tensors: dict[str, torch.Tensor]) -> AdapterPayload:
        from safetensors.torch import save

        config = self.peft_model.peft_config["default"].to_dict()
        config = json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        config["base_model_name_or_path"] = self.model_path
        return AdapterPayload(version=version, weights=save(tensors), config=config)

    # ------------------------------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str, client_state: dict | None = None) -> None:
        """Adapter, optimizer, schedule, step, RNG states and the EMA teacher into ``directory`` (all ranks write
        their shards; rank 0 the EMA, the same on every rank; the caller makes the directory appear atomically, see
        LearnerGroup.save_checkpoint)."""
        state = {
            "step": self.step_count,
            "scheduler": self.scheduler.state_dict(),
            "client": client_state or {},
        }
        self.engine.save_checkpoint(directory, tag="learner", client_state=state, exclude_frozen_parameters=True)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save(rng, rng_state_path(directory, self.rank))
        if self.ema is not None and self.rank == 0:
            self.ema.save(ema_state_path(directory))

    def load_checkpoint(self, directory: str) -> dict:
        _, state = self.engine.load_checkpoint(directory, tag="learner", load_module_strict=False)
        if state is None:
            raise FileNotFoundError(f"no learner checkpoint in {directory}")
        self.step_count = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        rng = torch.load(rng_state_path(directory, self.rank), weights_only=False)
        random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
        if self.ema is not None:
            path = ema_state_path(directory)
            if not path.is_file():
                raise FileNotFoundError(f"{directory} holds no EMA teacher ({path.name}): it was saved with "
                                        "teacher.kind=frozen, and the EMA it would have kept cannot be rebuilt")
            names = {name for name, p in self.peft_model.named_parameters() if p.requires_grad}
            self.ema.load(path, names, self.device)
        return state["client"]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def rng_state_path(directory: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its RNG states in a checkpoint (one file per rank: also the proof it wrote there)."""
    return Path(directory) / f"rng-rank{rank}.pt"


def ema_state_path(directory: str | Path) -> Path:
    """Where a checkpoint keeps the EMA teacher (``teacher.kind=ema``), written by rank 0."""
    return Path(directory) / "ema-teacher.safetensors"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

