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
from typing import Any, ClassVar, Literal, Sequence

from opsd.answers import ANSWER_FORMATS
from opsd.configlib import check
from opsd.errors import UserInputError

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# The prompts of the official OPSD code (siyan-zhao/OPSD, data_collator.py) as its current training scripts run it.
OPSD_STUDENT_TEMPLATE = "Problem: {problem}\n\n{instruction}"
OPSD_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each step "
    "\u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same final "
    "answer to the problem above. Think step by step, explore different approaches, and don't be afraid to backtrack "
    "or reconsider if something doesn't work out:\n"
    "\n{instruction}"
)
# Its first release, which produced the paper's results: no markers, a shorter transition, the problem without the
# "Problem:" prefix in the teacher turn, and the chat template's default (thinking) mode for both.
PAPER_TEACHER_TEMPLATE = (
    "{problem}\n\n"
    "Here is a reference solution to this problem:\n{solution}\n"
    "\n\nAfter understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem below:\n"
    "\n{instruction}"
)


@dataclass(frozen=True)
class PromptPreset:
    """A coherent set of templates and thinking modes; a config key set explicitly overrides its value."""

    student_template: str
    teacher_template: str
    student_thinking: bool
    teacher_thinking: bool


PRESETS: dict[str, PromptPreset] = {
    # The official code now: student without thinking, teacher in thinking mode (its student_thinking /
    # teacher_thinking defaults), the reference solution between markers.
    "opsd": PromptPreset(OPSD_STUDENT_TEMPLATE, OPSD_TEACHER_TEMPLATE, student_thinking=False, teacher_thinking=True),
    # The paper's release (both turns through the template's default mode: thinking for Qwen3).
    "opsd-paper": PromptPreset(OPSD_STUDENT_TEMPLATE, PAPER_TEACHER_TEMPLATE, student_thinking=True,
                               teacher_thinking=True),
}

PLACEHOLDERS = ("problem", "solution", "instruction")
_PLACEHOLDER_RE = re.compile(r"\{(problem|solution|instruction)\}")


@dataclass
class PromptConfig:
    """How the student and teacher user turns are written (both then go through the chat template)."""

    preset: Literal["opsd", "opsd-paper"] = field(
        default="opsd",
        metadata={"doc": "'opsd': the official OPSD code's current prompts (student without thinking; teacher in "
                  "thinking mode, the reference solution between '=== Reference Solution Begin/End ===' markers). "
                  "'opsd-paper': its first release, which produced the paper's numbers. The keys below override "
                  "the preset."},
    )
    student_template: str | None = field(
        default=None,
        metadata={"doc": "User turn of the student. Placeholders: {problem}, {instruction}. None: the preset's."},
    )
    teacher_template: str | None = field(
        default=None,
        metadata={"doc": "User turn of the teacher. Placeholders: {problem}, {solution}, {instruction}. None: the "
                  "preset's."},
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"doc": "Answer-format instruction shared by both turns."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"doc": "Optional system turn, the same for student and teacher. None: the template's own default."},
    )
    student_thinking: bool | None = field(
        default=None,
        metadata={"doc": "Qwen3 thinking mode of the student's chat template. None: the preset's. Ignored by "
                  "templates without it."},
    )
    teacher_thinking: bool | None = field(
        default=None,
        metadata={"doc": "Qwen3 thinking mode of the teacher's chat template. None: the preset's."},
    )

    answer_format: Literal["boxed", "flexible"] = field(
        default="boxed",
        metadata={"doc": "How a trace's final answer is read (train.student_accuracy, GRPO's rewards): 'boxed', its "
                  "last \\boxed{} (else a GSM8K '#### ' line); 'flexible', that, else the number after the last "
                  "'answer is', else the last number (lm-evaluation-harness's flexible-extract, for small models "
                  "that rarely box)."},
    )

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "enable_thinking": "split into prompt.student_thinking and prompt.teacher_thinking (each defaults to the "
                           "preset's mode)",
    }

    @property
    def student(self) -> tuple[str, bool]:
        """The student's template and thinking mode, preset and overrides resolved."""
        preset = PRESETS[self.preset]
        return (self.student_template if self.student_template is not None else preset.student_template,
                self.student_thinking if self.student_thinking is not None else preset.student_thinking)

    @property
    def teacher(self) -> tuple[str, bool]:
        preset = PRESETS[self.preset]
        return (self.teacher_template if self.teacher_template is not None else preset.teacher_template,
                self.teacher_thinking if self.teacher_thinking is not None else preset.teacher_thinking)

    def validate(self) -> None:
        check(self.preset in PRESETS, "preset", f"must be one of {', '.join(map(repr, PRESETS))}, got {self.preset!r}")
        check(self.answer_format in ANSWER_FORMATS, "answer_format",
              f"must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}")
        check_template(self.student[0], "prompt.student_template", required=("problem",), forbidden=("solution",))
        check_template(self.teacher[0], "prompt.teacher_template", required=("problem", "solution"))


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
        return fill_template(self.config.student[0], problem=problem, instruction=self.config.instruction)

    def teacher_user_turn(self, problem: str, solution: str) -> str:
        return fill_template(
            self.config.teacher[0], problem=problem, solution=solution, instruction=self.config.instruction
        )

    def _messages(self, user_turn: str) -> list[dict[str, str]]:
        messages = []
        if self.config.system_prompt is not None:
            messages.append({"role": "system", "content": self.config.system_prompt})
        messages.append({"role": "user", "content": user_turn})
        return messages

    def _render(self, user_turn: str, thinking: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self._messages(user_turn),
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )

    # -- full prompts (chat template applied, ending with the assistant generation prefix) --------------------
    def student_prompt(self, problem: str) -> str:
        return self._render(self.student_user_turn(problem), self.config.student[1])

    def teacher_prompt(self, problem: str, solution: str) -> str:
        return self._render(self.teacher_user_turn(problem, solution), self.config.teacher[1])

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
