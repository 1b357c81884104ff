"""Learner step: the DeepSpeed learner worker against a plain PyTorch loop of the same model, in one run.

    python benchmarks/learner.py                    # tiny Qwen3 and SmolLM2-135M, CPU, float32

Both sides train the same LoRA (r=16 on q,k,v,o,gate,up,down) with AdamW on the same scored table (GSM8K prompts,
random traces, the frozen model's top-64 + tail as teacher), with the same micro-batches and loss (learner.batch,
learner.loss):
  plain        model + torch.optim.AdamW: loss.backward() per micro-batch, clip, step
  ds-zero0/2   learner.worker.LearnerWorker: DeepSpeed ZeRO-0 / ZeRO-2, world size 1 (gloo)
Each configuration runs in a fresh process; peak memory is that process's high-water mark during the timed steps
(reset after set-up). Also: the time to export the adapter (gather + safetensors bytes) and to write it as the PEFT
directory a rollout worker loads, and its size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before this folder: benchmarks/learner.py must not shadow the learner package
sys.path.insert(1, str(REPO_ROOT / "benchmarks"))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_table(model_dir: str, rows: int, response: int):
    from bench_tables import synthetic_rollout_table
    from teacher.config import TeacherConfig
    from teacher.scorer import TeacherScorer

    scorer = TeacherScorer(model_dir, TeacherConfig(top_k=64))
    table = synthetic_rollout_table(scorer.builder, scorer.metadata.vocab_size, model_dir, rows, response)
    return scorer.score(table).table


def learner_config(zero_stage: int):
    from learner.config import LearnerConfig, LoraConfig, LossConfig, OptimConfig

    return LearnerConfig(num_workers=1, gpus_per_worker=0, zero_stage=zero_stage, micro_batch_tokens=4096,
                         lora=LoraConfig(rank=16, alpha=32, target_modules=LORA_TARGETS),
                         loss=LossConfig(kind="topk_tail"), optim=OptimConfig(lr=1e-4, schedule="constant"))


def run_one(method: str, model_dir: str, rows: int, response: int, steps: int) -> dict:
    import torch

    from learner.batch import pack_micro_batches, rows_from_table

    table = make_table(model_dir, rows, response)
    config = learner_config(2 if method == "ds-zero2" else 0)
    samples = rows_from_table(table, "topk_tail")
    tokens = sum(r.response_length for r in samples)
    if method == "plain":
        step, export = _plain_loop(model_dir, config, samples, tokens)
    else:
        from learner.worker import LearnerWorker

        worker = LearnerWorker(model_dir, config, total_steps=steps + 1)
        batches = pack_micro_batches(samples, config.micro_batch_tokens, worker.pad_id, "topk_tail")
        step = lambda: worker.train_step(batches, tokens, len(batches))  # noqa: E731
        export = worker.export_adapter
    step()  # warm-up
    _reset_hwm()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = _hwm_bytes()
    start = time.perf_counter()
    payload = export(1)
    export_seconds = time.perf_counter() - start
    from opsd.adapter import write_adapter_dir

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_adapter_dir(payload, Path(tmp) / "v1")
        write_seconds = time.perf_counter() - start
    return {"method": method, "step_seconds": seconds, "tokens_per_s": tokens / seconds, "peak_bytes": peak,
            "export_seconds": export_seconds, "write_seconds": write_seconds, "adapter_bytes": len(payload.weights),
            "torch_threads": torch.get_num_threads()}


def _plain_loop(model_dir, config, samples, tokens):
    """The same model, LoRA, micro-batches and loss without DeepSpeed."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    from learner.batch import pack_micro_batches
    from learner.loss import TopKTeacher, gjs_loss
    from opsd.adapter import AdapterPayload

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    lora = config.lora
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr)
    pad = model.config.pad_token_id or 0
    batches = pack_micro_batches(samples, config.micro_batch_tokens, pad, "topk_tail")
    decoder = model.get_base_model().base_model
    lm_head = model.get_base_model().get_output_embeddings()

    def step():
        for b in batches:
            hidden = decoder(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            t = b.teacher
            out = gjs_loss(hidden[b.response_mask], lm_head.weight, TopKTeacher(t["ids"], t["logprobs"], t["tail_logprob"]),
                           kind="topk_tail", normalizer=tokens, chunk_size=config.loss.chunk_size)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def export(version):
        state = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        return AdapterPayload(version, save(state), {"r": lora.rank})

    return step, export


def model_dir(name: str, workdir: Path) -> str:
    from orchestrator.offline_models import build_tiny_qwen3, import_gguf

    if name == "tiny-qwen3":
        path = workdir / name
        return str(path if (path / "config.json").is_file() else build_tiny_qwen3(path))
    existing = REPO_ROOT / "models" / "smollm2-135m-instruct"
    if (existing / "config.json").is_file():
        return str(existing)
    path = workdir / name
    return str(path if (path / "config.json").is_file() else import_gguf(path, dtype="float32"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-qwen3", "smollm2-135m"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.rows, args.response, args.steps)))
        return

    lines = [f"Learner step, {args.rows} rows x {args.response} response tokens (top-64+tail teacher), LoRA r=16 on all "
             f"projections, float32 CPU, mean of {args.steps} steps after a warm-up", "",
             "| model | learner | step (s) | response tokens/s | peak RSS (MiB) | tokens/s vs plain | export (s) | write dir (s) | adapter (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = model_dir(name, Path(tmp))
            results = []
            for method in ("plain", "ds-zero0", "ds-zero2"):
                cmd = [sys.executable, __file__, "--one", method, path, "--rows", str(args.rows), "--response",
                       str(args.response), "--steps", str(args.steps)]
                env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu"}
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"{method} on {name} failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            plain = results[0]
            for r in results:
                lines.append(f"| {name} | {r['method']} | {r['step_seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
                             f"{r['peak_bytes'] / 2**20:,.0f} | {r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | "
                             f"{r['export_seconds']:.3f} | {r['write_seconds']:.3f} | {r['adapter_bytes'] / 2**20:.1f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
