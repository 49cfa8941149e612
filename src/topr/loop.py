"""One iteration of the loop — sample → verify → curate → train → evaluate — in one process.

``run_iteration`` is the loop written once. It takes the stages as an object (``Stages``), so the
same order of the same files runs

- bare, with the library's stage functions (``LibraryStages``): the verifier's training and any
  script of a researcher's own;
- tracked in MLflow, with ``topr.steps`` around every stage (``topr.inprocess.TrackedStages``):
  the arms of ``topr experiment``, which log what a pipeline run logs, stage by stage.

The Kubeflow pipeline (``pipelines/topr_pipeline.py``) composes the same stage functions as one
component each; it is the cluster's form of this loop, not another copy of its logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from topr.config import Config
from topr.train import StepCallback


class Stages(Protocol):
    """The loop's stages, each reading and writing files; ``iteration`` is 1-based."""

    def sample(self, model_dir: str, prompts: Path, output: Path, iteration: int) -> dict: ...

    def verify(self, samples: Path, output: Path, iteration: int) -> dict: ...

    def curate(self, verified: Path, output: Path, report: Path, iteration: int) -> dict: ...

    def train(self, model_dir: str, train_set: Path, samples: Path, output: Path, iteration: int) -> dict: ...

    def evaluate(self, model_dir: str, prompts: Path, report: Path, completions: Path, iteration: int) -> dict: ...


@dataclass
class LibraryStages:
    """The stages as plain library functions, without tracking; ``on_step`` sees every training step."""

    config: Config
    on_step: StepCallback | None = None

    def sample(self, model_dir: str, prompts: Path, output: Path, iteration: int) -> dict:
        from topr.sample import run_sample

        return run_sample(self.config, model_dir, prompts, output, iteration)

    def verify(self, samples: Path, output: Path, iteration: int) -> dict:
        from topr.verify import run_verify

        return run_verify(self.config.task, samples, output)

    def curate(self, verified: Path, output: Path, report: Path, iteration: int) -> dict:
        from topr.curate import run_curate

        return run_curate(self.config, verified, output, report)

    def train(self, model_dir: str, train_set: Path, samples: Path, output: Path, iteration: int) -> dict:
        from topr.train import launch_train

        return launch_train(self.config, model_dir, train_set, output, self.on_step)

    def evaluate(self, model_dir: str, prompts: Path, report: Path, completions: Path, iteration: int) -> dict:
        from topr.evaluate import run_evaluate

        return run_evaluate(self.config, model_dir, prompts, report, completions)


@dataclass(frozen=True)
class IterationFiles:
    """Where one iteration's stages write, inside its folder."""

    folder: Path

    @property
    def samples(self) -> Path:
        return self.folder / "samples.jsonl"

    @property
    def verified(self) -> Path:
        return self.folder / "verified.jsonl"

    @property
    def train_set(self) -> Path:
        return self.folder / "train_set.jsonl"

    @property
    def composition(self) -> Path:
        return self.folder / "composition.json"

    @property
    def model(self) -> Path:
        return self.folder / "model"

    @property
    def evaluation(self) -> Path:
        return self.folder / "evaluation.json"

    @property
    def completions(self) -> Path:
        """The held-out completions, one greedy record per problem with its ``correct``."""
        return self.folder / "evaluation_completions.jsonl"


def run_iteration(
    stages: Stages,
    model_dir: str,
    train_prompts: str | Path,
    iteration: int,
    folder: str | Path,
    eval_prompts: str | Path | None = None,
    model_output: str | Path | None = None,
) -> dict[str, dict]:
    """Sample from ``model_dir`` on this iteration's slice of ``train_prompts``, verify, curate and
    train; then evaluate the new model on ``eval_prompts`` unless it is None.

    Everything is written under ``folder`` (see ``IterationFiles``), the new model too unless
    ``model_output`` says where it goes. Returns each stage's summary by stage name.
    """
    files = IterationFiles(Path(folder))
    files.folder.mkdir(parents=True, exist_ok=True)
    model = Path(model_output) if model_output is not None else files.model
    summaries = {"sample": stages.sample(model_dir, Path(train_prompts), files.samples, iteration)}
    summaries["verify"] = stages.verify(files.samples, files.verified, iteration)
    summaries["curate"] = stages.curate(files.verified, files.train_set, files.composition, iteration)
    summaries["train"] = stages.train(model_dir, files.train_set, files.samples, model, iteration)
    if eval_prompts is not None:
        summaries["evaluate"] = stages.evaluate(str(model), Path(eval_prompts), files.evaluation, files.completions, iteration)
    return summaries
