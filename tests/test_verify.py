import copy
from pathlib import Path

import pytest

from topr.config import TaskConfig
from topr.records import SCHEMA_VERSION, RecordError, read_records, write_records
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
