"""Rollout throughput: the RolloutWorker (vLLM) against HF ``generate``, and adapter hot-load time.

    python benchmarks/rollout.py                    # SmolLM2-135M-Instruct (imported into models/ if missing)
    python benchmarks/rollout.py --model tiny       # the tiny random Qwen3 (real 151,936 vocabulary)
    python benchmarks/rollout.py --model DIR --prompts 64 --max-tokens 512

One run, one model, the same prompts (the first P GSM8K test problems as chat-templated student prompts), the same
response budget. Two RolloutWorkers (two vLLM engines in this process), one per ``rollout.adapter_serving`` mode:
``merged`` (the CPU default: an engine without vLLM LoRA, adapters written into its weights) and ``lora`` (vLLM's
LoRA slots, the GPU default). Decodings: the paper recipe's sampling (temperature 1.1, top_p 0.95, top_k 20),
temperature 1.1 alone and greedy on the default engine; the recipe on the LoRA engine with no adapter (the cost of
its LoRA slots alone); and the recipe with a random rank-R LoRA adapter on all linear layers (the rollout stage's
situation after the first training step), served by each mode.

  HF generate        one left-padded batch of P prompts; tokens only (no log-probs); PEFT (unmerged) for the adapter
  RolloutWorker      ``generate``: n = 1, per-trace seeds, the sampled token's log-prob for every token (what the
                     rollout stage returns)
  adapter load       a random LoRA (rank R on all linear layers) as payload bytes -> ``load_adapter`` -> the first
                     generate with it (one prompt, one token); median over several versions, per mode

Tokens are counted as generated (through EOS when a trace stops). Both sides run float32, in this process, on the
same cores (vLLM's in-process CPU engines, bound to all usable cores), alternating decoding by decoding so that both
see the same background load. Each throughput is the best of ``--repeats`` timed runs after a short warm-up (the
usual estimator on a shared machine: noise only ever adds time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
GSM8K_TEST = REPO_ROOT / "data" / "gsm8k" / "test.jsonl"
SMOLLM2_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
TEMPERATURE, TOP_P, TOP_K = 1.1, 0.95, 20


@dataclass(frozen=True)
class Decoding:
    temperature: float
    top_p: float
    top_k: int  # -1 is off
    adapter: bool  # with the LoRA adapter loaded
    serving: str  # the RolloutWorker's rollout.adapter_serving: "merged" (the CPU default) or "lora"


# In the order they run: the rows compared with each other run next to each other, under similar background load.
DECODINGS = {
    "sampling, recipe (T 1.1, top_p 0.95, top_k 20)": Decoding(TEMPERATURE, TOP_P, TOP_K, False, "merged"),
    "sampling, recipe, adapter served merged": Decoding(TEMPERATURE, TOP_P, TOP_K, True, "merged"),
    "sampling, recipe, LoRA adapter loaded": Decoding(TEMPERATURE, TOP_P, TOP_K, True, "lora"),
    "sampling, recipe, engine with LoRA slots, no adapter": Decoding(TEMPERATURE, TOP_P, TOP_K, False, "lora"),
    "sampling, temperature 1.1 only": Decoding(TEMPERATURE, 1.0, -1, False, "merged"),
    "greedy": Decoding(0.0, 1.0, -1, False, "merged"),
}
SERVING = ("merged", "lora")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a model directory")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--adapter-versions", type=int, default=5)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    return parser.parse_args()


def resolve_model(name: str, scratch: Path) -> Path:
    if name == "tiny":
        from orchestrator.offline_models import build_tiny_qwen3

        return build_tiny_qwen3(scratch / "tiny-qwen3")
    if name == "smollm2":
        if not SMOLLM2_DIR.is_dir():
            from orchestrator.offline_models import import_gguf

            import_gguf(SMOLLM2_DIR)
        return SMOLLM2_DIR
    return Path(name)


def gsm8k_problems(count: int):
    import pyarrow as pa

    from opsd.schema import PROBLEM_SCHEMA, sample_id

    with open(GSM8K_TEST) as f:
        rows = [json.loads(line) for _, line in zip(range(count), f)]
    return pa.table({"sample_id": [sample_id(f"gsm8k-test-{i}", 0, 0) for i in range(len(rows))],
                     "problem": [r["question"] for r in rows], "solution": [r["answer"] for r in rows],
                     "answer": [None] * len(rows)}, schema=PROBLEM_SCHEMA)


def timed(fn, repeats: int, warm_up) -> tuple[float, object]:
    warm_up()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


# -- HF baseline ---------------------------------------------------------------------------------------------------
class HFGenerate:
    """HF ``generate`` on one left-padded batch of the prompts (PEFT, unmerged, when the adapter is asked for)."""

    def __init__(self, model_dir: Path, adapter_dir: Path, prompts: list[list[int]]):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.with_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir).eval()
        eos = self.base.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        pad = self.base.generation_config.pad_token_id
        self.pad = pad if pad is not None else next(iter(self.eos))
        self.width = max(len(p) for p in prompts)
        self.ids = torch.tensor([[self.pad] * (self.width - len(p)) + p for p in prompts])
        self.mask = torch.tensor([[0] * (self.width - len(p)) + [1] * len(p) for p in prompts])

    def tokens(self, temperature: float, top_p: float, top_k: int, adapter: bool, new_tokens: int) -> int:
        """Generate; return the tokens generated (through EOS when a row stops)."""
        import torch

        torch.manual_seed(0)
        model = self.with_adapter if adapter else self.base
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=max(top_k, 0))  # 0: off
        with torch.inference_mode():
            out = model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=new_tokens,
                                 pad_token_id=self.pad, **(options if temperature > 0 else dict(do_sample=False)))
        tokens = 0
        for row in out[:, self.width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in self.eos), None)
            tokens += len(row) if stop is None else stop + 1
        return tokens


# -- RolloutWorker ------------------------------------------------------------------------------------------------
def make_adapter_payload(model_dir: Path, rank: int, scratch: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from opsd.adapter import read_adapter_dir

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(scratch / "adapter")
    return scratch / "adapter", read_adapter_dir(scratch / "adapter", version=1)


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    scratch = Path(tempfile.mkdtemp(prefix="opsd-bench-rollout-"))
    try:
        run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path) -> None:
    from opsd.hf import load_tokenizer
    from opsd.prompts import PromptBuilder
    from rollout.config import RolloutConfig
    from rollout.resources import ModelSpec
    from rollout.worker import RolloutWorker, Sampling

    cores = sorted(os.sched_getaffinity(0))
    load_at_start = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    model_dir = resolve_model(args.model, scratch)
    problems = gsm8k_problems(args.prompts)
    builder = PromptBuilder(load_tokenizer(str(model_dir)))
    prompts = [builder.student_prompt_ids(p) for p in problems.column("problem").to_pylist()]
    adapter_dir, payload = make_adapter_payload(model_dir, args.lora_rank, scratch)

    hf_generate = HFGenerate(model_dir, adapter_dir, prompts)

    config = RolloutConfig(gpus_per_worker=0, cpu_kv_cache_gib=args.kv_cache_gib, max_response_tokens=args.max_tokens,
                           temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, max_lora_rank=args.lora_rank,
                           max_model_len=max(len(p) for p in prompts) + args.max_tokens + 64)
    workers = {mode: RolloutWorker(ModelSpec(str(model_dir)), replace(config, adapter_serving=mode))
               for mode in SERVING}
    infos = {mode: worker.info() for mode, worker in workers.items()}
    warm_batch = problems.slice(0, 2)

    def worker_tokens(worker: RolloutWorker, sampling: Sampling, batch) -> int:
        return sum(len(r) for r in worker.generate(batch, sampling).column("response_ids").to_pylist())

    # HF and the workers alternate, decoding by decoding, so that both see the same background load.
    hf, vllm = {}, {}
    for name, d in DECODINGS.items():
        hf[name] = timed(lambda: hf_generate.tokens(d.temperature, d.top_p, d.top_k, d.adapter, args.max_tokens),
                         args.repeats, lambda: hf_generate.tokens(d.temperature, d.top_p, d.top_k, d.adapter, 4))
        worker = workers[d.serving]
        if d.adapter and worker.policy_version() == 0:
            worker.load_adapter(1, payload)
        elif not d.adapter and worker.policy_version() != 0:
            worker.load_adapter(0)
        sampling = Sampling(temperature=d.temperature, top_p=d.top_p, top_k=d.top_k, n=1, max_tokens=args.max_tokens,
                            seed=0)
        vllm[name] = timed(lambda: worker_tokens(worker, sampling, problems), args.repeats,
                           lambda: worker_tokens(worker, replace(sampling, max_tokens=4), warm_batch))

    one = problems.slice(0, 1)
    first_token = Sampling(temperature=0.0, top_p=1.0, top_k=-1, n=1, max_tokens=1, seed=0)
    hot_load = {mode: hot_load_seconds(worker, payload, one, first_token, args.adapter_versions)
                for mode, worker in workers.items()}
    for worker in workers.values():
        worker.close()

    adapter_mb = len(payload.weights) / 2**20
    print(f"\nModel {model_dir.name}, float32, {args.prompts} GSM8K prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), max {args.max_tokens} new tokens; "
          f"{len(cores)} cores (engines bound to {infos['merged'].cpu_cores}); best of {args.repeats} runs after a "
          f"warm-up. Machine load average (1 min): {load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at end.\n")
    print("| decoding | adapter serving | HF generate tokens/s | RolloutWorker tokens/s | RolloutWorker / HF |")
    print("|---|---|---:|---:|---:|")
    for name, d in DECODINGS.items():
        (hf_seconds, hf_tokens), (vllm_seconds, vllm_tokens) = hf[name], vllm[name]
        hf_rate, vllm_rate = hf_tokens / hf_seconds, vllm_tokens / vllm_seconds
        print(f"| {name} | {d.serving} | {hf_rate:.0f} ({hf_tokens} tokens, {hf_seconds:.1f} s) | {vllm_rate:.0f} "
              f"({vllm_tokens} tokens, {vllm_seconds:.1f} s) | {vllm_rate / hf_rate:.2f}x |")
    print(f"\nAdapter hot-load: LoRA rank {args.lora_rank} on all linear layers ({adapter_mb:.1f} MiB of safetensors), "
          f"median of {args.adapter_versions} versions. Merged mode holds "
          f"{infos['merged'].base_weights_bytes / 2**20:.0f} MiB of base weights on the host.\n")
    print("| step | lora (s) | merged (s) |")
    print("|---|---:|---:|")
    steps = {
        "load_adapter (lora: validate, write, add to the engine; merged: validate, merge, write weights)": "load",
        "first generate with the new version (1 prompt, 1 token)": "first",
        "payload -> first token with it": "total",
        "same 1-token generate, base model (reference)": "base",
    }
    for label, key in steps.items():
        print(f"| {label} | {hot_load['lora'][key]:.3f} | {hot_load['merged'][key]:.3f} |")
    print(f"| engine start (vLLM `LLM(...)` in RolloutWorker, for reference) | "
          f"{infos['lora'].engine_start_seconds:.1f} | {infos['merged'].engine_start_seconds:.1f} |")


def hot_load_seconds(worker, payload, one, first_token, versions: int) -> dict[str, float]:
    """Median seconds of ``load_adapter`` and of the first 1-token generate after it, over ``versions`` versions."""
    worker.load_adapter(0)
    base_first = []
    for _ in range(versions):
        start = time.perf_counter()
        worker.generate(one, first_token)
        base_first.append(time.perf_counter() - start)
    loads, firsts = [], []
    for version in range(2, versions + 2):
        versioned = type(payload)(version=version, weights=payload.weights, config=payload.config)
        start = time.perf_counter()
        worker.load_adapter(version, versioned)
        loaded = time.perf_counter()
        worker.generate(one, first_token)
        loads.append(loaded - start)
        firsts.append(time.perf_counter() - loaded)
    med = statistics.median
    return {"load": med(loads), "first": med(firsts), "total": med(l + f for l, f in zip(loads, firsts)),
            "base": med(base_first)}


if __name__ == "__main__":
    main()
