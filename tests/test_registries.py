"""A new task and a new objective, each defined in one file, are usable everywhere by name."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from topr import objectives, tasks
from topr.config import ConfigError, load_config
from topr.objectives import policy_loss
from topr.tasks import get_task
from topr.verifier import build_verifier_prompts

PLUGIN = '''
"""Everything a new task and a new objective need, in one file."""
from topr.objectives import Preset, register_objective
from topr.tasks import Task


class ParityTask(Task):
    """Is n even? Prompts "Is n even?" and the instruction, references "even" or "odd"."""

    name = "parity"
    instruction = "Finish with one word: even or odd."

    def problems(self, split, size, seed):
        offset = 0 if split == "train" else 1000
        return [{"prompt_id": f"n{offset + i}", "prompt": self.prompt_for(f"Is {offset + i} even?"), "reference": "even" if i % 2 == 0 else "odd"} for i in range(size)]

    def extract(self, completion):
        words = [word for word in completion.lower().split() if word in ("even", "odd")]
        return words[-1] if words else None

    def is_correct(self, extracted, reference):
        return extracted == reference


register_objective("negatives_only_half", Preset((0.0, 0.0), (0.5, 0.5)))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The file above, imported as a module of its own; the registries as they were afterwards."""
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks.registered_tasks()))
    monkeypatch.setattr(objectives, "PRESETS", dict(objectives.PRESETS))
    (tmp_path / "parity_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("parity_plugin")
    sys.modules.pop("parity_plugin", None)


def test_a_task_and_an_objective_from_one_file_are_chosen_by_name(plugin):
    config = load_config(None, ["task.name=parity", "train.objective=negatives_only_half", "verifier.objective=negatives_only_half"])
    task = get_task(config.task)
    assert [p["reference"] for p in task.problems("train", 3, 0)] == ["even", "odd", "even"]
    assert task.is_correct(task.extract("I think it is Odd"), "odd")
    assert config.run.registered_model == "topr-parity"

    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.full((2, 2), -1.0), torch.tensor([1.0, -1.0]), torch.ones(2, 2), objective=config.train.objective)
    loss.backward()
    # Positives get weight 0, negatives 0.5 at ratio 1: only the negative's log-probs move.
    assert logprobs.grad[0].abs().sum() == 0 and (logprobs.grad[1] > 0).all()


def test_the_verifier_is_shown_a_new_tasks_question_without_its_instruction(plugin):
    task = get_task(load_config(None, ["task.name=parity"]).task)
    (problem,) = task.problems("train", 1, 0)
    assert problem["prompt"] == "Is 0 even?\nFinish with one word: even or odd."
    solved = {**problem, "completion": "0 is even", "sample_index": 0, "extracted": "even", "correct": True}
    (pair,) = build_verifier_prompts([solved], task)
    assert "Finish with" not in pair["prompt"]
    assert "Question:\nIs 0 even?\n\nProposed solution:\n0 is even\n\n" in pair["prompt"]


def test_unknown_names_list_what_is_registered(plugin):
    with pytest.raises(ConfigError, match="task.name.*unknown task 'nope' \\(choices: .*arithmetic.*parity"):
        load_config(None, ["task.name=nope"])
    with pytest.raises(ConfigError, match="train.objective.*unknown objective 'nope' \\(choices: 'topr'.*'negatives_only_half'"):
        load_config(None, ["train.objective=nope"])


def test_a_name_is_registered_once(plugin):
    with pytest.raises(ValueError, match="objective 'topr' is already registered"):
        objectives.register_objective("topr", objectives.PRESETS["rft"])
    with pytest.raises(ValueError, match="task 'parity' is defined twice"):
        type("Imposter", (tasks.Task,), {"name": "parity", "__module__": "elsewhere", "problems": None, "extract": None, "is_correct": None})
