import json
import logging

import pytest

from topr.config import Config, CurateConfig
from topr.curate import CurationError, curate, effective_positive_fraction, one_sided_warning, run_curate
from topr.records import RecordError, read_records, write_records

# prompt -> correctness of samples 0..3
CORRECTNESS = {
    "p0": [False, True, False, True],
    "p1": [True, True, True, True],
    "p2": [False, False, False, False],
}


def make_record(prompt_id, sample_index, correct, **fields):
    return {
        "prompt_id": prompt_id,
        "prompt": f"question {prompt_id}",
        "reference": "42",
        "prompt_token_ids": [1, 2, 3],
        "completion": f"answer {sample_index}",
        "completion_token_ids": [10 + sample_index] * (sample_index + 1),
        "behavior_logprobs": [-0.5] * (sample_index + 1),
        "sample_index": sample_index,
        "behavior_model": "sha:abc",
        "finish_reason": "stop",
        "extracted": "42" if correct else "7",
        "correct": correct,
        "reward": 1.0 if correct else -1.0,
        **fields,
    }


@pytest.fixture
def records():
    # Deliberately out of order: curation must not depend on input order.
    made = [
        make_record(prompt_id, index, correct)
        for prompt_id, flags in CORRECTNESS.items()
        for index, correct in enumerate(flags)
    ]
    return made[::-1]


def kept(curated):
    return [(record["prompt_id"], record["sample_index"]) for record in curated]


def test_effective_positive_fraction_values_and_limits():
    assert effective_positive_fraction(0.5, 0.0) == 0.5
    assert effective_positive_fraction(0.3, 0.0) == pytest.approx(0.3)
    assert effective_positive_fraction(0.5, 0.5) == pytest.approx(0.25)
    assert effective_positive_fraction(0.5, -0.5) == pytest.approx(0.75)
    for p in (0.01, 0.2, 0.5, 1.0):
        assert effective_positive_fraction(p, -1.0) == pytest.approx(1.0)
    for p in (0.0, 0.2, 0.5, 0.99):
        assert effective_positive_fraction(p, 1.0) == pytest.approx(0.0)
    # Degenerate: every weight is zero, the plain fraction is returned.
    assert effective_positive_fraction(1.0, 1.0) == 1.0
    assert effective_positive_fraction(0.0, -1.0) == 0.0
    with pytest.raises(ValueError):
        effective_positive_fraction(1.5, 0.0)


def test_anna_karenina_keeps_first_correct_and_all_incorrect(records):
    curated, report = curate(records, CurateConfig(), baseline=0.0)
    assert kept(curated) == [("p0", 0), ("p0", 1), ("p0", 2), ("p1", 0)] + [("p2", i) for i in range(4)]
    assert report["strategy"] == "anna_karenina"
    assert (report["input_count"], report["count"], report["positives"], report["negatives"]) == (12, 8, 2, 6)
    assert report["prompts"] == 3
    assert report["dropped"]["strategy"] == 4
    assert report["positive_fraction"] == 0.25
    assert report["mean_completion_tokens"] == pytest.approx((1 + 2 + 3 + 1 + 1 + 2 + 3 + 4) / 8)
    assert report["warnings"] == []


def test_all_keeps_everything_in_order(records):
    curated, report = curate(records, CurateConfig(strategy="all"), baseline=0.0)
    assert kept(curated) == [(p, i) for p in ("p0", "p1", "p2") for i in range(4)]
    assert (report["positives"], report["negatives"]) == (6, 6)


def test_uniform_draws_per_prompt_and_is_seeded(records):
    config = CurateConfig(strategy="uniform", uniform_per_prompt=2, seed=3)
    first, report = curate(records, config, baseline=0.0)
    again, _ = curate(list(reversed(records)), config, baseline=0.0)
    assert kept(first) == kept(again)
    assert report["count"] == 6 and report["dropped"]["strategy"] == 6
    for prompt_id in CORRECTNESS:
        assert sum(record["prompt_id"] == prompt_id for record in first) == 2
    assert first == sorted(first, key=lambda record: (record["prompt_id"], record["sample_index"]))
    draws = {tuple(kept(curate(records, config.model_copy(update={"seed": seed}), 0.0)[0])) for seed in range(10)}
    assert len(draws) > 1


def test_uniform_keeps_all_when_fewer_than_asked(records):
    curated, _ = curate(records, CurateConfig(strategy="uniform", uniform_per_prompt=9), baseline=0.0)
    assert len(curated) == 12


def test_filters_are_counted_by_first_reason(records):
    records[0]["completion"] = "   \n"
    records[1]["finish_reason"] = "length"
    records[2]["completion_token_ids"] = list(range(50))
    records[3]["completion"] = ""
    records[3]["finish_reason"] = "length"  # counted once, as empty
    del records[4]["finish_reason"]  # missing means "stop": kept
    config = CurateConfig(strategy="all", drop_truncated=True, max_completion_tokens=10)
    curated, report = curate(records, config, baseline=0.0)
    assert report["dropped"] == {"empty": 2, "truncated": 1, "too_long": 1, "strategy": 0, "rebalance": 0}
    assert report["count"] == 8
    assert records[4] in curated


def test_filters_off_keep_everything(records):
    records[0]["completion"] = ""
    records[1]["finish_reason"] = "length"
    _, report = curate(records, CurateConfig(strategy="all", drop_empty=False), baseline=0.0)
    assert report["count"] == 12


@pytest.mark.parametrize(
    ("target", "positives", "negatives"),
    [(0.25, 2, 6), (0.75, 6, 2), (0.5, 6, 6), (0.4, 4, 6), (0.1, 1, 6)],
)
def test_target_positive_fraction(records, target, positives, negatives):
    config = CurateConfig(strategy="all", target_positive_fraction=target, seed=1)
    curated, report = curate(records, config, baseline=0.0)
    assert (report["positives"], report["negatives"]) == (positives, negatives)
    assert report["dropped"]["rebalance"] == 12 - positives - negatives
    assert all(record in records for record in curated)
    assert curated == curate(records, config, baseline=0.0)[0]


def test_target_fraction_rounds_to_the_closest_count(records):
    # anna_karenina: 2 positives, 6 negatives; 0.4 wants 3 negatives (2/5 = 0.4).
    config = CurateConfig(target_positive_fraction=0.4)
    _, report = curate(records, config, baseline=0.0)
    assert (report["positives"], report["negatives"]) == (2, 3)
    # 0.3 wants 4.67 negatives: 5 gives 2/7 = 0.286, closer than 4 (2/6 = 0.333).
    _, report = curate(records, config.model_copy(update={"target_positive_fraction": 0.3}), baseline=0.0)
    assert (report["positives"], report["negatives"]) == (2, 5)


def test_target_fraction_unreachable_warns_and_keeps_all(records):
    only_negatives = [record for record in records if record["prompt_id"] == "p2"]
    curated, report = curate(only_negatives, CurateConfig(target_positive_fraction=0.5), baseline=0.0)
    assert len(curated) == 4
    assert "cannot be reached: the curated set has no positives" in report["warnings"][0]


def test_a_set_without_positives_is_said_with_what_to_try(tmp_path, records, caplog):
    """As a new user meets it: the model solves none of its prompts. The warning reaches the
    report and the console (a WARNING), and says what to change."""
    only_negatives = [record for record in records if record["prompt_id"] == "p2"]
    input_path = tmp_path / "verified.jsonl"
    write_records(input_path, only_negatives)
    with caplog.at_level(logging.WARNING, logger="topr.curate"):
        report = run_curate(run_config(), input_path, tmp_path / "train.jsonl", tmp_path / "report.json")
    (warning,) = report["warnings"]
    assert "has no positives: none of its 4 completions is correct" in warning
    assert "sample.samples_per_prompt" in warning and "sample.temperature" in warning and "easier task" in warning
    assert [r.levelname for r in caplog.records if warning in r.getMessage()] == ["WARNING"]


def test_a_set_without_negatives_is_said_and_a_mixed_one_is_not(records):
    only_positives = [record for record in records if record["correct"]]
    _, report = curate(only_positives, CurateConfig(strategy="all"), baseline=0.0)
    assert len(report["warnings"]) == 1 and "has no negatives" in report["warnings"][0]
    _, report = curate(records, CurateConfig(strategy="all"), baseline=0.0)
    assert report["warnings"] == []


def test_report_uses_baseline(records):
    _, report = curate(records, CurateConfig(strategy="all"), baseline=0.5)
    assert report["baseline"] == 0.5
    assert report["effective_positive_fraction"] == pytest.approx(0.25)


def test_the_checkers_rewards_report_the_closed_form_to_the_last_digit(records):
    _, report = curate(records, CurateConfig(), baseline=-0.8)
    assert (report["positives"], report["negatives"]) == (2, 6)
    assert report["effective_positive_fraction"] == effective_positive_fraction(0.25, -0.8)


# prompt -> graded reward of samples 0..3; every completion is correct, so only rewards can split them.
GRADED = {"g0": [0.2, 0.7, -0.4, 0.9], "g1": [0.5, 0.6, 1.0, 0.8], "g2": [-1.0, 0.1, 0.4, -0.3]}


@pytest.fixture
def graded():
    return [
        make_record(prompt_id, index, True, reward=reward)
        for prompt_id, rewards in GRADED.items()
        for index, reward in enumerate(rewards)
    ]


def test_anna_karenina_splits_graded_rewards_by_the_baseline(graded):
    """Positive: R - c >= 0 (0.5 counts at c = 0.5); the first positive and every negative are kept."""
    curated, report = curate(graded, CurateConfig(), baseline=0.5)
    assert kept(curated) == [("g0", 0), ("g0", 1), ("g0", 2), ("g1", 0), ("g2", 0), ("g2", 1), ("g2", 2), ("g2", 3)]
    assert (report["positives"], report["negatives"], report["positive_fraction"]) == (2, 6, 0.25)
    # |R - c| of the positives (0.2 + 0) over that of all (0.3 + 0.2 + 0.9 + 0 + 1.5 + 0.4 + 0.1 + 0.8).
    assert report["effective_positive_fraction"] == pytest.approx(0.2 / 4.2)
    assert report["warnings"] == []


def test_graded_rewards_are_rebalanced_and_warned_about_by_the_baseline(graded):
    _, report = curate(graded, CurateConfig(strategy="all", target_positive_fraction=0.5, seed=3), baseline=0.5)
    assert (report["positives"], report["negatives"]) == (6, 6)
    _, report = curate(graded, CurateConfig(strategy="all"), baseline=1.5)
    assert report["positives"] == 0 and report["warnings"] == [one_sided_warning(0, 12)]
    assert "none of its 12 completions is correct (has a reward at or above train.baseline)" in report["warnings"][0]


def test_empty_input_and_everything_dropped_raise(records):
    with pytest.raises(CurationError, match="no records in input"):
        curate([], CurateConfig(), baseline=0.0)
    for record in records:
        record["completion"] = " "
    with pytest.raises(CurationError, match="no examples left after curation: 12 records in, 12 dropped as empty"):
        curate(records, CurateConfig(), baseline=0.0)


def run_config(**curate_fields):
    return Config(curate=curate_fields, train={"baseline": -0.25})


def test_run_curate_writes_set_and_report_with_fields_passed_through(tmp_path, records):
    for record in records:
        record["custom"] = {"note": [1, "x"]}
    del records[0]["finish_reason"]
    input_path, output_path, report_path = tmp_path / "verified.jsonl", tmp_path / "train.jsonl", tmp_path / "r.json"
    write_records(input_path, records)
    report = run_curate(run_config(drop_truncated=True), input_path, output_path, report_path)
    written = read_records(output_path)
    originals = {(record["prompt_id"], record["sample_index"]): record for record in read_records(input_path)}
    assert len(written) == report["count"] == 8
    for record in written:
        assert record == originals[record["prompt_id"], record["sample_index"]]
    assert "finish_reason" not in originals["p2", 3] and ("p2", 3) in kept(written)
    assert json.loads(report_path.read_text()) == report
    assert report["baseline"] == -0.25


def test_run_curate_writes_nothing_when_empty(tmp_path, records):
    for record in records:
        record["completion"] = ""
    input_path = tmp_path / "verified.jsonl"
    write_records(input_path, records)
    existing, fresh, report_path = tmp_path / "old.jsonl", tmp_path / "new.jsonl", tmp_path / "report.json"
    existing.write_text("previous contents\n")
    for output_path in (existing, fresh):
        with pytest.raises(CurationError, match="12 dropped as empty"):
            run_curate(run_config(), input_path, output_path, report_path)
    assert existing.read_text() == "previous contents\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old.jsonl", "verified.jsonl"]


def test_run_curate_requires_fields(tmp_path, records):
    del records[5]["correct"]
    input_path = tmp_path / "verified.jsonl"
    write_records(input_path, records)
    with pytest.raises(RecordError, match="correct"):
        run_curate(run_config(), input_path, tmp_path / "train.jsonl", tmp_path / "report.json")
    assert not (tmp_path / "train.jsonl").exists()


def test_run_curate_refuses_a_duplicate_sample_naming_both_lines(tmp_path, records):
    """A duplicate (prompt_id, sample_index) is a bug upstream; curated, it would be trained on twice."""
    input_path, output_path = tmp_path / "verified.jsonl", tmp_path / "train.jsonl"
    write_records(input_path, records + [records[3]])
    first = next(line for line, record in enumerate(records, start=1) if record is records[3])
    key = f"prompt_id '{records[3]['prompt_id']}', sample_index {records[3]['sample_index']}"
    with pytest.raises(RecordError) as caught:
        run_curate(run_config(), input_path, output_path, tmp_path / "report.json")
    assert str(caught.value).startswith(f"{input_path}:{len(records) + 1}: duplicate record: {key} is also at line {first}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["verified.jsonl"]
