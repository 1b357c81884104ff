"""Greedy-decode token ids with vLLM (CPU build) in its own process, print them as JSON.

vLLM's engine must start under ``__main__`` (or in a Ray actor), so tests call this script in a subprocess.
Usage: python vllm_greedy.py MODEL_DIR MAX_TOKENS PROMPT_IDS_JSON
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; unset, vLLM takes most of the RAM
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: starts in seconds

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=model, enforce_eager=True, distributed_executor_backend="uni", max_model_len=1024, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
