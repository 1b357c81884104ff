"""Which eval sets exist, and loading them into the canonical problem table.

An eval set is a set of problems with reference answers that a model is evaluated on (``opsd eval``, and
``eval.every`` in training). Built-in eval sets are small files shipped in the repository's ``data/`` directory
(sources and licences in ``data/eval/README.md``), found relative to this package, so ``opsd eval --sets aime24``
works from any working directory of a clone:

    aime24, aime25, hmmt25   30 problems each, integer or LaTeX answers          (mapping ``eval``)
    math500                  500 problems of the MATH test set, LaTeX answers   (mapping ``eval``)
    gsm8k                    1,319 GSM8K test problems, answer after ``####``   (mapping ``gsm8k``)

Any other eval set is a JSONL or Parquet file given by path (``--sets NAME=PATH`` or just ``PATH``, named after
the file), read with a column mapping (a preset of :data:`opsd.data.MAPPINGS` plus per-field overrides).
Files are loaded and validated by :func:`opsd.data.load_problems` with ``problem`` and ``answer``
required, so a bad file is refused before any generation, naming the file, line and field.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa

from opsd.data import DataError, load_problems, mapping_with_columns

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class EvalSetSpec:
    """Where an eval set's problems come from."""

    name: str
    path: Path
    mapping: str = "eval"
    columns: Mapping[str, str] = field(default_factory=dict)  # per-field source column overrides
    description: str = ""
    source: str = ""  # for a built-in set that is not shipped: where to get it (its file is given once)


BUILTIN: dict[str, EvalSetSpec] = {
    spec.name: spec
    for spec in (
        EvalSetSpec("aime24", DATA_DIR / "eval" / "aime24.jsonl", "eval", {}, "AIME 2024 I and II"),
        EvalSetSpec("aime25", DATA_DIR / "eval" / "aime25.jsonl", "eval", {}, "AIME 2025 I and II"),
        EvalSetSpec("hmmt25", DATA_DIR / "eval" / "hmmt25.jsonl", "eval", {}, "HMMT February 2025"),
        EvalSetSpec("math500", DATA_DIR / "eval" / "math500.jsonl", "eval", {}, "MATH-500 (MATH test subset)"),
        EvalSetSpec("gsm8k", DATA_DIR / "gsm8k" / "test.jsonl", "gsm8k", {}, "GSM8K test set"),
        # Not shipped: evaluated by the paper, its file is given once (placed at this path, or as amobench=PATH).
        EvalSetSpec("amobench", DATA_DIR / "eval" / "amobench.jsonl", "eval",
                    {"problem": "prompt", "id": "question_id"}, "AMO-Bench",
                    source="the Hugging Face dataset meituan-longcat/AMO-Bench, test split (columns prompt, answer, "
                           "question_id)"),
    )
}
SHIPPED = tuple(name for name, spec in BUILTIN.items() if not spec.source)


@dataclass(frozen=True)
class EvalSet:
    """A loaded eval set: the canonical table (id, problem, solution, answer; every answer present)."""

    name: str
    path: Path
    table: pa.Table

    @property
    def num_problems(self) -> int:
        return self.table.num_rows


def resolve_eval_set(entry: str, mapping: str = "eval", columns: Mapping[str, str] | None = None
                     ) -> EvalSetSpec:
    """A built-in name, ``NAME=PATH`` or ``PATH`` -> a spec. ``mapping``/``columns`` apply to files given by path."""
    entry = entry.strip()
    if entry in BUILTIN:
        return BUILTIN[entry]
    name, _, path_text = entry.rpartition("=")
    path = Path(path_text).expanduser()
    known = BUILTIN.get(name)
    if known is not None and known.source:  # a built-in set that is not shipped, given by its file: its columns
        if not path.is_file():
            raise DataError(f"eval set {name!r}: {path}: file not found")
        return EvalSetSpec(name, path, known.mapping, dict(known.columns), known.description, known.source)
    if not name:
        name = path.name.split(".")[0]
    looks_like_path = "=" in entry or "/" in entry or "." in entry or path.exists()
    if not looks_like_path:
        close = difflib.get_close_matches(entry, list(BUILTIN), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(
            f"unknown eval set {entry!r}{hint}; built-in: {', '.join(BUILTIN)}; or give a file as PATH or NAME=PATH"
        )
    if not _NAME_RE.fullmatch(name):
        raise DataError(f"eval set name {name!r} (from {entry!r}) must be letters, digits, '_', '-' or '.'")
    if not path.is_file():
        raise DataError(f"eval set {name!r}: {path}: file not found" if not path.exists() else f"{path}: not a file")
    return EvalSetSpec(name, path, mapping, dict(columns or {}))


def load_eval_set(spec: EvalSetSpec, limit: int | None = None) -> EvalSet:
    """Load and validate an eval set (the first ``limit`` problems); every row needs a problem and an answer."""
    if not spec.path.is_file():
        if spec.source:
            raise DataError(f"eval set {spec.name!r} ({spec.description}) does not ship with opsd: get "
                            f"{spec.source}, save it as {spec.path.relative_to(REPO_ROOT)} or pass it as "
                            f"{spec.name}=PATH")
        raise DataError(
            f"eval set {spec.name!r}: {spec.path} not found. Built-in eval set files ship in the repository's "
            "data/ directory (an installed, non-editable package does not have them): pass the file as NAME=PATH"
        )
    mapping = mapping_with_columns(spec.mapping, spec.columns)
    table, _ = load_problems(spec.path, mapping, required=("problem", "answer"), limit=limit)
    return EvalSet(spec.name, spec.path, table)


def load_eval_sets(entries: Sequence[str], limit: int | None = None, mapping: str = "eval",
                   columns: Mapping[str, str] | None = None) -> list[EvalSet]:
    """Resolve and load every eval set (all validated before any is used); names must be unique."""
    if not entries:
        raise DataError(f"no eval set given; built-in: {', '.join(BUILTIN)}")
    specs = [resolve_eval_set(entry, mapping, columns) for entry in entries]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"eval set name(s) {', '.join(duplicates)} given more than once; name files NAME=PATH")
    return [load_eval_set(spec, limit) for spec in specs]


def parse_columns(text: str | None) -> dict[str, str]:
    """``"problem=question,answer=final"`` -> ``{"problem": "question", "answer": "final"}``."""
    columns: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DataError(f"column override {item!r} must look like FIELD=COLUMN, e.g. problem=question")
        columns[key.strip()] = value.strip()
    return columns
