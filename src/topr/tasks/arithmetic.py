"""Generated arithmetic problems with integer answers, at several difficulty levels.

Each level enumerates every problem it can pose (a few hundred to a few ten thousand). A problem's
split is fixed by a hash of its canonical expression ("12 + 7"): about 30 % are held out as
"test", about 15 % as "validation" and the rest are "train", so no sum is in two splits, whatever
its wording and whichever level poses it. Its wording is fixed too, drawn from the templates with
the expression as seed, and its prompt id is its position among the split's problems, so an id
always means the same prompt.

``problems(split, size, seed)`` shuffles the split's problems with ``seed`` and keeps the first
``size``; a level with fewer problems in the split gives all of them ("easy" has 108 test, 44
validation and 162 train problems; "one_step", which leaves out easy's sums, 543, 269 and 1,063; the others have thousands).
The test problems are those of the two-way split that came before (hash bucket < 30), so results
measured on them stand; validation was carved from what was train.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

from topr.tasks import (
    ANSWER_INSTRUCTION,
    ANSWER_MARKER,
    Task,
    answer_line_number,
    check_split,
    last_number,
    number_after,
    numbers_equal,
)

TEST_PERCENT = 30
VALIDATION_PERCENT = 15


@dataclass(frozen=True)
class Problem:
    expression: str  # canonical arithmetic ("12 + 7 - 5"): decides the split and seeds the wording
    answer: int
    numbers: tuple[int, ...]
    operators: tuple[str, ...]


@dataclass(frozen=True)
class Level:
    description: str
    enumerate: Callable[[], Iterator[Problem]]
    render: Callable[[Problem, random.Random], str]


def _chain(numbers: tuple[int, ...], operators: tuple[str, ...]) -> Problem:
    """Additions and subtractions applied left to right."""
    answer = numbers[0]
    expression = str(numbers[0])
    for operator, number in zip(operators, numbers[1:]):
        answer += number if operator == "+" else -number
        expression += f" {operator} {number}"
    return Problem(expression, answer, numbers, operators)


def _one_step() -> Iterator[Problem]:
    for start in range(2, 21):
        for change in range(1, 10):
            yield _chain((start, change), ("+",))
            if change <= start:
                yield _chain((start, change), ("-",))


def _one_step_wide() -> Iterator[Problem]:
    """easy's kind of problem over wider ranges, without easy's own sums: a test set of more than
    500 problems that shares none with easy's, on which earlier choices were made."""
    easy = {problem.expression for problem in _one_step()}
    for start in range(2, 61):
        for change in range(1, 21):
            for operator in ("+", "-"):
                problem = _chain((start, change), (operator,))
                if problem.answer >= 0 and problem.expression not in easy:
                    yield problem


def _two_step() -> Iterator[Problem]:
    for start in range(2, 31):
        for first in range(1, 16):
            for second in range(1, 16):
                for operators in (("+", "+"), ("+", "-"), ("-", "+"), ("-", "-")):
                    problem = _chain((start, first, second), operators)
                    halfway = start + (first if operators[0] == "+" else -first)
                    if halfway >= 0 and problem.answer >= 0:
                        yield problem


def _two_digit() -> Iterator[Problem]:
    for first in range(10, 100):
        for second in range(10, 100):
            yield _chain((first, second), ("+",))
            if second <= first:
                yield _chain((first, second), ("-",))


def _mixed() -> Iterator[Problem]:
    """Multiplication with addition or subtraction; "a - b * c" makes some answers negative."""
    for a in range(2, 13):
        for b in range(2, 13):
            for c in range(1, 31):
                yield Problem(f"{a} * {b} + {c}", a * b + c, (a, b, c), ("*", "+"))
                yield Problem(f"{a} * {b} - {c}", a * b - c, (a, b, c), ("*", "-"))
    for a in range(1, 21):
        for b in range(1, 21):
            for c in range(2, 10):
                yield Problem(f"({a} + {b}) * {c}", (a + b) * c, (a, b, c), ("+", "*"))
    for a in range(1, 31):
        for b in range(2, 10):
            for c in range(2, 10):
                yield Problem(f"{a} - {b} * {c}", a - b * c, (a, b, c), ("-", "*"))


_NAMES = (("Tom", "He"), ("Anna", "She"), ("Ravi", "He"), ("Mia", "She"), ("Leo", "He"),
          ("Sara", "She"), ("Ken", "He"), ("Lucy", "She"), ("Omar", "He"), ("Ines", "She"))
_OBJECTS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "shells")
# Story frames: opening, who acts, ways to gain, ways to lose, question. Every gain says
# "<n> more" and no loss does.
_FRAMES = (
    (
        "{name} has {start} {thing}.",
        "{pronoun}",
        ("buys {n} more", "finds {n} more", "gets {n} more from a friend"),
        ("gives away {n}", "loses {n}", "gives {n} to a friend"),
        "How many {thing} does {name} have now?",
    ),
    (
        "There are {start} {thing} in a box.",
        "{name}",
        ("puts {n} more in the box", "adds {n} more to the box"),
        ("takes {n} out of the box", "removes {n} from the box"),
        "How many {thing} are in the box now?",
    ),
)


def _story(problem: Problem, rng: random.Random) -> str:
    """A word problem: a starting amount, then one gain or loss per operator."""
    opening, actor, gains, losses, question = rng.choice(_FRAMES)
    name, pronoun = rng.choice(_NAMES)
    steps = [
        rng.choice(gains if operator == "+" else losses).format(n=number)
        for operator, number in zip(problem.operators, problem.numbers[1:])
    ]
    thing = rng.choice(_OBJECTS)
    words = {"name": name, "pronoun": pronoun, "start": problem.numbers[0], "thing": thing}
    sentence = f"{actor} {' and then '.join(steps)}.".format(**words)
    return " ".join((opening.format(**words), sentence, question.format(**words)))


def _expression(problem: Problem, rng: random.Random) -> str:
    return rng.choice(("What is {}?", "Calculate {}.", "Compute {}.")).format(problem.expression)


LEVELS: dict[str, Level] = {
    "easy": Level(
        "one-step word problems: 2-20 plus or minus 1-9, never below zero", _one_step, _story
    ),
    "one_step": Level(
        "one-step word problems as easy's, wider and none of easy's: 2-60 plus or minus 1-20, never below zero",
        _one_step_wide,
        _story,
    ),
    "add_sub_2digit": Level(
        "two-digit addition and subtraction, never below zero", _two_digit, _expression
    ),
    "two_step": Level(
        "two-step word problems: 2-30, then two gains or losses of 1-15", _two_step, _story
    ),
    "mixed": Level(
        "multiplication with addition or subtraction; answers may be negative", _mixed, _expression
    ),
}


def split_of(expression: str) -> str:
    """"test" for about TEST_PERCENT % of expressions, "validation" for the next VALIDATION_PERCENT %,
    "train" for the rest, decided by a hash."""
    digest = hashlib.sha256(expression.encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "validation" if bucket < TEST_PERCENT + VALIDATION_PERCENT else "train"


@cache
def _pool(level: str, split: str) -> tuple[Problem, ...]:
    problems = LEVELS[level].enumerate()
    return tuple(problem for problem in problems if split_of(problem.expression) == split)


class ArithmeticTask(Task):
    name = "arithmetic"
    instruction = ANSWER_INSTRUCTION

    @classmethod
    def from_config(cls, config) -> ArithmeticTask:
        return cls(config.level)

    def __init__(self, level: str = "easy"):
        if level not in LEVELS:
            raise ValueError(f"unknown arithmetic level {level!r} (choices: {', '.join(LEVELS)})")
        self.level = level

    def problems(self, split: str, size: int, seed: int) -> list[dict[str, str]]:
        check_split(split)
        pool = _pool(self.level, split)
        order = list(range(len(pool)))
        random.Random(f"{self.level}-{split}-{seed}").shuffle(order)
        return [self._record(split, index, pool[index]) for index in order[:size]]

    def _record(self, split: str, index: int, problem: Problem) -> dict[str, str]:
        question = LEVELS[self.level].render(problem, random.Random(problem.expression))
        return {
            "prompt_id": f"arithmetic-{self.level}-{split}-{index:05d}",
            "prompt": self.prompt_for(question),
            "reference": str(problem.answer),
        }

    def extract(self, completion: str) -> str | None:
        """The number after the last "Answer:", else the completion's last number; None if none.

        Small models often state the right result without the requested "Answer:" line;
        falling back to the last number (the usual GSM8K convention) scores the arithmetic,
        not the formatting. A completion with no number at all is unparsable.
        """
        return number_after(ANSWER_MARKER, completion) or last_number(completion)

    def extract_strict(self, completion: str) -> str | None:
        """The number of the last "Answer: <number>" line, as the prompt asks; None without one."""
        return answer_line_number(completion)

    def is_correct(self, extracted: str, reference: str) -> bool:
        return numbers_equal(extracted, reference)
