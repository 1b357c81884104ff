"""Evaluation without an engine: answer extraction, math-verify grading (process pool, timeouts), metrics against
their closed forms and brute force, eval set loading, run files, --compare, and bad input refused before any work."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest

from orchestrator.cli import main
from opsd.data import DataError
from evaluation.sets import BUILTIN, SHIPPED, load_eval_sets, parse_columns, resolve_eval_set
from evaluation.config import EvalConfig
from opsd.answers import extract_answer, extract_boxed, extract_gsm8k, vote_key
from evaluation.grading import Grader
from evaluation.scores import (
    ProblemScore,
    default_ks,
    majority_correct,
    mean_interval,
    paired_difference,
    pass_at_k,
    score_eval_set,
)
from evaluation.records import EvalResult, SampleRecord, summarize
from evaluation.report import compare_runs, markdown_table, read_run, write_run

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- extraction ----------------------------------------------------------------------------------------------------
EXTRACTION_CASES = [
    ("So the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("$\\boxed{\\dfrac{\\sqrt{3}}{2}}$", "\\dfrac{\\sqrt{3}}{2}"),
    ("\\boxed{\\sqrt{\\frac{95}{24}}}", "\\sqrt{\\frac{95}{24}}"),  # nested twice
    ("first \\boxed{3}, then on reflection \\boxed{5}", "5"),  # several boxes: the last
    ("\\boxed{4} and a truncated \\boxed{\\frac{1", "4"),  # an unclosed last box is skipped
    ("put it in \\boxed{} ... so \\boxed{12}", "12"),  # the instruction's empty box is skipped
    ("\\boxed{7} (written in \\boxed{ })", "7"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
    ("\\boxed{[-2, 7)}", "[-2, 7)"),  # an interval
    ("\\boxed{(-\\infty, 3]}", "(-\\infty, 3]"),
    ("\\boxed{10\\text{ inches}}", "10\\text{ inches}"),  # units stay for the grader
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),  # a text answer
    ("The answer is \\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
    ("\\fbox{9}", "9"),
    ("so $\\boxed 5$", "5"),  # brace-less box
    ("\\boxed{ 1,080 }", "1,080"),
    ("<think>maybe \\boxed{1}</think> final: \\boxed{2}", "2"),
    ("Janet makes 9 * 2 = 18 dollars.\n#### 18", "18"),  # GSM8K format
    ("#### 1\nwait\n#### 1,080.", "1,080."),  # the last '####'
    ("\\boxed{3}\n#### 4", "3"),  # a box wins over '####'
    ("The answer is 7.", None),  # no box
    ("\\boxed{}", None),
    ("\\boxedfoo{3}", None),  # another command
    ("", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_answer_hand_checked(text, expected):
    assert extract_answer(text) == expected


def test_extract_parts_and_vote_keys():
    assert extract_boxed("#### 3") is None and extract_gsm8k("#### 3") == "3"
    assert extract_gsm8k("####   \n") is None
    assert vote_key("\\left( 3, \\dfrac{\\pi}{2} \\right)") == vote_key("(3,\\frac{\\pi}{2})")
    assert vote_key("1 / 2") == vote_key("1/2") and vote_key("0.5") != vote_key("\\frac12")


# -- grading -------------------------------------------------------------------------------------------------------
GRADING_CASES = [
    # (extracted answer, reference, status)
    ("0.5", "\\frac{1}{2}", "correct"),  # fractions
    ("\\dfrac{1}{2}", "\\frac12", "correct"),  # \dfrac
    ("\\frac{3}{4}", "0.75", "correct"),
    ("\\frac{3}{5}", "0.75", "wrong"),
    ("[-2, 7]", "[-2,7]", "correct"),  # intervals
    ("(-2, 7)", "[-2,7]", "wrong"),
    ("(-\\infty,3)", "(-\\infty, 3)", "correct"),
    ("10\\text{ inches}", "10", "correct"),  # units
    ("90^\\circ", "90", "correct"),
    ("\\$18", "18", "correct"),
    ("50\\%", "50", "correct"),
    ("Evelyn", "\\text{Evelyn}", "correct"),  # text answers
    ("\\text{(C)}", "C", "correct"),
    ("\\text{Monday}", "\\text{Tuesday}", "wrong"),
    ("1,080", "1080", "correct"),  # GSM8K thousands separator
    ("x=5", "5", "correct"),
    ("2\\sqrt{2}", "\\sqrt{8}", "correct"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", "correct"),
    ("p-q", "p - q", "correct"),
    ("\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}", "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}",
     "correct"),
    ("3", "4", "wrong"),
    ("204", "204", "correct"),  # equal text: no worker needed
    (None, "204", "no_answer"),
]


@pytest.fixture(scope="module")
def grader():
    with Grader(processes=2, timeout_s=30.0) as pool:
        yield pool


def test_grading_hand_checked_table(grader):
    statuses = grader.grade([(answer, reference) for answer, reference, _ in GRADING_CASES])
    wrong = [(case, got) for case, got in zip(GRADING_CASES, statuses) if got != case[2]]
    assert not wrong, wrong
    assert grader.last_stats.verified == len(GRADING_CASES) - 3  # equal texts and no answer skip the pool


def test_grading_from_responses_end_to_end(grader):
    responses = ["... so $x = \\boxed{\\dfrac{1}{2}}$", "I think \\boxed{3} no wait \\boxed{\\frac{2}{4}}",
                 "\\boxed{0.49}", "no idea"]
    statuses = grader.grade([(extract_answer(r), "0.5") for r in responses])
    assert statuses == ["correct", "correct", "wrong", "no_answer"]


def test_grading_timeout_is_reported_counted_wrong_and_the_pool_recovers():
    """(x+y+z)^200 makes SymPy expand ~20,000 terms (many seconds): with a 1 s budget it is a timeout; the worker
    stuck on it is killed and replaced, and grading goes on."""
    with Grader(processes=1, timeout_s=1.0) as pool:
        statuses = pool.grade([("(x+y+z)^{200}", "1"), ("7", "7")])
        assert statuses == ["timeout", "correct"]
        assert pool.last_stats.timeouts == 1
        pool.timeout_s = 60.0  # a generous budget: the replacement worker grades normally
        assert pool.grade([("\\frac12", "0.5"), ("3", "4")]) == ["correct", "wrong"]

    record = sample("b", "p0", 0, extracted="(x+y+z)^{200}", status="timeout")
    result = summarize([record, sample("b", "p0", 1, extracted="1", status="correct")])["b"]
    assert record.correct is False and result.statuses["timeout"] == 1
    assert result.scores["avg@2"].mean == 0.5
    # maj@2: a tie between the two answers goes to the first, the timeout: wrong
    assert "| b | 1 | 50.0 | 100.0 | 0.0 | 0 (0.0%) | 1 |" in markdown_table({"b": result})


def test_grader_refuses_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        Grader(timeout_s=0)
    with pytest.raises(ValueError, match="processes"):
        Grader(processes=0)


# -- metrics -------------------------------------------------------------------------------------------------------
def test_pass_at_k_matches_the_closed_form():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_large_n_is_exact_without_overflow():
    n, c, k = 1000, 3, 500
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0 and pass_at_k(16, 4, 1) == 0.25
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_majority_vote_ties_no_answers_and_equivalent_spellings():
    # two votes for "\frac12" (spelled two ways), one for "1": the majority is right
    keys = [vote_key(a) for a in ("1", "\\frac{1}{2}", "\\dfrac{1}{2}")]
    assert majority_correct(keys, [False, True, True])
    assert not majority_correct(["a", "b"], [False, True])  # tie: the answer seen first
    assert majority_correct([None, None, "b"], [False, False, True])  # no answer, no vote
    assert not majority_correct([None, None], [False, False])


def test_mean_interval_is_the_normal_interval_over_problems():
    values = [0.0, 0.25, 1.0, 0.5, 0.75, 0.0, 1.0, 0.5]
    estimate = mean_interval(values)
    half = 1.959963984540054 * np.std(values, ddof=1) / math.sqrt(len(values))
    assert estimate.mean == pytest.approx(np.mean(values))
    assert (estimate.low, estimate.high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert mean_interval([1.0, 1.0, 0.9]).high == 1.0  # clipped to [0, 1]
    single = mean_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.low)


def test_mean_interval_covers_the_true_accuracy_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, problems, n = 2000, 100, 4
    difficulty = rng.uniform(0, 1, size=problems)  # per-problem accuracy; the eval set's true avg@n is the mean
    covered = 0
    for _ in range(trials):
        chosen = rng.integers(0, problems, size=problems)  # an eval set drawn from the problem population
        correct = rng.binomial(n, difficulty[chosen])
        estimate = mean_interval(list(correct / n))
        covered += estimate.low <= difficulty.mean() <= estimate.high
    assert 0.93 <= covered / trials <= 0.97


def test_score_eval_set_and_paired_difference():
    problems = [ProblemScore("a", 4, 4, True), ProblemScore("b", 4, 1, False), ProblemScore("c", 4, 0, False)]
    scores = score_eval_set(problems)
    assert list(scores) == ["avg@4", "pass@2", "pass@4", "maj@4"]
    assert scores["avg@4"].mean == pytest.approx((1 + 0.25 + 0) / 3)
    assert scores["pass@4"].mean == pytest.approx(2 / 3) and scores["maj@4"].mean == pytest.approx(1 / 3)
    assert scores["pass@2"].mean == pytest.approx((1 + 0.5 + 0) / 3)
    assert default_ks(16) == (2, 4, 8, 16) and default_ks(1) == () and default_ks(3) == (2, 3)
    with pytest.raises(ValueError, match="different sample counts"):
        score_eval_set(problems + [ProblemScore("d", 2, 1, True)])

    same = paired_difference([0.2, 0.5, 0.9], [0.2, 0.5, 0.9])
    assert same.diff == 0 and same.beyond_noise is False
    better = paired_difference([0.2, 0.5, 0.9], [0.3, 0.6, 1.0])  # +0.1 on every problem: no noise at all
    assert better.diff == pytest.approx(0.1) and better.beyond_noise is True
    noisy = paired_difference([0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0])
    assert noisy.diff == 0 and noisy.beyond_noise is False
    assert paired_difference([0.1], [0.2]).beyond_noise is None


# -- eval sets -----------------------------------------------------------------------------------------------------
def test_builtin_eval_sets_ship_with_the_repo_and_load_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eval_sets = load_eval_sets(list(SHIPPED))
    assert {s.name: s.num_problems for s in eval_sets} == {
        "aime24": 30, "aime25": 30, "hmmt25": 30, "math500": 500, "gsm8k": 1319}
    gsm8k = eval_sets[-1].table.slice(0, 1).to_pylist()[0]
    assert gsm8k["answer"] == "18" and gsm8k["problem"].startswith("Janet")
    readme = (REPO_ROOT / "data" / "eval" / "README.md").read_text()
    for name, spec in ((n, BUILTIN[n]) for n in SHIPPED):
        assert spec.path.is_relative_to(REPO_ROOT / "data") and spec.path.name in readme and name in readme
    # the shipped files are the public sets verbatim: their SHA-256 are the ones the README records
    import hashlib
    import re

    recorded = dict((path, digest) for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M))
    for spec in (BUILTIN[n] for n in SHIPPED):
        relative = spec.path.relative_to(REPO_ROOT).as_posix()
        assert hashlib.sha256(spec.path.read_bytes()).hexdigest() == recorded[relative], relative


def test_eval_sets_by_path_with_a_column_mapping(tmp_path):
    data = tmp_path / "quiz.jsonl"
    data.write_text('{"q": "1+1?", "final": 2}\n{"q": "2+2?", "final": "4"}\n')
    (eval_set,) = load_eval_sets([f"quiz={data}"], columns=parse_columns("problem=q,answer=final"))
    assert eval_set.name == "quiz" and eval_set.table.column("answer").to_pylist() == ["2", "4"]
    assert resolve_eval_set(str(data)).name == "quiz"


@pytest.mark.parametrize(
    "entries,message",
    [
        (["aime2024"], "unknown eval set 'aime2024' (did you mean 'aime24'?); built-in: aime24"),
        (["missing.jsonl"], "file not found"),
        (["aime24", "aime24"], "given more than once"),
        ([], "no eval set given"),
    ],
)
def test_bad_eval_set_names(entries, message):
    with pytest.raises(DataError) as error:
        load_eval_sets(entries)
    assert message in str(error.value)


def test_a_file_without_answers_is_refused_naming_file_line_and_field(tmp_path):
    data = tmp_path / "noanswer.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    with pytest.raises(DataError) as error:
        load_eval_sets([str(data)])
    assert "noanswer.jsonl" in str(error.value) and "line 2" in str(error.value) and "'answer'" in str(error.value)
    with pytest.raises(DataError, match="FIELD=COLUMN"):
        parse_columns("problem")


def test_eval_config_checks_its_ranges():
    from opsd.configlib import ConfigError, from_dict

    assert from_dict(EvalConfig, {"n": 4, "pass_k": [1, 4]}).ks() == (1, 4)
    for bad, key in [({"n": 0}, "n"), ({"pass_k": [8], "n": 4}, "pass_k"), ({"top_p": 0}, "top_p"),
                     ({"grade_timeout_s": 0}, "grade_timeout_s"), ({"sets": []}, "sets")]:
        with pytest.raises(ConfigError) as error:
            from_dict(EvalConfig, bad, "eval")
        assert error.value.key == f"eval.{key}"
    with pytest.raises(ConfigError, match="must name at least one eval set"):
        from_dict(EvalConfig, {"sets": []}, "eval")


def test_the_old_eval_benchmarks_key_says_it_is_now_eval_sets(tmp_path):
    from opsd.configlib import ConfigError, from_dict
    from orchestrator.config import load_config

    assert from_dict(EvalConfig, {"sets": ["gsm8k"]}, "eval").sets == ["gsm8k"]
    with pytest.raises(ConfigError) as error:
        from_dict(EvalConfig, {"benchmarks": ["gsm8k"]}, "eval")
    assert error.value.key == "eval.benchmarks" and "is no longer a key: renamed eval.sets" in str(error.value)
    # an old override and an old config file alike
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.path=data/train.jsonl", "eval.benchmarks=[gsm8k]"])
    assert error.value.key == "eval.benchmarks" and "renamed eval.sets" in str(error.value)
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  path: data/train.jsonl\neval:\n  benchmarks: [gsm8k]\n  every: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(old, [])
    assert error.value.key == "eval.benchmarks" and "renamed eval.sets" in str(error.value)
    assert load_config(None, ["data.path=data/train.jsonl", "eval.sets=[gsm8k]"]).eval.sets == ["gsm8k"]


# -- run files and --compare ---------------------------------------------------------------------------------------
def sample(eval_set: str, problem: str, index: int, extracted: str | None = "1", status: str = "correct",
           finish: str = "stop") -> SampleRecord:
    return SampleRecord(eval_set=eval_set, problem_id=problem, sample_index=index,
                        sample_id=f"{eval_set}:{problem}@e0r{index}", reference="1", extracted=extracted,
                        status=status, correct=status == "correct", finish_reason=finish, response_tokens=10,
                        policy_version=0, response=f"\\boxed{{{extracted}}}")


def synthetic_run(path: Path, accuracy: list[float], n: int = 4, seed: int = 0) -> Path:
    """A run directory whose problem i has round(accuracy[i] * n) correct samples."""
    rng = random.Random(seed)
    samples = []
    for i, p in enumerate(accuracy):
        correct = round(p * n)
        for j in range(n):
            ok = j < correct
            samples.append(sample("toy", f"toy-{i}", j, "1" if ok else str(rng.randint(2, 9)),
                                  "correct" if ok else "wrong"))
    result = EvalResult(eval_sets=summarize(samples), samples=samples, seconds={"total": 1.0}, policy_version=0)
    return write_run(path, result, {"model": "m", "adapter": None, "config": {"n": n}, "prompt": {}})


def test_write_run_writes_samples_results_and_table_atomically(tmp_path):
    run = synthetic_run(tmp_path / "run", [1.0, 0.5, 0.0])
    info, samples = read_run(run)
    assert len(samples) == 12 and samples[0].problem_id == "toy-0"
    assert info["eval_sets"]["toy"]["scores"]["avg@4"]["mean"] == pytest.approx(0.5)
    first = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert {"eval_set", "problem_id", "response", "extracted", "correct", "status", "reference"} <= set(first)
    assert first["eval_set"] == "toy"
    assert "| toy | 3 | 50.0 [" in (run / "results.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    with pytest.raises(FileExistsError):
        synthetic_run(tmp_path / "run", [1.0])


def test_compare_reports_differences_and_whether_they_exceed_noise(tmp_path, capsys):
    base = [0.0, 0.25, 0.5, 0.25] * 10
    a = synthetic_run(tmp_path / "a", base)
    b = synthetic_run(tmp_path / "b", [min(1.0, p + 0.5) for p in base])  # much better on every problem
    same = synthetic_run(tmp_path / "same", base, seed=1)
    text = compare_runs(a, b)
    row = next(line for line in text.splitlines() if line.startswith("| toy | avg@4"))
    assert "| 25.0 | 75.0 | +50.0 [" in row and row.endswith("| yes | 40 |")
    row = next(line for line in compare_runs(a, same).splitlines() if line.startswith("| toy | avg@4"))
    assert "+0.0" in row and "| no |" in row
    assert main(["eval", "--compare", str(a), str(b)]) == 0
    assert "exceeds noise" in capsys.readouterr().out
    assert main(["eval", "--compare", str(a), str(tmp_path)]) == 2
    assert "is not an evaluation run directory" in capsys.readouterr().err


# -- bad input on the command line: one clear line, before any engine ------------------------------------------------
@pytest.fixture(scope="module")
def other_base_adapter(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the tiny model at another path, an adapter trained on the original)."""
    from helpers.rollout_reference import make_lora_adapter

    root = tmp_path_factory.mktemp("eval-adapters")
    other = Path(shutil.copytree(tiny_model_dir, root / "other-model"))
    return other, make_lora_adapter(tiny_model_dir, root / "adapter", rank=8, seed=3)


def eval_cli(model: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--sets", "gsm8k", "--limit", "2", "--n", "2", "--max-tokens", "16",
            "--out", str(out), *extra]


def assert_refused(capsys, argv: list[str], *fragments: str) -> None:
    import ray

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("opsd: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not ray.is_initialized()  # refused before any cluster or engine was started


def test_cli_refuses_an_unknown_eval_set(tmp_path, tiny_model_dir, capsys):
    assert_refused(capsys, eval_cli(tiny_model_dir, tmp_path / "o") + ["--sets", "gsm8k,aime2024"],
                   "unknown eval set 'aime2024' (did you mean 'aime24'?)")
    # --bench, the old name of --sets, still works
    assert_refused(capsys, eval_cli(tiny_model_dir, tmp_path / "o") + ["--bench", "gsm8k,aime2024"],
                   "unknown eval set 'aime2024' (did you mean 'aime24'?)")


def test_cli_refuses_a_file_without_the_needed_fields(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n')
    assert_refused(capsys, eval_cli(tiny_model_dir, tmp_path / "o") + ["--sets", f"mine={data}"],
                   "bad.jsonl", "line 2", "'problem'")


def test_cli_refuses_an_adapter_for_another_base_model(tmp_path, other_base_adapter, capsys):
    other_model, adapter = other_base_adapter
    assert_refused(capsys, eval_cli(other_model, tmp_path / "o", "--adapter", str(adapter)),
                   str(adapter), "was trained on base model", str(other_model))
    assert_refused(capsys, eval_cli(other_model, tmp_path / "o", "--adapter", str(tmp_path)),
                   "is not a PEFT adapter directory")


def test_cli_refuses_settings_that_cannot_run(tmp_path, tiny_model_dir, capsys):
    assert_refused(capsys, eval_cli(tiny_model_dir, tmp_path / "o", "--max-tokens", "9000"),
                   "max_tokens", "8192")
    assert_refused(capsys, eval_cli(tiny_model_dir, tmp_path / "o", "--max-model-len", "64"),
                   "evaluation prompt(s) too long", "'gsm8k:test-0' (88 tokens)", "max_model_len")
    assert_refused(capsys, eval_cli(tiny_model_dir, tmp_path / "o", "--n", "0"), "n: must be >= 1, got 0")
    assert_refused(capsys, eval_cli(tiny_model_dir, tmp_path / "o", "--pass-k", "1,x"), "--pass-k")
    (tmp_path / "exists").mkdir()
    assert_refused(capsys, eval_cli(tiny_model_dir, tmp_path / "exists"), "already exists", "--overwrite")
    assert_refused(capsys, ["eval"], "needs --model")


def test_amobench_is_known_by_name_once_its_file_is_given(tmp_path):
    from opsd.data import DataError

    with pytest.raises(DataError, match=r"'amobench' \(AMO-Bench\) does not ship with opsd: get the Hugging Face "
                                        r"dataset meituan-longcat/AMO-Bench.*data/eval/amobench.jsonl.*amobench=PATH"):
        load_eval_sets(["amobench"])
    path = tmp_path / "amo.jsonl"
    path.write_text('{"question_id": 7, "prompt": "Find x.", "answer": "3"}\n')
    (amo,) = load_eval_sets([f"amobench={path}"])  # its own columns, whatever --mapping says
    assert amo.name == "amobench" and amo.table.to_pylist() == [
        {"id": "7", "problem": "Find x.", "solution": None, "answer": "3"}]
