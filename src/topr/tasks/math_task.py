"""MATH: competition problems from local JSONL files in the MATH format.

Each record has ``problem`` and ``solution``; the reference is the content of the solution's last
``\\boxed{...}``. Files are read as ``topr.tasks.jsonl.FileTask`` describes. A completion's answer
is the content of its last ``\\boxed{...}``, as the prompt asks (the strict extraction), or,
flexibly, whichever comes last of that and "the (final) answer is <answer>" (a ``$...$`` span, or
one word that ends the sentence, so "the answer is positive since ..." states nothing). Answers
are compared for mathematical equivalence by math-verify (``\\frac{1}{2}`` == ``0.5``,
``2\\sqrt{2}`` == ``\\sqrt{8}``).

(The module is not called ``math`` so that it never stands in for the standard library's.)
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from topr.tasks import MarkedAnswer, last_marked_answer
from topr.tasks.jsonl import FileTask, record_error, record_id

BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."
# math-verify's time limit relies on SIGALRM, which Python allows only in the main thread.
TIMEOUT_SECONDS = 5
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
# "the (final) answer is", past a colon and markdown, then the answer: a $...$ span, or one word
# (lazily, so a closing "**" or period stays out) that ends its sentence or line.
_ANSWER_IS = re.compile(
    r"\banswer\s+is[\s:*_]*(\$[^$\n]+\$|[^\s$]+?)(?=[*_]*(?:[.,;!](?:\s|$)|[ \t]*$))",
    re.IGNORECASE | re.MULTILINE,
)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces kept) or ``\\boxed 5``; else None."""
    return boxed_answer(text)[1]


def boxed_answer(text: str) -> MarkedAnswer:
    """Where the last ``\\boxed`` starts (-1 without one) and its content as ``last_boxed`` reads it."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return -1, None
    rest = text[matches[-1].end() :].lstrip()
    if rest.startswith("{"):
        return matches[-1].start(), (_braced(rest) or "").strip() or None
    simple = re.match(r"[^\s${}]+", rest)
    return matches[-1].start(), simple.group() if simple else None


def _stated_answer(text: str) -> MarkedAnswer:
    """Where the last "the answer is <answer>" starts (-1 without one) and its answer, ``$`` taken off."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return -1, None
    return matches[-1].start(), matches[-1].group(1).strip("$").strip() or None


def _braced(text: str) -> str | None:
    """The content of the brace group ``text`` starts with; None if it never closes."""
    depth = 0
    escaped = False
    for position, character in enumerate(text):
        if escaped:
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return text[1:position]
    return None


def _timeout() -> int | None:
    """math-verify's time limit, or None (no limit) outside the main thread, where it would fail."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def equivalent(answer: str, reference: str) -> bool:
    """Whether two LaTeX answers are mathematically equal, according to math-verify."""
    if "".join(answer.split()) == "".join(reference.split()):
        return True
    from math_verify import parse, verify  # here: it imports sympy, which only checking needs

    timeout = _timeout()
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
    return verify(gold, predicted, timeout_seconds=timeout)


class MathTask(FileTask):
    name = "math"
    required_fields = ("problem", "solution")
    instruction = BOXED_INSTRUCTION

    def problem(self, record: dict[str, Any], path: Path, index: int) -> dict[str, str]:
        reference = last_boxed(str(record["solution"]))
        if reference is None:
            raise record_error(path, index, "solution has no \\boxed{...} answer")
        return {
            "prompt_id": record_id(record, path, index),
            "prompt": self.prompt_for(record["problem"]),
            "reference": reference,
        }

    def extract(self, completion: str) -> str | None:
        return last_marked_answer((boxed_answer(completion), _stated_answer(completion)))

    def extract_strict(self, completion: str) -> str | None:
        return last_boxed(completion)

    def is_correct(self, extracted: str, reference: str) -> bool:
        return equivalent(extracted, reference)
