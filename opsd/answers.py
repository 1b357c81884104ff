"""The final answer of a response or a solution: the last ``\\boxed{...}``, else the text after GSM8K's last ``####``.

The student prompt asks for the final answer "within \\boxed{}", so a response's answer is its last *complete*,
non-empty box:

* braces nest (``\\boxed{\\frac{1}{2}}``) and escaped braces do not count (``\\boxed{\\{1, 2\\}}``);
* a box that a length-truncated response left open is skipped, and so is an empty one (a model that repeats the
  instruction writes ``\\boxed{}``), so the box before it counts;
* ``\\fbox{...}`` and the brace-less ``\\boxed 5`` count as boxes too.

The whole response is searched, thinking included (as the paper's evaluation script does): a response cut off
while thinking may still have boxed an answer. Without any box, a ``#### ANSWER`` line (the GSM8K training
format, which models fine-tuned on it keep) gives the answer. Without either, there is no answer: the sample is
graded ``no_answer`` (wrong).

``answer_format="flexible"`` reads more: without a box or a ``####`` line, the number after the last "answer is"
(or "answer:"), else the last number of the response: lm-evaluation-harness's *flexible-extract*, for small models
that compute the right number but rarely box it. It is a looser grader (a number that happens to come last counts),
so report which one a result used.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ANSWER_FORMATS = ("boxed", "flexible")
_VOTE_DROP_RE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\s+")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` of ``text``."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, match.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def _box_content(text: str, start: int) -> str | None:
    """What follows a ``\\boxed`` command ending at ``start``: a braced group (None if never closed) or one token."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i == len(text):
        return None
    if text[i] != "{":
        if start == i:  # "\boxedfoo" is another command; "\boxed 5" is a box
            return None
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    depth, j = 0, i
    while j < len(text):
        char = text[j]
        if char == "\\":
            j += 2  # an escaped character: \{ and \} are literal braces, \\ is a line break
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def extract_gsm8k(text: str) -> str | None:
    """Text after the last ``####`` of ``text``, to the end of its line (None when absent or empty)."""
    matches = _GSM8K_RE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer or None


def extract_answer(text: str, answer_format: str = "boxed") -> str | None:
    """The response's final answer: the last box, else the last ``####`` line, else None; with
    ``answer_format="flexible"``, else the number after the last "answer is", else the last number."""
    boxed = extract_boxed(text)
    answer = boxed if boxed is not None else extract_gsm8k(text)
    if answer is not None or answer_format == "boxed":
        return answer
    if answer_format != "flexible":
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    return extract_last_number(text)


def extract_last_number(text: str) -> str | None:
    """The number after the last "answer is" / "answer:", else the last number of ``text`` (thousands commas and a
    trailing full stop dropped), else None."""
    stated = _ANSWER_IS_RE.findall(text)
    numbers = stated or _NUMBER_RE.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".") or None


def vote_key(answer: str) -> str:
    """How answers are grouped for majority voting: the same text up to spacing and ``\\left``/``\\right``,
    ``\\dfrac``/``\\tfrac`` written as ``\\frac``. Equivalent answers written differently (``0.5`` and ``\\frac12``)
    are different votes; the vote's winner is then graded like any answer."""
    key = _VOTE_DROP_RE.sub("", answer)
    return key.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
