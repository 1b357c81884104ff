"""Faults a user makes before anything runs: every config key given a bad value, unknown keys, bad override syntax,
a model or tokenizer that cannot load. Each is one line on stderr naming the key or path, exit code 2, no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd.configlib import describe
from orchestrator.cli import main
from orchestrator.config import OPSDConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"
KEYS = describe(OPSDConfig)
BASE = [f"data.path={DATA}"]


def wrong_type_value(type_text: str) -> str:
    """An override value (YAML) that no key of this type accepts."""
    if type_text.startswith(("list", "tuple")) or "list[" in type_text:
        return "{a: 1}"  # a mapping where a list is expected
    if type_text.startswith("dict"):
        return "[1, 2]"
    if "bool" in type_text:
        return "maybe"
    if "int" in type_text or "float" in type_text:
        return "many"
    if "'" in type_text:  # a Literal
        return "no-such-choice"
    return "[1, 2]"  # a list where text is expected


def run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_naming(code: int, err: str, name: str) -> None:
    assert code == 2, err
    assert err.startswith("opsd: error: ") and err.count("\n") == 1, err
    assert name in err, err
    assert "Traceback" not in err


def test_the_generated_list_covers_every_key():
    assert len(KEYS) >= 90 and len({k.key for k in KEYS}) == len(KEYS)


@pytest.mark.parametrize("field", KEYS, ids=lambda f: f.key)
def test_every_key_refuses_a_wrong_type_in_one_line(capsys, field):
    if field.key == "data.path":
        pytest.skip("the data path is text: any YAML scalar is a path (a missing file is refused when it loads)")
    code, err = run(capsys, ["config", "show", *BASE, f"{field.key}={wrong_type_value(field.type)}"])
    assert_one_line_naming(code, err, field.key)


NUMERIC = [f for f in KEYS if ("int" in f.type or "float" in f.type) and "list" not in f.type]


@pytest.mark.parametrize("field", NUMERIC, ids=lambda f: f.key)
@pytest.mark.parametrize("value", ["-1000000", "1e30"])
def test_out_of_range_numbers_are_refused_naming_the_key_or_accepted(capsys, field, value):
    code, err = run(capsys, ["config", "show", *BASE, f"{field.key}={value}"])
    if code != 0:
        assert_one_line_naming(code, err, field.key)


@pytest.mark.parametrize("section", sorted({k.key.split(".")[0] for k in KEYS}))
def test_unknown_keys_in_every_section(capsys, section):
    code, err = run(capsys, ["config", "show", *BASE, f"{section}.no_such_key=1"])
    assert_one_line_naming(code, err, f"{section}.no_such_key")


@pytest.mark.parametrize("override", ["learner.lora.rank", "=5", "learner..rank=8", "learner.lora.rank=[1,"])
def test_bad_override_syntax(capsys, override):
    code, err = run(capsys, ["config", "show", *BASE, override])
    assert code == 2 and err.startswith("opsd: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("override, named", [
    ("model.path=/no/such/model", "/no/such/model"),
    ("model.path=no-such-owner/no-such-model", "no-such-owner/no-such-model"),
])
def test_a_model_that_cannot_load_fails_before_any_work(capsys, tmp_path, override, named):
    run_dir = tmp_path / "run"
    code, err = run(capsys, ["train", "--config", str(REPO_ROOT / "recipes" / "tiny-cpu.yaml"), *BASE,
                             f"train.run_dir={run_dir}", override])
    assert_one_line_naming(code, err, named)
    assert not run_dir.exists()  # nothing written, no cluster started


def test_a_tokenizer_that_cannot_load_fails_before_any_work(capsys, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    code, err = run(capsys, ["train", "--config", str(REPO_ROOT / "recipes" / "tiny-cpu.yaml"), *BASE,
                             f"model.path={tiny_model_dir}", "model.tokenizer=/no/such/tokenizer",
                             f"train.run_dir={run_dir}"])
    assert_one_line_naming(code, err, "/no/such/tokenizer")
    assert not run_dir.exists()
