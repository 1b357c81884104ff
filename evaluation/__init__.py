"""Evaluation of a model (plus an optional LoRA adapter) on math eval sets: ``opsd eval`` and in-training eval.

An eval set is a set of problems with reference answers (AIME 2024/2025, HMMT 2025, MATH-500, GSM8K, or any file
by path). The speed and memory scripts of ``benchmarks/`` are another thing.

    sets.py        which eval sets exist (built-in files shipped in ``data/``, or any file by path) and loading
    (final answers are extracted by opsd.answers, shared with training's student accuracy)
    grading.py     answer equivalence with math-verify, in worker processes with a per-answer timeout
    scores.py      avg@n, unbiased pass@k, maj@n, 95% intervals, paired differences between two runs
    config.py      EvalConfig: sampling, grading and metric settings (a config section)
    run.py         sample with RolloutWorker actors, grade, score; ``run_eval`` (in training) and ``evaluate`` (CLI)
    report.py      the run's files (samples.jsonl, results.json, results.md) and ``--compare``

This package imports neither Ray nor vLLM at import time; ``run.py`` does, when it runs.
"""
