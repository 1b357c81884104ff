"""One learner rank: a DeepSpeed engine around a PEFT LoRA model, trained on the distillation loss.

    worker = LearnerWorker(model, LearnerConfig(), rank=0, world_size=1, total_steps=100)
    metrics = worker.train_step(micro_batches, global_tokens=..., num_micro_batches=...)

A plain class; ``learner.group`` runs one per Ray actor. Gradient bookkeeping and non-finite steps: see
docs/ARCHITECTURE.md ("The learner").
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from learner.batch import MicroBatch, empty_micro_batch
from learner.config import LearnerConfig
from learner.kinds import FrozenBase
from learner.loss import gjs_loss
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
    ):
        model_spec = as_model_spec(model)
        self.config = config
        self.kind = config.loss.loss_kind
        self.model_path = model_spec.path
        self.rank, self.world_size = rank, world_size
        self.total_steps = total_steps
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

    def _frozen_base(self) -> FrozenBase:
        """The base model with the adapter off: the teacher, for kinds that run it here."""

        def hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.peft_model.disable_adapter():
                return self._decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return FrozenBase(hidden, self._lm_head())

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Full (gathered) fp32 copies of the LoRA tensors, for tests and checks. All ranks must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.peft_model.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p) if self.config.zero_stage > 0 else p.detach()
                out[name] = full.detach().float().cpu().clone()
        return out

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
        if self.config.zero_stage > 0:
            norm = self.engine.get_global_grad_norm()
            metrics.grad_norm = float(norm) if norm is not None and applied else float("nan")
        self.step_count += 1
        metrics.seconds = timings
        return metrics

    @torch.no_grad()
    def evaluate(self, micro_batches: list[MicroBatch], num_micro_batches: int) -> tuple[float, int]:
        """Sum of per-token divergences and token count under the current adapter, no update. All ranks must call
        it with the same ``num_micro_batches`` (ZeRO-3 gathers weights in the forwards)."""
        self.engine.eval()
        total, tokens = 0.0, 0
        batches = list(micro_batches) + [empty_micro_batch(self.pad_id)] * (num_micro_batches - len(micro_batches))
        for batch in batches:
            batch = batch.to(self.device)
            if batch.num_tokens == 0:
                self._idle_forwards(batch)
                self._decoder()(input_ids=batch.input_ids)
                continue
            out = self._loss(batch, normalizer=None)
            total += float(out.divergence_sum)
            tokens += out.num_tokens
        return total, tokens

    def _loss(self, batch: MicroBatch, normalizer: float | None):
        """The student's forward on ``batch`` and the fused loss against the batch's teacher."""
        import deepspeed

        loss = self.config.loss
        hidden = self._decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        frozen = self._frozen_base()
        teacher = self.kind.loss_teacher(batch.teacher, frozen)
        lm_head = frozen.lm_head
        # The fused loss reads lm_head's weight directly, outside the module's forward: under ZeRO-3 it must be
        # gathered first (read-only: lm_head is frozen under LoRA).
        with deepspeed.zero.GatheredParameters(list(lm_head.parameters()), enabled=self.config.zero_stage == 3):
            return gjs_loss(hidden[batch.response_mask], lm_head.weight, teacher, kind=self.kind.name,
                            beta=loss.beta, temperature=loss.tau, bias=getattr(lm_head, "bias", None),
                            normalizer=normalizer, chunk_size=loss.chunk_size, clip=loss.clip,
                            clip_mode=loss.clip_mode if loss.clip is not None else "token")

    def _idle_forwards(self, batch: MicroBatch) -> None:
        """The teacher forward an empty micro-batch stands in for (kinds that run the frozen base here)."""
        if self.kind.runs_frozen_base:
            self._frozen_base().hidden(batch.input_ids, batch.attention_mask)

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
        from safetensors.torch import save

        lora = [p for n, p in self.peft_model.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(lora, enabled=self.config.zero_stage == 3):
            if self.rank != 0:
                return None
            state = get_peft_model_state_dict(self.peft_model)
            tensors = {k: v.detach().to(torch.float32).cpu().contiguous().clone() for k, v in state.items()}
        if any(t.numel() == 0 for t in tensors.values()):
            raise RuntimeError("adapter export produced empty tensors (ZeRO-3 parameters not gathered)")
        config = self.peft_model.peft_config["default"].to_dict()
        config = json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        config["base_model_name_or_path"] = self.model_path
        return AdapterPayload(version=version, weights=save(tensors), config=config)

    # ------------------------------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str, client_state: dict | None = None) -> None:
        """Adapter, optimizer, schedule, step and RNG states into ``directory`` (all ranks write their shards; the
        caller makes the directory appear atomically, see LearnerGroup.save_checkpoint)."""
        state = {
            "step": self.step_count,
            "scheduler": self.scheduler.state_dict(),
            "client": client_state or {},
        }
        self.engine.save_checkpoint(directory, tag="learner", client_state=state, exclude_frozen_parameters=True)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save(rng, rng_state_path(directory, self.rank))

    def load_checkpoint(self, directory: str) -> dict:
        _, state = self.engine.load_checkpoint(directory, tag="learner", load_module_strict=False)
        if state is None:
            raise FileNotFoundError(f"no learner checkpoint in {directory}")
        self.step_count = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        rng = torch.load(rng_state_path(directory, self.rank), weights_only=False)
        random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
        return state["client"]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def rng_state_path(directory: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its RNG states in a checkpoint (one file per rank: also the proof it wrote there)."""
    return Path(directory) / f"rng-rank{rank}.pt"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

