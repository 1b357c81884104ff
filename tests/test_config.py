"""The typed config: defaults, the recipe, YAML + overrides, and the error messages users see."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from learner.config import LoraConfig
from opsd.configlib import (
    ConfigError,
    apply_overrides,
    check,
    describe,
    dump_yaml,
    from_dict,
    load_yaml,
    parse_yaml,
    to_dict,
)
from orchestrator.config import OPSDConfig, load_config, save_config
from rollout.config import RolloutConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "opsd-qwen3-1.7b.yaml"
DATA = ["data.path=data/train.jsonl"]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(fn, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value


# -- defaults and the recipe ----------------------------------------------------------------------------------


def test_defaults_follow_the_paper_text():
    cfg = load_config(None, DATA)
    assert cfg.learner.loss.beta == 0.5
    assert cfg.learner.loss.kind == "full"
    assert cfg.learner.loss.temperature == 1.0
    assert cfg.learner.optim.lr == 1e-5
    assert cfg.learner.optim.schedule == "cosine"
    assert cfg.rollout.max_response_tokens == 2048
    assert cfg.rollout.n == 1
    assert (cfg.learner.lora.rank, cfg.learner.lora.alpha) == (64, 128)
    assert cfg.learner.lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]
    assert cfg.model.trust_remote_code is False
    assert cfg.train.max_staleness == 0
    expected = OPSDConfig()
    expected.data.path = "data/train.jsonl"
    expected.learner.loss.temperature = expected.rollout.temperature  # derived when the config is loaded
    assert cfg == expected


def test_default_factories_do_not_share_lists():
    a, b = LoraConfig(), LoraConfig()
    a.target_modules.append("lm_head")
    assert "lm_head" not in b.target_modules


def test_recipe_loads_with_every_value_typed():
    cfg = load_config(RECIPE)
    assert cfg.model.path == "Qwen/Qwen3-1.7B"
    assert (cfg.learner.lora.rank, cfg.learner.lora.alpha) == (64, 128)
    assert cfg.learner.lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]
    assert isinstance(cfg.learner.optim.lr, float) and isinstance(cfg.learner.loss.clip, float)
    assert cfg.learner.loss.temperature == cfg.rollout.temperature == 1.1
    assert cfg.data.mapping == "opsd-math30k" and cfg.data.path == "siyanzhao/Openthoughts_math_30k_opsd"


# -- YAML and overrides ---------------------------------------------------------------------------------------


def test_overrides_nested_list_null_and_float():
    cfg = load_config(
        RECIPE,
        [
            "learner.optim.lr=3e-5",
            "learner.lora.target_modules=[q_proj,v_proj]",
            "rollout.max_model_len=8192",
            "rollout.max_model_len=null",  # later overrides win
            "learner.optim.grad_clip=null",
            "learner.loss.clip_mode=token",
            "learner.loss.clip=2",  # an int in a float field
            "learner.optim.betas=[0.9, 0.95]",
            "data.columns={problem: question}",
            "data.columns.solution=worked_answer",
            "placement.address=ray://head:10001",
            "model.revision='2024'",
        ],
    )
    assert cfg.learner.optim.lr == 3e-5
    assert cfg.learner.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.rollout.max_model_len is None
    assert cfg.learner.optim.grad_clip is None
    assert cfg.learner.loss.clip == 2.0 and isinstance(cfg.learner.loss.clip, float)
    assert cfg.learner.optim.betas == (0.9, 0.95)
    assert cfg.data.columns == {"problem": "question", "solution": "worked_answer"}
    assert cfg.placement.address == "ray://head:10001"
    assert cfg.model.revision == "2024"
    assert cfg.rollout.top_k == 20  # untouched recipe values stay


@pytest.mark.parametrize("text", ["1e-5", "1E-5", "1e5", "+1e-5", "1.e-5", ".5e-3", "2.0e-4", "1.5e+3"])
def test_yaml_exponent_floats_are_floats(text):
    value = parse_yaml(f"x: {text}")["x"]
    assert isinstance(value, float) and value == float(text)


def test_yaml_keeps_ints_and_strings():
    data = parse_yaml("a: 12\nb: 0x10\nc: e5\nd: 1e\ne: '1e-5'\nf: 1_000")
    assert data == {"a": 12, "b": 16, "c": "e5", "d": "1e", "e": "1e-5", "f": 1000}


def test_float_from_yaml_file(tmp_path):
    path = write(tmp_path, "data: {path: d.jsonl}\nlearner:\n  optim:\n    lr: 1e-5\n    eps: 1e-6\n")
    cfg = load_config(path)
    assert cfg.learner.optim.lr == 1e-5 and cfg.learner.optim.eps == 1e-6


def test_quoted_number_in_float_field_is_rejected(tmp_path):
    path = write(tmp_path, "data: {path: d.jsonl}\nlearner: {optim: {lr: '1e-5'}}\n")
    err = error_of(load_config, path)
    assert err.key == "learner.optim.lr" and "expected float" in str(err)


def test_apply_overrides_does_not_touch_its_input():
    data = {"learner": {"lora": {"rank": 8}}}
    out = apply_overrides(data, ["learner.lora.rank=16", "train.steps=3", "data.path="])
    assert data == {"learner": {"lora": {"rank": 8}}}
    assert out == {"learner": {"lora": {"rank": 16}}, "train": {"steps": 3}, "data": {"path": ""}}


@pytest.mark.parametrize("bad", ["learner.lora.rank", "=3", "a..b=1"])
def test_malformed_override(bad):
    err = error_of(apply_overrides, {}, [bad])
    assert repr(bad) in str(err)


def test_override_into_a_value_is_rejected():
    err = error_of(apply_overrides, {"train": {"steps": 3}}, ["train.steps.x=1"])
    assert err.key == "train.steps"


def test_empty_section_is_all_defaults(tmp_path):
    path = write(tmp_path, "data: {path: d.jsonl}\nlearner:\nrollout:\n")
    expected = OPSDConfig().learner
    expected.loss.temperature = OPSDConfig().rollout.temperature  # derived when the config is loaded
    assert load_config(path).learner == expected


# -- error messages -------------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "data: {path: d.jsonl}\nlearner:\n  lora:\n    rnak: 8\n")
    err = error_of(load_config, path)
    assert err.key == "learner.lora.rnak"
    assert "learner.lora.rnak" in str(err) and "did you mean 'learner.lora.rank'?" in str(err)
    assert str(path) in str(err)


def test_unknown_key_from_override_names_the_override():
    err = error_of(load_config, None, DATA + ["rollout.temprature=0.7"])
    assert "did you mean 'rollout.temperature'?" in str(err)
    assert "override 'rollout.temprature=0.7'" in str(err)


def test_misplaced_key_suggests_where_it_lives():
    err = error_of(load_config, None, DATA + ["lr=2e-4"])
    assert err.key == "lr" and "did you mean 'learner.optim.lr'?" in str(err)
    err = error_of(load_config, None, DATA + ["top_k=5"])
    assert "'rollout.top_k'" in str(err) and "'teacher.top_k'" in str(err)


def test_wrong_type_names_key_expected_type_and_value():
    err = error_of(load_config, None, DATA + ["rollout.n=two"])
    assert err.key == "rollout.n"
    assert "rollout.n" in str(err) and "expected int" in str(err) and "'two'" in str(err)
    err = error_of(load_config, None, DATA + ["rollout.n=2.0"])
    assert "expected int" in str(err) and "2.0" in str(err)


def test_bool_is_not_an_int_and_int_is_not_a_bool():
    assert error_of(load_config, None, DATA + ["train.epochs=true"]).key == "train.epochs"
    assert error_of(load_config, None, DATA + ["model.trust_remote_code=1"]).key == "model.trust_remote_code"


def test_optional_and_text_hints():
    err = error_of(load_config, None, DATA + ["rollout.max_model_len=None"])
    assert "expected int | None" in str(err) and "null" in str(err)
    err = error_of(load_config, None, DATA + ["model.revision=2024"])
    assert "quote" in str(err)


def test_list_item_error_names_the_index():
    err = error_of(load_config, None, DATA + ["learner.lora.target_modules=[q_proj, 3]"])
    assert err.key == "learner.lora.target_modules[1]"


def test_lora_on_the_output_head_or_embeddings_is_refused():
    err = error_of(load_config, None, DATA + ["learner.lora.target_modules=[q_proj, lm_head]"])
    assert err.key == "learner.lora.target_modules[1]" and "only the attention and MLP projections" in str(err)
    err = error_of(load_config, None, DATA + ["learner.lora.target_modules=[model.embed_tokens]"])
    assert err.key == "learner.lora.target_modules[0]"


def test_engine_lora_rank_is_derived_and_old_keys_say_what_replaced_them():
    # The engines are sized from learner.lora.rank; the key that had to be kept equal to it by hand is gone.
    err = error_of(load_config, None, DATA + ["rollout.max_lora_rank=64"])
    assert err.key == "rollout.max_lora_rank" and "unknown key" in str(err)
    for old, new in (("train.eval_rows", "train.heldout_rows"), ("train.eval_every", "train.heldout_every")):
        err = error_of(load_config, None, DATA + [f"{old}=1"])
        assert err.key == old and f"is no longer a key: renamed {new}" in str(err)
    err = error_of(load_config, None, DATA + ["data.shuffle_seed=3"])
    assert err.key == "data.shuffle_seed" and "train.seed" in str(err)


def test_loss_temperature_follows_sampling_and_a_mismatch_is_refused_unless_asked_for(tmp_path):
    assert load_config(None, DATA + ["rollout.temperature=1.1"]).learner.loss.temperature == 1.1
    assert load_config(None, DATA + ["rollout.temperature=0"]).learner.loss.temperature == 1.0  # greedy: untempered
    err = error_of(load_config, None, DATA + ["rollout.temperature=1.1", "learner.loss.temperature=1.0"])
    assert err.key == "learner.loss.temperature" and "differs from rollout.temperature (1.1)" in str(err)
    cfg = load_config(None, DATA + ["rollout.temperature=1.1", "learner.loss.temperature=1.0",
                                    "learner.loss.allow_temperature_mismatch=true"])
    assert cfg.learner.loss.temperature == 1.0
    # The saved config holds the derived value and loads back equal.
    derived = load_config(None, DATA + ["rollout.temperature=0.7"])
    save_config(derived, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == derived


def test_keys_without_effect_are_named():
    from orchestrator.config import ineffective_keys

    cfg = load_config(None, DATA + ["teacher.top_k=8", "teacher.num_workers=2", "rollout.cpu_kv_cache_gib=4"])
    notes = ineffective_keys(cfg, on_cpu=False)
    assert any(n.startswith("teacher.top_k has no effect: learner.loss.kind=full") for n in notes)
    assert any(n.startswith("teacher.num_workers has no effect") for n in notes)
    assert "rollout.cpu_kv_cache_gib has no effect on GPU engines" in notes
    assert ineffective_keys(load_config(None, DATA + ["teacher.top_k=8", "learner.loss.kind=topk_tail"]),
                            on_cpu=True) == []
    assert ineffective_keys(load_config(None, DATA), on_cpu=True) == []  # defaults are never reported


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_cpu_is_flagged_where_it_costs(monkeypatch, native):
    import orchestrator.config as config

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native)
    stages = load_config(None, DATA + ["teacher.dtype=bfloat16", "learner.dtype=bfloat16",
                                       "learner.loss.kind=topk_tail"])
    notes = config.ineffective_keys(stages, on_cpu=True)
    emulated = [n for n in notes if "without AVX512-BF16" in n]
    assert len(emulated) == (0 if native else 1)
    assert not emulated or emulated[0].startswith("teacher.dtype, learner.dtype=bfloat16")
    assert not any("merged weight" in n for n in notes)  # the rollout engines stay float32
    assert config.ineffective_keys(stages, on_cpu=False) == []  # bfloat16 is the GPU default
    engines = config.ineffective_keys(load_config(None, DATA + ["model.dtype=bfloat16"]), on_cpu=True)
    assert any(n.startswith("model.dtype=bfloat16 on CPU engines: each merged weight") for n in engines)
    lora = load_config(None, DATA + ["model.dtype=bfloat16", "rollout.adapter_serving=lora"])
    assert not any("merged weight" in n for n in config.ineffective_keys(lora, on_cpu=True))
    # The full-vocabulary loss runs no teacher actors: teacher.dtype is said to have no effect, once.
    full = config.ineffective_keys(load_config(None, DATA + ["teacher.dtype=bfloat16", "learner.dtype=bfloat16",
                                                             "learner.loss.kind=full"]), on_cpu=True)
    assert len([n for n in full if n.startswith("teacher.dtype")]) == 1
    assert any(n.startswith("learner.dtype=bfloat16 on a CPU without") for n in full) == (not native)


def test_literal_error_lists_choices_and_suggests():
    err = error_of(load_config, None, DATA + ["learner.loss.kind=topk"])
    assert err.key == "learner.loss.kind"
    assert "'full'" in str(err) and "'topk_tail'" in str(err)


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.loss.beta=1.5", "learner.loss.beta"),
        ("learner.lora.rank=7", "learner.lora.rank"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.top_k=0", "rollout.top_k"),
        ("rollout.n=0", "rollout.n"),
        ("rollout.gpu_memory_utilization=1.2", "rollout.gpu_memory_utilization"),
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("data.on_bad_row=maybe", "data.on_bad_row"),
        ("learner.optim.lr=0", "learner.optim.lr"),
        ("learner.optim.betas=[0.9, 1.0]", "learner.optim.betas"),
        ("learner.loss.temperature=0", "learner.loss.temperature"),
        ("learner.loss.clip=0", "learner.loss.clip"),
        ("train.max_staleness=2", "train.max_staleness"),
        ("train.steps=0", "train.steps"),
        ("data.limit=0", "data.limit"),
        ("data.columns={question: q}", "data.columns.question"),
        ("teacher.top_k=0", "teacher.top_k"),
        ("rollout.max_model_len=1024", "rollout.max_model_len"),
        ("teacher.max_context_tokens=2048", "teacher.max_context_tokens"),
        ("learner.optim.lr=.inf", "learner.optim.lr"),
    ],
)
def test_range_errors_name_the_key(override, key):
    err = error_of(load_config, None, DATA + [override])
    assert err.key == key
    assert key in str(err)


def test_lora_rank_error_lists_vllm_ranks():
    err = error_of(load_config, None, DATA + ["learner.lora.rank=7"])
    assert "vLLM" in str(err) and "1, 8, 16, 32, 64, 128, 256, 320, 512" in str(err)


def test_missing_data_path_is_the_only_default_error():
    err = error_of(load_config, None)
    assert err.key == "data.path"
    assert "required" in str(err) and "data.path" in str(err)
    error_of(load_config, None, ["data.path=  "])


def test_prompt_errors_become_config_errors():
    err = error_of(load_config, None, DATA + ["prompt.student_template='{problem} {solution}'"])
    assert err.key == "prompt"
    assert "prompt.student_template must not contain {solution}" in str(err)
    assert not str(err).startswith("prompt: prompt.")  # the key is not repeated


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\nlearner: [unclosed\n")
    err = error_of(load_config, path)
    assert str(path) in str(err) and "line " in str(err)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path, "data: {path: d.jsonl}\nlearner:\n  zero_stage: 1\n  zero_stage: 3\n")
    err = error_of(load_config, path)
    assert str(path) in str(err) and "zero_stage" in str(err) and "line 4" in str(err)


def test_missing_file_and_non_mapping_top_level(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in str(error_of(load_config, missing))
    listing = write(tmp_path, "- a\n- b\n")
    err = error_of(load_yaml, listing)
    assert str(listing) in str(err) and "mapping" in str(err)
    assert load_yaml(write(tmp_path, "# only a comment\n", "empty.yaml")) == {}


def test_section_that_is_not_a_mapping():
    err = error_of(load_config, None, DATA + ["learner=3"])
    assert err.key == "learner" and "section" in str(err)


# -- round trip and documentation -----------------------------------------------------------------------------


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(
        RECIPE,
        [
            "prompt.system_prompt=You are careful.",
            "data.columns={problem: q, id: uid}",
            "learner.optim.betas=[0.8, 0.95]",
            "rollout.max_model_len=4096",
        ],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert from_dict(OPSDConfig, yaml.safe_load(dump_yaml(to_dict(cfg)))) == cfg


def test_to_dict_is_plain_data():
    data = to_dict(OPSDConfig())
    assert data["learner"]["optim"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_config_error_is_a_user_input_error():
    from opsd.errors import USER_ERRORS

    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, USER_ERRORS)


def test_config_error_pickles():
    err = pickle.loads(pickle.dumps(ConfigError("a.b", "bad", source="f.yaml")))
    assert (err.key, err.message, err.source) == ("a.b", "bad", "f.yaml") and str(err) == "f.yaml: a.b: bad"


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        # sections are dicts of the config tree; data.columns is a dict-valued leaf (empty by default)
        keys.extend(_leaf_keys(v, key + ".") if isinstance(v, dict) and v else [key])
    return keys


def test_describe_documents_every_leaf():
    docs = describe(OPSDConfig)
    assert [d.key for d in docs] == _leaf_keys(to_dict(OPSDConfig()))
    undocumented = [d.key for d in docs if not d.doc.strip()]
    assert undocumented == []
    by_key = {d.key: d for d in docs}
    assert by_key["learner.lora.rank"].type == "int" and by_key["learner.lora.rank"].default == "64"
    assert by_key["rollout.max_model_len"].type == "int | None"
    assert by_key["rollout.max_model_len"].default == "null"
    assert by_key["learner.loss.kind"].type == "'full' | 'topk_tail' | 'topk_renorm' | 'sampled_token'"
    assert "\n" not in by_key["prompt.teacher_template"].default


# -- the generic machinery on its own -------------------------------------------------------------------------


@dataclass
class _Inner:
    size: int = field(default=1, metadata={"doc": "size"})

    def validate(self) -> None:
        check(self.size >= 1, "size", "must be >= 1")


@dataclass
class _Outer:
    name: str = field(metadata={"doc": "required name"})
    mode: Literal["a", "b"] = field(default="a", metadata={"doc": "mode"})
    pair: tuple[int, str] = field(default=(1, "x"), metadata={"doc": "pair"})
    many: tuple[float, ...] = field(default=(), metadata={"doc": "many"})
    tags: dict[str, str] = field(default_factory=dict, metadata={"doc": "tags"})
    inner: _Inner = field(default_factory=_Inner, metadata={"doc": "inner"})


def test_from_dict_generic():
    obj = from_dict(_Outer, {"name": "n", "pair": [2, "y"], "many": [1, 2.5], "inner": {"size": 3}})
    assert obj == _Outer(name="n", pair=(2, "y"), many=(1.0, 2.5), inner=_Inner(size=3))
    assert error_of(from_dict, _Outer, {}).key == "name"
    assert error_of(from_dict, _Outer, {"name": "n", "inner": {"size": 0}}, path="top").key == "top.inner.size"
    assert error_of(from_dict, _Outer, {"name": "n", "pair": [1]}).key == "pair"
    assert error_of(from_dict, _Outer, {"name": "n", "tags": {"k": 1}}).key == "tags.k"
    assert error_of(from_dict, _Outer, {"name": "n", "inner": {"sise": 2}}).key == "inner.sise"
    assert [d.key for d in describe(_Outer)][-1] == "inner.size"
    assert describe(_Outer)[0].default == "required"


def test_section_usable_alone():
    cfg = from_dict(RolloutConfig, {"temperature": 0, "top_k": 20})
    assert cfg.temperature == 0.0 and cfg.top_k == 20
    err = error_of(from_dict, RolloutConfig, {"top_p": 0}, path="rollout")
    assert err.key == "rollout.top_p"


def test_clip_needs_its_mode_and_a_mode_needs_its_clip():
    err = error_of(load_config, None, DATA + ["learner.loss.clip=0.05"])
    assert err.key == "learner.loss.clip" and "clip_mode 'none'" in str(err)
    err = error_of(load_config, None, DATA + ["learner.loss.clip_mode=pointwise"])
    assert err.key == "learner.loss.clip" and "must be > 0 with clip_mode 'pointwise'" in str(err)
    cfg = load_config(None, DATA + ["learner.loss.clip_mode=pointwise", "learner.loss.clip=0.05"])
    assert (cfg.learner.loss.clip_mode, cfg.learner.loss.clip) == ("pointwise", 0.05)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "recipes").glob(
    "opsd-qwen3-*.yaml")))
def test_every_gpu_recipe_fills_one_8_gpu_node_and_says_where_each_value_comes_from(recipe):
    from orchestrator.placement import ClusterView, ResourcePlan, fit_problems
    from orchestrator.plan import cluster_of, describe_run

    path = Path(__file__).resolve().parents[1] / "recipes" / recipe
    cfg = load_config(path)
    node = cluster_of(1, 8, 96)
    plan = ResourcePlan.from_config(cfg, node)
    assert plan.totals()["GPU"] == 8 and fit_problems(plan, node) == []
    assert fit_problems(plan, cluster_of(1, 7, 96))  # and not less than the node
    assert "the plan fits" in describe_run(cfg, node)
    header = path.read_text().split("\n\n")[0]
    # Every key the recipe sets is named in its header, with where the value comes from.
    for section, values in yaml.safe_load(path.read_text()).items():
        for key in values:
            assert f"{section}.{key}" in header or f"{section}." in header and key in header or section in header, \
                (recipe, section, key)
    assert cfg.train.steps and cfg.train.checkpoint_every and cfg.eval.every


def test_the_current_recipe_is_the_authors_script_and_the_paper_recipe_the_paper():
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    now = load_config(recipes / "opsd-qwen3-1.7b.yaml")
    assert (now.learner.loss.beta, now.learner.loss.clip_mode, now.learner.loss.clip) == (0.0, "pointwise", 0.05)
    assert (now.learner.optim.lr, now.learner.optim.grad_clip, now.rollout.max_response_tokens) == (5e-6, 0.1, 1024)
    assert (now.rollout.temperature, now.rollout.top_p, now.rollout.top_k) == (1.1, 0.95, 20)
    assert now.learner.loss.temperature == 1.1 and now.prompt.student == (now.prompt.student[0], False)
    assert now.prompt.teacher[1] is True and now.train.steps == 200 and now.train.prompts_per_step == 32
    paper = load_config(recipes / "opsd-qwen3-1.7b-paper.yaml")
    assert (paper.learner.loss.beta, paper.learner.loss.clip_mode, paper.learner.optim.lr) == (0.5, "none", 1e-5)
    assert (paper.learner.optim.schedule, paper.rollout.max_response_tokens, paper.prompt.preset) == \
        ("cosine", 2048, "opsd-paper")
    assert load_config(recipes / "opsd-qwen3-8b.yaml").learner.loss.clip == 0.06
