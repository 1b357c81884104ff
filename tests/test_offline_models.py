"""Offline models load and generate in transformers, PEFT and vLLM (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd.atomic import atomic_directory
from orchestrator.offline_models import QWEN3_VOCAB_SIZE, TinyQwen3Spec, build_tiny_qwen3

HELPERS = Path(__file__).parent / "helpers"


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def vllm_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    proc = subprocess.run(
        [sys.executable, str(HELPERS / "vllm_greedy.py"), str(model_dir), str(max_tokens), json.dumps(prompts)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def chat_ids(tokenizer, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_tiny_qwen3_has_real_tokenizer_and_padded_vocab(tiny_model_dir: Path, qwen3_tokenizer):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen3" and config.vocab_size == QWEN3_VOCAB_SIZE
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert not list(tiny_model_dir.glob("*.bin")), "weights must be safetensors only"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer) == len(qwen3_tokenizer) == 151_669
    text = "Natalia sold 48/2 = 24 clips in May. <think>"
    assert tokenizer(text)["input_ids"] == qwen3_tokenizer(text)["input_ids"]
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_tiny_qwen3_is_small_besides_embedding(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert 0 < total - embedding < 5_000_000


def test_tiny_qwen3_is_deterministic_per_seed(tmp_path: Path):
    from safetensors.torch import load_file

    a = load_file(build_tiny_qwen3(tmp_path / "a", TinyQwen3Spec(seed=3)) / "model.safetensors")
    b = load_file(build_tiny_qwen3(tmp_path / "b", TinyQwen3Spec(seed=3)) / "model.safetensors")
    c = load_file(build_tiny_qwen3(tmp_path / "c", TinyQwen3Spec(seed=4)) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_qwen3_trains_with_peft_lora(tiny_model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("crash while writing")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(out):
            pass


@pytest.mark.slow
def test_tiny_qwen3_vllm_greedy_equals_transformers(tiny_model_dir: Path, qwen3_tokenizer):
    prompts = [chat_ids(qwen3_tokenizer, "What is 2+3?"), chat_ids(qwen3_tokenizer, "Name a prime.")]
    expected = [hf_greedy(tiny_model_dir, p, 12) for p in prompts]
    assert vllm_greedy(tiny_model_dir, prompts, 12) == expected


@pytest.mark.slow
def test_imported_smollm2_answers_in_transformers_and_vllm(smollm2_dir: Path):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert str(config.dtype).endswith("bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = chat_ids(tokenizer, "What is 2+3? Answer with a number.")
    hf_answer = tokenizer.decode(hf_greedy(smollm2_dir, prompt, 16), skip_special_tokens=True)
    vllm_answer = tokenizer.decode(vllm_greedy(smollm2_dir, [prompt], 16)[0], skip_special_tokens=True)
    assert "5" in hf_answer, hf_answer
    assert "5" in vllm_answer, vllm_answer
