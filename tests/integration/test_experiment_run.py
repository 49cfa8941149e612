"""``topr experiment`` for real: every unit a run of the loop in this process (tiny model), tracked
in MLflow like a pipeline run; the named P1 experiment in two replicates, and the verifier branch."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from mlflow import MlflowClient

from topr import console
from topr.cli import main
from topr.storage import file_sha256
from topr.tracking import FILES_REMOVED_TAG, default_tracking_uri

TINY = [
    "task.train_size=2",
    "task.eval_size=2",
    "sample.samples_per_prompt=2",
    "sample.max_new_tokens=4",
    "evaluate.max_new_tokens=4",
    "train.batch_size=2",
    "verifier.train_questions=2",
    "verifier.solutions_per_question=2",
    "verifier.max_new_tokens=3",
]


@pytest.mark.slow
def test_two_arms_share_iteration_one_and_the_report_compares_them(tmp_path, tiny_model_dir, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "description": "TOPR against REINFORCE, the first with the verifier branch.",
        "overrides": ["run.iterations=1"],
        "arms": {"topr": ["train.objective=topr", "verifier.enabled=true"], "reinforce": ["train.objective=reinforce"]},
    }))

    code = main(["experiment", str(spec), "--drop-models", f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", *TINY])

    assert code == 0, capsys.readouterr().err
    folder = tmp_path / "tiny"
    results = json.loads((folder / "results.json").read_text())
    assert {arm: units["rep0"]["status"] for arm, units in results["units"].items()} == {"topr": "finished", "reinforce": "finished"}
    client = MlflowClient(default_tracking_uri(tmp_path))
    runs = {arm: client.get_run(units["rep0"]["run_id"]) for arm, units in results["units"].items()}

    # Both arms trained iteration 1 on the very samples the experiment drew once.
    shared_samples = folder / "shared" / "rep0" / "samples.jsonl"
    for arm, run in runs.items():
        (collect,) = client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.run_name = 'iter1/collect_samples'"
        )
        assert [item.dataset.digest for item in collect.inputs.dataset_inputs] == [file_sha256(shared_samples)[:16]], arm
        assert run.data.params["sample.first_iteration_samples"] == str(shared_samples)

    # What the report reads from each arm: accuracy with intervals and the signs of degeneration.
    for run in runs.values():
        for key in ("pass_at_1_ci_low", "empty_rate", "mean_weight_negative", "final_logprob_negative", "curated_count"):
            assert key in run.data.metrics, key
    assert runs["reinforce"].data.metrics["mean_weight_negative"] == pytest.approx(1.0)
    # The verifier branch ran in the topr arm only, and registered its model.
    assert 0.0 <= runs["topr"].data.metrics["verifier_accuracy_trained"] <= 1.0
    assert "vote_weighted_trained" in runs["topr"].data.metrics and "vote_k" in runs["topr"].data.metrics
    assert "verifier_accuracy_trained" not in runs["reinforce"].data.metrics
    assert [str(version.version) for version in client.search_model_versions("name = 'tiny-topr-verifier'")] == ["1"]
    # --drop-models: every model the units trained, policy and verifier, is gone, its version tagged so.
    versions = [version for name in ("tiny-topr", "tiny-reinforce", "tiny-topr-verifier") for version in client.search_model_versions(f"name = '{name}'")]
    assert len(versions) == 3 and all(FILES_REMOVED_TAG in version.tags for version in versions)
    assert not any(Path(version.tags["topr.model_uri"]).exists() or Path(urlparse(version.source).path).exists() for version in versions)

    report = (folder / "report.md").read_text()
    assert "| topr | `train.objective=topr` `verifier.enabled=true` | shared | 1/1 |" in report
    assert "## Generative verifier" in report and "| reinforce | 1 |" in report
    assert {"accuracy.png", "degeneration.png", "report.md", "results.json"} <= {path.name for path in folder.iterdir()}
    printed = capsys.readouterr().out
    assert report in printed
    # A unit's console shows its stages as they start and end; its whole output is in its run.log.
    assert re.search(r"^iter 1  train +done in .*\b\d+ steps, final loss", printed, re.M), printed
    assert re.search(r"^iter 1  evaluate_verifier +done in ", printed, re.M), printed
    for arm in ("topr", "reinforce"):
        assert console.EVENT_PREFIX + '{"kind": "stage_ended", "stage": "train"' in (folder / "arms" / arm / "rep0" / "run.log").read_text()


@pytest.mark.slow
def test_the_objectives_experiment_in_two_replicates_pairs_every_arm_with_rft(tmp_path, tiny_model_dir, capsys):
    code = main(["experiment", "objectives", "--replicates", "2", f"model.path={tiny_model_dir}", f"run.output_dir={tmp_path}", *TINY])

    assert code == 0, capsys.readouterr().err
    folder = tmp_path / "objectives"
    results = json.loads((folder / "results.json").read_text())
    assert {arm: sorted(units) for arm, units in results["units"].items()} == {arm: ["rep0", "rep1"] for arm in ("topr", "rft", "tis", "reinforce")}
    assert all(unit["status"] == "finished" for units in results["units"].values() for unit in units.values())
    # Each replicate trained on its own samples, shared by the arms of that replicate.
    client = MlflowClient(default_tracking_uri(tmp_path))
    for replicate in ("rep0", "rep1"):
        used = {client.get_run(units[replicate]["run_id"]).data.params["sample.first_iteration_samples"] for units in results["units"].values()}
        assert used == {str(folder / "shared" / replicate / "samples.jsonl")}
    assert file_sha256(folder / "shared" / "rep0" / "samples.jsonl") != file_sha256(folder / "shared" / "rep1" / "samples.jsonl")
    # Every arm but the reference compared with it, per replicate, on the same held-out problems.
    comparisons = results["comparisons"]["1"]
    assert [c["arm"] for c in comparisons] == ["topr", "tis", "reinforce"] and {c["reference"] for c in comparisons} == {"rft"}
    assert all(len(c["differences"]) == 2 for c in comparisons)
    report = (folder / "report.md").read_text()
    assert "## Paired differences from `rft`, iteration 1" in report and (folder / "paired_differences.png").exists()
    # The taper at every training step of iteration 1 (rft's negatives have a ratio too, at weight 0).
    assert "![median ratio on negatives by training step](taper.png)" in report and (folder / "taper.png").stat().st_size > 0
    from topr.report import taper_histories

    histories = taper_histories(default_tracking_uri(tmp_path), results["units"])
    assert set(histories) == {"topr", "rft", "tis", "reinforce"} and all(len(reps) == 2 for reps in histories.values())
    assert all(history[min(history)] == pytest.approx(1.0, abs=1e-3) for reps in histories.values() for history in reps.values())  # on-policy first
