"""The `opsd` command line: exit codes, one-line input errors, and the quickstart's steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_model_tiny_writes_and_refuses_to_overwrite(tmp_path: Path, capsys):
    out = tmp_path / "tiny"
    assert main(["model", "tiny", "--out", str(out), "--seed", "1"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["model", "tiny", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["model", "tiny", "--out", str(out), "--overwrite"]) == 0


def test_data_check_reports_file_line_and_field(tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n{"question": "", "answer": "x\\n#### 3"}\n')
    assert main(["data", "check", str(bad), "--mapping", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opsd: error: ") and err.count("\n") == 1, err
    assert "bad.jsonl" in err and "line 2" in err and "'problem'" in err and "'question'" in err
    assert main(["data", "check", str(bad), "--mapping", "gsm8k", "--on-bad-row", "skip"]) == 0
    out = capsys.readouterr().out
    assert "kept 1" in out and "skipped 1 (empty_field)" in out


def test_data_check_eval_file_requires_answers_not_solutions(capsys):
    fixture = REPO_ROOT / "tests" / "fixtures" / "data" / "eval.jsonl"
    assert main(["data", "check", str(fixture), "--mapping", "eval"]) == 0
    assert "first row answer" in capsys.readouterr().out


def test_config_show_rejects_unknown_key_with_suggestion(capsys):
    assert main(["config", "show", "data.path=x.jsonl", "learner.loss.betta=0.3"]) == 2
    err = capsys.readouterr().err
    assert "learner.loss.betta" in err and "did you mean 'learner.loss.beta'" in err
    assert main(["config", "show", "data.path=x.jsonl", "learner.loss.beta=0.3"]) == 0
    assert "beta: 0.3" in capsys.readouterr().out


def test_eval_takes_eval_sets_and_still_the_old_bench_option(capsys):
    from orchestrator.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval"]).sets == "aime24,aime25,hmmt25"  # EvalConfig's default
    assert parser.parse_args(["eval", "--sets", "gsm8k,mine=q.jsonl"]).sets == "gsm8k,mine=q.jsonl"
    assert parser.parse_args(["eval", "--bench", "gsm8k,math500"]).sets == "gsm8k,math500"  # old commands run
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    usage = capsys.readouterr().out
    assert "--sets" in usage and "eval sets" in usage
    assert "--bench" not in usage and "benchmark" not in usage.lower()  # the alias is hidden; one meaning per word
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "math eval sets" in capsys.readouterr().out


def test_prompts_prints_student_and_teacher_prompt(tiny_model_dir: Path, capsys):
    recipe = REPO_ROOT / "recipes" / "quickstart-cpu.yaml"
    data = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"
    assert main(["prompts", "--config", str(recipe), f"model.path={tiny_model_dir}", f"data.path={data}"]) == 0
    out = capsys.readouterr().out
    assert "student prompt" in out and "teacher prompt" in out
    assert "Here is a reference solution to this problem:" in out
    assert "tokens over 5 rows" in out


def test_quickstart_keeps_float32_on_cpus_that_would_emulate_bfloat16():
    from orchestrator.config import load_config
    from orchestrator.quickstart import QUICKSTART_RECIPE, cpu_dtype_overrides

    recipe = load_config(QUICKSTART_RECIPE)
    assert (recipe.teacher.dtype, recipe.learner.dtype, recipe.model.dtype) == ("bfloat16", "bfloat16", "auto")
    assert cpu_dtype_overrides([], native_bf16=True) == []
    assert cpu_dtype_overrides([], native_bf16=False) == ["teacher.dtype=float32", "learner.dtype=float32"]
    assert cpu_dtype_overrides(["learner.dtype=bfloat16"], native_bf16=False) == ["teacher.dtype=float32"]


@pytest.mark.slow
def test_quickstart_trains_and_reports(smollm2_dir: Path, tmp_path: Path, capsys, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "smollm2-135m-instruct").symlink_to(smollm2_dir)  # reuse the session's import
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the embedded cluster must not write ~/.ray/auth_token here
    run_dir = tmp_path / "run"
    assert main(["quickstart", "--models-dir", str(models), "train.steps=2", "train.prompts_per_step=1",
                 "train.heldout_rows=1", "rollout.max_response_tokens=8", f"train.run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    for step in ("[1/3] model", "[2/3] config", "dtypes: teacher", "[3/3] training", "step 2/2", "quickstart done"):
        assert step in out
    assert "held-out GJS" in out and "before" in out and "after" in out
    assert "tokens/s over the run: rollout" in out and f"run directory {run_dir.resolve()}" in out
    assert (run_dir / "curves.png").is_file() and (run_dir / "adapters" / "v2").is_dir()
