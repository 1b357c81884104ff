"""Dataset loading and validation: a JSONL or Parquet file in, one canonical Arrow table out (``id``, ``problem``,
``solution``, ``answer``).

The whole input is validated before anything is returned; every :class:`DataError` names the file, the line or row
and the field. Mappings and ids: docs/ARCHITECTURE.md ("Configs and data").
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from opsd.answers import extract_boxed
from opsd.errors import UserInputError

CANONICAL_FIELDS = ("id", "problem", "solution", "answer")
SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("problem", pa.string(), nullable=False),
                    pa.field("solution", pa.string()), pa.field("answer", pa.string())])
ON_BAD_ROW = ("error", "skip")
FORMATS = ("auto", "jsonl", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".json-lines": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_CALCULATOR_MARK = re.compile(r"<<[^<>]*>>")
_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_GSM8K_MARKER = "#### "


class DataError(UserInputError):
    """Bad input data or a bad loader argument. The message names the file, the line/row and the field."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column feeds each canonical field.

    ``id=None`` gives ids ``"<file stem>-<row index>"``, the 0-based index of the row in the file (blank JSONL lines
    are not rows; skipped bad rows keep their index), so ids stay stable whatever is skipped or limited.
    ``answer_from_solution="gsm8k"`` derives the answer from the text after the last ``'#### '`` of the solution;
    ``"boxed"`` from its last ``\\boxed{...}`` (none there: no answer, unless the answer is required).
    """

    problem: str
    solution: str | None = None
    answer: str | None = None
    id: str | None = None
    answer_from_solution: str | None = None
    strip_calculator_marks: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.problem, str) or not self.problem:
            raise DataError(f"ColumnMapping.problem must name a source column, got {self.problem!r}")
        if self.answer_from_solution not in (None, "gsm8k", "boxed"):
            raise DataError(f"answer_from_solution must be None, 'gsm8k' or 'boxed', got {self.answer_from_solution!r}")
        if self.answer_from_solution and (self.solution is None or self.answer is not None):
            raise DataError("answer_from_solution needs a solution column and no answer column")

    def columns(self) -> dict[str, str]:
        """Canonical field -> source column (a derived answer reads the solution column)."""
        answer = self.solution if self.answer_from_solution else self.answer
        pairs = {"id": self.id, "problem": self.problem, "solution": self.solution, "answer": answer}
        return {name: column for name, column in pairs.items() if column is not None}


MAPPINGS: dict[str, ColumnMapping] = {
    # GSM8K: the solution keeps its text and its final '#### N' line; only the <<a*b=c>> marks go.
    "gsm8k": ColumnMapping("question", solution="answer", answer_from_solution="gsm8k", strip_calculator_marks=True),
    "openthoughts": ColumnMapping(problem="problem", solution="solution", answer="answer"),
    # The OPSD authors' training set (siyanzhao/Openthoughts_math_30k_opsd): problem and solution only; the answer
    # (for the student-accuracy metric) is the solution's last \boxed{}.
    "opsd-math30k": ColumnMapping(problem="problem", solution="solution", answer_from_solution="boxed"),
    "eval": ColumnMapping(problem="problem", answer="answer"),
    # The project's own columns, as `opsd data convert` writes them.
    "opsd": ColumnMapping(problem="problem", solution="solution", answer="answer", id="id"),
}


@dataclass
class LoadReport:
    path: str
    rows_read: int
    rows_kept: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count; only filled when on_bad_row="skip"


class _BadRow(Exception):
    """One bad row: a skip reason (a LoadReport.skipped key) and what to tell the user."""

    def __init__(self, reason: str, detail: str, name: str | None = None, column: str | None = None,
                 derived: bool = False):  # derived: the field is computed from `column` (gsm8k answer)
        super().__init__(detail)
        self.reason, self.detail, self.field_name, self.column, self.derived = reason, detail, name, column, derived

    def describe(self) -> str:
        if self.field_name is None:
            return self.detail
        source = f" ({'derived from ' if self.derived else ''}column {self.column!r})" if self.column else ""
        return f"field {self.field_name!r}{source}: {self.detail}"


def _unknown(what: str, name: Any, known: Sequence[str]) -> DataError:
    """'unknown <what> 'nmae' (did you mean 'name'?); known: ...'"""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"unknown {what} {name!r}{hint}; known: {', '.join(known)}")


def resolve_mapping(mapping: str | ColumnMapping | Mapping[str, Any]) -> ColumnMapping:
    """A preset name, a ColumnMapping, or a dict of ColumnMapping fields -> a ColumnMapping."""
    if isinstance(mapping, ColumnMapping):
        return mapping
    if isinstance(mapping, str):
        if mapping in MAPPINGS:
            return MAPPINGS[mapping]
        raise _unknown("column mapping", mapping, sorted(MAPPINGS))
    if isinstance(mapping, Mapping):
        names = [f.name for f in fields(ColumnMapping)]
        for key in mapping:
            if key not in names:
                raise _unknown("column mapping key", key, names)
        if "problem" not in mapping:
            raise DataError("a column mapping needs 'problem' (the source column of the problem text)")
        return ColumnMapping(**mapping)
    raise DataError(f"a column mapping is a preset name, a ColumnMapping or a dict, not {type(mapping).__name__}")


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _text(record: Mapping[str, Any], name: str, column: str, required: bool, allow_int: bool) -> str | None:
    """A string field of one record, or None when it is optional and absent/null/blank."""
    value = record.get(column)
    if value is None:
        if required:
            raise _BadRow("missing_field", "is missing" if column not in record else "is null", name, column)
        return None
    if allow_int and type(value) is int:  # bool is a subclass of int: excluded by the exact type check
        value = str(value)
    if not isinstance(value, str):
        expected = "a string or an integer" if allow_int else "a string"
        raise _BadRow("wrong_type", f"expected {expected}, got {_type_name(value)}", name, column)
    if not value.strip():
        if required:
            raise _BadRow("empty_field", "is empty or whitespace-only", name, column)
        return None
    return value


def _gsm8k_answer(solution: str, column: str) -> str:
    """Text after the last '#### ', with thousands separators dropped ('1,080' -> '1080') for exact-match grading."""
    if _GSM8K_MARKER not in solution:
        raise _BadRow("no_final_answer", "solution has no '#### ' final-answer line", "answer", column, True)
    answer = solution.rsplit(_GSM8K_MARKER, 1)[1].strip()
    if not answer:
        raise _BadRow("no_final_answer", "nothing after the last '#### '", "answer", column, True)
    return answer.replace(",", "") if _GROUPED_NUMBER.fullmatch(answer) else answer


def _convert(record: Mapping[str, Any], default_id: str, mapping: ColumnMapping, need: frozenset[str]) -> dict:
    """One source record -> one canonical row, or _BadRow."""
    m = mapping
    problem = _text(record, "problem", m.problem, True, False)
    solution = _text(record, "solution", m.solution, "solution" in need, False) if m.solution else None
    answer = None
    if m.answer_from_solution == "boxed" and solution is not None:
        answer = extract_boxed(solution)
        if answer is None and "answer" in need:
            raise _BadRow("no_final_answer", "solution has no \\boxed{} final answer", "answer", m.solution, True)
    elif m.answer_from_solution and solution is not None:
        answer = _gsm8k_answer(solution, m.solution or "")
    elif m.answer_from_solution and "answer" in need:
        raise _BadRow("missing_field", "cannot be derived: the solution is missing", "answer", m.solution, True)
    elif m.answer:
        answer = _text(record, "answer", m.answer, "answer" in need, True)
    if solution is not None and m.strip_calculator_marks:
        solution = _CALCULATOR_MARK.sub("", solution)
    row_id = _text(record, "id", m.id, True, True) if m.id else default_id
    return {"id": row_id, "problem": problem, "solution": solution, "answer": answer}


Records = Iterator[tuple[int, str, Mapping[str, Any] | _BadRow]]  # (row index, "line 3" / "row 2 (0-based)", record)


def _jsonl_records(path: Path) -> Records:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        index = 0
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # blank lines are not rows
            record: Mapping[str, Any] | _BadRow
            try:
                record = json.loads(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                record = _BadRow("invalid_json", f"invalid JSON: {exc}")
            if not isinstance(record, (dict, _BadRow)):
                record = _BadRow("invalid_json", f"expected a JSON object, got {_type_name(record)}")
            yield index, f"line {lineno}", record
            index += 1


def _parquet_records(path: Path, mapping: ColumnMapping, need: frozenset[str]) -> Records:
    """Rows of the mapped columns. A column of a required field must exist; an optional one may be absent (null)."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    available = parquet.schema_arrow.names
    wanted = mapping.columns()
    for name, column in wanted.items():
        if column not in available and name in need:
            raise DataError(
                f"{path}: field {name!r} (column {column!r}): column not in the Parquet schema; "
                f"available columns: {', '.join(available)}"
            )
    columns = sorted({column for column in wanted.values() if column in available})
    index = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            yield index, f"row {index} (0-based)", record
            index += 1


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    for suffix, found in _SUFFIXES.items():
        if path.name.lower().endswith(suffix):
            return found
    raise DataError(
        f"{path}: cannot tell the format from the file name; use one of {', '.join(_SUFFIXES)} "
        "or pass fmt='jsonl' / fmt='parquet'"
    )


def _check_arguments(mapping: ColumnMapping, required: Sequence[str], fmt: str, on_bad_row: str, limit: int | None):
    """Validate the loader arguments; return the set of fields every row must have (problem and a mapped id always)."""
    if on_bad_row not in ON_BAD_ROW:
        raise _unknown("on_bad_row value", on_bad_row, ON_BAD_ROW)
    if fmt not in FORMATS:
        raise _unknown("data format", fmt, FORMATS)
    if limit is not None and (type(limit) is not int or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(required, str):
        required = (required,)
    columns = mapping.columns()
    for name in required:
        if name not in CANONICAL_FIELDS:
            raise _unknown("required field", name, CANONICAL_FIELDS)
        if name not in columns and name != "id":
            mapped = ", ".join(f"{field}<-{column!r}" for field, column in columns.items())
            raise DataError(
                f"required field {name!r} has no source column in the mapping ({mapped}); "
                f"map it with data.columns or require fewer fields"
            )
    return frozenset(required) | {"problem"} | ({"id"} if mapping.id else set())


def load_problems(
    path: str | Path,
    mapping: str | ColumnMapping | Mapping[str, Any] = "openthoughts",
    *,
    fmt: str = "auto",
    required: Sequence[str] = ("problem", "solution"),
    on_bad_row: str = "error",
    limit: int | None = None,
) -> tuple[pa.Table, LoadReport]:
    """Load and validate a problem file into the canonical table (columns id, problem, solution, answer).

    ``required``: canonical fields that must be present and non-blank in every row (("problem", "solution") to
    train, ("problem", "answer") to evaluate); other mapped fields may be absent, null or blank and become null.
    ``on_bad_row="error"`` raises a DataError for the first bad row and says how many more the whole file has;
    ``"skip"`` drops bad rows (a duplicate id keeps its first occurrence) and counts them by reason in the report.
    ``limit``: keep the first N valid rows; rows after the N-th valid one are not read or validated, unless a bad
    row came first in error mode, when the rest of the file is scanned to count its bad rows.
    JSONL is parsed line by line with ``json`` (not ``pyarrow.json``) so that each error names its exact line.
    Wrong types are errors even in optional fields; an int answer or id becomes a string.
    """
    m = resolve_mapping(mapping)
    need = _check_arguments(m, required, fmt, on_bad_row, limit)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    records = _jsonl_records(path) if _format_of(path, fmt) == "jsonl" else _parquet_records(path, m, need)
    try:
        rows, report = _collect(path, records, m, need, on_bad_row, limit)
    except (OSError, EOFError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not rows:
        raise DataError(f"{path}: no usable rows (read {report.rows_read}, skipped {report.skipped or 'none'})")
    return pa.Table.from_pylist(rows, schema=SCHEMA), report


def mapping_with_columns(mapping: str | ColumnMapping | Mapping[str, Any], columns: Mapping[str, str]) -> ColumnMapping:
    """A mapping overridden per field, e.g. ``{"problem": "q"}``; an explicit answer column turns off derivation."""
    base = resolve_mapping(mapping)
    for name in columns:
        if name not in CANONICAL_FIELDS:
            raise _unknown("column override field", name, CANONICAL_FIELDS)
    derive = None if "answer" in columns else base.answer_from_solution
    return replace(base, **dict(columns), answer_from_solution=derive)


def load_dataset(data: Any, required: Sequence[str] = ("problem", "solution")) -> tuple[pa.Table, LoadReport]:
    """Load what a config's ``data`` section names: a file, or a Hugging Face dataset id (``split``, ``revision``),
    with its mapping, columns, format, on_bad_row and limit. Every row of a Hub dataset goes through the same
    checks as a file's (the error names the cached file, its row and the field)."""
    mapping = mapping_with_columns(data.mapping, getattr(data, "columns", None) or {})
    dataset_id = hub_dataset_id(data.path)
    if dataset_id is None:
        return load_problems(
            data.path, mapping, fmt=data.format, required=required, on_bad_row=data.on_bad_row, limit=data.limit
        )
    split, revision = getattr(data, "split", "train"), getattr(data, "revision", None)
    tables, reports, left = [], [], data.limit
    for path in hub_files(dataset_id, split, revision):
        table, report = load_problems(path, mapping, fmt="auto", required=required, on_bad_row=data.on_bad_row,
                                      limit=left)
        tables.append(table)
        reports.append(report)
        if left is not None:
            left -= table.num_rows
            if left <= 0:
                break
    skipped: Counter[str] = Counter()
    for report in reports:
        skipped.update(report.skipped)
    where = f"hf://{dataset_id} ({split}{', revision ' + revision if revision else ''})"
    return pa.concat_tables(tables), LoadReport(where, sum(r.rows_read for r in reports),
                                                sum(r.rows_kept for r in reports), dict(skipped))


HUB_PREFIX = "hf://"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_dataset_id(path: str) -> str | None:
    """The Hugging Face dataset id ``path`` names (``hf://owner/name``, or ``owner/name`` when no such local file
    or directory exists and it has no data-file suffix); None for a local file."""
    if path.startswith(HUB_PREFIX):
        return path[len(HUB_PREFIX):].strip("/")
    if Path(path).exists() or any(path.endswith(suffix) for suffix in _SUFFIXES) or not _HUB_ID.fullmatch(path):
        return None
    return path


def hub_files(dataset_id: str, split: str, revision: str | None = None) -> list[Path]:
    """The data files (Parquet or JSONL) of one split of a Hub dataset, downloaded once into the Hugging Face cache
    (offline, ``HF_HUB_OFFLINE=1``: from the cache only). Splits are named as the Hub does: a ``train`` directory,
    or files named ``train.*``, ``train-00000-of-00001.*``."""
    from huggingface_hub import snapshot_download

    where = f"dataset {dataset_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        root = Path(snapshot_download(dataset_id, repo_type="dataset", revision=revision,
                                      allow_patterns=[f"*{suffix}" for suffix in _SUFFIXES]))
    except Exception as exc:  # network, auth, unknown repo or revision, offline without a cached copy
        offline = "; offline (HF_HUB_OFFLINE) only a dataset already in the local cache loads" if _hub_offline() else ""
        raise DataError(f"{where}: cannot load it from the Hugging Face Hub ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}){offline}. Download it once while "
                        "online, or give a local .jsonl/.parquet file as data.path") from None
    files = sorted(p for p in root.rglob("*") if p.is_file() and _format_suffix(p.name))
    chosen = [p for p in files if _split_of(p.relative_to(root)) == split]
    if not chosen:
        found = sorted({_split_of(p.relative_to(root)) or p.name for p in files}) or ["no data files"]
        raise DataError(f"{where}: no {split!r} split (found: {', '.join(found)}); set data.split")
    return chosen


def _split_of(relative: Path) -> str | None:
    for directory in relative.parts[:-1]:
        if directory in ("train", "test", "validation", "valid", "dev"):
            return directory
    name = relative.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    match = re.match(r"([A-Za-z0-9]+)(?:[-_.]|$)", name)
    return match.group(1) if match else None


def _format_suffix(name: str) -> str | None:
    return next((fmt for suffix, fmt in _SUFFIXES.items() if name.endswith(suffix)), None)


def _hub_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _collect(
    path: Path, records: Records, mapping: ColumnMapping, need: frozenset[str], on_bad_row: str, limit: int | None
) -> tuple[list[dict], LoadReport]:
    rows: list[dict] = []
    seen: dict[str, str] = {}  # id -> where it was first seen
    skipped: Counter[str] = Counter()
    first_error, bad_rows, rows_read = "", 0, 0
    for index, where, record in records:
        rows_read += 1
        try:
            if isinstance(record, _BadRow):
                raise record
            row = _convert(record, f"{path.stem.removesuffix('.jsonl')}-{index}", mapping, need)
            if row["id"] in seen:
                detail = f"duplicate id {row['id']!r}, first seen at {seen[row['id']]}"
                raise _BadRow("duplicate_id", detail, "id", mapping.id)
        except _BadRow as bad:
            if on_bad_row == "skip":
                skipped[bad.reason] += 1
            else:
                bad_rows += 1
                first_error = first_error or f"{path}: {where}: {bad.describe()}"
            continue
        seen[row["id"]] = where
        if not first_error:
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if first_error:
        more = bad_rows - 1
        if more:
            first_error += f" ({more} more bad row{'s' if more > 1 else ''} in this file; on_bad_row='skip' drops them)"
        raise DataError(first_error)
    return rows, LoadReport(str(path), rows_read, len(rows), dict(skipped))


def dataset_fingerprint(table: pa.Table) -> str:
    """16 hex chars of a sha256 over the id/problem/solution/answer values, row by row (order matters).

    Each value is length-prefixed and nulls are tagged, so no two different tables share an input stream.
    """
    missing = [name for name in CANONICAL_FIELDS if name not in table.column_names]
    if missing:
        raise DataError(f"table lacks the canonical columns {missing}")
    digest = hashlib.sha256()
    for values in zip(*(table.column(name).to_pylist() for name in CANONICAL_FIELDS)):
        for value in values:
            if value is None:
                digest.update(b"\x00")
            else:
                data = str(value).encode("utf-8")
                digest.update(b"\x01" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]
