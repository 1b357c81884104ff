"""Shared fixtures: offline models are built once per test session into a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

# Ray reads this once, at its first import: every Ray listener of the tests stays on 127.0.0.1 (tests/helpers/local_ray.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402

# No hub is reachable from tests: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.offline_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.offline_models import import_gguf

    return import_gguf(tmp_path_factory.mktemp("models") / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    from orchestrator.offline_models import qwen3_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
