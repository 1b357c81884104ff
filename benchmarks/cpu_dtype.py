"""float32 against bfloat16 on this CPU, for the teacher's and the learner's work: why the quickstart asks for
bfloat16 teacher and learner where the CPU computes it natively (AVX512-BF16 or AMX).

    python benchmarks/cpu_dtype.py [--model-dir DIR] [--rows 6] [--prompt 110] [--response 220]

Measured in one run, both dtypes on the same inputs and threads (every core):
  matmul     a [rows * tokens, H] x [H, 3H] product, GFLOP/s
  teacher    the model's forward, no grad (what the teacher scorer runs per batch)
  learner    forward + backward with a LoRA adapter (r 16 on q, k, v, o, gate, up, down; frozen base), the loss a
             float32 log-softmax over the vocabulary at the response positions (what the learner's step runs)
Prints a Markdown table with the bfloat16 / float32 speed ratio. Default model: the quickstart's SmolLM2-135M-Instruct,
imported from its GGUF on first use; default shape: the quickstart's step (6 rows of ~110 prompt + ~220 response).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_dir: Path, dtype, rows: int, prompt: int, response: int, repeats: int) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                 attn_implementation="sdpa")
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    tokens = prompt + response
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=g)
    a = torch.randn(rows * tokens, hidden, generator=g).to(dtype)
    b = torch.randn(hidden, 3 * hidden, generator=g).to(dtype)
    matmul_s = timed(lambda: a @ b, repeats * 5)

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    teacher_s = timed(forward, repeats)
    student = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

    def step():
        logits = student(input_ids=ids, logits_to_keep=response).logits
        torch.log_softmax(logits.float(), dim=-1).mean().backward()

    learner_s = timed(step, repeats)
    return {"matmul": 2 * rows * tokens * hidden * 3 * hidden / matmul_s / 1e9, "teacher": teacher_s,
            "learner": learner_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None,
                        help="a model directory (default: the quickstart's SmolLM2 in models/, imported if missing)")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=110)
    parser.add_argument("--response", type=int, default=220)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from opsd.model import cpu_has_native_bf16
    from orchestrator.quickstart import ensure_quickstart_model

    if args.model_dir is None:
        model_dir = ensure_quickstart_model(REPO_ROOT / "models")
    else:
        model_dir = Path(args.model_dir)
        if not (model_dir / "config.json").is_file():
            parser.error(f"--model-dir {model_dir}: no config.json there (a Hugging Face model directory is needed)")
    results = {name: measure(model_dir, dtype, args.rows, args.prompt, args.response, args.repeats)
               for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    f32, bf16 = results["float32"], results["bfloat16"]
    print(f"CPU with native bfloat16 (AVX512-BF16 or AMX): {cpu_has_native_bf16()}; torch threads "
          f"{torch.get_num_threads()}; {args.rows} rows x ({args.prompt} prompt + {args.response} response) tokens; "
          f"median of {args.repeats}\n")
    print("| work | float32 | bfloat16 | bfloat16 speed vs float32 |")
    print("|---|---:|---:|---:|")
    print(f"| matmul (GFLOP/s) | {f32['matmul']:.0f} | {bf16['matmul']:.0f} | {bf16['matmul'] / f32['matmul']:.2f}x |")
    for work, what in (("teacher", "teacher forward (s)"), ("learner", "learner forward + backward, LoRA (s)")):
        print(f"| {what} | {f32[work]:.2f} | {bf16[work]:.2f} | {f32[work] / bf16[work]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
