"""References for the rollout tests: HF transformers (+ PEFT) decoding and log-probs, random LoRA adapters.

Everything runs in float32 on CPU, one prompt at a time (no padding), so it is the exact computation vLLM's
outputs are compared with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_hf_model(model_dir: Path, adapter_dir: Path | None = None):
    """The model in float32, eval mode, with the PEFT adapter at ``adapter_dir`` applied (not merged)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: Sequence[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens (EOS included if produced, as the model's generation config defines it) and their
    log-softmax log-probs, from ``generate``'s own logits."""
    out = model.generate(torch.tensor([list(prompt_ids)]), max_new_tokens=max_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), dim=-1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@torch.inference_mode()
def hf_token_logprobs(model, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float,
                      top_k: int | None = None) -> list[float]:
    """Log-probs of ``response_ids`` under ``softmax(logits / temperature)``, renormalised over the top-k tokens
    when ``top_k`` is given (the distribution vLLM samples from), teacher-forced on prompt + response."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    if top_k is not None:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, torch.tensor(list(response_ids))[:, None])[:, 0].tolist()


def make_lora_adapter(model_dir: Path, out_dir: Path, *, rank: int = 8, targets: Sequence[str] = ALL_LINEAR,
                      seed: int = 0, scale: float = 0.5) -> Path:
    """Save a PEFT LoRA adapter with random, nonzero A and B (an adapter that changes the model's outputs)."""
    from peft import LoraConfig, get_peft_model

    model = load_hf_model(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


def sampled_rollout_table(model_dir, tokenizer, problems, lengths):
    """A rollout table of traces the model itself samples (HF, seed 0), trace i of ``lengths[i]`` tokens, for each
    ``(problem, solution)``: what a rollout worker would send, without an engine."""
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM

    from opsd.hf import tokenizer_fingerprint
    from opsd.prompts import PromptBuilder
    from opsd.schema import ROLLOUT_SCHEMA, TableMetadata, sample_id, with_metadata

    builder = PromptBuilder(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    rows = []
    for i, ((problem, solution), n) in enumerate(zip(problems, lengths)):
        prompt = builder.student_prompt_ids(problem)
        out = model.generate(torch.tensor([prompt]), do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0)
        response = out[0, len(prompt):].tolist()
        rows.append({"sample_id": sample_id(f"row-{i}", 0, 0), "problem": problem, "solution": solution,
                     "answer": None, "prompt_ids": prompt, "response_ids": response,
                     "response_logprobs": [0.0] * len(response), "finish_reason": "length", "policy_version": 0})
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    return with_metadata(table, TableMetadata(str(model_dir), tokenizer_fingerprint(tokenizer), 151_936))
