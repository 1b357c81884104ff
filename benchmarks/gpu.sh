#!/usr/bin/env bash
# The GPU checks, one short script for one call on a lent GPU machine (torch, transformers and peft there; no vLLM,
# Ray or DeepSpeed). Writes its tables to $OUT (or ./gpu-results) for benchmarks/RESULTS.md.
#   1. the GJS loss kernel alone: naive vs fused vs top-k+tail, bf16, V = 151,936, hidden = 2,048 (Qwen3-1.7B)
#   2. one learner step on a Qwen3-1.7B-shaped model with LoRA r=64, bf16, for each loss form
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/loss.py --device cuda --dtype bfloat16 --tokens 2048 8192 32768 --chunk 2048 --repeats 3 \
  --skip-real --out "$out/loss.md"
python3 benchmarks/learner_step.py --model qwen3-1.7b --device cuda --batch 2 --response 2048 --steps 3 \
  --chunk 2048 --out "$out/learner_step_b2.md"
python3 benchmarks/learner_step.py --model qwen3-1.7b --device cuda --batch 8 --response 2048 --steps 3 \
  --chunk 2048 --gradient-checkpointing --out "$out/learner_step_b8_ckpt.md"
