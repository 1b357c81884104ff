"""`opsd science` (`make science`): the paper's comparison at laptop scale, one command, every number rerunnable.

On procedurally generated arithmetic problems (science.arithmetic) and SmolLM2-135M-Instruct (the offline model of
the quickstart), it trains base -> OPSD, base -> SFT, base -> GRPO and base -> OPSD with a curriculum, each from the
same base model on the same training problems for the same wall-clock budget (``train.time_budget_s``), and
evaluates the base model and every final adapter on the same held-out problems (avg@n with 95% intervals, and
paired differences per problem, as ``opsd eval --compare`` computes them). Then it measures where the teacher and
the student disagree on the base model's own held-out traces (science.divergence). Everything lands in ``--out``:

    data/        train.jsonl, heldout.jsonl (the generated problems)
    eval/        base/, prepass/ (the base model on the training problems: the curriculum's difficulty), <arm>/
    runs/<arm>/  each training run (metrics.jsonl, curves.png, adapters/)
    results.md   the table, the paired comparisons, the divergence by token kind, the settings
    results.json the same numbers

Arms run one after another on the whole machine; the time budget makes them comparable on any machine, the
tokens sampled and the steps taken say what each did with it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from opsd.atomic import write_text_atomic
from opsd.configlib import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SCIENCE_RECIPE = REPO_ROOT / "recipes" / "science-cpu.yaml"


@dataclass(frozen=True)
class Arm:
    """One training run of the comparison: a method and its own overrides of the science recipe."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()
    curriculum: bool = False  # ordered by the base model's failure rate on the training problems (the pre-pass)


ARMS: dict[str, Arm] = {
    "opsd": Arm("opsd", "opsd"),
    "sft": Arm("sft", "sft"),
    # The group of a prompt is its rollout.n traces (the paper's GRPO samples 8 per prompt).
    "grpo": Arm("grpo", "grpo", ("rollout.n=4",)),
    "opsd-curriculum": Arm("opsd-curriculum", "opsd", ("data.order=curriculum",), curriculum=True),
}


@dataclass
class ScienceSettings:
    out: str = "runs/science"
    arms: tuple[str, ...] = tuple(ARMS)
    train_rows: int = 512
    heldout_rows: int = 200
    seed: int = 0
    budget_s: float = 450.0  # wall-clock training budget of every arm
    n: int = 4  # samples per held-out problem (avg@n)
    prepass_n: int = 2  # samples per training problem in the curriculum's pre-pass
    models_dir: str = "models"
    model: str | None = None  # a model directory instead of SmolLM2-135M-Instruct (tests: the tiny Qwen3)
    overrides: tuple[str, ...] = field(default_factory=tuple)  # applied to every arm's config


def eval_config(settings: ScienceSettings, data_file: Path, name: str, n: int):
    """The held-out evaluation of every model: the science recipe's eval section on one generated file."""
    from orchestrator.config import load_config

    cfg = load_config(str(SCIENCE_RECIPE), ["model.path=unused", "data.path=unused", *settings.overrides])
    ev = cfg.eval
    ev.sets, ev.mapping, ev.n, ev.limit = [f"{name}={data_file}"], "opsd", n, None
    return cfg, ev


def run_eval(settings: ScienceSettings, model_dir: Path, data_file: Path, name: str, out: Path,
             adapter: Path | None, n: int, print_fn) -> Path:
    from opsd.model import ModelSpec
    from orchestrator.evaluate import EvalRun, evaluate

    if (out / "results.json").is_file():  # a finished evaluation is kept: rerunning the command resumes
        print_fn(f"science: {out} already evaluated")
        return out
    cfg, ev = eval_config(settings, data_file, name, n)
    spec = ModelSpec(path=str(model_dir), dtype=cfg.model.dtype)
    run = EvalRun(model=spec, out=out, adapter=adapter, max_model_len=cfg.rollout.max_model_len,
                  cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib, overwrite=True, address=cfg.placement.address)
    evaluate(ev, run, print_fn=print_fn)
    return out


def train_arm(settings: ScienceSettings, arm: Arm, model_dir: Path, train_file: Path, out: Path,
              prepass: Path | None, print_fn) -> Path:
    """One arm's training run; returns its final adapter directory."""
    from orchestrator.config import load_config
    from orchestrator.plot import plot_run
    from orchestrator.train import train

    run_dir = out / "runs" / arm.name
    summary = run_dir / "summary.json"
    if not summary.is_file():
        overrides = [f"model.path={model_dir}", f"data.path={train_file}", f"train.method={arm.method}",
                     f"train.run_dir={run_dir}", f"train.time_budget_s={settings.budget_s}",
                     f"train.seed={settings.seed}", *arm.overrides, *settings.overrides]
        if arm.curriculum and prepass is not None:
            overrides.append(f"data.difficulty={prepass}")
        if run_dir.exists():  # an interrupted arm starts again: the budget is the whole run's
            shutil.rmtree(run_dir)
        train(load_config(str(SCIENCE_RECIPE), overrides), print_fn=print_fn)
        plot_run(run_dir)
    version = json.loads(summary.read_text())["final_adapter_version"]
    return run_dir / "adapters" / f"v{version}"


def run_science(settings: ScienceSettings, print_fn: Callable[..., None] = print) -> Path:
    from orchestrator.quickstart import ensure_quickstart_model
    from science.arithmetic import split, write_jsonl
    from science.report import write_report

    started = time.perf_counter()
    out = Path(settings.out)
    check_rerun(out, settings)
    model_dir = Path(settings.model) if settings.model else ensure_quickstart_model(Path(settings.models_dir))
    train_rows, heldout_rows = split(settings.train_rows, settings.heldout_rows, settings.seed)
    train_file = write_jsonl(train_rows, out / "data" / "train.jsonl")
    heldout_file = write_jsonl(heldout_rows, out / "data" / "heldout.jsonl")
    print_fn(f"science: {len(train_rows)} training and {len(heldout_rows)} held-out problems in {out / 'data'}; "
             f"arms {', '.join(settings.arms)}, {settings.budget_s:.0f} s of training each")

    evals: dict[str, Path] = {"base": run_eval(settings, model_dir, heldout_file, "heldout", out / "eval" / "base",
                                               None, settings.n, print_fn)}
    prepass = None
    if any(ARMS[a].curriculum for a in settings.arms):
        prepass = run_eval(settings, model_dir, train_file, "train", out / "eval" / "prepass", None,
                           settings.prepass_n, print_fn)
    seconds: dict[str, float] = {}
    for name in settings.arms:
        arm_started = time.perf_counter()
        adapter = train_arm(settings, ARMS[name], model_dir, train_file, out, prepass, print_fn)
        evals[name] = run_eval(settings, model_dir, heldout_file, "heldout", out / "eval" / name, adapter,
                               settings.n, print_fn)
        seconds[name] = time.perf_counter() - arm_started

    from science.divergence import divergence_by_kind

    base_cfg, _ = eval_config(settings, heldout_file, "heldout", settings.n)
    divergence = divergence_by_kind(model_dir, out / "eval" / "base", heldout_file, base_cfg)
    report = write_report(out, settings_dict(settings), evals, divergence, seconds,
                          total_s=time.perf_counter() - started)
    print_fn(report.read_text())
    return report


def check_rerun(out: Path, settings: ScienceSettings) -> None:
    """A rerun into the same ``--out`` keeps the arms and evaluations already finished, so it must be the same
    experiment: other settings there are refused (the arms may differ)."""
    from opsd.errors import UserInputError

    recorded = out / "settings.json"
    wanted = {k: v for k, v in settings_dict(settings).items() if k != "arms"}
    if recorded.is_file():
        before = {k: v for k, v in json.loads(recorded.read_text()).items() if k != "arms"}
        if before != wanted:
            changed = ", ".join(sorted(k for k in wanted if before.get(k) != wanted[k]))
            raise UserInputError(f"{out} holds a comparison with other settings ({changed}); choose another --out")
    write_text_atomic(recorded, json.dumps(settings_dict(settings), indent=2) + "\n")


def settings_dict(settings: ScienceSettings) -> dict[str, Any]:
    d = asdict(settings)
    d["arms"], d["overrides"] = list(settings.arms), list(settings.overrides)
    return d


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `opsd science` options (orchestrator.cli wires them)."""
    d = ScienceSettings()
    parser.add_argument("--out", default=d.out, help=f"output directory (default: {d.out}); a rerun keeps the "
                        "arms and evaluations already finished there")
    parser.add_argument("--arms", default=",".join(d.arms), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--train-rows", type=int, default=d.train_rows)
    parser.add_argument("--heldout-rows", type=int, default=d.heldout_rows)
    parser.add_argument("--budget-s", type=float, default=d.budget_s,
                        help=f"training seconds per arm (default: {d.budget_s:.0f})")
    parser.add_argument("--n", type=int, default=d.n, help=f"samples per held-out problem (default: {d.n})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--models-dir", default=d.models_dir, help="where the offline model is imported once")
    parser.add_argument("--model", default=None,
                        help="a local model directory instead of SmolLM2-135M-Instruct (imported from its GGUF)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every arm")


def settings_from(args: argparse.Namespace) -> ScienceSettings:
    arms = tuple(a for a in args.arms.split(",") if a)
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ConfigError("--arms", f"unknown arm(s) {', '.join(unknown) or '(none)'}; the arms are "
                          f"{', '.join(ARMS)}")
    for name, value in (("--train-rows", args.train_rows), ("--heldout-rows", args.heldout_rows), ("--n", args.n)):
        if value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}")
    if args.budget_s <= 0:
        raise ConfigError("--budget-s", f"must be > 0, got {args.budget_s}")
    return ScienceSettings(out=args.out, arms=arms, train_rows=args.train_rows, heldout_rows=args.heldout_rows,
                           seed=args.seed, budget_s=args.budget_s, n=args.n, models_dir=args.models_dir,
                           model=args.model, overrides=tuple(args.overrides))
