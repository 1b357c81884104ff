"""Teacher scoring: tokens per second and bytes per response token sent, in one run.

    python benchmarks/teacher.py                       # tiny Qwen3 (V = 151,936) and SmolLM2-135M, CPU
    python benchmarks/teacher.py --device cuda --models qwen3-1.7b-shape

Throughput: TeacherScorer (packed by token budget, chunked lm_head + top-k) against the plain form in the same run:
one HF forward per row that returns the full [T, V] logits, then log-softmax and top-k over them.
Bytes: the teacher columns of the scored Arrow table per response token, for k in {8, 64, 256}, against what full
bf16 logits would take (2 V bytes per token).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before this folder: benchmarks/teacher.py must not shadow the teacher package

from bench_tables import synthetic_rollout_table  # noqa: E402
from teacher.config import TeacherConfig  # noqa: E402
from teacher.scorer import TeacherScorer  # noqa: E402
from teacher.topk import compress_logits  # noqa: E402

TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob", "teacher_token_logprob")


def rollout_table(scorer: TeacherScorer, rows: int, response_tokens: int) -> pa.Table:
    return synthetic_rollout_table(scorer.builder, scorer.metadata.vocab_size, "bench", rows, response_tokens)


@torch.inference_mode()
def plain_scoring(scorer: TeacherScorer, table: pa.Table, k: int) -> tuple[int, float]:
    """One forward per row with full logits, log-softmax and top-k over [T, V]: the baseline."""
    start, tokens = time.perf_counter(), 0
    for problem, solution, response in zip(*(table.column(c).to_pylist() for c in ("problem", "solution", "response_ids"))):
        context = scorer.builder.teacher_prompt_ids(problem, solution) + response
        logits = scorer.model(torch.tensor([context], device=scorer.device)).logits[0]
        begin = len(context) - len(response)
        compress_logits(logits[begin - 1: len(context) - 1], torch.tensor(response, device=scorer.device), k,
                        scorer.temperature)
        tokens += len(context)
    if scorer.device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def bytes_per_token(table: pa.Table) -> float:
    response_tokens = sum(len(r) for r in table.column("response_ids").to_pylist())
    return sum(table.column(c).nbytes for c in TEACHER_COLUMNS) / response_tokens


def model_dirs(names: list[str], workdir: Path) -> dict[str, Path]:
    from orchestrator.offline_models import TinyQwen3Spec, build_tiny_qwen3, import_gguf

    out = {}
    for name in names:
        if name == "tiny-qwen3":
            out[name] = build_tiny_qwen3(workdir / name)
        elif name == "smollm2-135m":
            existing = REPO_ROOT / "models" / "smollm2-135m-instruct"
            out[name] = existing if (existing / "config.json").is_file() else import_gguf(workdir / name)
        elif name == "qwen3-1.7b-shape":
            spec = TinyQwen3Spec(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, intermediate_size=6144)
            out[name] = build_tiny_qwen3(workdir / name, spec)
        else:
            raise SystemExit(f"unknown model {name}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-qwen3", "smollm2-135m"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    lines = [f"Teacher scoring, {args.rows} GSM8K rows x {args.response} response tokens, device {args.device}", "",
             "| model | V | scorer tokens/s (k=64) | plain tokens/s | speed vs plain | bytes/token k=8 | k=64 | k=256 | full bf16 logits | k=64 vs full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in model_dirs(args.models, Path(tmp)).items():
            sizes = {}
            for k in (8, 64, 256):
                scorer = TeacherScorer(str(path), TeacherConfig(top_k=k, token_budget=args.token_budget,
                                                                dtype="auto"), device=args.device)
                table = rollout_table(scorer, args.rows, args.response)
                scorer.score(table.slice(0, 1))  # warm-up
                result = scorer.score(table)
                sizes[k] = bytes_per_token(result.table)
                if k == 64:
                    speed = result.tokens_per_second
                    plain_tokens, plain_seconds = plain_scoring(scorer, table, k)
                    plain = plain_tokens / plain_seconds
            vocab = scorer.metadata.vocab_size
            full = 2 * vocab
            lines.append(f"| {name} | {vocab:,} | {speed:,.0f} | {plain:,.0f} | {speed / plain:.2f}x | {sizes[8]:.0f} | "
                         f"{sizes[64]:.0f} | {sizes[256]:.0f} | {full:,} | {sizes[64] / full:.4f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
