"""The product's learner step timed: learner.worker.LearnerWorker (DeepSpeed ZeRO-0 / ZeRO-2, world size 1) against a
plain PyTorch loop of the same step, in one run, with MFU.

    python benchmarks/learner_worker.py                      # Qwen3-1.7B shape on CUDA (what benchmarks/gpu.sh runs)
    python benchmarks/learner_worker.py --tiny               # tiny Qwen3 on CPU, seconds: the script's own check

The step: ``--rows`` rows of ``--prompt`` random prompt tokens + ``--response`` random response tokens (default
8 x (256 + 2,048), 16,384 response tokens, as 8 rollouts of 2K). LoRA r=64 (alpha 128) on q,k,v,o,gate,up,down,
AdamW, gradient clipping 1.0, loss chunk 1,024 (learner.loss.chunk_size's default), bf16 on CUDA (float32 on CPU).
Loss kinds:
  full   the paper's default: the learner runs its frozen base (adapter off) on each row's teacher context,
         --teacher-prompt random tokens + the same response (default 768 + 2,048), and the fused GJS loss over the
         whole vocabulary
  topk   topk_tail: the teacher's top-64 + tail per response position as the teacher actors send it (synthetic
         log-probs: distinct ids, normalised over k + 1 categories); no teacher forward in the learner
The rows are the product's learner.batch.Row; plan_step packs them into micro-batches of learner.micro_batch_tokens
padded tokens (a full row packs as max(student, teacher context) = 2,816 tokens), collated by the loss kind.

Configurations, LEARNER:KIND[:OPTION...] (--configs):
  zero0 / zero2   LearnerWorker.train_step, DeepSpeed ZeRO stage 0 / 2, NCCL on CUDA (gloo on CPU), world size 1
  plain           the same micro-batches, model, LoRA and loss kind without DeepSpeed: loss.backward() per
                  micro-batch, clip_grad_norm_, torch.optim.AdamW (benchmarks/learner_step.py's loop, micro-batched)
  naive           plain, with the naive GJS (benchmarks/loss.py naive_gjs: [T, V] logits) instead of the fused loss
                  (full kind only)
  rN              N rows per micro-batch (micro_batch_tokens = N x the longest packed row); default: the product's
                  learner.micro_batch_tokens default (8,192: 2 full rows or 3 topk rows per micro-batch)
  tN              micro_batch_tokens = N
  ckpt            gradient checkpointing (learner.gradient_checkpointing)
Each configuration runs in a fresh process (one DeepSpeed engine and one CUDA allocator per measurement): warm-up
step(s), then --steps timed steps (median). Peak memory: torch.cuda.max_memory_allocated over the timed steps (CPU:
the process's VmHWM). The ratio column compares each row with the plain loop of the same loss kind and micro-batching.

MFU = useful FLOPs per step / (seconds per step x the card's dense bf16 peak); the formula is printed with the table.
Useful FLOPs count the real (unpadded) tokens and no recomputation; LoRA's own FLOPs (about 5% of the forward at
r=64) are left out, so MFU is a slight underestimate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before this folder: benchmarks/learner*.py must not shadow the learner package
sys.path.insert(1, str(REPO_ROOT / "benchmarks"))

from bench_model import (REAL_TOKENS, Shape, build_model_dir, machine_name, memory_label, mfu_text,  # noqa: E402
                         peak_bytes, peak_flops, reset_peak)

# In priority order (a time budget drops the last ones). zero2:full:ckpt is the paper recipe's learner
# (recipes/opsd-qwen3-1.7b-paper.yaml: ZeRO-2, full, gradient checkpointing, the default micro_batch_tokens).
DEFAULT_CONFIGS = ["plain:full", "zero0:full", "zero2:full", "zero2:full:ckpt", "plain:topk", "zero0:topk",
                   "zero2:topk", "zero2:full:r1", "zero2:full:r4", "naive:full"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOP_K = 64


@dataclass(frozen=True)
class Spec:
    name: str
    learner: str  # plain | naive | zero0 | zero2
    kind: str  # full | topk_tail
    rows_per_micro: int | None = None
    micro_batch_tokens: int | None = None
    checkpointing: bool = False

    @classmethod
    def parse(cls, text: str) -> Spec:
        parts = text.split(":")
        if len(parts) < 2 or parts[0] not in ("plain", "naive", "zero0", "zero2") or parts[1] not in ("full", "topk"):
            raise SystemExit(f"bad configuration {text!r}: LEARNER:KIND[:OPTION...], LEARNER plain|naive|zero0|zero2, "
                             f"KIND full|topk, OPTION rN|tN|ckpt")
        rows = tokens = None
        ckpt = False
        for option in parts[2:]:
            if option == "ckpt":
                ckpt = True
            elif option[:1] in ("r", "t") and option[1:].isdigit():
                rows, tokens = (int(option[1:]), tokens) if option[0] == "r" else (rows, int(option[1:]))
            else:
                raise SystemExit(f"bad option {option!r} in {text!r}: rN, tN or ckpt")
        if parts[0] == "naive" and parts[1] != "full":
            raise SystemExit("the naive loss is the full-vocabulary one: naive:full")
        return cls(text, parts[0], "full" if parts[1] == "full" else "topk_tail", rows, tokens, ckpt)

    @property
    def baseline_key(self) -> tuple:
        return (self.kind, self.rows_per_micro, self.micro_batch_tokens, self.checkpointing)


# -- one configuration, in this process ----------------------------------------------------------------------------
def synthetic_rows(kind: str, args) -> list:
    """The product's Rows: random ids of the exact lengths, the kind's teacher data."""
    import numpy as np
    import torch

    from learner.batch import Row
    from opsd.teacher_context import TeacherContext

    g = torch.Generator().manual_seed(0)
    vocab = Shape.from_dir(args.model_dir).vocab
    rows = []
    for i in range(args.rows):
        prompt = torch.randint(0, REAL_TOKENS, (args.prompt,), generator=g).tolist()
        response = torch.randint(0, REAL_TOKENS, (args.response,), generator=g).tolist()
        if kind == "full":
            teacher_prompt = torch.randint(0, REAL_TOKENS, (args.teacher_prompt,), generator=g).tolist()
            teacher = TeacherContext(i, teacher_prompt + response, args.teacher_prompt)
            teacher_tokens = len(teacher.input_ids)
        else:
            base = torch.randint(0, vocab, (args.response, 1), generator=g)
            ids = (base + torch.arange(TOP_K) * (vocab // TOP_K)) % vocab  # k distinct ids per position
            logp = torch.log_softmax(3 * torch.randn(args.response, TOP_K + 1, generator=g), dim=-1)
            top = logp[:, :TOP_K].sort(dim=-1, descending=True).values
            teacher = (ids.numpy().astype(np.int32), top.numpy(), logp[:, TOP_K].contiguous().numpy())
            teacher_tokens = 0
        rows.append(Row(f"bench-{i}", prompt + response, args.prompt, teacher, teacher_tokens))
    return rows


def step_flops(shape: Shape, rows, kind: str) -> dict:
    """Useful FLOPs of one step (see the module docstring and FORMULA)."""
    student = sum(4 * shape.non_embedding_params * len(r.input_ids) + 3 * shape.attention_forward(len(r.input_ids))
                  for r in rows)
    teacher = sum(shape.forward(r.teacher_tokens) for r in rows) if kind == "full" else 0
    response = sum(r.response_length for r in rows)
    head = (3 if kind == "full" else 2) * shape.lm_head * response
    return {"student": student, "teacher": teacher, "lm_head": head, "total": student + teacher + head}


def learner_config(spec: Spec, args, rows):
    from learner.config import LearnerConfig, LoraConfig, LossConfig, OptimConfig

    longest = max(max(len(r.input_ids), r.teacher_tokens) for r in rows)
    tokens = spec.micro_batch_tokens or (spec.rows_per_micro * longest if spec.rows_per_micro else None)
    config = LearnerConfig(num_workers=1, gpus_per_worker=0, zero_stage=2 if spec.learner == "zero2" else 0,
                           dtype=args.dtype, gradient_checkpointing=spec.checkpointing,
                           lora=LoraConfig(rank=args.rank, alpha=2 * args.rank, target_modules=list(TARGETS)),
                           loss=LossConfig(kind=spec.kind, chunk_size=args.chunk),
                           optim=OptimConfig(lr=1e-5, schedule="constant"))
    if tokens:
        config.micro_batch_tokens = tokens
    return config


def run_one(spec: Spec, args) -> dict:
    import torch

    from learner.batch import plan_step

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    rows = synthetic_rows("full" if spec.kind == "full" else "topk", args)
    config = learner_config(spec, args, rows)
    plan = plan_step(rows, 1, config.micro_batch_tokens)
    kind = config.loss.loss_kind
    start = time.perf_counter()
    if spec.learner in ("zero0", "zero2"):
        from learner.worker import LearnerWorker

        worker = LearnerWorker(args.model_dir, config, total_steps=args.warmup + args.steps + 1)
        batches = plan.micro_batches(0, kind, worker.pad_id)

        def step():
            m = worker.train_step(batches, plan.global_tokens, plan.num_micro_batches)
            return m.loss, m.grad_norm, m.skipped
    else:
        step = plain_step(spec, config, plan, args.model_dir, device)
    init = time.perf_counter() - start
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup = time.perf_counter() - start
    reset_peak(device)
    times, loss, norm, skipped = [], float("nan"), float("nan"), False
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, norm, skipped = step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = step_flops(Shape.from_dir(args.model_dir), rows, "full" if spec.kind == "full" else "topk")
    return {
        "config": spec.name, "learner": spec.learner, "kind": spec.kind, "device": device,
        "micro_batches": plan.num_micro_batches, "micro_batch_tokens": config.micro_batch_tokens,
        "rows_per_micro": max(len(b) for b in plan.micro[0]), "checkpointing": spec.checkpointing,
        "init_s": init, "warmup_s": warmup, "step_s": seconds, "step_times": times,
        "response_tokens": plan.global_tokens, "student_tokens": sum(len(r.input_ids) for r in rows),
        "teacher_tokens": sum(r.teacher_tokens for r in rows), "flops": flops, "peak_bytes": peak_bytes(device),
        "loss": float(loss), "grad_norm": float(norm), "skipped": bool(skipped), "dtype": str(config.dtype),
        "torch": torch.__version__, "deepspeed": _version("deepspeed"), "machine": machine_name(device),
        "peak": peak_flops(device, args.peak_tflops),
    }


def plain_step(spec: Spec, config, plan, model_dir: str, device: str):
    """The same step without DeepSpeed: per micro-batch forward + loss + backward, then clip and AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from learner.kinds import LearnerTeacher
    from learner.loss import gjs_loss
    from loss import naive_gjs  # benchmarks/loss.py
    from opsd.model import resolve_dtype

    dtype = resolve_dtype(config.dtype, device == "cuda")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                 attn_implementation="sdpa").to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    lora = config.lora
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = config.optim
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    pad = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    kind = config.loss.loss_kind
    batches = plan.micro_batches(0, kind, pad)
    decoder = model.get_base_model().base_model
    lm_head = model.get_base_model().get_output_embeddings()

    def teacher_hidden(input_ids, attention_mask):
        with torch.no_grad(), model.disable_adapter():
            return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    frozen = LearnerTeacher(teacher_hidden, lm_head)
    total = plan.global_tokens

    def step():
        model.train()
        loss_sum = 0.0
        for batch in batches:
            batch = batch.to(device)
            hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            student = hidden[batch.response_mask]
            if spec.learner == "naive":
                t = batch.teacher
                t_hidden = frozen.hidden(t.input_ids, t.attention_mask)[t.response_mask]
                loss = naive_gjs(student, t_hidden, lm_head.weight) * (student.shape[0] / total)
            else:
                loss = gjs_loss(student, lm_head.weight, kind.loss_teacher(batch.teacher, frozen), kind=kind.name,
                                beta=config.loss.beta, temperature=config.loss.tau, normalizer=total,
                                chunk_size=config.loss.chunk_size).loss
            loss.backward()
            loss_sum += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, float(norm), False

    return step


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "-"


# -- the table ------------------------------------------------------------------------------------------------------
def formula_lines(shape: Shape, peak_text: str) -> list[str]:
    return [
        "FLOPs per step (useful: real tokens, no recomputation, LoRA's own FLOPs left out):",
        *("  " + line for line in shape.formula_lines()),
        "  student, per row of s = prompt + response tokens: 4 N s + 3 attn(s)  (forward 2 N s + attn(s); backward "
        "to the activations 2 N s + 2 attn(s); no weight gradients: the base is frozen)",
        "  teacher (full kind), per row of t = teacher-context tokens: 2 N t + attn(t)  (forward, no grad)",
        "  lm_head, per response token: 2 V H (student logits) + 2 V H (d loss / d hidden) [+ 2 V H teacher logits, "
        "full kind]",
        f"  MFU = FLOPs / (step seconds x peak); peak = {peak_text}",
    ]


def render(results: list[dict], args) -> str:
    """The table. Machine and peak come from the measurements (this process never touches the GPU)."""
    shape = Shape.from_dir(args.model_dir)
    measured = next((r for r in results if "error" not in r), None)
    device = measured["device"] if measured else args.device
    machine = measured["machine"] if measured else device
    peak, peak_text = measured["peak"] if measured else peak_flops("cpu", args.peak_tflops)
    lines = [
        f"LearnerWorker step, {args.shape}-shaped Qwen3 (V = {shape.vocab:,}), {machine}, LoRA r = "
        f"{args.rank}, {args.rows} rows x ({args.prompt} prompt + {args.response} response), teacher context "
        f"{args.teacher_prompt} + {args.response} (full kind), top-{TOP_K} + tail (topk), loss chunk {args.chunk}; "
        f"{args.warmup} warm-up step(s), median of {args.steps}",
        "",
        *formula_lines(shape, peak_text),
        "",
        f"| config | learner | loss | micro-batches x rows | step (s) | response tokens/s | {memory_label(device)} | "
        "TFLOP/step | TFLOP/s | MFU | tokens/s vs plain | init (s) | loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    plain = {Spec.parse(r["config"]).baseline_key: r for r in results
             if "error" not in r and r["learner"] == "plain"}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | - | - | - | - | - | {r['error']} | - | - | - | - | - | - |")
            continue
        base = plain.get(Spec.parse(r["config"]).baseline_key)
        tokens_s = r["response_tokens"] / r["step_s"]
        ratio = f"{tokens_s / (base['response_tokens'] / base['step_s']):.2f}x" if base else "-"
        flops = r["flops"]["total"]
        learner = {"zero0": "DeepSpeed ZeRO-0", "zero2": "DeepSpeed ZeRO-2", "plain": "plain PyTorch",
                   "naive": "plain, naive loss"}[r["learner"]]
        micro = f"{r['micro_batches']} x {r['rows_per_micro']}" + (" (ckpt)" if r["checkpointing"] else "")
        loss = "skipped" if r["skipped"] else f"{r['loss']:.4g}"
        lines.append(f"| {r['config']} | {learner} | {r['kind']} | {micro} | {r['step_s']:.3f} | {tokens_s:,.0f} | "
                     f"{r['peak_bytes'] / 2**30:.2f} | {flops / 1e12:.3g} | {flops / r['step_s'] / 1e12:.3g} | "
                     f"{mfu_text(flops, r['step_s'], peak)} | {ratio} | {r['init_s']:.1f} | {loss} |")
    return "\n".join(lines)


def run_all(args, specs: list[Spec]) -> list[dict]:
    results: list[dict] = []
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    for spec in specs:
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left < args.min_config_s:
            results.append({"config": spec.name, "error": f"skipped: time budget ({args.budget_s:.0f} s) spent"})
        elif args.in_process:
            results.append(_in_process(spec, args))
        else:
            results.append(_subprocess(spec, args, left))
        r = results[-1]
        print(f"[learner_worker] {spec.name}: " + (r["error"] if "error" in r else
              f"{r['step_s']:.3f} s/step, {r['response_tokens'] / r['step_s']:,.0f} tokens/s, "
              f"peak {r['peak_bytes'] / 2**30:.2f} GiB, init {r['init_s']:.1f} s, warm-up {r['warmup_s']:.1f} s, "
              f"loss {r['loss']:.4g}"), file=sys.stderr, flush=True)
        _write(args, render(results, args), results)
    return results


def _in_process(spec: Spec, args) -> dict:
    import torch

    try:
        return run_one(spec, args)
    except torch.cuda.OutOfMemoryError:
        return {"config": spec.name, "error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - one configuration's failure is a row of the table
        return {"config": spec.name, "error": f"failed: {type(e).__name__}: {str(e)[:200]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _subprocess(spec: Spec, args, timeout: float | None) -> dict:
    cmd = [sys.executable, __file__, "--one", spec.name, *_common_argv(args)]
    env = dict(os.environ)
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        sys.stderr.write((e.stderr or b"")[-3000:].decode() if isinstance(e.stderr, bytes) else (e.stderr or "")[-3000:])
        return {"config": spec.name, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        sys.stderr.write(f"--- {spec.name} failed (exit {proc.returncode}); its stderr ends:\n{proc.stderr[-4000:]}\n")
        text = proc.stderr
        if "OutOfMemoryError" in text or "out of memory" in text:
            return {"config": spec.name, "error": "out of memory"}
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        return {"config": spec.name, "error": f"failed: {last[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _common_argv(args) -> list[str]:
    return ["--model-dir", args.model_dir, "--shape", args.shape, "--device", args.device, "--dtype", args.dtype,
            "--rows", str(args.rows), "--prompt", str(args.prompt), "--teacher-prompt", str(args.teacher_prompt),
            "--response", str(args.response), "--rank", str(args.rank), "--chunk", str(args.chunk),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]


def _write(args, text: str, results: list[dict]) -> None:
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny Qwen3 on CPU, 2 rows x (16 + 32), teacher prompt 24, 1 warm-up + 1 step, "
                             "configurations in this process: seconds")
    parser.add_argument("--shape", default=None, choices=["qwen3-1.7b", "tiny"])
    parser.add_argument("--model-dir", default=None, help="a model directory (benchmarks/bench_model.py build); "
                                                          "default: built into a temporary directory")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="learner.dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--configs", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--teacher-prompt", type=int, default=None)
    parser.add_argument("--response", type=int, default=None)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak for MFU (default: by name)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting configurations after this many seconds (the rest: 'skipped')")
    parser.add_argument("--min-config-s", type=float, default=30.0,
                        help="with --budget-s: do not start a configuration with less time than this left")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--in-process", action="store_true", default=None,
                      help="run the configurations in this process (the default with --tiny)")
    mode.add_argument("--fresh-processes", dest="in_process", action="store_false",
                      help="one process per configuration (the default without --tiny)")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here, after each configuration")
    parser.add_argument("--json", default=None, help="also write the raw results (JSON) here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    tiny = dict(shape="tiny", device="cpu", rows=2, prompt=16, teacher_prompt=24, response=32, steps=1)
    full = dict(shape="qwen3-1.7b", device=None, rows=8, prompt=256, teacher_prompt=768, response=2048, steps=3)
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"  # no CUDA context in this process
    if args.in_process is None:
        args.in_process = bool(args.tiny)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    if args.one:
        print(json.dumps(run_one(Spec.parse(args.one), args)))
        return
    specs = [Spec.parse(c) for c in (args.configs or DEFAULT_CONFIGS)]
    with tempfile.TemporaryDirectory(prefix="opsd-bench-") as tmp:
        if args.model_dir is None:
            start = time.perf_counter()
            args.model_dir = str(build_model_dir(Path(tmp) / args.shape, args.shape, args.device))
            print(f"[learner_worker] built {args.shape} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        results = run_all(args, specs)
        text = render(results, args)
    print(text)
    _write(args, text, results)
    if not any("error" not in r for r in results):
        raise SystemExit("learner_worker: every configuration failed")


if __name__ == "__main__":
    main()
