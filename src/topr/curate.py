"""The curation stage: which verified samples the policy trains on.

Curation runs in three steps, each accounted for in the report's ``dropped`` counts:

1. Filters (``drop_empty``, ``drop_truncated``, ``max_completion_tokens``); a record failing
   several is counted once, under the first of ``empty``, ``truncated``, ``too_long``.
2. A strategy picks among each prompt's survivors (``strategy``):

   - ``anna_karenina``: the first positive completion (lowest ``sample_index``) and every
     negative one. Correct completions tend to resemble each other while each wrong one is wrong
     in its own way, so one positive per prompt carries most of what positives teach.
   - ``uniform``: ``uniform_per_prompt`` completions drawn at random per prompt.
   - ``all``: everything.
3. An optional rebalancing (``target_positive_fraction``) subsamples positives or negatives so
   the kept set's fraction of positives is as close to the target as possible without adding
   any record.

Positives and negatives are split as ``policy_loss`` splits them: a record is positive when its
advantage R - c is at least 0 (``is_positive``, c = ``train.baseline``). With the checker's
rewards of +1 and -1 and -1 < c <= 1 (the default c is -0.8), the positives are the correct
completions; graded rewards (``topr.rewards``) are split by the baseline alone.

Random choices are seeded by ``CurateConfig.seed`` and records are grouped and returned in
(``prompt_id``, ``sample_index``) order, so the result depends on the input set, not its order.
Records come out as they went in: fields curation does not know pass through unchanged.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from topr.config import Config, CurateConfig
from topr.records import RECORD_KEY, Record, read_records, write_json, write_records

log = logging.getLogger(__name__)

CURATE_FIELDS = ("prompt_id", "sample_index", "completion", "completion_token_ids", "correct", "reward")
DROP_REASONS = ("empty", "truncated", "too_long", "strategy", "rebalance")


class CurationError(ValueError):
    """Curation left nothing to train on; the message says where the records went."""


def is_positive(record: Record, baseline: float) -> bool:
    """Whether ``record`` trains as a positive: its advantage R - ``baseline`` is at least 0."""
    return float(record["reward"]) - baseline >= 0


def effective_positive_fraction(p: float, c: float) -> float:
    """The fraction of positives a set trains like, given a fraction ``p`` of positives and baseline ``c``.

    Training on the advantage ``R - c`` with ``R`` in {+1, -1} scales each positive by ``1 - c``
    and each negative by ``1 + c``, so positives carry the share
    ``p(1 - c) / (p(1 - c) + (1 - p)(1 + c)) = p(1 - c) / (1 + c(1 - 2p))`` of the total weight:
    ``c = 0`` gives ``p``, ``c -> -1`` only positives (1 when ``p > 0``), ``c -> 1`` only
    negatives (0 when ``p < 1``). The formula is meant for ``-1 <= c <= 1``; outside it one class
    gets a negative weight.

    Convention: the denominator is 0 when both weights are (``c = 1`` and ``p = 1``, or
    ``c = -1`` and ``p = 0``); nothing is reweighted then, so ``p`` itself is returned.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"positive fraction must lie in [0, 1], got {p}")
    denominator = 1.0 + c * (1.0 - 2.0 * p)
    if denominator == 0.0:
        return p
    return p * (1.0 - c) / denominator


def effective_positive_fraction_of(records: Sequence[Record], positive_fraction: float, baseline: float) -> float:
    """The share of the training weight |R - c| that the positives among ``records`` carry
    (``positive_fraction`` of them), before any taper. With rewards of +1 and -1 only it is
    ``effective_positive_fraction``, computed by that formula so reports of the checker's rewards
    keep their figure to the last digit; graded rewards add up their advantages."""
    rewards = {float(record["reward"]) for record in records}
    if rewards <= {1.0, -1.0}:
        return effective_positive_fraction(positive_fraction, baseline)
    advantages = [float(record["reward"]) - baseline for record in records]
    total = math.fsum(map(abs, advantages))
    return math.fsum(advantage for advantage in advantages if advantage >= 0) / total if total else positive_fraction


def curate(records: Sequence[Record], config: CurateConfig, baseline: float) -> tuple[list[Record], dict]:
    """Filter, select and rebalance verified records; return the training set and its report.

    Raises ``CurationError`` when no record is left (or none came in).
    """
    if not records:
        raise CurationError("no records in input")
    dropped = dict.fromkeys(DROP_REASONS, 0)
    survivors = []
    for record in records:
        reason = _drop_reason(record, config)
        if reason is None:
            survivors.append(record)
        else:
            dropped[reason] += 1
    if not survivors:
        raise CurationError(f"no examples left after curation: {_describe_drops(len(records), dropped)}")

    rng = random.Random(config.seed)
    selected = [record for group in _by_prompt(survivors) for record in _select(group, config, baseline, rng)]
    dropped["strategy"] = len(survivors) - len(selected)
    warnings: list[str] = []
    if config.target_positive_fraction is not None:
        balanced = _rebalance(selected, config.target_positive_fraction, baseline, rng, warnings)
        dropped["rebalance"] = len(selected) - len(balanced)
        selected = balanced
    curated = sorted(selected, key=_order)
    one_sided = one_sided_warning(sum(is_positive(record, baseline) for record in curated), len(curated))
    return curated, _report(len(records), dropped, config, baseline, curated, warnings + ([one_sided] if one_sided else []))


def one_sided_warning(positives: int, count: int) -> str | None:
    """What to say when a training set of ``count`` records holds no positive or no negative."""
    if positives == 0:
        return (
            f"the training set has no positives: none of its {count} completions is correct (has a reward at or above "
            "train.baseline), so training only pushes the model away from wrong answers and cannot teach a right one. "
            "Try more samples per prompt (sample.samples_per_prompt), a higher temperature (sample.temperature) or an "
            "easier task"
        )
    if positives == count:
        return (
            f"the training set has no negatives: all of its {count} completions are correct (have a reward at or above "
            "train.baseline), so training is rejection fine-tuning. Try harder prompts or a higher temperature "
            "(sample.temperature)"
        )
    return None


def run_curate(
    config: Config, input_path: str | Path, output_path: str | Path, report_path: str | Path
) -> dict:
    """Curate the verified records at ``input_path``; write the training set and its report.

    A record without ``finish_reason`` counts as ``"stop"``. Nothing is written when curation
    leaves no example (``CurationError``): an existing output stays as it was, and neither when
    a (prompt_id, sample_index) appears twice (``RecordError`` naming both lines): curated, the
    duplicate would be trained on twice.
    """
    records = read_records(input_path, required=CURATE_FIELDS, unique=RECORD_KEY)
    curated, report = curate(records, config.curate, config.train.baseline)
    write_records(output_path, curated)
    write_json(report_path, report)
    log.info(
        "curated %(count)d of %(input_count)d records (%(positives)d positive, %(negatives)d negative)",
        report,
    )
    for warning in report["warnings"]:
        log.warning("curation: %s", warning)
    return report


def _drop_reason(record: Record, config: CurateConfig) -> str | None:
    if config.drop_empty and not record["completion"].strip():
        return "empty"
    if config.drop_truncated and record.get("finish_reason", "stop") == "length":
        return "truncated"
    limit = config.max_completion_tokens
    if limit is not None and len(record["completion_token_ids"]) > limit:
        return "too_long"
    return None


def _describe_drops(input_count: int, dropped: dict[str, int]) -> str:
    parts = [f"{count} dropped as {reason.replace('_', ' ')}" for reason, count in dropped.items() if count]
    return ", ".join([f"{input_count} records in", *parts])


def _order(record: Record) -> tuple:
    return record["prompt_id"], record["sample_index"]


def _by_prompt(records: list[Record]) -> Iterator[list[Record]]:
    """Each prompt's records, in (prompt_id, sample_index) order."""
    for _, group in itertools.groupby(sorted(records, key=_order), key=lambda record: record["prompt_id"]):
        yield list(group)


def _select(group: list[Record], config: CurateConfig, baseline: float, rng: random.Random) -> list[Record]:
    if config.strategy == "anna_karenina":
        first_positive = next((record for record in group if is_positive(record, baseline)), None)
        return [record for record in group if record is first_positive or not is_positive(record, baseline)]
    if config.strategy == "uniform":
        return rng.sample(group, min(config.uniform_per_prompt, len(group)))
    return group


def _rebalance(records: list[Record], target: float, baseline: float, rng: random.Random, warnings: list[str]) -> list[Record]:
    """Subsample the over-represented class so the fraction of positives is closest to ``target``."""
    positives = [record for record in records if is_positive(record, baseline)]
    negatives = [record for record in records if not is_positive(record, baseline)]
    if not positives or not negatives:
        missing = "positives" if not positives else "negatives"
        warnings.append(
            f"target_positive_fraction={target} cannot be reached: the curated set has no {missing}; "
            f"kept all {len(records)} records"
        )
        return records
    if len(positives) / len(records) > target:
        positives = rng.sample(positives, _closest_count(target, len(negatives), len(positives)))
    else:
        negatives = rng.sample(negatives, _closest_count(1.0 - target, len(positives), len(negatives)))
    return positives + negatives


def _closest_count(share: float, others: int, available: int) -> int:
    """How many of one class (at most ``available``) to keep beside ``others`` records of the
    other class for its share to come closest to ``share``; ties keep the larger set."""
    ideal = share * others / (1.0 - share)
    candidates = {min(available, math.floor(ideal)), min(available, math.ceil(ideal))}
    return min(candidates, key=lambda kept: (abs(kept / (kept + others) - share), -kept))


def _report(
    input_count: int,
    dropped: dict[str, int],
    config: CurateConfig,
    baseline: float,
    curated: list[Record],
    warnings: list[str],
) -> dict:
    positives = sum(is_positive(record, baseline) for record in curated)
    fraction = positives / len(curated)
    return {
        "input_count": input_count,
        "dropped": dropped,
        "strategy": config.strategy,
        "target_positive_fraction": config.target_positive_fraction,
        "count": len(curated),
        "positives": positives,
        "negatives": len(curated) - positives,
        "prompts": len({record["prompt_id"] for record in curated}),
        "positive_fraction": fraction,
        "baseline": baseline,
        "effective_positive_fraction": effective_positive_fraction_of(curated, fraction, baseline),
        "mean_completion_tokens": sum(len(record["completion_token_ids"]) for record in curated) / len(curated),
        "warnings": warnings,
    }
