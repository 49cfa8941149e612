import pytest
from pydantic import ValidationError

from topr.config import GateConfig
from topr.gate import decide

GATE = GateConfig()


def figures(pass_at_1: float, truncated: float = 0.05, unparsable: float = 0.02, tokens: float = 20.0) -> dict[str, float]:
    """An evaluation's figures, as the gate reads them."""
    return {"pass_at_1": pass_at_1, "truncated_rate": truncated, "parse_failure_rate": unparsable, "mean_completion_tokens": tokens}


def test_no_champion_yet_promotes():
    decision = decide(figures(0.30), None, GATE)
    assert decision.promote and decision.label == "promote" and decision.reason == "no champion yet"
    assert "gate_gain" not in decision.figures() and decision.guardrails == ()
    assert decision.tags() == {"topr.gate": "promote: no champion yet"}


def test_a_gain_above_the_margin_promotes():
    decision = decide(figures(0.556), figures(0.500), GATE.model_copy(update={"margin": 0.05}))
    assert decision.promote
    assert decision.figures()["gate_gain"] == pytest.approx(0.056)
    assert "> margin 0.0500" in decision.reason and "but" not in decision.reason


@pytest.mark.parametrize(("new", "champion", "margin"), [(0.52, 0.50, 0.05), (0.50, 0.50, 0.0), (0.40, 0.50, 0.0)])
def test_a_gain_within_the_margin_or_a_loss_keeps_the_champion(new, champion, margin):
    decision = decide(figures(new), figures(champion), GATE.model_copy(update={"margin": margin}))
    assert not decision.promote and decision.label == "keep"
    assert decision.figures()["gate_promoted"] == 0.0
    assert "<= margin" in decision.reason


def test_a_negative_margin_accepts_a_small_loss():
    assert decide(figures(0.49), figures(0.50), GATE.model_copy(update={"margin": -0.02})).promote


@pytest.mark.parametrize(
    ("degenerate", "failing"),
    [
        ({"truncated": 0.11}, "answers cut at the length limit fails: new 11.0% > limit 10.0% (champion 5.0%)"),
        ({"unparsable": 0.08}, "answers with nothing to parse fails: new 8.0% > limit 7.0% (champion 2.0%)"),
        ({"tokens": 30.5}, "mean answer length (tokens) fails: new 30.5 > limit 30.0 (champion 20.0)"),
    ],
)
def test_a_gain_with_a_failing_guardrail_keeps_the_champion_and_says_which(degenerate, failing):
    decision = decide(figures(0.70, **degenerate), figures(0.50), GATE)
    assert not decision.promote
    assert decision.reason.startswith("gain +0.2000") and decision.reason.endswith("; but " + failing)
    assert [g.holds for g in decision.guardrails].count(False) == 1
    assert failing in decision.tags().values() and decision.tags()["topr.gate"] == f"keep: {decision.reason}"


def test_a_guardrail_at_its_limit_holds_and_one_set_to_null_is_off():
    assert decide(figures(0.70, truncated=0.10, tokens=30.0), figures(0.50), GATE).promote
    # 34 of 200 cut against the champion's 24 of 200: 0.17 against 0.12 + 0.05, which rounds below 0.17.
    assert 24 / 200 + 0.05 < 34 / 200 and decide(figures(0.70, truncated=34 / 200), figures(0.50, truncated=24 / 200), GATE).promote
    assert not decide(figures(0.70, truncated=35 / 200), figures(0.50, truncated=24 / 200), GATE).promote
    lenient = GATE.model_copy(update={"max_length_ratio": None})
    decision = decide(figures(0.70, tokens=100.0), figures(0.50), lenient)
    assert decision.promote and [g.metric for g in decision.guardrails] == ["truncated_rate", "parse_failure_rate"]


def test_guardrails_do_not_promote_a_model_without_a_gain():
    """They only ever keep the champion: a loss with every guardrail holding still keeps it."""
    decision = decide(figures(0.40, truncated=0.0), figures(0.50), GATE)
    assert not decision.promote and all(g.holds for g in decision.guardrails) and "but" not in decision.reason


def test_the_decision_in_markdown_names_both_models_their_accuracy_and_every_guardrail():
    text = decide(figures(0.5, tokens=40.0), figures(0.25), GATE).markdown("m/3", "m/2")
    assert text.startswith("## Gate: keep\n\ngain +0.2500 (new 0.5000, champion 0.2500) > margin 0.0000; but mean answer length")
    assert "| new model | `m/3` | 50.0% |" in text and "| champion | `m/2` | 25.0% |" in text
    assert "| answers cut at the length limit | 5.0% | 5.0% | 10.0% | holds |" in text
    assert "| answers with nothing to parse | 2.0% | 2.0% | 7.0% | holds |" in text
    assert "| mean answer length (tokens) | 40.0 | 20.0 | 30.0 | **fails** |" in text
    first = decide(figures(0.5), None, GATE).markdown("m/1", None)
    assert "champion" not in first.split("\n\n", 2)[2] and "Guardrails" not in first


def test_each_guardrails_figures_are_logged():
    logged = decide(figures(0.6), figures(0.5), GATE).figures()
    assert logged["gate_champion_truncated_rate"] == 0.05 and logged["gate_truncated_rate_limit"] == pytest.approx(0.10)
    assert logged["gate_mean_completion_tokens_limit"] == pytest.approx(30.0)


@pytest.mark.parametrize("override", [{"max_truncated_rise": -0.1}, {"max_parse_failure_rise": 1.5}, {"max_length_ratio": 0}])
def test_a_guardrail_out_of_range_is_refused(override):
    with pytest.raises(ValidationError):
        GateConfig(**override)


def test_a_champion_that_answers_nothing_can_be_replaced():
    """Under one token on average, the champion sets no length limit (0 × 1.5 would block every model)."""
    decision = decide(figures(0.70, tokens=25.0), figures(0.50, tokens=0.0), GATE)
    assert decision.promote and decision.guardrails[2].limit == float("inf")
    assert not decide(figures(0.70, tokens=31.0), figures(0.50, tokens=20.0), GATE).promote
