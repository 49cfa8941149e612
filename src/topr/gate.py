"""The promotion gate: move the ``champion`` alias only for a gain larger than a set margin, and
only when no guardrail fails.

The new model's held-out figures come from the run's last evaluation; the champion is evaluated
again by the same code on the same prompts with the same seed, so the two compare. pass@1 alone
would promote a model whose answers now run to the length limit, or no longer parse, as long as
it gained: the guardrails limit those signs of a degenerating policy against the champion's.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from topr.config import GateConfig


@dataclass(frozen=True)
class Guardrail:
    """One evaluation figure of the new model, held to a limit set by the champion's."""

    metric: str
    label: str
    new: float
    champion: float
    limit: float

    @property
    def holds(self) -> bool:
        """At the limit holds: 34/200 cut against a champion's 24/200 and a rise of 0.05 is
        17.0% against 17.0%, though 0.12 + 0.05 rounds below 0.17 in binary."""
        return self.new <= self.limit or math.isclose(self.new, self.limit, rel_tol=1e-9, abs_tol=1e-12)

    def show(self, value: float) -> str:
        return f"{value:.1f}" if self.metric == "mean_completion_tokens" else f"{value:.1%}"

    def line(self) -> str:
        verdict = "holds" if self.holds else "fails"
        return f"{self.label} {verdict}: new {self.show(self.new)} {'<=' if self.holds else '>'} limit {self.show(self.limit)} (champion {self.show(self.champion)})"


def times_length(champion_tokens: float, ratio: float) -> float:
    """The length limit: ``ratio`` times the champion's mean answer length; none (infinite) for a
    champion whose answers average under one token, which any model that answers may replace."""
    return champion_tokens * ratio if champion_tokens >= 1.0 else math.inf


# (evaluation metric, what it counts, GateConfig field, the limit from the champion's value and the field)
GUARDRAILS = (
    ("truncated_rate", "answers cut at the length limit", "max_truncated_rise", operator.add),
    ("parse_failure_rate", "answers with nothing to parse", "max_parse_failure_rise", operator.add),
    ("mean_completion_tokens", "mean answer length (tokens)", "max_length_ratio", times_length),
)

# What the gate reads of the new model's last evaluation.
GATE_METRICS = ("pass_at_1", *(metric for metric, *_ in GUARDRAILS))


def guardrails(new: dict[str, float], champion: dict[str, float], settings: GateConfig) -> tuple[Guardrail, ...]:
    """The guardrails ``settings`` enables (a limit set to None is off), each with its figures."""
    return tuple(
        Guardrail(metric, label, new[metric], champion[metric], limit_from(champion[metric], getattr(settings, field)))
        for metric, label, field, limit_from in GUARDRAILS
        if getattr(settings, field) is not None
    )


@dataclass(frozen=True)
class Decision:
    promote: bool
    new_pass_at_1: float
    champion_pass_at_1: float | None
    margin: float
    reason: str
    guardrails: tuple[Guardrail, ...] = ()

    @property
    def label(self) -> str:
        return "promote" if self.promote else "keep"

    def markdown(self, model: str, champion: str | None) -> str:
        """The decision as Kubeflow's UI shows a Markdown artifact."""
        rows = [("new model", model, f"{self.new_pass_at_1:.1%}")]
        if champion is not None and self.champion_pass_at_1 is not None:
            rows.append(("champion", champion, f"{self.champion_pass_at_1:.1%}"))
        table = "\n".join(f"| {role} | `{name}` | {accuracy} |" for role, name, accuracy in rows)
        text = f"## Gate: {self.label}\n\n{self.reason}.\n\n| | model | held-out pass@1 |\n|---|---|---|\n{table}\n"
        if self.guardrails:
            lines = "\n".join(
                f"| {g.label} | {g.show(g.new)} | {g.show(g.champion)} | {g.show(g.limit)} | {'holds' if g.holds else '**fails**'} |"
                for g in self.guardrails
            )
            text += f"\n### Guardrails\n\n| | new model | champion | limit | |\n|---|---|---|---|---|\n{lines}\n"
        return text

    def figures(self) -> dict[str, float]:
        figures = {"gate_new_pass_at_1": self.new_pass_at_1, "gate_margin": self.margin, "gate_promoted": float(self.promote)}
        if self.champion_pass_at_1 is not None:
            figures.update(gate_champion_pass_at_1=self.champion_pass_at_1, gate_gain=self.new_pass_at_1 - self.champion_pass_at_1)
        for guardrail in self.guardrails:
            figures[f"gate_champion_{guardrail.metric}"] = guardrail.champion
            figures[f"gate_{guardrail.metric}_limit"] = guardrail.limit
        return figures

    def tags(self) -> dict[str, str]:
        """What the model version and the parent run are tagged with: the decision, and each guardrail's figures."""
        return {"topr.gate": f"{self.label}: {self.reason}", **{f"topr.gate.{g.metric}": g.line() for g in self.guardrails}}


class TaskMismatchError(RuntimeError):
    """The champion was trained on another task, so this run's held-out prompts do not measure it."""


def check_same_task(champion: str, champion_task: str | None, task: str) -> None:
    """Refuse to compare with a champion of another task (versions registered before the task
    was recorded, ``champion_task`` None, are compared)."""
    if champion_task is not None and champion_task != task:
        raise TaskMismatchError(
            f"{champion} was trained on task {champion_task!r} and this run's task is {task!r}: refusing to "
            "compare across tasks. Give this task a registered model of its own (run.registered_model; its "
            "default, topr-<task.name>, is one per task)"
        )


def decide(new: dict[str, float], champion: dict[str, float] | None, settings: GateConfig) -> Decision:
    """Promote when there is no champion yet, or when new − champion pass@1 > margin and every
    guardrail holds. ``new`` and ``champion`` are evaluation metrics (``topr.evaluate``)."""
    new_pass_at_1 = new["pass_at_1"]
    if champion is None:
        return Decision(True, new_pass_at_1, None, settings.margin, "no champion yet")
    gain = new_pass_at_1 - champion["pass_at_1"]
    checks = guardrails(new, champion, settings)
    gained = gain > settings.margin
    reason = f"gain {gain:+.4f} (new {new_pass_at_1:.4f}, champion {champion['pass_at_1']:.4f}) {'>' if gained else '<='} margin {settings.margin:.4f}"
    failed = [guardrail.line() for guardrail in checks if not guardrail.holds]
    if gained and failed:
        reason += "; but " + "; ".join(failed)
    return Decision(gained and not failed, new_pass_at_1, champion["pass_at_1"], settings.margin, reason, checks)
