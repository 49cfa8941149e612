import pytest

from topr.gate import decide


def test_no_champion_yet_promotes():
    decision = decide(0.30, None, margin=0.05)
    assert decision.promote and decision.label == "promote" and decision.reason == "no champion yet"
    assert "gate_gain" not in decision.figures()


def test_a_gain_above_the_margin_promotes():
    decision = decide(0.556, 0.500, margin=0.05)
    assert decision.promote
    assert decision.figures()["gate_gain"] == pytest.approx(0.056)
    assert "> margin 0.0500" in decision.reason


@pytest.mark.parametrize(("new", "champion", "margin"), [(0.52, 0.50, 0.05), (0.50, 0.50, 0.0), (0.40, 0.50, 0.0)])
def test_a_gain_within_the_margin_or_a_loss_keeps_the_champion(new, champion, margin):
    decision = decide(new, champion, margin)
    assert not decision.promote and decision.label == "keep"
    assert decision.figures()["gate_promoted"] == 0.0
    assert "<= margin" in decision.reason


def test_a_negative_margin_accepts_a_small_loss():
    assert decide(0.49, 0.50, margin=-0.02).promote


def test_the_decision_in_markdown_names_both_models_and_their_accuracy():
    text = decide(0.5, 0.25, 0.0).markdown("m/3", "m/2")
    assert text.startswith("## Gate: promote\n\ngain +0.2500 (new 0.5000, champion 0.2500) > margin 0.0000.")
    assert "| new model | `m/3` | 50.0% |" in text and "| champion | `m/2` | 25.0% |" in text
    assert "champion" not in decide(0.5, None, 0.0).markdown("m/1", None).split("\n\n", 2)[2]
