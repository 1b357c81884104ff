"""``opsd export``: a trained adapter as a directory to share, as the PEFT adapter or merged into the base model.

    opsd export RUN_DIR --out DIR [--merge]           the newest adapters/vN (or --version N), tokenizer, model card
    opsd export ADAPTER_DIR --out DIR [--base-model M]
    opsd export ... --push-to-hub USER/NAME

Everything is checked before a weight is loaded, the output appears whole or not at all, and the merge is PEFT's
own in float32: README.md ("Export").
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsd.adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError, AdapterPayload, read_adapter_dir
from opsd.atomic import atomic_directory
from opsd.errors import UserInputError

if TYPE_CHECKING:
    from orchestrator.config import OPSDConfig

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_NO_RANK_LIMIT = 1 << 30  # the rank check of opsd.lora is an engine's limit; an export has none
TAGS = ["opsd", "on-policy-self-distillation", "self-distillation"]


class ExportError(UserInputError):
    """An input or output of ``opsd export`` that cannot be used; the message names the path or field."""


@dataclass(frozen=True)
class ExportSource:
    """What is exported and what is known about how it was trained (the run's files, when it comes from a run)."""

    adapter_dir: Path
    payload: AdapterPayload  # its config's base_model_name_or_path is the base model it is exported with
    base_model: str  # HF id or local directory, as configured
    revision: str | None
    tokenizer: str
    trust_remote_code: bool
    run_dir: Path | None = None
    config: OPSDConfig | None = None
    summary: dict = field(default_factory=dict)  # the run's summary.json ({} when absent)
    records: list[dict] = field(default_factory=list)  # the run's metrics.jsonl

    @property
    def base_model_is_local(self) -> bool:
        return Path(self.base_model).is_dir()


@dataclass(frozen=True)
class ExportResult:
    out: Path
    merged: bool
    dtype: str | None  # of the merged weights


# ----------------------------------------------------------------------------------------------------------------
# The input


def resolve_source(path: str | os.PathLike, version: int | None = None, base_model: str | None = None
                   ) -> ExportSource:
    """Read and check a run directory or a PEFT adapter directory; raises :class:`ExportError` naming the path.

    Also checks that the adapter fits the base model (its LoRA layers exist there with the shapes it holds), from
    the base model's config alone: no weight is loaded.
    """
    folder = Path(path)
    if not folder.exists():
        raise ExportError(f"{folder}: no such directory")
    if not folder.is_dir():
        raise ExportError(f"{folder} is a file; opsd export takes a run directory or a PEFT adapter directory")
    if (folder / "config.yaml").exists() or (folder / "adapters").is_dir():
        source = _run_source(folder, version, base_model)
    elif any((folder / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE)) or _pickle_files(folder):
        if version is not None:
            raise ExportError(f"{folder} is an adapter directory: --version picks an adapter of a run directory")
        source = _adapter_source(folder, base_model)
    else:
        raise ExportError(
            f"{folder} is neither an opsd run directory (config.yaml and adapters/vN/) nor a PEFT adapter "
            f"directory ({CONFIG_FILE} and {WEIGHTS_FILE})")
    _check_fits_base_model(source)
    return source


def _run_source(run_dir: Path, version: int | None, base_model: str | None) -> ExportSource:
    from orchestrator.config import load_config

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"{config_file}: missing; an opsd run directory holds the config.yaml it was trained with")
    cfg = load_config(config_file)
    adapters = _adapter_versions(run_dir / "adapters")
    if not adapters:
        raise ExportError(f"{run_dir / 'adapters'}: no adapter versions (adapters/vN/) in this run directory yet")
    if version is None:
        version = max(adapters)
    elif version not in adapters:
        raise ExportError(f"{run_dir / 'adapters' / f'v{version}'}: no such adapter version; this run has "
                          + ", ".join(f"v{v}" for v in sorted(adapters)))
    adapter_dir = adapters[version]
    payload = _read_adapter(adapter_dir, version)
    recorded = payload.base_model
    if base_model is None and recorded and not _same_model(recorded, cfg.model.path):
        raise ExportError(f"{adapter_dir / CONFIG_FILE}: the adapter was trained on base model {recorded!r}, but "
                          f"{config_file} has model.path {cfg.model.path!r}")
    base = base_model or cfg.model.path
    tokenizer = cfg.model.tokenizer or base
    return ExportSource(
        adapter_dir=adapter_dir, payload=_with_base(payload, base), base_model=base,
        revision=None if base_model else cfg.model.revision, tokenizer=tokenizer,
        trust_remote_code=cfg.model.trust_remote_code, run_dir=run_dir, config=cfg,
        summary=_read_summary(run_dir), records=_read_records(run_dir))


def _adapter_source(adapter_dir: Path, base_model: str | None) -> ExportSource:
    match = re.fullmatch(r"v(\d+)", adapter_dir.name)
    payload = _read_adapter(adapter_dir, int(match[1]) if match else 1)
    base = base_model or payload.base_model
    if not base:
        raise ExportError(f"{adapter_dir / CONFIG_FILE}: no base_model_name_or_path; pass --base-model")
    revision = None if base_model else payload.config.get("revision")
    return ExportSource(adapter_dir=adapter_dir, payload=_with_base(payload, base), base_model=base,
                        revision=revision, tokenizer=base, trust_remote_code=False)


def _adapter_versions(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    return {int(p.name[1:]): p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name)}


def _pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _PICKLE_SUFFIXES)


def _read_adapter(adapter_dir: Path, version: int) -> AdapterPayload:
    """The adapter's safetensors weights and config. Pickle weights are refused, never loaded: unpickling runs
    whatever code the file holds."""
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        pickles = _pickle_files(adapter_dir)
        if pickles:
            raise ExportError(
                f"{pickles[0]}: adapter weights in a pickle file; opsd export reads {WEIGHTS_FILE} only (loading "
                "a pickle can run code). Re-save the adapter with PEFT's save_pretrained (safetensors by default)")
    try:
        return read_adapter_dir(adapter_dir, version)
    except AdapterError as exc:
        raise ExportError(str(exc)) from None


def _with_base(payload: AdapterPayload, base: str) -> AdapterPayload:
    """The payload with ``base_model_name_or_path`` set to the base it is exported with (a local directory as an
    absolute path: the one PEFT's AutoPeftModel finds from anywhere)."""
    name = str(Path(base).resolve()) if Path(base).is_dir() else base
    return AdapterPayload(version=payload.version, weights=payload.weights,
                          config={**payload.config, "base_model_name_or_path": name})


def _same_model(a: str, b: str) -> bool:
    from opsd.lora import same_base_model

    return same_base_model(a, b)


def _check_fits_base_model(source: ExportSource) -> None:
    """The adapter's LoRA layers against the base model's linear layers (a meta-device model: no weights)."""
    from opsd.lora import AdapterTarget, model_linear_shapes, validated_lora_weights

    try:
        shapes = model_linear_shapes(source.base_model, source.revision, source.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read base model {source.base_model!r} of {source.adapter_dir}: "
                          f"{_first_line(exc)} (pass --base-model to load it from elsewhere)") from exc
    target = AdapterTarget(base_model=source.payload.base_model or source.base_model, max_rank=_NO_RANK_LIMIT,
                           linear_shapes=shapes)
    try:
        validated_lora_weights(source.payload, target)
    except AdapterError as exc:
        reason = str(exc).removeprefix(f"adapter version {source.payload.version}: ")
        raise ExportError(f"cannot export {source.adapter_dir} with base model {source.base_model!r}: {reason}"
                          ) from None


def _read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}  # a run that is still going (or stopped) has adapters but no summary yet
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(summary, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return summary


def _read_records(run_dir: Path) -> list[dict]:
    from orchestrator.plot import load_records

    path = run_dir / "metrics.jsonl"
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        return []
    return load_records(run_dir)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------------------
# The output


def check_output(out: str | os.PathLike, source: ExportSource, overwrite: bool) -> Path:
    """``out`` resolved; refuses a non-empty directory (unless ``overwrite``), a file, and a directory that
    holds the adapter being exported (replacing it would delete the source)."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file")
    adapter = source.adapter_dir.resolve()
    if out == adapter or out in adapter.parents:
        raise ExportError(f"--out {out} holds the adapter being exported ({source.adapter_dir}); choose another "
                          "directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} is not empty (pass --overwrite to replace it)")
    return out


def check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError as exc:
        raise ExportError(f"--push-to-hub {repo!r}: {_first_line(exc)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Export


def export(source: ExportSource, out: str | os.PathLike, merge: bool = False, overwrite: bool = False,
           repo: str | None = None, log=print) -> ExportResult:
    """Write the export of ``source`` to ``out`` atomically. ``repo`` only names the model in the card's how-to."""
    out = check_output(out, source, overwrite)
    if merge:
        _check_merge_input(source)
    tokenizer = _load_tokenizer(source)
    with atomic_directory(out, overwrite=True) as tmp:  # check_output has refused what must not be replaced
        dtype = None
        if merge:
            log(f"opsd export: merging {source.adapter_dir} into {source.base_model} (float32, then the base's dtype)")
            dtype = _write_merged(source, tmp)
        else:
            _write_adapter_files(source.payload, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(source, merged=merge, dtype=dtype, repo=repo or out.name),
                                       encoding="utf-8")
    return ExportResult(out=out, merged=merge, dtype=dtype)


def _check_merge_input(source: ExportSource) -> None:
    from opsd.lora import check_mergeable

    try:
        check_mergeable(source.payload)
    except AdapterError as exc:
        raise ExportError(f"{source.adapter_dir}: {exc}") from None
    base = Path(source.base_model)
    if base.is_dir() and not list(base.glob("*.safetensors")):
        raise ExportError(f"base model {base} has no .safetensors weights; opsd export loads safetensors only")


def _load_tokenizer(source: ExportSource) -> Any:
    from opsd.hf import load_tokenizer

    return load_tokenizer(source.tokenizer, source.revision, source.trust_remote_code)


def _write_adapter_files(payload: AdapterPayload, folder: Path) -> None:
    (folder / WEIGHTS_FILE).write_bytes(payload.weights)
    (folder / CONFIG_FILE).write_text(json.dumps(payload.config, indent=2, sort_keys=True) + "\n")


def _write_merged(source: ExportSource, folder: Path) -> str:
    """Base + adapter merged by PEFT in float32, saved in the base checkpoint's dtype; returns that dtype's name."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    load = dict(revision=source.revision, trust_remote_code=source.trust_remote_code)
    try:
        dtype = _checkpoint_dtype(AutoConfig.from_pretrained(source.base_model, **load))
        model = AutoModelForCausalLM.from_pretrained(source.base_model, dtype=torch.float32, use_safetensors=True,
                                                     **load)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load base model {source.base_model!r} from safetensors: {_first_line(exc)}") from exc
    with tempfile.TemporaryDirectory(prefix="opsd-export-adapter-") as staged:
        _write_adapter_files(source.payload, Path(staged))  # only the checked safetensors file, nothing else
        merged = PeftModel.from_pretrained(model, staged).merge_and_unload()
    merged = merged.to(dtype).eval()
    merged.config.dtype = dtype
    for name, tensor in merged.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{source.adapter_dir}: merged weight {name} is not finite in {dtype}")
    try:
        merged.generation_config = GenerationConfig.from_pretrained(source.base_model, **load)
    except OSError:
        pass  # the base has none: transformers writes the one it derived from the model config
    merged.save_pretrained(folder)
    return str(dtype).removeprefix("torch.")


def _checkpoint_dtype(config: Any) -> Any:
    """The dtype the base checkpoint declares (float32 when it declares none)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# The model card


@dataclass(frozen=True)
class TrainingFacts:
    """What the run's files say about the exported adapter version; None where they do not say."""

    steps: int | None  # optimizer steps behind the exported version
    run_steps: int | None
    final_version: int | None
    heldout_before: float | None
    heldout_after: tuple[int, float] | None  # (step, GJS)
    last_eval: tuple[int, dict[str, float]] | None  # (step, eval/<set>/<metric> values)


def training_facts(source: ExportSource) -> TrainingFacts:
    version, summary, records = source.payload.version, source.summary, source.records
    final = summary.get("final_adapter_version")
    run_steps = summary.get("steps") or (max(r["step"] for r in records) if records else None)
    at_version = [r["step"] for r in records if r.get("adapter_version") == version]
    steps = min(at_version) if at_version else (run_steps if final == version else None)
    heldout = {int(k): v for k, v in (summary.get("heldout_gjs") or {}).items() if _is_number(v)}
    heldout |= {r["step"]: r["heldout_gjs"] for r in records if _is_number(r.get("heldout_gjs"))}
    until = steps if steps is not None else math.inf
    after_steps = [s for s in heldout if 0 < s <= until]
    after = (max(after_steps), heldout[max(after_steps)]) if after_steps else None
    last_eval = None
    for record in records:
        values = {k: v for k, v in record.items() if k.count("/") == 2 and k.startswith("eval/") and _is_number(v)}
        if values and record["step"] <= until:
            last_eval = (record["step"], values)
    if last_eval is None and summary.get("eval"):  # e.g. only the evaluation before training
        step = max(int(s) for s in summary["eval"])
        if step <= until:
            values = {k: v for k, v in summary["eval"][str(step)].items() if k.count("/") == 2 and _is_number(v)}
            last_eval = (step, values) if values else None
    return TrainingFacts(steps=steps, run_steps=run_steps, final_version=final, heldout_before=heldout.get(0),
                         heldout_after=after, last_eval=last_eval)


def model_card(source: ExportSource, merged: bool, dtype: str | None, repo: str) -> str:
    """``README.md`` of the export: YAML front matter for the Hub, then how it was trained and how to load it."""
    from opsd.configlib import dump_yaml, to_dict

    front: dict[str, Any] = {}
    if not source.base_model_is_local:  # the Hub links base_model to that model's page; a local path means nothing
        front["base_model"] = source.base_model
    front["library_name"] = "transformers" if merged else "peft"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = TAGS + (["lora", "merged"] if merged else ["lora"])
    lora = source.payload.config
    facts = training_facts(source)
    kind = (f"the base model with the LoRA adapter merged into its weights ({dtype})" if merged
            else "a PEFT LoRA adapter")
    lines = [
        "---", dump_yaml(front).rstrip(), "---", "",
        f"# {repo.rsplit('/', 1)[-1]}", "",
        f"{kind[0].upper()}{kind[1:]}, trained with opsd by On-Policy Self-Distillation "
        "([Zhao et al., 2026](https://arxiv.org/abs/2601.18734)): the student samples reasoning traces from the "
        "problem alone; the same model with frozen initial weights, shown the problem and its verified solution, "
        "scores every token; a LoRA adapter moves the student's next-token distribution toward the teacher's "
        "(generalized Jensen-Shannon divergence).", "",
        "## Training", "",
        f"- Base model: `{source.base_model}`" + (" (a local directory)" if source.base_model_is_local else ""),
        f"- LoRA: rank {lora.get('r')}, alpha {lora.get('lora_alpha')}, target modules "
        f"{', '.join(f'`{m}`' for m in source.payload.target_modules)}",
        f"- Adapter version: v{source.payload.version}" + _steps_text(facts),
    ]
    if source.config is not None:
        lines.append(f"- Data: {_data_text(source.config)}")
        lines.append(f"- Loss: {source.config.learner.loss.kind}, beta {source.config.learner.loss.beta}")
    else:
        lines.append("- Exported from an adapter directory: the training run's config, data and metrics are not known")
    lines.append("")
    if source.run_dir is not None and not (source.summary or source.records):
        lines += ["## Results", "", "The run directory has no summary.json or metrics.jsonl: no results to report.", ""]
    elif source.run_dir is not None:
        lines += _results_lines(facts)
    lines += ["## How to load", "", *_howto_lines(source, merged, repo), ""]
    if source.config is not None:
        lines += ["## Training config", "", "The opsd config of the run (`opsd train --config` takes it back):", "",
                  "```yaml", dump_yaml(to_dict(source.config)).rstrip(), "```", ""]
    return "\n".join(lines)


def _steps_text(facts: TrainingFacts) -> str:
    parts = []
    if facts.steps is not None:
        parts.append(f"after {facts.steps} training step{'' if facts.steps == 1 else 's'}")
    if facts.run_steps is not None and facts.final_version is not None:
        parts.append(f"the run trained {facts.run_steps} steps, final adapter v{facts.final_version}")
    elif facts.run_steps is not None:
        parts.append(f"the run has recorded {facts.run_steps} steps so far (no summary.json)")
    return f" ({'; '.join(parts)})" if parts else ""


def _data_text(cfg: Any) -> str:
    """The data file and its number of problems, counted as training counted them, when the file is here."""
    from opsd.data import load_dataset

    text = f"`{cfg.data.path}` (mapping `{cfg.data.mapping}`)"
    if not Path(cfg.data.path).is_file():
        return text
    try:
        table, _ = load_dataset(cfg.data, required=("problem", "solution"))
    except UserInputError:
        return text
    held = cfg.train.heldout_rows
    trained = table.num_rows - held
    return text + f", {table.num_rows} problems" + (f": {trained} trained on, {held} held out" if held else "")


def _results_lines(facts: TrainingFacts) -> list[str]:
    lines = ["## Results", ""]
    if facts.heldout_before is not None and facts.heldout_after is not None:
        step, after = facts.heldout_after
        change = f" ({(after - facts.heldout_before) / facts.heldout_before:+.1%})" if facts.heldout_before else ""
        lines.append(f"Held-out GJS (mean per token on traces of held-out problems, lower is closer to the teacher): "
                     f"{facts.heldout_before:.5f} before training, {after:.5f} after step {step}{change}.")
    elif facts.heldout_before is not None:
        lines.append(f"Held-out GJS before training: {facts.heldout_before:.5f}.")
    else:
        lines.append("No held-out GJS was measured (`train.heldout_rows` was 0).")
    lines.append("")
    if facts.last_eval is None:
        return lines + ["No evaluation on eval sets was recorded during training (`eval.every`).", ""]
    step, values = facts.last_eval
    lines += [f"Last evaluation on eval sets (after step {step}):", "",
              "| eval set | metric | value |", "|---|---|---|"]
    for key, value in sorted(values.items()):
        _, eval_set, metric = key.split("/")
        if metric.endswith(("_ci95_low", "_ci95_high")):
            continue
        low, high = values.get(f"{key}_ci95_low"), values.get(f"{key}_ci95_high")
        interval = f" [{low:.3f}, {high:.3f}]" if _is_number(low) and _is_number(high) else ""
        lines.append(f"| {eval_set} | {metric} | {value:.4g}{interval} |")
    return lines + [""]


def _howto_lines(source: ExportSource, merged: bool, repo: str) -> list[str]:
    trust = ", trust_remote_code=True" if source.trust_remote_code else ""
    if merged:
        return [
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}"{trust})',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{trust})', "```", "",
            f"vLLM: `vllm serve {repo}`.",
        ]
    rank = max([source.payload.rank, *map(int, (source.payload.config.get("rank_pattern") or {}).values())])
    return [
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'base = AutoModelForCausalLM.from_pretrained("{source.base_model}"{trust})',
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```", "",
        f"vLLM: `vllm serve {source.base_model} --enable-lora --lora-modules opsd={repo} --max-lora-rank "
        f"{_vllm_rank(rank)}`; or `opsd export --merge` for a plain model.",
    ]


def _vllm_rank(rank: int) -> int:
    """The smallest of vLLM's allowed ``max_lora_rank`` values that holds ``rank``."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------------------------
# The Hub


class PushError(UserInputError):
    """The export is complete locally; uploading it failed (offline, no token, the Hub refused)."""


def push_to_hub(folder: str | os.PathLike, repo: str) -> str:
    """Create ``repo`` (if needed) and upload ``folder`` to it; returns the repo's URL. Failures raise
    :class:`PushError` with the repo and the reason (never the token)."""
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    later = f"the export in {folder} is complete; push it later with: hf upload {repo} {folder}"
    if constants.HF_HUB_OFFLINE:
        raise PushError(f"cannot push to {repo}: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); {later}")
    token = get_token()
    if not token:
        raise PushError(f"cannot push to {repo}: no Hugging Face token (run `hf auth login` or set HF_TOKEN); {later}")
    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                          commit_message="Upload model exported by opsd export")
    except Exception as exc:  # network, auth, quota, ...: the export stands, the reason is all the user needs
        reason = f"{type(exc).__name__}: {_first_line(exc)}".replace(token, "<token>")
        raise PushError(f"cannot push to {repo}: {reason}; {later}") from exc
    return str(url)
