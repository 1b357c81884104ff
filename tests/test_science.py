"""`opsd science`: the generated task, flexible answers, the curriculum order, the time budget, the divergence by
token kind (against the loss, float64), the report's paired statistics, and one small end-to-end run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

from evaluation.config import EvalConfig  # noqa: E402
from opsd.answers import extract_answer  # noqa: E402
from opsd.configlib import ConfigError  # noqa: E402
from opsd.data import ColumnMapping, DataError, load_dataset  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.sampler import Cursor, EpochSampler  # noqa: E402
from science.arithmetic import KINDS, generate, split, write_jsonl  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- answers -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, boxed, flexible", [
    ("9 + 8 = 17.", None, "17"),
    ("So the answer is 1,234. Then step 5 adds nothing", None, "1234"),
    ("Final answer: -4.5", None, "-4.5"),
    ("First 3, then \\boxed{12}, then 7", "12", "12"),  # a box always wins
    ("#### 42\nchecked with 6 x 7", "42", "42"),
    ("no number at all", None, None),
    ("the answer is 5 apples, and 2 + 3 = 5 in total 9", None, "5"),  # the stated answer beats the last number
])
def test_flexible_answers_read_what_boxed_answers_miss(text, boxed, flexible):
    assert extract_answer(text) == boxed and extract_answer(text, "boxed") == boxed
    assert extract_answer(text, "flexible") == flexible


def test_answer_format_is_checked_in_both_prompts():
    with pytest.raises(ValueError, match="answer_format"):
        extract_answer("5", "loose")
    with pytest.raises(ConfigError, match="answer_format"):
        load_config(str(REPO_ROOT / "recipes" / "science-cpu.yaml"), ["prompt.answer_format=loose"])
    assert EvalConfig(answer_format="flexible").prompt().answer_format == "flexible"


# -- the task ----------------------------------------------------------------------------------------------------

def _recompute(solution: str) -> int:
    """Evaluate the solution's own equations ("a + b = c", "a x b = c"), checking each, and return the last."""
    value = None
    for a, op, b, c in re.findall(r"(\d+) ([-+x]) (\d+) = (\d+)", solution):
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
        assert value == int(c), solution
    assert value is not None, solution
    return value


def test_generated_problems_are_deterministic_correct_and_disjoint(tmp_path):
    train, heldout = split(120, 60, seed=3)
    assert [p.problem for p in split(120, 60, seed=3)[0]] == [p.problem for p in train]
    assert [p.problem for p in split(120, 60, seed=4)[0]] != [p.problem for p in train]
    assert not {p.problem for p in train} & {p.problem for p in heldout}
    assert len({p.id for p in train + heldout}) == 180
    assert {p.kind for p in train} == set(KINDS)
    for p in train + heldout:
        assert int(p.answer) >= 0 and str(_recompute(p.solution)) == p.answer
        assert extract_answer(p.solution) == p.answer  # the graders read the reference solution's own answer
    table, report = load_dataset_file(write_jsonl(train, tmp_path / "train.jsonl"))
    assert table.num_rows == 120 and table.column("answer").to_pylist() == [p.answer for p in train]
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate(0, seed=0)
    from science.experiment import ScienceSettings

    d = ScienceSettings()  # the default sizes can be drawn, distinct
    assert [len(rows) for rows in split(d.train_rows, d.heldout_rows, d.seed)] == [d.train_rows, d.heldout_rows]
    with pytest.raises(ValueError, match="cannot draw 5000 distinct problems"):
        generate(5000, seed=0)


def load_dataset_file(path: Path):
    from orchestrator.config import DataConfig

    return load_dataset(DataConfig(path=str(path), mapping="opsd"))


# -- curriculum --------------------------------------------------------------------------------------------------

def _table(n: int) -> pa.Table:
    return pa.table({"id": [f"p{i}" for i in range(n)], "problem": [f"q{i}" for i in range(n)],
                     "solution": ["s" * (1 + i % 4) for i in range(n)], "answer": [str(i) for i in range(n)]})


def _epoch(sampler: EpochSampler) -> list[str]:
    ids = []
    for _ in range(sampler.steps_per_epoch):
        ids += [s.split("@")[0] for s in sampler.next_batch().column("sample_id").to_pylist()]
    return ids


def test_curriculum_goes_from_easy_to_hard_each_epoch_with_ties_shuffled_and_resumes_exactly():
    from opsd.curriculum import difficulty_scores

    table = _table(24)
    difficulty = difficulty_scores(table, "curriculum", None)
    assert difficulty.tolist() == [1 + i % 4 for i in range(24)]  # solution length
    sampler = EpochSampler(table, 5, seed=7, difficulty=difficulty)
    first, second = _epoch(sampler), _epoch(sampler)
    by_id = {f"p{i}": d for i, d in enumerate(difficulty)}
    for epoch in (first, second):
        assert sorted(epoch) == sorted(table.column("id").to_pylist())  # every row exactly once
        assert [by_id[i] for i in epoch] == sorted(by_id[i] for i in epoch)  # easiest first
    assert first != second  # ties come in each epoch's own shuffle
    resumed = EpochSampler(table, 5, seed=7, difficulty=difficulty, cursor=Cursor(1, 10))
    assert _epoch_rest(resumed) == second[10:]
    assert difficulty_scores(table, "shuffled", None) is None
    with pytest.raises(ValueError, match="difficulty scores"):
        EpochSampler(table, 5, seed=0, difficulty=np.zeros(3))


def _epoch_rest(sampler: EpochSampler) -> list[str]:
    ids = []
    while sampler.cursor.position < sampler.problems.num_rows:
        ids += [s.split("@")[0] for s in sampler.next_batch().column("sample_id").to_pylist()]
    return ids


def _write_eval_run(out: Path, correct: dict[str, list[bool]]) -> Path:
    """An evaluation directory as `opsd eval` writes it, from per-problem grades."""
    from evaluation.records import EvalResult, SampleRecord, summarize
    from evaluation.report import write_run

    samples = [SampleRecord(eval_set="heldout", problem_id=pid, sample_index=k, sample_id=f"{pid}-{k}",
                            reference="1", extracted="1" if ok else "2", status="correct" if ok else "wrong",
                            correct=ok, finish_reason="stop", response_tokens=3, policy_version=0,
                            response="1" if ok else "2")
               for pid, grades in correct.items() for k, ok in enumerate(grades)]
    result = EvalResult(eval_sets=summarize(samples), samples=samples, seconds={"generate": 1.0})
    return write_run(out, result, {"model": "m", "adapter": None}, overwrite=True)


def test_curriculum_by_the_base_models_pass_rate_reads_an_eval_run_and_names_missing_problems(tmp_path):
    from opsd.curriculum import difficulty_scores

    table = _table(4)
    grades = {"p0": [True, True], "p1": [False, False], "p2": [True, False], "p3": [False, True]}
    run = _write_eval_run(tmp_path / "prepass", grades)
    assert difficulty_scores(table, "curriculum", str(run)).tolist() == [0.0, 1.0, 0.5, 0.5]
    del grades["p3"]
    partial = _write_eval_run(tmp_path / "partial", grades)
    with pytest.raises(DataError, match="training problem\\(s\\) 'p3'"):
        difficulty_scores(table, "curriculum", str(partial))


def test_difficulty_needs_the_curriculum_order_and_a_directory(tmp_path):
    recipe = str(REPO_ROOT / "recipes" / "science-cpu.yaml")
    with pytest.raises(ConfigError, match="data.difficulty.*data.order=curriculum"):
        load_config(recipe, [f"data.difficulty={tmp_path}"])
    with pytest.raises(ConfigError, match="data.difficulty.*not a directory"):
        load_config(recipe, ["data.order=curriculum", f"data.difficulty={tmp_path / 'none'}"])
    assert load_config(recipe, ["data.order=curriculum", f"data.difficulty={tmp_path}"]).data.order == "curriculum"
    with pytest.raises(ConfigError, match="time_budget_s"):
        load_config(recipe, ["train.time_budget_s=0"])


# -- divergence --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_per_token_divergence_is_the_losss_own_divergence(beta):
    """Per token, float64: summed over tokens it equals learner.loss.gjs_loss (full vocabulary) on the same logits."""
    from learner.loss import FullTeacher, gjs_loss
    from science.divergence import generalized_jsd

    g = torch.Generator().manual_seed(int(beta * 10))
    student, teacher = torch.randn(9, 13, generator=g, dtype=torch.float64), torch.randn(9, 13, generator=g,
                                                                                          dtype=torch.float64) * 2
    values = generalized_jsd(student, teacher, beta, temperature=0.7)
    assert values.shape == (9,) and bool((values >= -1e-12).all())
    reference = gjs_loss(student, torch.eye(13, dtype=torch.float64), FullTeacher(logits=teacher), kind="full",
                         beta=beta, temperature=0.7, normalizer=1.0)
    assert values.sum().item() == pytest.approx(reference.divergence_sum.item(), rel=1e-9, abs=1e-12)
    same = generalized_jsd(student, student.clone(), beta, temperature=0.7)
    assert torch.allclose(same, torch.zeros(9, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("token, kind", [(" 17", "number"), ("3", "number"), (" +", "operator"), (" =", "operator"),
                                         ("\\boxed", "format"), ("{", "format"), (" apples", "word"),
                                         (".\n", "other"), (" ", "other")])
def test_token_kinds(token, kind):
    from science.divergence import token_kind

    assert token_kind(token) == kind


# -- the report --------------------------------------------------------------------------------------------------

def test_report_pairs_problems_and_counts_what_each_arm_spent(tmp_path):
    from evaluation.scores import paired_difference
    from science.report import write_report

    base = {f"p{i}": [i % 3 == 0, False] for i in range(30)}
    trained = {f"p{i}": [i % 3 == 0 or i % 5 == 0, i % 2 == 0] for i in range(30)}
    evals = {"base": _write_eval_run(tmp_path / "eval" / "base", base),
             "opsd": _write_eval_run(tmp_path / "eval" / "opsd", trained)}
    run = tmp_path / "runs" / "opsd"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "rows": 8, "step_seconds": 2.5}) + "\n"
                                               for s in (1, 2, 3)))
    (run / "summary.json").write_text(json.dumps({"generated_tokens_total": 1234}))
    divergence = {"traces": 2, "beta": 0.5, "temperature": 0.6, "mean": 0.1,
                  "kinds": {"number": {"tokens": 4, "mean": 0.2, "share": 0.8}},
                  "by_outcome": {"wrong/number": {"tokens": 4, "mean": 0.2}}}
    report = write_report(tmp_path, {"budget_s": 1}, evals, divergence, {"opsd": 60.0}, total_s=120.0).read_text()
    expected = paired_difference([sum(base[p]) / 2 for p in base], [sum(trained[p]) / 2 for p in base])
    data = json.loads((tmp_path / "results.json").read_text())
    (pair,) = data["paired"]
    assert (pair["a"], pair["b"]) == ("base", "opsd")
    assert pair["diff"] == pytest.approx(expected.diff) and pair["low"] == pytest.approx(expected.low)
    opsd_row = next(r for r in data["models"] if r["model"] == "opsd")
    assert opsd_row["steps"] == 3 and opsd_row["trained_rows"] == 24 and opsd_row["generated_tokens"] == 1234
    assert opsd_row["avg"] == pytest.approx(sum(map(sum, trained.values())) / 60)
    assert f"| base | opsd | {100 * expected.a:.1f} | {100 * expected.b:.1f} | {100 * expected.diff:+.1f}" in report
    assert "| number | 4 | 0.2000 | 80.0% | - | 0.2000 |" in report
    assert "| base | 16.7 | " in report and " | 0.0 | 3 | - | - | - | - |" in report  # no answer, truncated, tokens


def test_science_command_refuses_bad_arguments_in_one_line(capsys):
    from orchestrator.cli import main

    assert main(["science", "--arms", "opsd,ppo"]) == 2
    assert "unknown arm(s) ppo" in capsys.readouterr().err
    assert main(["science", "--budget-s", "0"]) == 2
    assert "--budget-s: must be > 0" in capsys.readouterr().err


# -- end to end (slow) -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_time_budget_ends_the_run_after_the_step_that_passes_it(tiny_model_dir, tmp_path):
    from orchestrator.train import train

    with local_ray(num_cpus=4):
        lines: list[str] = []
        cfg = load_config(str(REPO_ROOT / "recipes" / "tiny-cpu.yaml"), [
            f"model.path={tiny_model_dir}", f"train.run_dir={tmp_path / 'run'}", "train.steps=6", "train.prompts_per_step=2", "train.time_budget_s=0.05", "data.order=curriculum"])
        run_dir = train(cfg, print_fn=lines.append)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Step 1 starts at once, within the budget; step 2 starts past it, so it is the last.
    assert [r["step"] for r in records] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and (run_dir / "adapters" / "v2" / "adapter_model.safetensors").is_file()
    assert any("time budget of 0 s spent: step 2 is the last" in line for line in lines)
    assert any("easiest first by solution length" in line for line in lines)


@pytest.mark.slow
def test_science_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Every piece of `opsd science` once, small: data, the base evaluation, the curriculum's pre-pass, one arm
    trained for a budget and evaluated, the divergence and the report."""
    from science.experiment import ScienceSettings, run_science

    with local_ray(num_cpus=4):
        settings = ScienceSettings(
            out=str(tmp_path / "science"), arms=("opsd-curriculum",), train_rows=6, heldout_rows=3, budget_s=0.05,
            n=2, prepass_n=1, model=str(tiny_model_dir),
            overrides=("rollout.max_response_tokens=8", "eval.max_tokens=8",
                       "train.prompts_per_step=2", "teacher.top_k=8", "learner.lora.rank=8",
                       "eval.grade_processes=1"))
        report = run_science(settings, print_fn=lambda *a, **k: None).read_text()
    out = tmp_path / "science"
    data = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in data["models"]] == ["base", "opsd-curriculum"]
    assert data["models"][0]["problems"] == 3 and data["models"][0]["n"] == 2
    trained = data["models"][1]
    assert trained["steps"] == 2 and trained["generated_tokens"] > 0
    assert json.loads((out / "eval" / "opsd-curriculum" / "results.json").read_text())["adapter"].endswith("v2")
    config = (out / "runs" / "opsd-curriculum" / "config.yaml").read_text()
    assert "order: curriculum" in config and str(out / "eval" / "prepass") in config
    assert data["divergence"]["traces"] == 6 and "| base | opsd-curriculum |" in report
    assert (out / "runs" / "opsd-curriculum" / "curves.png").is_file()


def test_a_rerun_into_the_same_directory_must_be_the_same_experiment(tmp_path):
    from opsd.errors import UserInputError
    from science.experiment import ScienceSettings, check_rerun

    check_rerun(tmp_path, ScienceSettings(out=str(tmp_path), budget_s=60))
    check_rerun(tmp_path, ScienceSettings(out=str(tmp_path), budget_s=60, arms=("sft",)))  # other arms: fine
    with pytest.raises(UserInputError, match="other settings \\(budget_s, seed\\)"):
        check_rerun(tmp_path, ScienceSettings(out=str(tmp_path), budget_s=90, seed=1))
