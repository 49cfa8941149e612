import copy
from pathlib import Path

import pytest

from topr.config import TaskConfig
from topr.records import SCHEMA_VERSION, RecordError, read_records, write_records
from topr.rewards import Reward, RewardError
from topr.tasks.arithmetic import ArithmeticTask
from topr.tasks.gsm8k import Gsm8kTask
from topr.tasks.math_task import MathTask
from topr.verify import run_verify, verify_records


def completion(prompt_id: str, reference: str, text: str, **extra) -> dict:
    return {"prompt_id": prompt_id, "reference": reference, "completion": text, **extra}


RECORDS = [
    completion("p1", "19", "7 + 12 = 19\nAnswer: 19", sample_index=0, behavior_logprobs=[-0.5, -1.5]),
    completion("p1", "19", "Answer: 18", sample_index=1, behavior_logprobs=[-2.0]),
    completion("p2", "5", "I do not know.", sample_index=0, behavior_logprobs=[]),
    completion("p2", "5", "Answer: **5**.", sample_index=1, behavior_logprobs=[-0.1]),
    completion("p3", "-3", "Answer: 3", sample_index=0, behavior_logprobs=[-0.3]),
    completion("p3", "-3", "Answer:", sample_index=1, behavior_logprobs=[-0.4]),
]


def test_verify_records_adds_verdicts_and_rewards():
    verified, _ = verify_records(RECORDS, ArithmeticTask())
    assert [(r["extracted"], r["correct"], r["reward"]) for r in verified] == [
        ("19", True, 1.0),
        ("18", False, -1.0),
        (None, False, -1.0),
        ("5", True, 1.0),
        ("3", False, -1.0),
        (None, False, -1.0),
    ]


def test_verify_records_summary():
    _, summary = verify_records(RECORDS, ArithmeticTask())
    assert summary == {
        "count": 6,
        "correct": 2,
        "accuracy": pytest.approx(2 / 6),
        "unparsable": 2,
        "unparsable_rate": pytest.approx(2 / 6),
        "prompts": 3,
        "prompts_with_a_correct": 2,
        "mean_reward": pytest.approx(-2 / 6),
    }


def test_other_fields_pass_through_and_input_is_not_changed():
    before = copy.deepcopy(RECORDS)
    verified, _ = verify_records(RECORDS, ArithmeticTask())
    assert RECORDS == before
    for original, record in zip(RECORDS, verified):
        assert {key: record[key] for key in original} == original
        assert set(record) == set(original) | {"extracted", "correct", "reward"}


def test_verify_records_of_nothing():
    verified, summary = verify_records([], ArithmeticTask())
    assert verified == []
    assert summary["count"] == 0
    assert summary["accuracy"] == 0.0 and summary["unparsable_rate"] == 0.0


def test_a_numeric_reference_that_is_not_a_string_is_accepted():
    verified, _ = verify_records([completion("p", 7, "Answer: 7")], ArithmeticTask())
    assert verified[0]["correct"] is True


def test_verify_with_math_equivalence():
    records = [
        completion("m1", r"\frac{1}{2}", r"So it is $\boxed{0.5}$."),
        completion("m1", r"\frac{1}{2}", r"So it is $\boxed{\frac{1}{3}}$."),
        completion("m2", r"2\sqrt{2}", r"$\boxed{\sqrt{8}}$"),
        completion("m2", r"2\sqrt{2}", "about 2.83"),
    ]
    verified, summary = verify_records(records, MathTask(None, None))
    assert [r["correct"] for r in verified] == [True, False, True, False]
    assert summary["unparsable"] == 1 and summary["prompts_with_a_correct"] == 2


WRITTEN_AS_MODELS_DO = [
    completion("g1", "-3", "It is 2 - 5 = -3 degrees, so the answer is -3."),
    completion("g2", "18", "3 shirts at $6 each. The final answer is $18.00"),
    completion("g3", "18", "3 * 6 = 18\nAnswer: 18"),
]


def test_flexible_extraction_reads_answers_as_models_write_them_and_strict_only_the_instructed_line():
    flexible, _ = verify_records(WRITTEN_AS_MODELS_DO, Gsm8kTask(None, None))
    strict, summary = verify_records(WRITTEN_AS_MODELS_DO, Gsm8kTask(None, None), "strict")
    assert [(r["extracted"], r["reward"]) for r in flexible] == [("-3", 1.0), ("18", 1.0), ("18", 1.0)]
    assert [(r["extracted"], r["reward"]) for r in strict] == [(None, -1.0), (None, -1.0), ("18", 1.0)]
    assert summary["unparsable"] == 2


def test_run_verify_uses_the_configured_extraction(tmp_path: Path):
    source = tmp_path / "sampled.jsonl"
    write_records(source, [{**record, "sample_index": 0} for record in WRITTEN_AS_MODELS_DO])
    for extraction, correct in (("flexible", 3), ("strict", 1)):
        summary = run_verify(TaskConfig(name="gsm8k", extraction=extraction), source, tmp_path / f"{extraction}.jsonl")
        assert summary["correct"] == correct


def test_run_verify_reads_and_writes_files(tmp_path: Path):
    source, target = tmp_path / "sampled.jsonl", tmp_path / "out" / "verified.jsonl"
    write_records(source, RECORDS)
    summary = run_verify(TaskConfig(name="arithmetic"), source, target)
    assert summary["count"] == 6 and summary["correct"] == 2
    written = read_records(target)
    assert [r["reward"] for r in written] == [1.0, -1.0, -1.0, 1.0, -1.0, -1.0]
    assert all(r["schema_version"] == SCHEMA_VERSION for r in written)
    assert written[0]["behavior_logprobs"] == [-0.5, -1.5]
    assert [p.name for p in target.parent.iterdir()] == ["verified.jsonl"]


def test_run_verify_names_a_missing_field(tmp_path: Path):
    source = tmp_path / "sampled.jsonl"
    write_records(source, [RECORDS[0], {"prompt_id": "p9", "reference": "1"}])
    with pytest.raises(RecordError, match=r"sampled\.jsonl:2: .*missing required field.*completion"):
        run_verify(TaskConfig(name="arithmetic"), source, tmp_path / "verified.jsonl")
    assert not (tmp_path / "verified.jsonl").exists()


# ----------------------------------------------------------------------------- rewards


def reward_file(tmp_path: Path, body: str) -> str:
    """A Python file defining ``body``; the ``task.reward_function`` that names its ``score``."""
    path = tmp_path / "rewards.py"
    path.write_text(body)
    return f"{path}:score"


LENGTH_PENALTY = """
def score(record, completion):
    record["completion"] = "changed"  # the function gets a copy
    return -min(1.0, len(completion) / 20)
"""


def test_the_default_reward_is_the_checkers_plus_or_minus_one_exactly(tmp_path: Path):
    source, target = tmp_path / "sampled.jsonl", tmp_path / "verified.jsonl"
    write_records(source, RECORDS)
    run_verify(TaskConfig(), source, target)
    assert [repr(r["reward"]) for r in read_records(target)] == ["1.0", "-1.0", "-1.0", "1.0", "-1.0", "-1.0"]


def test_a_reward_function_from_a_file_joins_the_checkers_verdict_weighted_and_clipped(tmp_path: Path):
    source, target = tmp_path / "sampled.jsonl", tmp_path / "verified.jsonl"
    write_records(source, RECORDS)
    config = TaskConfig(reward_function=reward_file(tmp_path, LENGTH_PENALTY), function_weight=0.5)
    summary = run_verify(config, source, target)
    written = read_records(target)
    # ±1 - 0.5 × min(1, characters / 20): 21 and 14 characters when correct, clipped at -1 when wrong.
    assert [r["reward"] for r in written] == pytest.approx([0.5, -1.0, -1.0, 0.65, -1.0, -1.0])
    assert [r["correct"] for r in written] == [True, False, False, True, False, False]  # the checker's verdict
    assert [r["completion"] for r in written] == [r["completion"] for r in RECORDS]
    assert summary["correct"] == 2 and summary["mean_reward"] == pytest.approx((0.5 + 0.65 - 4) / 6)


def test_the_function_gets_the_checked_record_and_the_completion(tmp_path: Path, monkeypatch):
    (tmp_path / "graded_reward.py").write_text(
        "def score(record, completion):\n"
        "    assert completion == record['completion'] and 'correct' in record and 'extracted' in record\n"
        "    return 0.5 if record['extracted'] is not None else -0.5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = Reward.from_config(TaskConfig(reward_function="graded_reward:score", correctness_weight=0.0))
    verified, _ = verify_records(RECORDS, ArithmeticTask(), reward=reward)
    assert [r["reward"] for r in verified] == [0.5, 0.5, -0.5, 0.5, 0.5, -0.5]


def test_the_format_term_rewards_the_instructed_format_and_weights_combine():
    def rewards(**weights):
        reward = Reward.from_config(TaskConfig(name="gsm8k", **weights))
        return [r["reward"] for r in verify_records(WRITTEN_AS_MODELS_DO, Gsm8kTask(None, None), reward=reward)[0]]

    # All three are correct (flexible); only the third says "Answer: 18" as instructed.
    assert rewards() == [1.0, 1.0, 1.0]
    assert rewards(format_weight=0.5) == [0.5, 0.5, 1.0]  # 1.5 is clipped to 1
    assert rewards(correctness_weight=0.5, format_weight=0.5) == [0.0, 0.0, 1.0]
    assert rewards(correctness_weight=0.0, format_weight=0.25) == [-0.25, -0.25, 0.25]


@pytest.mark.parametrize(
    "returned, problem",
    [
        ("math.nan", "returned nan: a reward is a finite number in [-1, 1]"),
        ("math.inf", "returned inf: a reward is a finite number in [-1, 1]"),
        ("1.5", "returned 1.5: a reward is a finite number in [-1, 1]"),
        ("-1.01", "returned -1.01: a reward is a finite number in [-1, 1]"),
        ("'0.5'", "returned '0.5': a reward is a finite number in [-1, 1]"),
        ("None", "returned None: a reward is a finite number in [-1, 1]"),
        ("True", "returned True: a reward is a finite number in [-1, 1]"),
        ("1 / 0", "raised ZeroDivisionError: division by zero"),
    ],
)
def test_a_bad_reward_stops_verify_naming_the_file_the_function_and_the_record(tmp_path: Path, returned, problem):
    function = reward_file(tmp_path, f"import math\n\ndef score(record, completion):\n    return 0.0 if record['prompt_id'] != 'p2' else {returned}\n")
    source, target = tmp_path / "sampled.jsonl", tmp_path / "verified.jsonl"
    write_records(source, RECORDS)
    with pytest.raises(RewardError) as caught:
        run_verify(TaskConfig(reward_function=function), source, target)
    assert str(caught.value) == f"{source}: task.reward_function {function} {problem} (prompt_id 'p2', sample_index 0)"
    assert not target.exists()


def test_any_real_number_in_range_is_a_reward(tmp_path: Path):
    function = reward_file(tmp_path, "import fractions\n\ndef score(record, completion):\n    return fractions.Fraction(1, 4)\n")
    reward = Reward.from_config(TaskConfig(reward_function=function, correctness_weight=0.5))
    verified, _ = verify_records(RECORDS[:1], ArithmeticTask(), reward=reward)
    assert verified[0]["reward"] == 0.75
