"""The promotion gate: move the ``champion`` alias only for a gain larger than a set margin.

The new model's held-out pass@1 comes from the run's last evaluation; the champion is evaluated
again by the same code on the same prompts with the same seed, so the two figures compare.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    new_pass_at_1: float
    champion_pass_at_1: float | None
    margin: float
    reason: str

    @property
    def label(self) -> str:
        return "promote" if self.promote else "keep"

    def markdown(self, model: str, champion: str | None) -> str:
        """The decision as Kubeflow's UI shows a Markdown artifact."""
        rows = [("new model", model, f"{self.new_pass_at_1:.1%}")]
        if champion is not None and self.champion_pass_at_1 is not None:
            rows.append(("champion", champion, f"{self.champion_pass_at_1:.1%}"))
        table = "\n".join(f"| {role} | `{name}` | {accuracy} |" for role, name, accuracy in rows)
        return f"## Gate: {self.label}\n\n{self.reason}.\n\n| | model | held-out pass@1 |\n|---|---|---|\n{table}\n"

    def figures(self) -> dict[str, float]:
        figures = {"gate_new_pass_at_1": self.new_pass_at_1, "gate_margin": self.margin, "gate_promoted": float(self.promote)}
        if self.champion_pass_at_1 is not None:
            figures.update(gate_champion_pass_at_1=self.champion_pass_at_1, gate_gain=self.new_pass_at_1 - self.champion_pass_at_1)
        return figures


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


def decide(new_pass_at_1: float, champion_pass_at_1: float | None, margin: float) -> Decision:
    """Promote when there is no champion yet, or when new − champion > margin."""
    if champion_pass_at_1 is None:
        return Decision(True, new_pass_at_1, None, margin, "no champion yet")
    gain = new_pass_at_1 - champion_pass_at_1
    promote = gain > margin
    comparison = ">" if promote else "<="
    reason = f"gain {gain:+.4f} (new {new_pass_at_1:.4f}, champion {champion_pass_at_1:.4f}) {comparison} margin {margin:.4f}"
    return Decision(promote, new_pass_at_1, champion_pass_at_1, margin, reason)
