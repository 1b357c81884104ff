"""Tests of opsd.data: the column mappings, the canonical table, and every bad-input error."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opsd.data import (
    MAPPINGS,
    SCHEMA,
    ColumnMapping,
    DataError,
    dataset_fingerprint,
    load_dataset,
    load_problems,
    mapping_with_columns,
    resolve_mapping,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"

EVAL = {"mapping": "eval", "required": ("problem", "answer")}


def write_jsonl(path: Path, lines: list) -> Path:
    """Write one line per item: dicts and lists as JSON, strings verbatim (for broken lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def load_error(path: Path, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_problems(path, *args, **kwargs)
    message = str(info.value)
    assert path.name in message
    return message


# --- built-in mappings on their fixtures --------------------------------------------------------------------


def test_gsm8k_fixture_values():
    table, report = load_problems(FIXTURES / "gsm8k.jsonl", "gsm8k")
    assert table.schema == SCHEMA
    assert report.rows_read == report.rows_kept == table.num_rows == 5
    assert report.skipped == {}
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"gsm8k-{i}" for i in range(5)]
    assert rows[0]["problem"].startswith("Natalia sold clips to 48 of her friends in April")
    assert rows[0]["answer"] == "72"
    assert rows[0]["solution"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert [r["answer"] for r in rows] == ["72", "10", "5", "42", "1080"]  # '#### 1,080' -> '1080'
    assert not any("<<" in r["solution"] or ">>" in r["solution"] for r in rows)
    assert all(r["solution"].splitlines()[-1] == f"#### {a}" for r, a in zip(rows[:4], ["72", "10", "5", "42"]))


def test_openthoughts_fixture_values():
    table, report = load_problems(FIXTURES / "openthoughts.jsonl")  # "openthoughts" is the default mapping
    assert table.column_names == ["id", "problem", "solution", "answer"]  # extra columns dropped
    assert report.rows_kept == 4
    rows = table.to_pylist()
    assert rows[2]["problem"] == "How many positive divisors does $36$ have?"
    assert rows[2]["solution"].endswith("$\\boxed{9}$ positive divisors.")
    assert [r["answer"] for r in rows] == ["55", "2, 3", "9", None]  # the optional answer column may be absent


def test_eval_fixture_values():
    table, _ = load_problems(FIXTURES / "eval.jsonl", **EVAL)
    assert table.num_rows == 4
    assert table.column("solution").null_count == 4
    assert table.column("answer").to_pylist() == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}", "9"]
    assert table.column("id").to_pylist() == ["eval-0", "eval-1", "eval-2", "eval-3"]


def test_parquet_and_jsonl_give_equal_tables():
    from_jsonl, _ = load_problems(FIXTURES / "openthoughts.jsonl", "openthoughts")
    from_parquet, report = load_problems(FIXTURES / "openthoughts.parquet", "openthoughts")
    assert report.rows_kept == 4
    assert from_parquet.equals(from_jsonl)
    assert dataset_fingerprint(from_parquet) == dataset_fingerprint(from_jsonl)


def test_explicit_format_gzip_and_limit(tmp_path):
    packed = tmp_path / "train.jsonl.gz"
    packed.write_bytes(gzip.compress((FIXTURES / "gsm8k.jsonl").read_bytes()))
    table, _ = load_problems(packed, "gsm8k")
    assert table.column("id").to_pylist()[0] == "train-0"
    odd_name = tmp_path / "rows.txt"
    odd_name.write_bytes((FIXTURES / "gsm8k.jsonl").read_bytes())
    limited, report = load_problems(odd_name, "gsm8k", fmt="jsonl", limit=2)
    assert limited.column("answer").to_pylist() == ["72", "10"]
    assert report.rows_read == 2


def test_limit_stops_before_later_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}, "{"])
    table, report = load_problems(path, **EVAL, limit=2)
    assert table.num_rows == 2 and report.rows_read == 2
    assert "line 3" in load_error(path, **EVAL, limit=3)


def test_blank_lines_are_not_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ["", {"problem": "a", "answer": "1"}, "   ", {"problem": "b"}])
    message = load_error(path, **EVAL)
    assert "line 4" in message and "field 'answer' (column 'answer')" in message
    table, report = load_problems(path, "eval", required=("problem",))
    assert table.column("id").to_pylist() == ["p-0", "p-1"]
    assert report.rows_read == 2


def test_answer_int_becomes_string_and_id_column(tmp_path):
    rows = [{"uid": 7, "problem": "a", "answer": 42}, {"uid": "x", "problem": "b", "answer": "-3"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    table, _ = load_problems(path, {"problem": "problem", "answer": "answer", "id": "uid"}, required=EVAL["required"])
    assert table.to_pylist() == [
        {"id": "7", "problem": "a", "solution": None, "answer": "42"},
        {"id": "x", "problem": "b", "solution": None, "answer": "-3"},
    ]


# --- mappings and arguments ---------------------------------------------------------------------------------


def test_resolve_mapping():
    assert resolve_mapping("gsm8k") is MAPPINGS["gsm8k"]
    custom = ColumnMapping(problem="q", solution="s")
    assert resolve_mapping(custom) is custom
    assert resolve_mapping({"problem": "q", "solution": "s"}) == custom
    with pytest.raises(DataError, match=r"mapping 'gsm8kk' \(did you mean 'gsm8k'\?\); known: eval, gsm8k"):
        resolve_mapping("gsm8kk")
    with pytest.raises(DataError, match="did you mean 'solution'"):
        resolve_mapping({"problem": "q", "soluton": "s"})
    with pytest.raises(DataError, match="needs 'problem'"):
        resolve_mapping({"solution": "s"})
    with pytest.raises(DataError, match="answer_from_solution"):
        ColumnMapping(problem="q", answer_from_solution="gsm8k")


def test_column_overrides_and_load_dataset(tmp_path):
    renamed = mapping_with_columns("gsm8k", {"problem": "q"})
    assert (renamed.problem, renamed.solution, renamed.answer_from_solution) == ("q", "answer", "gsm8k")
    explicit = mapping_with_columns("gsm8k", {"answer": "final"})
    assert (explicit.answer, explicit.answer_from_solution) == ("final", None)
    with pytest.raises(DataError, match="did you mean 'answer'"):
        mapping_with_columns("eval", {"anwser": "a"})
    rows = [{"q": "p1", "answer": "s <<1+1=2>>2\n#### 2"}, {"q": "p2", "answer": "#### 3"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    section = SimpleNamespace(path=str(path), mapping="gsm8k", columns={"problem": "q"}, format="auto",
                              on_bad_row="error", limit=1)
    table, report = load_dataset(section)
    assert table.to_pylist() == [{"id": "t-0", "problem": "p1", "solution": "s 2\n#### 2", "answer": "2"}]
    assert report.rows_read == 1


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"on_bad_row": "drop"}, "on_bad_row"),
        ({"fmt": "csv"}, "data format 'csv'"),
        ({"limit": 0}, "limit"),
        ({"required": ("problem", "soln")}, "did you mean 'solution'"),
        ({"mapping": "eval", "required": ("problem", "solution")}, "required field 'solution' has no source column"),
    ],
)
def test_bad_arguments(kwargs, expected):
    with pytest.raises(DataError, match=expected):
        load_problems(FIXTURES / "openthoughts.jsonl", **kwargs)


# --- bad input: each error names the file, the line/row and the field -------------------------------------


def test_missing_file(tmp_path):
    assert "file not found" in load_error(tmp_path / "nope.jsonl")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("problem,solution\n")
    assert "fmt='jsonl'" in load_error(path)


GOOD = {"problem": "What is 1+1?", "solution": "1+1 = 2, so $\\boxed{2}$."}


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"problem": "x", ', ["invalid JSON"]),
        ('["problem", "solution"]', ["expected a JSON object, got array"]),
        ({"problem": "x"}, ["field 'solution' (column 'solution')", "is missing"]),
        ({"problem": "x", "solution": None}, ["field 'solution' (column 'solution')", "is null"]),
        ({"problem": " \n\t", "solution": "s"}, ["field 'problem' (column 'problem')", "empty or whitespace-only"]),
        ({"problem": "", "solution": "s"}, ["field 'problem' (column 'problem')", "empty"]),
        ({"problem": 3, "solution": "s"}, ["field 'problem' (column 'problem')", "expected a string, got integer"]),
        ({"problem": "x", "solution": ["a"]}, ["field 'solution' (column 'solution')", "got array"]),
        ({"problem": "x", "solution": "s", "answer": True}, ["field 'answer' (column 'answer')", "got boolean"]),
        ({"problem": "x", "solution": "s", "answer": 2.5}, ["field 'answer' (column 'answer')", "got number"]),
        ({"problem": "x", "solution": "s", "answer": {"v": 1}}, ["field 'answer' (column 'answer')", "got object"]),
    ],
)
def test_bad_jsonl_line(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad_line, GOOD])
    message = load_error(path)
    assert "line 2:" in message
    for part in expected:
        assert part in message
    assert "more bad row" not in message


def test_gsm8k_errors_name_the_source_column(tmp_path):
    lines = [
        {"question": "q1", "answer": "2 + 2 = 4\n#### 4"},
        {"question": "q2", "answer": "no final line"},
        {"question": "q3"},
        {"question": "q4", "answer": "ends in a marker #### "},
    ]
    path = write_jsonl(tmp_path / "gsm.jsonl", lines)
    message = load_error(path, "gsm8k")
    assert "line 2: field 'answer' (derived from column 'answer')" in message and "'#### '" in message
    assert "(2 more bad rows in this file" in message
    table, report = load_problems(path, "gsm8k", on_bad_row="skip")
    assert report.skipped == {"no_final_answer": 2, "missing_field": 1}
    assert table.column("answer").to_pylist() == ["4"]
    path = write_jsonl(tmp_path / "gsm.jsonl", lines[:1] + lines[2:3])
    assert "line 2: field 'solution' (column 'answer'): is missing" in load_error(path, "gsm8k")


def test_duplicate_id_names_both_lines(tmp_path):
    mapping = {"problem": "problem", "solution": "solution", "id": "uid"}
    rows = [{"uid": "a", **GOOD}, {"uid": "b", **GOOD}, {"uid": "a", **GOOD}, {"uid": "b", **GOOD}]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    message = load_error(path, mapping)
    assert "line 3: field 'id' (column 'uid'): duplicate id 'a', first seen at line 1" in message
    assert "(1 more bad row in" in message
    table, report = load_problems(path, mapping, on_bad_row="skip")
    assert table.column("id").to_pylist() == ["a", "b"] and report.skipped == {"duplicate_id": 2}
    path = write_jsonl(tmp_path / "noid.jsonl", [{"uid": "a", **GOOD}, GOOD])
    assert "line 2: field 'id' (column 'uid'): is missing" in load_error(path, mapping)


def test_skip_mode_counts_reasons_and_keeps_order(tmp_path):
    mapping = {"problem": "problem", "solution": "solution", "answer": "answer", "id": "uid"}
    lines = [
        {"uid": "1", "problem": "p1", "solution": "s1"},
        "not json",
        {"uid": "2", "problem": "p2"},
        {"uid": "3", "problem": "p3", "solution": "s3", "answer": 5},
        {"uid": "1", "problem": "again", "solution": "s"},
        {"uid": "4", "problem": "  ", "solution": "s"},
        {"uid": "5", "problem": "p5", "solution": "s5", "answer": False},
        '"a string"',
        {"uid": "6", "problem": "p6", "solution": "s6", "extra": [1, 2]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    message = load_error(path, mapping)
    assert "line 2: invalid JSON" in message and "(5 more bad rows in this file" in message
    table, report = load_problems(path, mapping, on_bad_row="skip")
    assert table.column("id").to_pylist() == ["1", "3", "6"]
    assert table.column("answer").to_pylist() == [None, "5", None]
    assert table.column("problem").to_pylist() == ["p1", "p3", "p6"]
    expected = {"invalid_json": 2, "missing_field": 1, "duplicate_id": 1, "empty_field": 1, "wrong_type": 1}
    assert report.skipped == expected
    assert (report.rows_read, report.rows_kept) == (9, 3)


def test_no_surviving_row_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{", {"problem": "x"}])
    assert "no usable rows" in load_error(path, on_bad_row="skip")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "no usable rows" in load_error(empty)


def test_invalid_utf8_is_an_unreadable_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"problem": "\xff"}\n')
    assert "line 2: invalid JSON" in load_error(path)


def test_parquet_missing_column_lists_the_available_ones(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"problem": ["p"], "text": ["t"]}), path)
    message = load_error(path)
    assert "field 'solution' (column 'solution')" in message
    assert "available columns: problem, text" in message
    table, _ = load_problems(path, "openthoughts", required=("problem",))  # an optional column may be absent
    assert table.to_pylist() == [{"id": "rows-0", "problem": "p", "solution": None, "answer": None}]


def test_parquet_bad_rows_name_the_row(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"problem": ["p0", "p1", "p2"], "solution": ["s0", None, ""]}), path)
    message = load_error(path)
    assert "row 1 (0-based): field 'solution' (column 'solution'): is null" in message
    assert "(1 more bad row in" in message
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"problem": [1, 2], "answer": [1.5, 2.5]}), typed)
    message = load_error(typed, **EVAL)
    assert "row 0 (0-based): field 'problem' (column 'problem'): expected a string, got integer" in message
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": [1, 20]}), ints)
    assert load_problems(ints, **EVAL)[0].column("answer").to_pylist() == ["1", "20"]


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    assert "not a readable Parquet file" in load_error(path)


def test_fingerprint_tracks_values_and_order():
    table, _ = load_problems(FIXTURES / "openthoughts.jsonl")
    fingerprint = dataset_fingerprint(table)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert dataset_fingerprint(table) == fingerprint
    assert dataset_fingerprint(table.slice(1)) != fingerprint
    assert dataset_fingerprint(pa.concat_tables([table.slice(1), table.slice(0, 1)])) != fingerprint
    answers = table.column("answer").to_pylist()
    changed = table.set_column(3, "answer", pa.array(answers[:3] + ["56"], pa.string()))
    assert dataset_fingerprint(changed) != fingerprint


# --- acceptance: the real data sets --------------------------------------------------------------------------


def test_shipped_gsm8k_subset():
    table, report = load_problems(REPO / "data" / "gsm8k" / "train-1k.jsonl", "gsm8k")
    assert table.num_rows == report.rows_kept == 1000
    assert table.column("answer").null_count == 0


def test_gsm8k_test_split_loads_without_calculator_marks():
    table, report = load_problems(REPO / "data" / "gsm8k" / "test.jsonl", "gsm8k")
    assert table.num_rows == report.rows_read == 1319
    assert not any("<<" in s for s in table.column("solution").to_pylist())


@pytest.mark.parametrize("name, rows", [("aime24", 30), ("aime25", 30), ("hmmt25", 30), ("math500", 500)])
def test_eval_sets(name, rows):
    table, report = load_problems(REPO / "data" / "eval" / f"{name}.jsonl", **EVAL)
    assert table.num_rows == report.rows_kept == rows
    assert table.column("answer").null_count == 0


# -- Hugging Face datasets (from the local cache: no hub is reachable from tests) -------------------------------
def fake_hub_dataset(cache: Path, dataset_id: str, files: dict[str, list[dict]]) -> Path:
    """A dataset as the Hub cache holds it after one download: refs/main -> snapshots/<commit>/<files>."""
    import pyarrow.parquet as pq

    folder = cache / f"datasets--{dataset_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name, rows in files.items():
        path = folder / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return folder / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def hub_section(path: str, **kw):
    from types import SimpleNamespace

    values = dict(path=path, mapping="opsd-math30k", columns={}, format="auto", on_bad_row="error", limit=None,
                  split="train", revision=None)
    values.update(kw)
    return SimpleNamespace(**values)


def test_a_hugging_face_dataset_loads_from_the_cache_with_the_same_checks(hub_cache):
    from opsd.data import load_dataset

    rows = [{"problem": f"p{i}", "solution": f"so {i} \\boxed{{{i}}}"} for i in range(5)]
    fake_hub_dataset(hub_cache, "siyanzhao/Openthoughts_math_30k_opsd", {
        "data/train-00000-of-00002.parquet": rows[:3], "data/train-00001-of-00002.parquet": rows[3:],
        "data/test-00000-of-00001.parquet": [{"problem": "t", "solution": "no box"}]})
    for path in ("siyanzhao/Openthoughts_math_30k_opsd", "hf://siyanzhao/Openthoughts_math_30k_opsd"):
        table, report = load_dataset(hub_section(path))
        assert table.column("problem").to_pylist() == [r["problem"] for r in rows]
        assert table.column("answer").to_pylist() == ["0", "1", "2", "3", "4"]  # the solution's last \boxed{}
        assert report.rows_kept == 5 and report.path.startswith("hf://siyanzhao/Openthoughts_math_30k_opsd (train")
    table, _ = load_dataset(hub_section("siyanzhao/Openthoughts_math_30k_opsd", split="test"))
    assert table.column("answer").to_pylist() == [None]  # no box: no answer (not needed to train)
    assert load_dataset(hub_section("siyanzhao/Openthoughts_math_30k_opsd", limit=4))[0].num_rows == 4


def test_hugging_face_dataset_errors_name_the_dataset_the_split_and_the_row(hub_cache):
    from opsd.data import DataError, load_dataset

    with pytest.raises(DataError, match=r"dataset 'someone/missing': cannot load it from the Hugging Face Hub.*"
                                        r"offline.*local cache"):
        load_dataset(hub_section("someone/missing"))
    fake_hub_dataset(hub_cache, "owner/bad", {"train.parquet": [{"problem": "p", "solution": "s"},
                                                               {"problem": "", "solution": "s"}]})
    with pytest.raises(DataError, match=r"train\.parquet.*row 1.*field 'problem'"):
        load_dataset(hub_section("owner/bad"))
    with pytest.raises(DataError, match=r"dataset 'owner/bad': no 'validation' split \(found: train\)"):
        load_dataset(hub_section("owner/bad", split="validation"))


def test_local_paths_are_never_taken_for_dataset_ids(tmp_path):
    from opsd.data import hub_dataset_id

    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").write_text("")
    assert hub_dataset_id("owner/name") == "owner/name"
    assert hub_dataset_id(str(tmp_path / "owner" / "name")) is None
    assert hub_dataset_id("data/train.jsonl") is None and hub_dataset_id("hf://a/b") == "a/b"


def test_opsd_data_convert_writes_the_projects_columns(hub_cache, tmp_path, capsys):
    import pyarrow.parquet as pq

    from opsd.data import load_problems
    from orchestrator.cli import main

    fake_hub_dataset(hub_cache, "owner/math", {"train.parquet": [{"problem": "1+1?", "solution": "\\boxed{2}"}]})
    out = tmp_path / "math.parquet"
    assert main(["data", "convert", "owner/math", "--mapping", "opsd-math30k", "--out", str(out)]) == 0
    assert pq.read_table(out).column_names == ["id", "problem", "solution", "answer"]
    table, _ = load_problems(out, "opsd")
    assert table.to_pylist() == [{"id": "train-0", "problem": "1+1?", "solution": "\\boxed{2}", "answer": "2"}]
    assert main(["data", "check", "owner/math", "--mapping", "opsd-math30k"]) == 0
    assert "hf://owner/math (train): read 1 rows, kept 1" in capsys.readouterr().out
