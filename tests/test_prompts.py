"""Student and teacher prompts: exact strings through the real Qwen3 chat template, and token accounting."""

from __future__ import annotations

import pytest

from opsd.prompts import (
    OPSD_TEACHER_TEMPLATE,
    PromptBuilder,
    PromptConfig,
    PromptError,
    fill_template,
)

PROBLEM = "What is 1+1?"
SOLUTION = "1+1=2, so the answer is \\boxed{2}."
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# The official code's current transition text, spelled out here (em-dash included) rather than imported.
TRANSITION = (
    "After reading the reference solution above, make sure you truly understand the reasoning behind each step "
    "\u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same final "
    "answer to the problem above. Think step by step, explore different approaches, and don't be afraid to backtrack "
    "or reconsider if something doesn't work out:"
)
PAPER_TRANSITION = (
    "After understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem below:"
)


def test_student_prompt_exact_string_official_preset_thinking_off(qwen3_tokenizer):
    builder = PromptBuilder(qwen3_tokenizer, PromptConfig())
    assert builder.student_prompt(PROBLEM) == (
        "<|im_start|>user\n"
        f"Problem: {PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_teacher_prompt_exact_string_official_preset_thinking_on(qwen3_tokenizer):
    """The official code's current teacher turn: the solution between markers, its transition, one user message,
    the chat template in thinking mode (no empty think block before the student's trace)."""
    builder = PromptBuilder(qwen3_tokenizer, PromptConfig())
    assert builder.teacher_prompt(PROBLEM, SOLUTION) == (
        "<|im_start|>user\n"
        f"Problem: {PROBLEM}\n\n"
        "Here is a reference solution to this problem:\n"
        "=== Reference Solution Begin ===\n"
        f"{SOLUTION}\n"
        "=== Reference Solution End ===\n\n\n"
        f"{TRANSITION}\n\n"
        f"{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_paper_preset_exact_strings(qwen3_tokenizer):
    """The first release (the paper's numbers): teacher turn without markers or a 'Problem:' prefix, both turns
    in the template's default (thinking) mode."""
    builder = PromptBuilder(qwen3_tokenizer, PromptConfig(preset="opsd-paper"))
    assert builder.student_prompt(PROBLEM) == (
        f"<|im_start|>user\nProblem: {PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert builder.teacher_prompt(PROBLEM, SOLUTION) == (
        "<|im_start|>user\n"
        f"{PROBLEM}\n\n"
        "Here is a reference solution to this problem:\n"
        f"{SOLUTION}\n\n\n"
        f"{PAPER_TRANSITION}\n\n"
        f"{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_keys_override_the_preset(qwen3_tokenizer):
    config = PromptConfig(preset="opsd-paper", student_thinking=False, teacher_template="{problem} | {solution}")
    builder = PromptBuilder(qwen3_tokenizer, config)
    assert builder.student_prompt(PROBLEM).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert builder.teacher_prompt(PROBLEM, SOLUTION) == (
        f"<|im_start|>user\n{PROBLEM} | {SOLUTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert config.teacher == ("{problem} | {solution}", True) and config.student[1] is False


def test_evaluation_prompt_is_the_official_eval_scripts(qwen3_tokenizer):
    """In training and in `opsd eval`, evaluation uses its own prompt: no 'Problem:' prefix, thinking on."""
    from evaluation.config import EvalConfig

    builder = PromptBuilder(qwen3_tokenizer, EvalConfig().prompt())
    assert builder.student_prompt(PROBLEM) == (
        f"<|im_start|>user\n{PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    off = PromptBuilder(qwen3_tokenizer, EvalConfig(thinking=False).prompt())
    assert off.student_prompt(PROBLEM).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_thinking_on_and_system_prompt(qwen3_tokenizer):
    builder = PromptBuilder(qwen3_tokenizer, PromptConfig(student_thinking=True, system_prompt="Be brief."))
    assert builder.student_prompt(PROBLEM) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n"
        f"Problem: {PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert builder.teacher_prompt(PROBLEM, SOLUTION).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_the_old_thinking_key_says_what_replaced_it():
    from opsd.configlib import ConfigError, from_dict

    with pytest.raises(ConfigError, match="prompt.enable_thinking: is no longer a key: split into"):
        from_dict(PromptConfig, {"enable_thinking": True}, path="prompt")


def test_custom_templates_keep_literal_braces_and_never_expand_twice(qwen3_tokenizer):
    config = PromptConfig(
        student_template="Q: {problem} -> \\boxed{}",
        teacher_template="Q: {problem}\nRef: {solution}\n{instruction}",
        instruction="Answer in {braces}.",
    )
    builder = PromptBuilder(qwen3_tokenizer, config)
    tricky = "Find {solution} and {x}."
    assert builder.student_user_turn(tricky) == "Q: Find {solution} and {x}. -> \\boxed{}"
    assert builder.teacher_user_turn(tricky, "S {problem}") == "Q: Find {solution} and {x}.\nRef: S {problem}\nAnswer in {braces}."


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"student_template": "no placeholder"}, "prompt.student_template must contain {problem}"),
        ({"student_template": "{problem} {solution}"}, "prompt.student_template must not contain {solution}"),
        ({"teacher_template": "{problem} only"}, "prompt.teacher_template must contain {solution}"),
    ],
)
def test_bad_templates_are_rejected(qwen3_tokenizer, kwargs, message):
    with pytest.raises(PromptError, match=message.replace("{", r"\{").replace("}", r"\}")):
        PromptBuilder(qwen3_tokenizer, PromptConfig(**kwargs))


def test_fill_template_requires_values():
    with pytest.raises(PromptError, match="no solution was given"):
        fill_template(OPSD_TEACHER_TEMPLATE, problem="p", instruction="i")


def test_teacher_context_appends_response_ids_unchanged(qwen3_tokenizer):
    builder = PromptBuilder(qwen3_tokenizer)
    # Ids that would not survive a decode/encode round trip as the same ids.
    response = [151645, 15, 16, 17, 151643, 9707]
    context = builder.teacher_context_ids(PROBLEM, SOLUTION, response)
    prompt_ids = builder.teacher_prompt_ids(PROBLEM, SOLUTION)
    assert context == prompt_ids + response
    assert qwen3_tokenizer.decode(prompt_ids) == builder.teacher_prompt(PROBLEM, SOLUTION)


def test_lengths_account_for_every_part(qwen3_tokenizer):
    builder = PromptBuilder(qwen3_tokenizer)
    lengths = builder.lengths(PROBLEM, SOLUTION, response_budget=2048)
    assert lengths.student_prompt == len(builder.student_prompt_ids(PROBLEM))
    assert lengths.teacher_prompt == len(builder.teacher_prompt_ids(PROBLEM, SOLUTION))
    assert lengths.solution == len(qwen3_tokenizer(SOLUTION, add_special_tokens=False)["input_ids"])
    # The teacher holds the problem, the solution and the transition: strictly longer than student + solution.
    assert lengths.teacher_prompt > lengths.student_prompt + lengths.solution
    assert lengths.teacher_total == lengths.teacher_prompt + 2048
    assert lengths.student_total == lengths.student_prompt + 2048


def test_tokenizer_without_chat_template_is_refused(qwen3_tokenizer):
    import copy

    plain = copy.deepcopy(qwen3_tokenizer)
    plain.chat_template = None
    with pytest.raises(PromptError, match="no chat template"):
        PromptBuilder(plain)


def test_smollm2_chatml_prompt(smollm2_dir):
    from transformers import AutoTokenizer

    builder = PromptBuilder(AutoTokenizer.from_pretrained(smollm2_dir))
    assert builder.student_prompt(PROBLEM) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\nProblem: {PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
