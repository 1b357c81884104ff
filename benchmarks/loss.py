"""GJS loss: the fused chunked form against the naive form, and top-k+tail against the full loss on a real model.

    python benchmarks/loss.py                      # CPU, float32, V = 151,936, hidden = 2,048 (Qwen3-1.7B's head)
    python benchmarks/loss.py --device cuda --dtype bfloat16 --skip-real   # what benchmarks/gpu.sh runs
    python benchmarks/loss.py --tiny               # small shapes on CPU, seconds

Part 1, for T in {256, 1024, 2048} response tokens, forward + backward (gradient w.r.t. the student's hidden states;
``lm_head`` frozen, as under LoRA) from the same inputs (student and teacher hidden states, ``lm_head``):
  naive      materialises student and teacher logits [T, V], mixture by logsumexp over a stacked tensor, two KLs
             (the form of TRL's GKD trainer and of the paper's released code)
  fused      learner.loss.gjs_loss, full vocabulary, teacher given as hidden states (logits made chunk by chunk)
  topk+tail  learner.loss.gjs_loss against the teacher's top-64 + tail (what crosses the network)
Peak memory is the peak above the inputs: on CPU, each measurement runs in a fresh process and reads the kernel's
high-water mark (VmHWM, reset after the inputs exist); on CUDA, torch.cuda.max_memory_allocated.
MFU counts the loss's three GEMMs with V x H = lm_head, 2 FLOPs per multiply-add: the student's logits (2 T V H), the
gradient w.r.t. the student's hidden states (2 T V H) and the teacher's logits (2 T V H; not for top-k+tail, whose
teacher arrives compressed): 6 T V H (naive, fused) or 4 T V H (top-k+tail), over the time and the card's dense bf16
peak (benchmarks/bench_model.py; none on CPU). The naive form's logsumexps, softmaxes and KLs are not counted.

Part 2, on SmolLM2-135M-Instruct (imported offline from its GGUF): student traces sampled from GSM8K problems, the
teacher's distribution along them (teacher context with the reference solution), and for k in {8, 32, 64, 256} the
relative error of the top-k+tail loss and the cosine similarity of its gradient (w.r.t. the student's hidden states)
to the full loss's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before this folder: its scripts must not shadow the packages

from learner.loss import FullTeacher, TopKTeacher, gjs_loss  # noqa: E402

sys.path.insert(1, str(REPO_ROOT / "benchmarks"))
from bench_model import mfu_text, peak_flops  # noqa: E402

BETA, TAU, TOP_K = 0.5, 1.0, 64


# ---------------------------------------------------------------------------------------------------------------------
# Part 1: speed and memory
# ---------------------------------------------------------------------------------------------------------------------
def naive_gjs(hidden, teacher_hidden, weight, beta=BETA, tau=TAU):
    """The naive form, written as TRL's GKD trainer and the paper's code write it."""
    student_logits = (hidden @ weight.T).float()
    with torch.no_grad():
        teacher_logits = (teacher_hidden @ weight.T).float()
    s = F.log_softmax(student_logits / tau, dim=-1)
    t = F.log_softmax(teacher_logits / tau, dim=-1)
    mixture = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, t, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, s, reduction="none", log_target=True)
    return (beta * kl_teacher + (1 - beta) * kl_student).sum() / hidden.shape[0]


def make_inputs(tokens, vocab, hidden_size, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    weight = (torch.randn(vocab, hidden_size, generator=g) * (4.0 / hidden_size**0.5)).to(device, dtype)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
    teacher_hidden = (hidden.detach().float() + 0.5 * torch.randn(tokens, hidden_size, generator=g).to(device)).to(dtype)
    return hidden, teacher_hidden, weight


def teacher_top_k(teacher_hidden, weight, k, rows_per_chunk=64):
    """Top-k + tail of the tempered teacher, a few rows at a time (what the teacher actor sends)."""
    ids, top, tail = [], [], []
    for start in range(0, teacher_hidden.shape[0], rows_per_chunk):
        logp = torch.log_softmax((teacher_hidden[start:start + rows_per_chunk] @ weight.T).float() / TAU, dim=-1)
        values, indices = logp.topk(k, dim=-1)
        rest = logp.scatter(-1, indices, float("-inf"))
        ids.append(indices), top.append(values), tail.append(torch.logsumexp(rest, dim=-1))
    return TopKTeacher(torch.cat(ids), torch.cat(top), torch.cat(tail))


def run_method(method, hidden, teacher_hidden, weight, chunk, topk_teacher=None):
    if method == "naive":
        loss = naive_gjs(hidden, teacher_hidden, weight)
    elif method == "fused":
        loss = gjs_loss(hidden, weight, FullTeacher(hidden=teacher_hidden, weight=weight), beta=BETA, temperature=TAU,
                        chunk_size=chunk).loss
    else:
        loss = gjs_loss(hidden, weight, topk_teacher, kind="topk_tail", beta=BETA, temperature=TAU, chunk_size=chunk).loss
    loss.backward()
    return loss.item()


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_one(method, tokens, vocab, hidden_size, chunk, dtype_name, device, repeats) -> dict:
    """Time and peak memory of one method at one length (in this process)."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    hidden, teacher_hidden, weight = make_inputs(tokens, vocab, hidden_size, dtype, device)
    topk = teacher_top_k(teacher_hidden, weight, TOP_K) if method == "topk+tail" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(repeats):
        hidden.grad = None
        sync()
        if i == 0:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the high-water mark: the inputs already exist
                base = _hwm_bytes()
        start = time.perf_counter()
        loss = run_method(method, hidden, teacher_hidden, weight, chunk, topk)
        sync()
        times.append(time.perf_counter() - start)
        if i == 0:
            peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _hwm_bytes()) - base
    return {"method": method, "tokens": tokens, "seconds": min(times), "peak_bytes": peak, "loss": loss}


def measure(method, tokens, args) -> dict:
    if args.device == "cuda":
        try:
            return measure_one(method, tokens, args.vocab, args.hidden, args.chunk, args.dtype, "cuda", args.repeats)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"method": method, "tokens": tokens, "error": "out of memory"}
    # CPU: a fresh process per measurement, so one method's allocations never count for another.
    cmd = [sys.executable, __file__, "--one", method, str(tokens), "--vocab", str(args.vocab), "--hidden",
           str(args.hidden), "--chunk", str(args.chunk), "--dtype", args.dtype, "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        reason = "killed (out of memory)" if proc.returncode in (-9, 137) else proc.stderr.strip().splitlines()[-1:]
        return {"method": method, "tokens": tokens, "error": str(reason)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_speed_memory(args) -> list[str]:
    peak, peak_text = peak_flops(args.device, args.peak_tflops)
    lines = [
        f"Part 1: forward+backward, V={args.vocab:,}, hidden={args.hidden:,}, {args.dtype} on {args.device}, "
        f"beta={BETA}, tau={TAU}, fused chunk={args.chunk} positions, top-k k={TOP_K}",
        "",
        "FLOPs: the three GEMMs with lm_head (V x H): student logits 2 T V H + d loss / d hidden 2 T V H + teacher "
        "logits 2 T V H = 6 T V H (naive, fused); 4 T V H (topk+tail: the teacher arrives as top-k + tail)",
        f"MFU = FLOPs / (time x peak); peak = {peak_text}",
        "",
        "| T | method | time (s) | peak memory above inputs (MiB) | time vs naive | memory vs naive | TFLOP/s | MFU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for tokens in args.tokens:
        results = {m: measure(m, tokens, args) for m in ("naive", "fused", "topk+tail")}
        naive = results["naive"]
        for method, r in results.items():
            if "error" in r:
                lines.append(f"| {tokens} | {method} | - | {r['error']} | - | - | - | - |")
                continue
            if "error" in naive:
                ratio_t = ratio_m = "naive failed"
            else:
                ratio_t = f"{r['seconds'] / naive['seconds']:.2f}x"
                ratio_m = f"{r['peak_bytes'] / naive['peak_bytes']:.3f}x"
            flops = (4 if method == "topk+tail" else 6) * tokens * args.vocab * args.hidden
            lines.append(f"| {tokens} | {method} | {r['seconds']:.4f} | {r['peak_bytes'] / 2**20:,.0f} | {ratio_t} | "
                         f"{ratio_m} | {flops / r['seconds'] / 1e12:.3g} | {mfu_text(flops, r['seconds'], peak)} |")
        fused, naive_r = results["fused"], results["naive"]
        if "error" not in fused and "error" not in naive_r:
            assert abs(fused["loss"] - naive_r["loss"]) <= 1e-3 * abs(naive_r["loss"]) + 1e-5, (fused, naive_r)
        print("\n".join(lines[-3:]), flush=True)
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Part 2: top-k + tail against the full loss on a real model's distributions
# ---------------------------------------------------------------------------------------------------------------------
def part_real_model(args) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd.prompts import PromptBuilder
    from opsd.data import load_problems
    from orchestrator.offline_models import import_gguf

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        import_gguf(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(tokenizer)
    table, _ = load_problems(REPO_ROOT / "data" / "gsm8k" / "train-1k.jsonl", "gsm8k", limit=args.real_rows)
    weight = model.get_output_embeddings().weight.detach()

    hidden_rows, teacher_logit_rows = [], []
    torch.manual_seed(0)
    for row in table.to_pylist():
        student = builder.student_prompt_ids(row["problem"])
        with torch.inference_mode():
            out = model.generate(torch.tensor([student]), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=args.real_tokens, pad_token_id=tokenizer.pad_token_id)
        response = out[0, len(student):].tolist()
        teacher = builder.teacher_context_ids(row["problem"], row["solution"], response)
        with torch.inference_mode():
            # The position before each response token predicts it: [prompt-1, prompt+R-1).
            h = model.model(torch.tensor([student + response])).last_hidden_state[0]
            hidden_rows.append(h[len(student) - 1: len(student) + len(response) - 1].clone())
            th = model.model(torch.tensor([teacher])).last_hidden_state[0]
            start = len(teacher) - len(response) - 1
            teacher_logit_rows.append(th[start: start + len(response)] @ weight.T)
    hidden = torch.cat(hidden_rows)
    teacher_logits = torch.cat(teacher_logit_rows)

    def loss_and_grad(teacher, kind):
        h = hidden.clone().requires_grad_()
        out = gjs_loss(h, weight, teacher, kind=kind, beta=BETA, temperature=TAU, chunk_size=256)
        out.loss.backward()
        return out.loss.item(), h.grad.flatten()

    full_loss, full_grad = loss_and_grad(FullTeacher(logits=teacher_logits), "full")
    lines = [
        "",
        f"Part 2: SmolLM2-135M-Instruct (V={weight.shape[0]:,}), {len(hidden_rows)} GSM8K problems, "
        f"{hidden.shape[0]} sampled response tokens, beta={BETA}, tau={TAU}; full GJS = {full_loss:.5f}",
        "",
        "| k | top-k+tail GJS | relative error vs full | gradient cosine vs full |",
        "|---:|---:|---:|---:|",
    ]
    logp = torch.log_softmax(teacher_logits.double() / TAU, dim=-1)
    for k in (8, 32, 64, 256):
        top, ids = logp.topk(k, dim=-1)
        tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
        loss, grad = loss_and_grad(TopKTeacher(ids, top.float(), tail.float()), "topk_tail")
        cosine = F.cosine_similarity(grad.double(), full_grad.double(), dim=0).item()
        lines.append(f"| {k} | {loss:.5f} | {(full_loss - loss) / full_loss:.2%} | {cosine:.4f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256, help="positions per chunk of the fused loss")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest is reported")
    parser.add_argument("--skip-real", action="store_true", help="skip part 2 (needs the SmolLM2 model)")
    parser.add_argument("--real-rows", type=int, default=8)
    parser.add_argument("--real-tokens", type=int, default=128)
    parser.add_argument("--model-dir", default=str(REPO_ROOT / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak for MFU (default: by name)")
    parser.add_argument("--out", default=None, help="also write the tables (Markdown) to this file")
    parser.add_argument("--tiny", action="store_true", help="T = 64, V = 8,192, hidden = 64, no part 2: seconds "
                                                            "(the script's own check)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.tokens, args.vocab, args.hidden, args.chunk, args.repeats, args.skip_real = [64], 8192, 64, 32, 1, True

    if args.one:
        method, tokens = args.one[0], int(args.one[1])
        print(json.dumps(measure_one(method, tokens, args.vocab, args.hidden, args.chunk, args.dtype, "cpu", args.repeats)))
        return

    machine = f"{os.cpu_count()} CPU cores" if args.device == "cpu" else torch.cuda.get_device_name()
    lines = [f"Machine: {machine}, torch {torch.__version__}", ""]
    lines += part_speed_memory(args)
    if not args.skip_real:
        lines += part_real_model(args)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
