"""`opsd export`: the adapter or the merged model loads in transformers (and vLLM) and computes what base + adapter
computes; the model card tells how it was trained; bad input fails before any work with one line naming the path.

The adapter is a random PEFT LoRA on the tiny Qwen3 (nonzero B, so it changes the outputs) inside a minimal run
directory built the way a training run writes one: config.yaml by save_config, adapters/vN/, summary.json and
metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.rollout_reference import hf_greedy, load_hf_model, make_lora_adapter
from test_offline_models import chat_ids, vllm_greedy

from opsd.configlib import to_dict
from orchestrator.cli import main
from orchestrator.config import load_config, save_config
from opsd.adapter import read_adapter_dir
from orchestrator.export import ExportSource, model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"  # 5 problems
PROMPTS = ["What is 2+3?", "Name a prime number.", "Natalia sold 48 clips in April and half as many in May. Total?"]
RUN_METRICS = [
    {"step": 1, "loss": 0.02, "gjs": 0.02, "adapter_version": 1},
    {"step": 2, "loss": 0.01, "gjs": 0.01, "adapter_version": 2, "heldout_gjs": 0.0075,
     "eval/gsm8k/avg@4": 0.25, "eval/gsm8k/avg@4_ci95_low": 0.1, "eval/gsm8k/avg@4_ci95_high": 0.4,
     "eval/gsm8k/maj@4": 0.5, "eval/seconds": 12.0},
]


def run_export(*args) -> int:
    return main(["export", *map(str, args)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("opsd: error: ") and err.count("\n") == 1, err
    return err


def logits(model, text_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([text_ids])).logits[0].float()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run: adapters v1 and v2 (different random LoRAs), its config, summary and metrics."""
    run = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.path={GSM8K}", "data.mapping=gsm8k",
                             "train.steps=2", "train.prompts_per_step=1", "train.heldout_rows=2", f"train.run_dir={run}"])
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    for version, seed in ((1, 1), (2, 2)):
        make_lora_adapter(tiny_model_dir, run / "adapters" / f"v{version}", seed=seed, scale=0.05)
    summary = {"steps": 2, "final_adapter_version": 2, "run_dir": str(run), "heldout_gjs": {"0": 0.01, "2": 0.0075},
               "tokens_per_second": {}, "eval": {"2": {k: v for k, v in RUN_METRICS[1].items() if "/" in k}}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RUN_METRICS))
    return run


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [chat_ids(tokenizer, text) for text in PROMPTS]


@pytest.fixture(scope="module")
def merged_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "tiny-opsd"
    assert run_export(run_dir, "--out", out, "--merge") == 0
    return out


def test_adapter_export_loads_with_peft_and_computes_the_source_adapter(run_dir, tiny_model_dir, prompt_ids, tmp_path):
    out = tmp_path / "adapter"
    assert run_export(run_dir, "--out", out) == 0
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")) and not list(out.glob("model*.safetensors"))
    source_weights = run_dir / "adapters" / "v2" / "adapter_model.safetensors"
    assert (out / "adapter_model.safetensors").read_bytes() == source_weights.read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == tiny_model_dir.resolve()

    exported = load_hf_model(tiny_model_dir, out)
    source = load_hf_model(tiny_model_dir, run_dir / "adapters" / "v2")
    base = load_hf_model(tiny_model_dir)
    for ids in prompt_ids:
        assert torch.equal(logits(exported, ids), logits(source, ids))
        assert (logits(exported, ids) - logits(base, ids)).abs().max() > 1e-2  # the adapter matters

    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)(PROMPTS[2])["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPTS[2])["input_ids"]


def test_merged_export_is_a_plain_model_equal_to_base_plus_adapter(merged_dir, run_dir, tiny_model_dir, prompt_ids):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    names = {p.name for p in merged_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not {"adapter_model.safetensors", "adapter_config.json"} & names and not list(merged_dir.glob("*.bin"))
    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float32}  # the base checkpoint's dtype
    assert not any("lora" in k for k in keys)
    assert "lm_head.weight" not in keys  # tied embeddings stay tied: one tensor
    assert AutoConfig.from_pretrained(merged_dir).tie_word_embeddings
    base_generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    merged_generation = json.loads((merged_dir / "generation_config.json").read_text())
    assert merged_generation["eos_token_id"] == base_generation["eos_token_id"]

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert type(merged).__module__.startswith("transformers.")
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    reference = load_hf_model(tiny_model_dir, run_dir / "adapters" / "v2")
    for ids in prompt_ids:
        torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=1e-4, rtol=0)


def test_model_card_holds_config_data_steps_and_results(merged_dir, run_dir, tiny_model_dir, tmp_path):
    card = (merged_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert {"opsd", "on-policy-self-distillation"} <= set(front["tags"])
    assert "base_model" not in front  # a local directory is no Hub model to link to
    assert "Adapter version: v2 (after 2 training steps; the run trained 2 steps, final adapter v2)" in card
    assert "5 problems: 3 trained on, 2 held out" in card
    assert "0.01000 before training, 0.00750 after step 2 (-25.0%)" in card
    assert "Last evaluation on eval sets (after step 2)" in card and "| eval set | metric | value |" in card
    assert "| gsm8k | avg@4 | 0.25 [0.100, 0.400] |" in card and "| gsm8k | maj@4 | 0.5 |" in card
    config_yaml = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_yaml) == to_dict(load_config(run_dir / "config.yaml"))

    out = tmp_path / "v1"
    assert run_export(run_dir, "--out", out, "--version", 1) == 0
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "peft"
    assert "Adapter version: v1 (after 1 training step; the run trained 2 steps" in card
    assert "Held-out GJS before training: 0.01000." in card  # not evaluated at step 1
    assert "No evaluation on eval sets was recorded" in card
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_model_card_front_matter_names_a_hub_base_model(run_dir):
    payload = read_adapter_dir(run_dir / "adapters" / "v2", 2)
    source = ExportSource(adapter_dir=run_dir / "adapters" / "v2", payload=payload, base_model="Qwen/Qwen3-1.7B",
                          revision=None, tokenizer="Qwen/Qwen3-1.7B", trust_remote_code=False)
    card = model_card(source, merged=False, dtype=None, repo="someone/qwen3-opsd")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "Qwen/Qwen3-1.7B" and front["library_name"] == "peft"
    assert 'PeftModel.from_pretrained(base, "someone/qwen3-opsd")' in card
    assert "--lora-modules opsd=someone/qwen3-opsd --max-lora-rank 8" in card
    assert "not known" in card and "## Training config" not in card


def test_adapter_dir_export_and_base_model_checks(run_dir, tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "my-adapter"
    shutil.copytree(run_dir / "adapters" / "v2", adapter)
    assert run_export(adapter, "--out", tmp_path / "out") == 0
    assert "Exported from an adapter directory" in (tmp_path / "out" / "README.md").read_text()

    from orchestrator.offline_models import TinyQwen3Spec, build_tiny_qwen3

    wider = build_tiny_qwen3(tmp_path / "wider-qwen3", TinyQwen3Spec(hidden_size=128))
    capsys.readouterr()
    assert run_export(adapter, "--out", tmp_path / "bad", "--base-model", wider) == 2
    err = one_error_line(capsys)
    assert f"cannot export {adapter} with base model {str(wider)!r}: model.layers.0." in err
    assert "lora_B (128, 8)" in err
    assert not (tmp_path / "bad").exists()

    # a run whose adapter records another base model than the run's config
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config_file = run / "adapters" / "v2" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(wider)}))
    assert run_export(run, "--out", tmp_path / "bad") == 2
    err = one_error_line(capsys)
    assert str(config_file) in err and str(wider) in err and "model.path" in err
    assert not (tmp_path / "bad").exists()


def test_bad_input_fails_before_work_with_one_line_naming_the_path(run_dir, tmp_path, capsys):
    out = tmp_path / "out"

    assert run_export(tmp_path / "missing", "--out", out) == 2
    assert f"{tmp_path / 'missing'}: no such directory" in one_error_line(capsys)

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    assert run_export(stray, "--out", out) == 2
    assert f"{stray} is neither an opsd run directory" in one_error_line(capsys)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(run_dir / "adapters" / "v2" / "adapter_config.json", pickled)
    torch.save({"lora": torch.zeros(2)}, pickled / "adapter_model.bin")
    assert run_export(pickled, "--out", out) == 2
    err = one_error_line(capsys)
    assert str(pickled / "adapter_model.bin") in err and "pickle" in err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir / "adapters" / "v2", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert run_export(corrupt, "--out", out) == 2
    err = one_error_line(capsys)
    assert f"cannot export {corrupt}" in err and "not a readable safetensors file" in err

    no_adapters = tmp_path / "run-no-adapters"
    no_adapters.mkdir()
    shutil.copy(run_dir / "config.yaml", no_adapters)
    assert run_export(no_adapters, "--out", out) == 2
    assert f"{no_adapters / 'adapters'}: no adapter versions" in one_error_line(capsys)

    assert run_export(run_dir, "--out", out, "--version", 7) == 2
    err = one_error_line(capsys)
    assert str(run_dir / "adapters" / "v7") in err and "this run has v1, v2" in err

    assert run_export(run_dir, "--out", run_dir / "adapters", "--overwrite") == 2
    assert "holds the adapter being exported" in one_error_line(capsys)
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_export(run_dir, "--out", out) == 2
    assert f"--out {out.resolve()} is not empty (pass --overwrite" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_export(run_dir, "--out", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left


def test_push_offline_fails_with_one_clear_line_after_the_export(run_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # set by conftest for the whole suite
    monkeypatch.setenv("HF_TOKEN", "hf_exportTestSecret123")
    out = tmp_path / "out"
    assert run_export(run_dir, "--out", out, "--push-to-hub", "someone/tiny-opsd") == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert "cannot push to someone/tiny-opsd: the Hugging Face Hub is offline" in captured.err
    assert f"the export in {out.resolve()} is complete" in captured.err
    assert "hf_exportTestSecret123" not in captured.err + captured.out
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert 'PeftModel.from_pretrained(base, "someone/tiny-opsd")' in (out / "README.md").read_text()

    assert run_export(run_dir, "--out", tmp_path / "bad", "--push-to-hub", "not a/repo/id") == 2
    assert "--push-to-hub 'not a/repo/id'" in one_error_line(capsys)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("token", [None, "hf_exportTestSecret123"])
def test_push_online_without_token_or_hub_fails_with_one_clear_line(tmp_path, token):
    """Not offline by flag: no token fails before the network; with a token an unreachable Hub fails clearly."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9",
               PYTHONPATH=str(REPO_ROOT))
    if token:
        env["HF_TOKEN"] = token
    code = ("import sys\nfrom orchestrator.export import PushError, push_to_hub\ntry:\n"
            f"    push_to_hub({str(folder)!r}, 'someone/tiny-opsd')\n"
            "except PushError as e:\n    print(e)\n    sys.exit(2)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stdout.strip()
    assert message.startswith("cannot push to someone/tiny-opsd: ") and "\n" not in message
    if token is None:
        assert "no Hugging Face token" in message
    else:
        assert "Error" in message and token not in message + proc.stderr
    assert f"the export in {folder} is complete" in message


@pytest.mark.slow
def test_merged_export_greedy_in_vllm_equals_transformers(merged_dir, run_dir, tiny_model_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reference = load_hf_model(tiny_model_dir, run_dir / "adapters" / "v2")
    base = load_hf_model(tiny_model_dir)
    expected = [hf_greedy(merged, ids, 12)[0] for ids in prompt_ids]
    assert expected == [hf_greedy(reference, ids, 12)[0] for ids in prompt_ids]
    assert expected != [hf_greedy(base, ids, 12)[0] for ids in prompt_ids]  # the merge changed what it says
    assert vllm_greedy(merged_dir, prompt_ids, 12) == expected


def bfloat16_merge_checks(base_dir: Path, adapter: Path, out: Path, prompt: str) -> None:
    """The merged export of ``adapter`` on a bfloat16 ``base_dir``: saved in bfloat16, embeddings still tied, and
    computing base + adapter (float32, unmerged) up to bfloat16 rounding."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run_export(adapter, "--out", out, "--merge") == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in set(f.keys())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()

    ids = chat_ids(AutoTokenizer.from_pretrained(out), prompt)
    reference_model = load_hf_model(base_dir, adapter)
    reference = logits(reference_model, ids)
    with reference_model.disable_adapter():
        base = logits(reference_model, ids)
    change = (reference - base).abs().max()
    assert change > 0.1  # the adapter matters
    assert (logits(merged, ids) - reference).abs().max() < 0.1 * change  # bfloat16 rounding only


def test_merged_export_keeps_a_bfloat16_checkpoint_in_bfloat16(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, base_dir)
    assert json.loads((base_dir / "config.json").read_text())["dtype"] == "bfloat16"
    adapter = make_lora_adapter(base_dir, tmp_path / "adapter", seed=4, scale=0.05)
    bfloat16_merge_checks(base_dir, adapter, tmp_path / "merged", PROMPTS[0])


@pytest.mark.slow
def test_merged_export_of_a_real_bfloat16_model(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct: a real bfloat16 Llama checkpoint with tied embeddings."""
    adapter = make_lora_adapter(smollm2_dir, tmp_path / "adapter", seed=3, scale=0.02)
    bfloat16_merge_checks(smollm2_dir, adapter, tmp_path / "merged", "What is 2+3? Answer with a number.")
