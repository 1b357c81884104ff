"""Student and teacher prompts: exact strings through the real Qwen3 chat template, and token accounting."""

from __future__ import annotations

import pytest

from opsd.prompts import (
    DEFAULT_TEACHER_TEMPLATE,
    PromptBuilder,
    PromptConfig,
    PromptError,
    fill_template,
)

PROBLEM = "What is 1+1?"
SOLUTION = "1+1=2, so the answer is \\boxed{2}."
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def test_student_prompt_exact_string_thinking_off(qwen3_tokenizer):
    builder = PromptBuilder(qwen3_tokenizer, PromptConfig())
    assert builder.student_prompt(PROBLEM) == (
        "<|im_start|>user\n"
        f"Problem: {PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_teacher_prompt_exact_string_thinking_off(qwen3_tokenizer):
    builder = PromptBuilder(qwen3_tokenizer, PromptConfig())
    assert builder.teacher_prompt(PROBLEM, SOLUTION) == (
        "<|im_start|>user\n"
        f"Problem: {PROBLEM}\n\n"
        "Here is a reference solution to this problem:\n"
        f"{SOLUTION}\n\n"
        "After understanding the reference solution and the rationale behind each step, now articulate your own "
        "step-by-step reasoning that derives the same final answer to the problem below:\n\n"
        f"Problem: {PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_thinking_on_and_system_prompt(qwen3_tokenizer):
    builder = PromptBuilder(qwen3_tokenizer, PromptConfig(enable_thinking=True, system_prompt="Be brief."))
    assert builder.student_prompt(PROBLEM) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n"
        f"Problem: {PROBLEM}\n\n{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert builder.teacher_prompt(PROBLEM, SOLUTION).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


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
        fill_template(DEFAULT_TEACHER_TEMPLATE, problem="p", instruction="i")


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
    # The teacher holds the problem twice plus the solution: strictly longer than student + solution.
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
