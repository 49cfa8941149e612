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
