"""Student and teacher prompts: the one place where OPSD's two contexts are built.

The student sees the problem alone; the teacher sees the problem, the verified reference solution and a
transition instruction, then the student's trace appended unchanged (docs/ARCHITECTURE.md, "The teacher"). Both go
through the model's own chat template, so the same code serves Qwen3, Llama/ChatML and any HF tokenizer.

Templates are plain strings with the placeholders ``{problem}``, ``{solution}`` and ``{instruction}``. Only those
three names are substituted, in one pass, so literal braces (``\\boxed{}``) need no escaping and a problem that
happens to contain ``{solution}`` is never expanded a second time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from opsd.errors import UserInputError

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

DEFAULT_STUDENT_TEMPLATE = "Problem: {problem}\n\n{instruction}"

DEFAULT_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "{solution}\n\n"
    "After understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem below:\n\n"
    "Problem: {problem}\n\n"
    "{instruction}"
)

PLACEHOLDERS = ("problem", "solution", "instruction")
_PLACEHOLDER_RE = re.compile(r"\{(problem|solution|instruction)\}")


@dataclass
class PromptConfig:
    """How the student and teacher user turns are written (both then go through the chat template)."""

    student_template: str = field(
        default=DEFAULT_STUDENT_TEMPLATE,
        metadata={"doc": "User turn of the student. Placeholders: {problem}, {instruction}."},
    )
    teacher_template: str = field(
        default=DEFAULT_TEACHER_TEMPLATE,
        metadata={"doc": "User turn of the teacher. Placeholders: {problem}, {solution}, {instruction}."},
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"doc": "Answer-format instruction shared by both turns."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"doc": "Optional system turn, the same for student and teacher. None: the template's own default."},
    )
    enable_thinking: bool = field(
        default=False,
        metadata={
            "doc": "Qwen3 thinking mode in the chat template (student and teacher alike, so the student's trace "
            "continues the teacher's context in the same mode). Ignored by templates without it."
        },
    )

    def validate(self) -> None:
        check_template(self.student_template, "prompt.student_template", required=("problem",), forbidden=("solution",))
        check_template(self.teacher_template, "prompt.teacher_template", required=("problem", "solution"))


class PromptError(UserInputError):
    """A template or an input that cannot make a prompt."""


def check_template(template: str, name: str, required: Sequence[str], forbidden: Sequence[str] = ()) -> None:
    found = set(_PLACEHOLDER_RE.findall(template))
    missing = [p for p in required if p not in found]
    if missing:
        raise PromptError(f"{name} must contain {', '.join('{' + p + '}' for p in missing)}")
    leaked = [p for p in forbidden if p in found]
    if leaked:
        # The student must never see the solution: that is the whole premise of OPSD.
        raise PromptError(f"{name} must not contain {', '.join('{' + p + '}' for p in leaked)}")


def fill_template(template: str, **values: str) -> str:
    """Substitute ``{problem}``, ``{solution}``, ``{instruction}`` in one pass; other braces stay as written."""

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise PromptError(f"template uses {{{key}}} but no {key} was given")
        return values[key]

    return _PLACEHOLDER_RE.sub(replace, template)


@dataclass(frozen=True)
class PromptLengths:
    """Token accounting for one row: what the student and the teacher will hold at most."""

    student_prompt: int
    teacher_prompt: int
    solution: int
    response_budget: int

    @property
    def student_total(self) -> int:
        return self.student_prompt + self.response_budget

    @property
    def teacher_total(self) -> int:
        return self.teacher_prompt + self.response_budget


class PromptBuilder:
    """Builds chat-templated student and teacher prompts (as text and as token ids) for one tokenizer."""

    def __init__(self, tokenizer: Any, config: PromptConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        self.config.validate()
        if getattr(tokenizer, "chat_template", None) is None:
            raise PromptError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                "OPSD prompts are built with the model's chat template"
            )

    # -- user turns ------------------------------------------------------------------------------------------
    def student_user_turn(self, problem: str) -> str:
        return fill_template(self.config.student_template, problem=problem, instruction=self.config.instruction)

    def teacher_user_turn(self, problem: str, solution: str) -> str:
        return fill_template(
            self.config.teacher_template, problem=problem, solution=solution, instruction=self.config.instruction
        )

    def _messages(self, user_turn: str) -> list[dict[str, str]]:
        messages = []
        if self.config.system_prompt is not None:
            messages.append({"role": "system", "content": self.config.system_prompt})
        messages.append({"role": "user", "content": user_turn})
        return messages

    def _render(self, user_turn: str) -> str:
        return self.tokenizer.apply_chat_template(
            self._messages(user_turn),
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=self.config.enable_thinking,
        )

    # -- full prompts (chat template applied, ending with the assistant generation prefix) --------------------
    def student_prompt(self, problem: str) -> str:
        return self._render(self.student_user_turn(problem))

    def teacher_prompt(self, problem: str, solution: str) -> str:
        return self._render(self.teacher_user_turn(problem, solution))

    def encode(self, text: str) -> list[int]:
        # The chat template already wrote every special token: add none.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def student_prompt_ids(self, problem: str) -> list[int]:
        return self.encode(self.student_prompt(problem))

    def teacher_prompt_ids(self, problem: str, solution: str) -> list[int]:
        return self.encode(self.teacher_prompt(problem, solution))

    def teacher_context_ids(self, problem: str, solution: str, response_ids: Sequence[int]) -> list[int]:
        """Teacher prompt followed by the student's sampled trace, token for token (never re-tokenised)."""
        return self.teacher_prompt_ids(problem, solution) + [int(t) for t in response_ids]

    def lengths(self, problem: str, solution: str, response_budget: int) -> PromptLengths:
        return PromptLengths(
            student_prompt=len(self.student_prompt_ids(problem)),
            teacher_prompt=len(self.teacher_prompt_ids(problem, solution)),
            solution=len(self.encode(solution)),
            response_budget=response_budget,
        )
