"""One OPSD learner step in plain PyTorch + PEFT: the naive loss against the fused loss, in the same run.

    python benchmarks/learner_step.py --model qwen3-1.7b --device cuda --batch 2 --response 2048   # benchmarks/gpu.sh
    python benchmarks/learner_step.py --model tiny --batch 2 --response 128                       # CPU smoke run

A Qwen3-shaped model (random init: the shapes decide speed and memory, not the weights) with LoRA r=64 on
q,k,v,o,gate,up,down (the paper's script). Per step: the student forward on prompt + response (LoRA on), the frozen
teacher forward on teacher prompt + the same response (adapter disabled, no grad), the GJS loss on the response
positions, backward, AdamW. It reports response tokens per second and peak memory per loss form:
  naive      lm_head on all response positions, [T, V] logits, stacked logsumexp mixture (TRL GKD / the paper's code)
  fused      learner.loss.gjs_loss, full vocabulary, teacher as hidden states
  topk+tail  learner.loss.gjs_loss against the teacher's top-64 + tail (computed here from the teacher's hidden states)
DeepSpeed, Ray and the real learner actor arrive with issue 5/7; this is the loss's effect on a whole step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before this folder: its scripts must not shadow the packages
sys.path.insert(1, str(REPO_ROOT / "benchmarks"))  # after the repo: benchmarks/learner.py must not shadow learner/

from learner.loss import FullTeacher, TopKTeacher, gjs_loss  # noqa: E402
from loss import naive_gjs  # noqa: E402  (benchmarks/loss.py)

SHAPES = {
    # Qwen3-1.7B's published config.
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(shape: str, dtype: torch.dtype, device: str, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=40_960,
                         rope_theta=1_000_000.0, attn_implementation="sdpa", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    return model


def top_k_teacher(teacher_hidden, weight, k=64, rows=1024):
    ids, top, tail = [], [], []
    for start in range(0, teacher_hidden.shape[0], rows):
        logp = torch.log_softmax((teacher_hidden[start:start + rows] @ weight.T).float(), dim=-1)
        values, indices = logp.topk(k, dim=-1)
        ids.append(indices), top.append(values)
        tail.append(torch.logsumexp(logp.scatter_(-1, indices, float("-inf")), dim=-1))
        del logp
    return TopKTeacher(torch.cat(ids), torch.cat(top), torch.cat(tail))


def step(model, optimizer, student_ids, teacher_ids, response, method, chunk):
    decoder = model.get_base_model().model  # the transformer without lm_head: LoRA layers are inside it
    lm_head = model.get_base_model().get_output_embeddings().weight
    prompt, teacher_prompt = student_ids.shape[1] - response, teacher_ids.shape[1] - response
    with torch.no_grad(), model.disable_adapter():
        t_hidden = decoder(teacher_ids).last_hidden_state[:, teacher_prompt - 1:-1].reshape(-1, lm_head.shape[1])
    s_hidden = decoder(student_ids).last_hidden_state[:, prompt - 1:-1].reshape(-1, lm_head.shape[1])
    if method == "naive":
        loss = naive_gjs(s_hidden, t_hidden, lm_head)
    elif method == "fused":
        loss = gjs_loss(s_hidden, lm_head, FullTeacher(hidden=t_hidden, weight=lm_head), chunk_size=chunk).loss
    else:
        teacher = top_k_teacher(t_hidden, lm_head)
        loss = gjs_loss(s_hidden, lm_head, teacher, kind="topk_tail", chunk_size=chunk).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run(method, args, dtype):
    device = args.device
    model = build_model(args.model, dtype, device, args.rank)
    if args.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    g = torch.Generator().manual_seed(1)
    vocab = 151_669  # real tokens only
    student_ids = torch.randint(0, vocab, (args.batch, args.prompt + args.response), generator=g).to(device)
    teacher_ids = torch.cat([torch.randint(0, vocab, (args.batch, args.teacher_prompt), generator=g).to(device),
                             student_ids[:, args.prompt:]], dim=1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        step(model, optimizer, student_ids, teacher_ids, args.response, method, args.chunk)  # warm-up
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loss = step(model, optimizer, student_ids, teacher_ids, args.response, method, args.chunk)
            sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        seconds = sorted(times)[len(times) // 2]
        return dict(method=method, seconds=seconds, tokens_per_s=args.batch * args.response / seconds,
                    peak_gib=peak, loss=loss)
    except torch.cuda.OutOfMemoryError:
        return dict(method=method, error="out of memory")
    finally:
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--teacher-prompt", type=int, default=768)
    parser.add_argument("--response", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["naive", "fused", "topk+tail"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations in backward")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))

    machine = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"Learner step, {args.model}-shaped Qwen3 (V=151,936), LoRA r={args.rank}, {dtype}, {machine}, "
        f"batch {args.batch} x ({args.prompt} prompt + {args.response} response), teacher prompt {args.teacher_prompt}, "
        f"loss chunk {args.chunk}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"median of {args.steps} steps",
        "",
        "| loss form | step (s) | response tokens/s | peak GPU memory (GiB) | tokens/s vs naive | memory vs naive |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    results = [run(m, args, dtype) for m in args.methods]
    naive = next((r for r in results if r["method"] == "naive" and "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | - | - | {r['error']} | - | - |")
            continue
        speed = f"{r['tokens_per_s'] / naive['tokens_per_s']:.2f}x" if naive else "-"
        memory = f"{r['peak_gib'] / naive['peak_gib']:.2f}x" if naive and naive["peak_gib"] == naive["peak_gib"] else "-"
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {speed} | {memory} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
