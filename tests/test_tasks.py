import hashlib
import itertools
import re
import threading
from collections import Counter
from pathlib import Path

import pytest

from topr.config import TaskConfig
from topr.records import RecordError
from topr.tasks import ANSWER_INSTRUCTION, SPLITS, Task, get_task, last_number, normalize_number, numbers_equal
from topr.tasks.arithmetic import LEVELS, ArithmeticTask, split_of
from topr.tasks.dataset import DatasetTask
from topr.tasks.gsm8k import Gsm8kTask
from topr.tasks.jsonl import EXACT_INSTRUCTION, JsonlTask
from topr.tasks.math_task import BOXED_INSTRUCTION, MathTask, last_boxed
from topr.tasks.verifier import VerifierTask

from helpers import write_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K = FIXTURES / "gsm8k.jsonl"
MATH = FIXTURES / "math.jsonl"
GENERIC = FIXTURES / "generic.jsonl"
MALFORMED = FIXTURES / "malformed.jsonl"
INSTRUCTION = "End your reply with 'Answer: <number>'."


# --- get_task -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("arithmetic", ArithmeticTask),
        ("gsm8k", Gsm8kTask),
        ("math", MathTask),
        ("jsonl", JsonlTask),
        ("dataset", DatasetTask),
    ],
)
def test_get_task_builds_each_task(name, kind):
    task = get_task(TaskConfig(name=name, train_path=str(GSM8K), eval_path=str(GSM8K)))
    assert isinstance(task, kind) and task.name == name


def test_unknown_task_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown task 'nope' \\(choices: arithmetic, dataset, gsm8k, jsonl, math, verifier\\)"):
        get_task(TaskConfig.model_construct(name="nope"))


def test_unknown_level_lists_the_levels():
    with pytest.raises(ValueError, match="'hardest'.*easy.*add_sub_2digit"):
        get_task(TaskConfig(level="hardest"))


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="'dev'"):
        ArithmeticTask().problems("dev", 5, 0)


# --- prompt format --------------------------------------------------------------------------


class Colours(Task):
    """A task defined here (no name: not registered) that sets an instruction and nothing else about its prompts."""

    instruction = "Finish with 'Colour: <name>'."

    def problems(self, split, size, seed):
        return [{"prompt_id": "sky", "prompt": self.prompt_for("Which colour is the sky?"), "reference": "blue"}][:size]

    def extract(self, completion):
        return completion.rpartition("Colour:")[2].strip() or None

    def is_correct(self, extracted, reference):
        return extracted.lower() == reference


def test_a_task_writes_its_instruction_on_the_prompts_last_line_and_takes_it_off_again():
    task = Colours()
    (problem,) = task.problems("train", 1, 0)
    assert problem["prompt"] == "Which colour is the sky?\nFinish with 'Colour: <name>'."
    assert task.question_text(problem["prompt"]) == "Which colour is the sky?"
    assert task.question_text(problem["prompt"] + " \n") == "Which colour is the sky?"
    # Only a last line that is the instruction is taken off.
    for prompt in (
        "Which colour is the sky?",
        "Finish with 'Colour: <name>'.\nWhich colour is the sky?",
        "Sky?\nFinish with 'Colour: <name>'. Or not.",
    ):
        assert task.question_text(prompt) == prompt


def test_a_task_without_a_strict_format_of_its_own_reads_both_extractions_alike():
    task = Colours()
    assert task.extract_strict("Colour: blue") == task.extract_as("strict", "Colour: blue") == "blue"
    assert task.extract_as("flexible", "Colour: blue") == "blue"


def test_an_unknown_extraction_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown extraction 'loose' \\(choices: flexible, strict\\)"):
        Colours().extract_as("loose", "Colour: blue")


def test_a_task_without_an_instruction_leaves_its_prompts_as_they_are():
    task = Colours()
    task.instruction = ""
    assert task.prompt_for("Which colour is the sky?") == "Which colour is the sky?"
    assert task.question_text("Which colour is the sky?\n") == "Which colour is the sky?\n"


@pytest.mark.parametrize(
    ("kind", "instruction"),
    [
        (ArithmeticTask(), ANSWER_INSTRUCTION),
        (Gsm8kTask(None, None), ANSWER_INSTRUCTION),
        (MathTask(None, None), BOXED_INSTRUCTION),
        (JsonlTask(None, None), ANSWER_INSTRUCTION),
        (JsonlTask(None, None, match="exact"), EXACT_INSTRUCTION),
        (DatasetTask(None, None), ANSWER_INSTRUCTION),
        (DatasetTask(None, None, match="exact"), EXACT_INSTRUCTION),
        (VerifierTask(None, None), ""),
    ],
)
def test_each_task_knows_its_instruction(kind, instruction):
    assert kind.instruction == instruction


# --- arithmetic -----------------------------------------------------------------------------


def solve(prompt: str) -> tuple[str, int]:
    """The problem's arithmetic and its answer, worked out from the prompt text alone."""
    question = prompt.removesuffix("\n" + INSTRUCTION)
    expression = re.search(r"[\d(][\d\s+\-*()]*[\d)]", question)
    if question.startswith(("What is", "Calculate", "Compute")):
        return expression.group(), eval(expression.group())  # only digits, spaces, + - * ( )
    # A word problem: a starting amount, then "<n> more" to gain n, any other number to lose it.
    (start, _), *steps = re.findall(r"(\d+)( more)?", question)
    answer = int(start)
    for number, more in steps:
        answer += int(number) if more else -int(number)
    return " ".join([start] + [("+" if more else "-") + number for number, more in steps]), answer


def test_levels_include_the_documented_ones():
    assert {"easy", "add_sub_2digit", "two_step", "mixed"} <= set(LEVELS)
    assert all(level.description for level in LEVELS.values())


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_generated_answers_are_right_and_the_three_splits_never_overlap(level):
    task = ArithmeticTask(level)
    by_split = {split: task.problems(split, 400, seed=0) for split in SPLITS}
    for records in by_split.values():
        for record in records:
            assert record["prompt"].endswith("\n" + INSTRUCTION)
            assert int(record["reference"]) == solve(record["prompt"])[1]
    for first, second in itertools.combinations(SPLITS, 2):
        assert not {r["prompt"] for r in by_split[first]} & {r["prompt"] for r in by_split[second]}
        assert not {solve(r["prompt"])[0] for r in by_split[first]} & {solve(r["prompt"])[0] for r in by_split[second]}
    for split, records in by_split.items():
        ids = [r["prompt_id"] for r in records]
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(rf"arithmetic-{level}-{split}-\d{{5}}", i) for i in ids)


def test_the_split_shares_are_about_30_15_55_and_test_is_the_earlier_two_way_test_set():
    problems = [p for level in LEVELS.values() for p in level.enumerate()]
    shares = Counter(split_of(p.expression) for p in problems)
    assert abs(shares["test"] / len(problems) - 0.30) < 0.01
    assert abs(shares["validation"] / len(problems) - 0.15) < 0.01
    # The two-way split held out the expressions whose hash bucket is below 30: the same ones.
    earlier_test = {p.expression for p in problems if int.from_bytes(hashlib.sha256(p.expression.encode()).digest()[:8], "big") % 100 < 30}
    assert earlier_test == {p.expression for p in problems if split_of(p.expression) == "test"}


def test_one_step_has_a_test_set_of_more_than_500_of_easys_kind_of_problem_and_none_of_easys():
    task = ArithmeticTask("one_step")
    test = task.problems("test", 10_000, seed=0)
    assert len(test) > 500
    easy = {r["prompt"] for split in SPLITS for r in ArithmeticTask("easy").problems(split, 10_000, 0)}
    assert not easy & {r["prompt"] for split in SPLITS for r in task.problems(split, 10_000, 0)}
    for record in test:
        start, change = map(int, re.findall(r"\d+", record["prompt"]))
        assert 2 <= start <= 60 and 1 <= change <= 20 and int(record["reference"]) >= 0


def test_easy_problems_are_one_step_within_range_and_never_negative():
    task = ArithmeticTask("easy")
    everything = [record for split in SPLITS for record in task.problems(split, 10_000, 0)]
    # 19 starts x 9 changes additions, plus the subtractions that stay >= 0.
    assert len(everything) == 19 * 9 + sum(1 for a in range(2, 21) for b in range(1, 10) if b <= a)
    for record in everything:
        start, change = map(int, re.findall(r"\d+", record["prompt"]))
        assert 2 <= start <= 20 and 1 <= change <= 9
        assert int(record["reference"]) >= 0


def test_mixed_level_has_negative_answers_and_multiplication():
    records = ArithmeticTask("mixed").problems("train", 300, 0)
    assert any(int(r["reference"]) < 0 for r in records)
    assert all("*" in r["prompt"] for r in records)


def test_arithmetic_is_deterministic_by_seed():
    task = ArithmeticTask("add_sub_2digit")
    first = task.problems("test", 50, seed=3)
    assert first == ArithmeticTask("add_sub_2digit").problems("test", 50, seed=3)
    assert first != task.problems("test", 50, seed=4)
    assert task.problems("test", 20, seed=3) == first[:20]


def test_a_prompt_id_always_means_the_same_prompt():
    task = ArithmeticTask("two_step")
    by_id = {r["prompt_id"]: r for r in task.problems("train", 3000, seed=1)}
    for record in task.problems("train", 3000, seed=2):
        if record["prompt_id"] in by_id:
            assert by_id[record["prompt_id"]] == record


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("12 + 7 = 19\nAnswer: 19", "19"),
        ("**Answer:** 19", "19"),
        ("Answer: **19**.", "19"),
        ("**Answer**: 19", "19"),
        ("answer: 1,234.", "1234"),
        ("Answer: -5", "-5"),
        ("Answer: +5", "5"),
        ("Answer: $12.00", "12"),
        ("Answer: 12 apples", "12"),
        ("Answer:\n  12", "12"),
        ("Answer: 3\nWait, no.\nAnswer: 4", "4"),
        ("So Tom has 19 apples.", "19"),
        ("12 + 7 = 19 apples, so 19.", "19"),
        ("Answer: I am not sure", None),
        ("Answer: 7\nAnswer: unsure", "7"),
        ("I cannot count apples.", None),
        ("", None),
    ],
)
def test_arithmetic_extraction(completion, expected):
    assert ArithmeticTask().extract(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("12 + 7 = 19\nAnswer: 19", "19"),
        ("**Answer:** 19", "19"),
        ("Answer: **19**.", "19"),
        ("Answer:\n  12", "12"),
        ("Answer: $1,234.00", "1234"),
        ("Answer: 3\nWait, no.\nAnswer: 4", "4"),
        ("Answer: 7\nAnswer: unsure", "7"),
        ("So Tom has 19 apples.", None),
        ("Answer: about 19", None),
        ("The answer is 19.", None),
    ],
)
def test_arithmetic_strict_extraction_reads_only_the_answer_line(completion, expected):
    assert ArithmeticTask().extract_strict(completion) == expected


def test_arithmetic_checker_compares_numbers():
    task = ArithmeticTask()
    assert task.is_correct("12.0", "12")
    assert task.is_correct("-5", "-5")
    assert not task.is_correct("5", "-5")


# --- number normalisation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000.00", "1000"),
        ("$5", "5"),
        ("3.50", "3.5"),
        ("1000.", "1000"),
        ("-0", "0"),
        ("\u22123", "-3"),
        ("+7", "7"),
        ("abc", None),
        ("nan", None),
        ("", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_numbers_equal():
    assert numbers_equal("1,000.00", "1000")
    assert numbers_equal("$5", "5")
    assert numbers_equal("3.50", "3.5")
    assert not numbers_equal("3.5", "35")
    assert not numbers_equal("abc", "abc")


def test_huge_exponents_are_numbers_not_overflow_errors():
    """A completion saying "1e999999999" is scored, not a crash of the verify stage."""
    assert normalize_number("1e999999999") == "1e999999999"
    assert normalize_number("-2.50E+100000000000") == "-25e99999999999"
    assert normalize_number("1e-999999999") == "1e-999999999"
    assert numbers_equal("1e999999999", "10e999999998")
    assert normalize_number("1.5e-2") == "0.015" and normalize_number("1e3") == "1000"


def test_long_numbers_compare_every_digit():
    """Decimal's 28-digit context must not round two different answers into one."""
    assert not numbers_equal("12345678901234567890123456789012", "12345678901234567890123456789000")
    assert numbers_equal("12345678901234567890123456789012", "12,345,678,901,234,567,890,123,456,789,012.000")


def test_a_minus_between_numbers_is_not_a_sign():
    assert last_number("5-3=2") == "2"
    assert last_number("from 10-3") == "3"
    assert last_number("it is -3") == "-3"


# --- gsm8k ----------------------------------------------------------------------------------


def test_gsm8k_reads_questions_and_references():
    problems = Gsm8kTask(str(GSM8K), None).problems("train", 10, seed=0)
    assert len(problems) == 5  # all of them: the file has fewer than asked
    by_id = {p["prompt_id"]: p for p in problems}
    assert [by_id[f"gsm8k-{i}"]["reference"] for i in range(5)] == ["6", "120", "1,200", "7", "150"]
    assert by_id["gsm8k-0"]["prompt"].startswith("A baker makes 24 muffins")
    assert by_id["gsm8k-0"]["prompt"].endswith("\n" + INSTRUCTION)


def test_gsm8k_takes_a_seeded_sample_and_reads_eval_path_for_test(tmp_path):
    other = write_jsonl(tmp_path / "held_out.jsonl", [{"question": "Q?", "answer": "#### 3"}])
    task = Gsm8kTask(str(GSM8K), str(other))
    sample = task.problems("train", 3, seed=7)
    assert len(sample) == 3 and sample == task.problems("train", 3, seed=7)
    assert any(task.problems("train", 3, seed=other) != sample for other in range(8))
    assert task.problems("test", 3, seed=7) == [
        {"prompt_id": "held_out-0", "prompt": "Q?\n" + INSTRUCTION, "reference": "3"}
    ]
    with pytest.raises(ValueError, match="no 'validation' split.*task.eval_path"):
        task.problems("validation", 3, seed=7)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Answer: 72", "72"),
        ("48 + 24 = 72\n#### 72", "72"),
        ("#### 70\nAnswer: 72", "72"),
        ("Answer: none\n#### 5", "5"),
        ("Answer: $1,200.00", "1200"),
        ("It is 2 - 5 = -3 degrees, so the answer is -3.", "-3"),
        ("The final answer is $18.00", "18"),
        ("The answer is: **1,234** apples.", "1234"),
        ("She pays 18 dollars in all. The final answer is 18 dollars.", "18"),
        ("The discount is 25%, so the answer is 25%.", "25"),
        (r"So she pays $\boxed{18}$.", "18"),
        (r"In all: \boxed{\text{\$1{,}234}}", "1234"),
        (r"Maybe \boxed{3}, no: \boxed{4}", "4"),
        ("Answer: 5\nI hope this helps! Ask me about the other 2 or 3 problems.", "5"),
        ("Answer: 4. Wait, the answer is 5.", "5"),
        ("The answer is 5.\nAnswer: 4", "4"),
        ("Answer: 5\nThe answer is clear: 3 and 4 make 7.", "5"),
        ("They sold 72 clips.", "72"),
        ("They sold 72 clips. That is 1,000.5.", "1000.5"),
        ("I cannot tell.", None),
    ],
)
def test_gsm8k_flexible_extraction(completion, expected):
    """Marked answers (Answer:, ####, the answer is, \\boxed{}) win over other numbers, the last of
    them over earlier ones; with none, the last number counts."""
    assert Gsm8kTask(None, None).extract(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Answer: 72", "72"),
        ("**Answer:** $1,200.00", "1200"),
        ("Answer: -3.", "-3"),
        ("#### 70\nAnswer: 72", "72"),
        ("Answer: 5\nI hope this helps! Ask me about the other 2 or 3 problems.", "5"),
        ("It is 2 - 5 = -3 degrees, so the answer is -3.", None),
        ("The final answer is $18.00", None),
        (r"So she pays $\boxed{18}$.", None),
        ("48 + 24 = 72\n#### 72", None),
        ("They sold 72 clips.", None),
    ],
)
def test_gsm8k_strict_extraction_reads_only_the_instructed_answer_line(completion, expected):
    assert Gsm8kTask(None, None).extract_strict(completion) == expected


def test_gsm8k_checker_normalises_numbers():
    task = Gsm8kTask(None, None)
    assert task.is_correct(task.extract("Answer: $1,200.00"), "1,200")
    assert task.is_correct("3.50", "3.5")
    assert not task.is_correct("1201", "1,200")


def test_gsm8k_answer_without_hashes_is_an_error(tmp_path):
    rows = [{"question": "Q", "answer": "#### 1"}, {"question": "Q", "answer": "2"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RecordError, match=r"bad\.jsonl: record 2: answer does not end in '####"):
        Gsm8kTask(str(path), None).problems("train", 5, 0)


def test_malformed_line_is_named_with_file_and_line():
    with pytest.raises(RecordError, match=r"malformed\.jsonl:3: not valid JSON"):
        Gsm8kTask(str(MALFORMED), None).problems("train", 5, 0)


def test_missing_field_is_named_with_file_and_line(tmp_path):
    rows = [{"question": "Q", "answer": "#### 1"}, {"question": "Q"}]
    path = write_jsonl(tmp_path / "short.jsonl", rows)
    with pytest.raises(RecordError, match=r"short\.jsonl:2: .*missing required field\(s\) answer"):
        Gsm8kTask(str(path), None).problems("train", 5, 0)


def test_missing_file_is_said_plainly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: .*nowhere.jsonl"):
        Gsm8kTask(str(tmp_path / "nowhere.jsonl"), None).problems("train", 5, 0)


def test_missing_path_names_the_option():
    with pytest.raises(ValueError, match="task.eval_path"):
        Gsm8kTask(str(GSM8K), None).problems("test", 5, 0)


# --- math -----------------------------------------------------------------------------------


def test_math_references_are_the_last_boxed_answers():
    problems = MathTask(str(MATH), None).problems("train", 10, seed=0)
    references = {p["prompt_id"]: p["reference"] for p in problems}
    assert references == {
        "math-0": r"\frac{1}{2}",
        "math-1": r"2\sqrt{2}",
        "math-2": r"\frac{\sqrt{3}}{2}",
        "math-3": "5",
        "math-4": "9",
    }
    assert all(p["prompt"].endswith("\\boxed{}.") for p in problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{ 2 }", "2"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{3}", "3"),
        (r"\boxed{}", None),
        (r"\boxed{\frac{1}{2}", None),
        ("The answer is 5.", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("0.5", r"\frac{1}{2}", True),
        (r"\dfrac12", r"\frac{1}{2}", True),
        (r"\sqrt{8}", r"2\sqrt{2}", True),
        (r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}", True),
        (r"\frac{1}{3}", r"\frac{1}{2}", False),
        ("4", "5", False),
    ],
)
def test_math_answers_compared_for_equivalence(answer, reference, expected):
    assert MathTask(None, None).is_correct(answer, reference) is expected


def test_math_checker_works_outside_the_main_thread():
    results = []
    task = MathTask(None, None)
    worker = threading.Thread(target=lambda: results.append(task.is_correct("0.5", r"\frac{1}{2}")))
    worker.start()
    worker.join()
    assert results == [True]


def test_math_extraction_takes_the_last_boxed():
    task = MathTask(None, None)
    assert task.extract(r"Maybe \boxed{3}. No: the answer is $\boxed{\sqrt{8}}$.") == r"\sqrt{8}"
    assert task.extract("I think it is 5.") is None


@pytest.mark.parametrize(
    ("completion", "flexible", "strict"),
    [
        (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}", r"\frac{1}{2}"),
        (r"So the answer is $\frac{1}{2}$.", r"\frac{1}{2}", None),
        ("The final answer is 5.", "5", None),
        ("The answer is **5**", "5", None),
        (r"First \boxed{3}. Hmm, the answer is $4$, I think.", "4", "3"),
        (r"The answer is 4. Checking: $\boxed{\sqrt{8}}$", r"\sqrt{8}", r"\sqrt{8}"),
        ("The answer is positive since x > 0.", None, None),
        ("I think it is 5.", None, None),
    ],
)
def test_math_extractions(completion, flexible, strict):
    task = MathTask(None, None)
    assert (task.extract(completion), task.extract_strict(completion)) == (flexible, strict)


def test_math_solution_without_boxed_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "nobox.jsonl", [{"problem": "P", "solution": "It is 5."}])
    with pytest.raises(RecordError, match=r"nobox\.jsonl: record 1: solution has no \\boxed"):
        MathTask(str(path), None).problems("train", 5, 0)


# --- generic jsonl --------------------------------------------------------------------------


def test_jsonl_uses_the_configured_fields_and_ids():
    config = TaskConfig(
        name="jsonl",
        train_path=str(GENERIC),
        eval_path=str(GENERIC),
        prompt_field="text",
        answer_field="target",
    )
    problems = {p["prompt_id"]: p for p in get_task(config).problems("test", 10, 0)}
    assert set(problems) == {"meaning", "generic-1", "generic-2", "cold"}
    assert problems["meaning"] == {
        "prompt_id": "meaning",
        "prompt": "What is six times seven?\n" + INSTRUCTION,
        "reference": "42",
    }


def test_jsonl_missing_configured_field_is_named():
    task = JsonlTask(str(GENERIC), None, prompt_field="question", answer_field="target")
    with pytest.raises(RecordError, match=r"generic\.jsonl:1: .*missing required field\(s\) question"):
        task.problems("train", 5, 0)


def test_jsonl_numeric_answer_must_be_a_number(tmp_path):
    path = write_jsonl(tmp_path / "words.jsonl", [{"prompt": "Capital?", "answer": "Paris"}])
    with pytest.raises(RecordError, match=r"words\.jsonl: record 1: answer 'Paris' is not a num"):
        JsonlTask(str(path), None).problems("train", 5, 0)


def test_jsonl_duplicate_ids_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "twice.jsonl", [{"id": "a", "prompt": "P", "answer": 1}] * 2)
    with pytest.raises(RecordError, match=r"twice\.jsonl: record 2: id 'a' is used twice"):
        JsonlTask(str(path), None).problems("train", 5, 0)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("6 * 7 = 42\nAnswer: 42.", "42"),
        ("Answer: 40 + 2 = 42", "40"),
        ("6 * 7 is 42, so 42 it is", "42"),
        ("Answer: not sure. Maybe 41", "41"),
        ("no idea", None),
    ],
)
def test_jsonl_numeric_extraction(completion, expected):
    assert JsonlTask(None, None).extract(completion) == expected


def test_jsonl_strict_extraction_reads_only_the_answer_line():
    assert JsonlTask(None, None).extract_strict("6 * 7 = 42\nAnswer: 42.") == "42"
    assert JsonlTask(None, None).extract_strict("6 * 7 is 42, so 42 it is") is None
    exact = JsonlTask(None, None, match="exact")
    assert exact.extract_strict("It is in France.\n**Answer:** Paris\nHope this helps.") == "Paris"
    assert exact.extract_strict("  Paris \n") is None
    assert exact.extract_strict("Answer:   ") is None


def test_jsonl_exact_match(tmp_path):
    rows = [{"prompt": "Capital of France?", "answer": " Paris "}]
    path = write_jsonl(tmp_path / "capitals.jsonl", rows)
    task = JsonlTask(str(path), None, match="exact")
    [problem] = task.problems("train", 5, 0)
    assert problem["reference"] == "Paris"
    assert problem["prompt"] == "Capital of France?\nEnd your reply with 'Answer: <answer>'."
    assert task.extract("It is in France.\n**Answer:** Paris\nHope this helps.") == "Paris"
    assert task.extract("  Paris \n") == "Paris"
    assert task.extract("Answer:   ") is None
    assert task.is_correct("Paris", "Paris")
    assert not task.is_correct("paris", "Paris")
