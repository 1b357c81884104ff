"""`opsd plot`: curves from a run's metrics.jsonl (as MetricsSink writes it) to a PNG; bad files named precisely."""

from __future__ import annotations

import pytest

from orchestrator.metrics import MetricsSink
from orchestrator.plot import MetricsFileError, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps: int, accuracy: bool = False) -> None:
    sink = MetricsSink(run_dir, export_to_ray=False)
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 1.0 / step, "gjs": 1.1 / step, "step_seconds": 2.0}
        if accuracy:
            record["student_accuracy"] = step / (steps + 1)
        if step % 2 == 0:
            record["heldout_gjs"] = 1.2 / step
        for stage, rate in (("rollout", 100.0), ("teacher", 500.0), ("learner", 300.0)):
            record[f"tokens_per_second/{stage}"] = rate + step
            record[f"stage_seconds/{stage}"] = 0.5
        sink.record(record)
    sink.close()


def test_plot_writes_a_png_of_the_run(tmp_path):
    import matplotlib.image

    write_run(tmp_path, steps=6)
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 500
    assert image.std() > 0.01  # curves were drawn, not a blank canvas
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, nothing left over


def test_plot_draws_the_held_out_value_before_training_from_the_summary(tmp_path):
    import json

    import matplotlib.image

    write_run(tmp_path, steps=4)
    without = matplotlib.image.imread(plot_run(tmp_path, tmp_path / "a.png"))
    (tmp_path / "summary.json").write_text(json.dumps({"heldout_gjs": {"0": 1.3, "4": 0.3}}))
    with_before = matplotlib.image.imread(plot_run(tmp_path, tmp_path / "b.png"))
    assert (without != with_before).any()  # the step-0 point (and the rescaled axis) changed the picture
    (tmp_path / "summary.json").write_text("{not json")
    plot_run(tmp_path, tmp_path / "c.png")  # a broken summary is ignored: the steps still plot


def test_plot_to_a_chosen_file_and_the_cli(tmp_path, capsys):
    from orchestrator.cli import main

    write_run(tmp_path / "run", steps=3)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "figs" / "a.png")]) == 0
    assert (tmp_path / "figs" / "a.png").read_bytes()[:8] == PNG_SIGNATURE
    assert str(tmp_path / "figs" / "a.png") in capsys.readouterr().out


def test_plot_names_the_file_and_line_of_bad_metrics(tmp_path):
    with pytest.raises(MetricsFileError, match="metrics.jsonl: no such file"):
        plot_run(tmp_path)
    write_run(tmp_path, steps=2)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.1\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl, line 3: not JSON"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"loss": 0.1}\n')
    with pytest.raises(MetricsFileError, match=r"line 1: field 'step'"):
        plot_run(tmp_path)


def test_plot_adds_a_panel_for_the_students_accuracy_when_graded(tmp_path):
    import matplotlib.image

    write_run(tmp_path / "without", steps=4)
    write_run(tmp_path / "with", steps=4, accuracy=True)
    tall = matplotlib.image.imread(plot_run(tmp_path / "with")).shape[0]
    assert tall > matplotlib.image.imread(plot_run(tmp_path / "without")).shape[0]


def test_plot_adds_accuracy_against_training_tokens_where_tokens_were_sampled(tmp_path):
    """GRPO/OPSD sample training tokens: accuracy (training traces, eval sets' avg@n with the evaluation before
    training at 0 tokens) is drawn against their running total. SFT samples none: no such view."""
    import json

    import matplotlib.image

    from orchestrator.plot import _accuracy_by_tokens, load_records

    for name, per_step in (("sampled", 100), ("sft", 0)):
        sink = MetricsSink(tmp_path / name, export_to_ray=False)
        for step in range(1, 5):
            record = {"step": step, "loss": 1.0 / step, "step_seconds": 1.0, "student_accuracy": step / 10,
                      "generated_tokens": per_step, "generated_tokens_total": per_step * step}
            if step % 2 == 0:
                record["eval/gsm8k/avg@4"], record["eval/gsm8k/avg@4_ci95_low"] = step / 8, 0.0
            sink.record(record)
        sink.close()
        (tmp_path / name / "summary.json").write_text(json.dumps({"eval": {"0": {"eval/gsm8k/avg@4": 0.05}}}))
    series = _accuracy_by_tokens(load_records(tmp_path / "sampled"), tmp_path / "sampled")
    assert series == {"gsm8k avg@4": [(0.0, 0.05), (200.0, 0.25), (400.0, 0.5)],
                      "training traces": [(100.0, 0.1), (200.0, 0.2), (300.0, 0.3), (400.0, 0.4)]}
    assert _accuracy_by_tokens(load_records(tmp_path / "sft"), tmp_path / "sft") == {}
    tall = matplotlib.image.imread(plot_run(tmp_path / "sampled")).shape[0]
    assert tall > matplotlib.image.imread(plot_run(tmp_path / "sft")).shape[0]
