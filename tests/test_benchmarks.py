"""The product benchmarks run end to end in their CPU ``--tiny`` modes and print their tables (no speed asserted:
speed targets live in benchmarks/, never in timed tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"


def _bench_model():
    """benchmarks/bench_model.py, loaded from its file: benchmarks/ is not put on sys.path (its learner.py would
    shadow the learner package for every later test)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_model", BENCHMARKS / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_model", module)
    spec.loader.exec_module(module)
    return module


SHAPES, VOCAB, Shape, peak_flops = (getattr(_bench_model(), name) for name in ("SHAPES", "VOCAB", "Shape",
                                                                               "peak_flops"))


def run_script(script: str, *args: str, timeout: int = 240) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_qwen3_1_7b_shape_counts():
    shape = Shape.of({**SHAPES["qwen3-1.7b"], "vocab_size": VOCAB})
    # Qwen3-1.7B's model card: 1.4 B non-embedding parameters, 1.7 B in all (embedding tied with lm_head).
    assert shape.non_embedding_params == 1_409_286_144
    assert 1.7e9 < shape.non_embedding_params + VOCAB * shape.hidden < 1.75e9
    assert shape.attention_forward(1) == 2 * 28 * 16 * 128 * 2
    assert peak_flops("cpu") == (None, "none on CPU (pass --peak-tflops for an MFU)")
    assert peak_flops("cpu", 100)[0] == 100e12


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny"
    run_script("bench_model.py", "build", "--shape", "tiny", "--device", "cpu", "--out", str(out))
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    return out


@pytest.mark.slow
def test_learner_worker_tiny(tiny_model, tmp_path):
    configs = ["plain:full", "zero0:full", "zero2:topk", "zero2:full:r1"]
    out = run_script("learner_worker.py", "--tiny", "--model-dir", str(tiny_model), "--configs", *configs,
                     "--json", str(tmp_path / "lw.json"))
    assert "FLOPs per step" in out and "4 N s + 3 attn(s)" in out and "2 N t + attn(t)" in out
    assert "| MFU |" in out and "| tokens/s vs plain |" in out
    rows = {row[0]: row for row in table_rows(out, "zero") + table_rows(out, "plain")}
    assert set(rows) == set(configs)
    for name, row in rows.items():
        assert float(row[4]) > 0 and float(row[5].replace(",", "")) > 0, row  # step (s), tokens/s
        assert row[9] == "-"  # no MFU on CPU without --peak-tflops
        assert row[12] != "skipped" and float(row[12]) == float(row[12]), row  # a finite loss
    assert rows["zero2:full:r1"][3] == "2 x 1"  # one row per micro-batch: 2 micro-batches
    assert rows["zero0:full"][10].endswith("x") and rows["zero2:topk"][10] == "-"  # no plain:topk to compare with
    assert (tmp_path / "lw.json").is_file()


@pytest.mark.slow
def test_teacher_tiny(tiny_model):
    out = run_script("teacher.py", "--tiny", "--model-dir", str(tiny_model), "--teacher-prompt", "300")
    assert "2 N t + attn(t) + 2 V H r" in out and "scorer MFU" in out and "plain MFU" in out
    row = table_rows(out, "tiny")[0]
    assert row[2] == "2 x (300 + 32)"  # the solution lengthened to the asked teacher prompt
    assert float(row[3].replace(",", "")) > 0 and float(row[4].replace(",", "")) > 0
    sizes = table_rows(out, "tiny")[-1]
    assert sizes[2:5] == ["72", "520", "2056"]  # 8 k + 8 bytes per token


@pytest.mark.slow
def test_loss_tiny():
    out = run_script("loss.py", "--tiny")
    assert "6 T V H" in out and "| MFU |" in out
    methods = [row[1] for row in table_rows(out, "64")[-3:]]  # the final table (progress lines come first)
    assert methods == ["naive", "fused", "topk+tail"]


def test_gpu_sh_help_and_wheels_script():
    help_text = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--dry-run" in help_text and ".whl" in help_text
    wheels = (BENCHMARKS / "wheels.sh").read_text()
    assert "DS_BUILD_OPS=0" in wheels and "--python-version 3.12" in wheels
