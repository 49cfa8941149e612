"""The ``topr`` command, called in-process through ``topr.cli.main``."""

import json
import sys

import pytest
import yaml

from topr.cli import main
from topr.records import SCHEMA_VERSION, read_records, write_records

from helpers import write_jsonl


COMPLETIONS = [
    {"prompt_id": "p1", "reference": "19", "completion": "7 + 12 = 19\nAnswer: 19", "sample_index": 0},
    {"prompt_id": "p1", "reference": "19", "completion": "Answer: 18", "sample_index": 1},
    {"prompt_id": "p2", "reference": "5", "completion": "No idea.", "sample_index": 0},
    {"prompt_id": "p2", "reference": "5", "completion": "2 + 3 = 5\nAnswer: 5", "sample_index": 1},
]


def verified_record(prompt_id, sample_index, completion, correct):
    return {
        "prompt_id": prompt_id,
        "prompt": "What is 7 + 12?",
        "reference": "19",
        "prompt_token_ids": [1, 2, 3],
        "completion": completion,
        "completion_token_ids": [4, 5] if completion else [],
        "behavior_logprobs": [-0.5, -0.25] if completion else [],
        "sample_index": sample_index,
        "finish_reason": "stop",
        "extracted": "19" if correct else None,
        "correct": correct,
        "reward": 1.0 if correct else -1.0,
    }


def test_run_help_lists_config_fields(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: topr run" in out
    assert "train.objective = 'topr'" in out
    assert "Policy-gradient objective" in out
    assert "sample.temperature = 0.5" in out
    assert "Sampling temperature." in out
    assert "run.iterations = 2" in out
    assert "section.field=value" in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "compile", "sample", "verify", "curate", "train", "evaluate"):
        assert command in out
    assert "95% CIs" in out


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


def test_verify_writes_rewards_and_prints_summary(tmp_path, capsys):
    source, output = tmp_path / "samples.jsonl", tmp_path / "out" / "verified.jsonl"
    write_jsonl(source, COMPLETIONS)
    assert main(["verify", "--task", "arithmetic", "--input", str(source), "--output", str(output)]) == 0
    verified = read_records(output)
    assert [(r["prompt_id"], r["extracted"], r["correct"], r["reward"]) for r in verified] == [
        ("p1", "19", True, 1.0),
        ("p1", "18", False, -1.0),
        ("p2", None, False, -1.0),
        ("p2", "5", True, 1.0),
    ]
    assert all(r["schema_version"] == SCHEMA_VERSION for r in verified)
    assert [r["sample_index"] for r in verified] == [0, 1, 0, 1]  # other fields pass through
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 4
    assert summary["correct"] == 2
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["unparsable"] == 1
    assert summary["prompts_with_a_correct"] == 2


@pytest.mark.parametrize("task, right", [("gsm8k", "6 × 7. Answer: 42"), ("math", "6 × 7 = \\boxed{42}"), ("jsonl", "Answer: 42")])
def test_verify_scores_completions_from_elsewhere_without_prompt_files(tmp_path, capsys, task, right):
    """A file task's checker needs no train or eval file: ``topr verify --task gsm8k`` just scores."""
    source, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_jsonl(source, [{"prompt_id": "p1", "reference": "42", "completion": right},
                         {"prompt_id": "p2", "reference": "5", "completion": "Answer: 6"}])  # fmt: skip
    assert main(["verify", "--task", task, "--input", str(source), "--output", str(output)]) == 0
    assert [r["correct"] for r in read_records(output)] == [True, False]
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.5


def test_verify_malformed_line_exits_2_and_names_file_and_line(tmp_path, capsys):
    source, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    lines = [json.dumps(record) for record in COMPLETIONS]
    lines[2] = lines[2][:-1]  # drop the closing brace of line 3
    source.write_text("\n".join(lines) + "\n")
    assert main(["verify", "--task", "arithmetic", "--input", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "topr verify: error:" in err
    assert f"{source}:3:" in err
    assert not output.exists()


def test_verify_missing_field_exits_2(tmp_path, capsys):
    source, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_jsonl(source, [COMPLETIONS[0], {"prompt_id": "p2", "reference": "5"}])
    assert main(["verify", "--input", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"{source}:2:" in err and "completion" in err
    assert not output.exists()


def test_verify_missing_input_exits_2(tmp_path, capsys):
    source, output = tmp_path / "missing.jsonl", tmp_path / "verified.jsonl"
    assert main(["verify", "--input", str(source), "--output", str(output)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not output.exists()


def test_unknown_task_override_exits_2_with_choices(tmp_path, capsys):
    source, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_jsonl(source, COMPLETIONS)
    assert main(["verify", "--input", str(source), "--output", str(output), "task.name=nope"]) == 2
    err = capsys.readouterr().err
    assert "task.name" in err
    for choice in ("arithmetic", "gsm8k", "math", "jsonl"):
        assert choice in err
    assert not output.exists()


def test_unknown_task_option_exits_2(tmp_path, capsys):
    source, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_jsonl(source, COMPLETIONS)
    assert main(["verify", "--task", "nope", "--input", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "task.name" in err and "arithmetic" in err
    assert not output.exists()


def test_unknown_objective_exits_2_with_choices(tmp_path, capsys):
    source, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_jsonl(source, COMPLETIONS)
    assert main(["verify", "--input", str(source), "--output", str(output), "train.objective=foo"]) == 2
    err = capsys.readouterr().err
    assert "train.objective" in err
    for choice in ("topr", "reinforce", "tis", "rft", "ppo"):
        assert f"'{choice}'" in err
    assert not output.exists()


def test_unknown_override_field_exits_2(tmp_path, capsys):
    source, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_jsonl(source, COMPLETIONS)
    assert main(["verify", "--input", str(source), "--output", str(output), "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown field train.lr" in err and "learning_rate" in err


def test_missing_config_file_exits_2(tmp_path, capsys):
    source, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_jsonl(source, COMPLETIONS)
    config = tmp_path / "nope.yaml"
    assert main(["verify", "--config", str(config), "--input", str(source), "--output", str(output)]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_curate_writes_training_set_and_report(tmp_path, capsys):
    source = tmp_path / "verified.jsonl"
    output, report = tmp_path / "train.jsonl", tmp_path / "curate.json"
    write_records(
        source,
        [
            verified_record("p1", 0, "Answer: 19", True),
            verified_record("p1", 1, "Answer: 19", True),
            verified_record("p1", 2, "Answer: 18", False),
            verified_record("p1", 3, "", False),
        ],
    )
    assert main(["curate", "--input", str(source), "--output", str(output), "--report", str(report)]) == 0
    curated = read_records(output)
    assert [r["sample_index"] for r in curated] == [0, 2]  # anna_karenina, empty dropped
    written = json.loads(report.read_text())
    assert written["count"] == 2 and written["dropped"]["empty"] == 1 and written["dropped"]["strategy"] == 1
    assert json.loads(capsys.readouterr().out)["count"] == 2


def test_curate_with_nothing_left_exits_2_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "verified.jsonl"
    output, report = tmp_path / "train.jsonl", tmp_path / "curate.json"
    write_records(source, [verified_record("p1", i, "   " if i else "", False) for i in range(3)])
    assert main(["curate", "--input", str(source), "--output", str(output), "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert "topr curate: error:" in err
    assert "no examples left after curation" in err
    assert "3 records in" in err and "3 dropped as empty" in err
    assert not output.exists()
    assert not report.exists()


def test_train_with_missing_model_exits_2(tmp_path, capsys):
    data, output = tmp_path / "train.jsonl", tmp_path / "model_out"
    write_records(data, [verified_record("p1", 0, "Answer: 19", True), verified_record("p1", 1, "Answer: 18", False)])
    assert main(["train", "--model", "/nonexistent", "--data", str(data), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "topr train: error:" in err
    assert "/nonexistent" in err and "does not exist" in err
    assert not output.exists()


def test_train_with_mismatched_logprobs_exits_2_naming_line(tmp_path, capsys):
    data, output = tmp_path / "train.jsonl", tmp_path / "model_out"
    bad = {**verified_record("p1", 1, "Answer: 18", False), "behavior_logprobs": [-0.5]}
    write_records(data, [verified_record("p1", 0, "Answer: 19", True), bad])
    assert main(["train", "--model", "/nonexistent", "--data", str(data), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2:" in err and "behavior_logprobs" in err
    assert not output.exists()


def test_compile_writes_pipeline_yaml(tmp_path, capsys):
    output = tmp_path / "pipelines" / "topr.yaml"
    assert main(["compile", "--output", str(output), "--iterations", "2"]) == 0
    assert str(output) in capsys.readouterr().out
    text = output.read_text()
    for component in ("sample", "verify", "curate", "train", "evaluate"):
        assert f"comp-{component}" in text
    spec, _ = yaml.safe_load_all(text)
    assert spec["pipelineInfo"]["name"] == "topr"
    # Two unrolled iterations, each its own nested pipeline: a shard loop around sample, then the stages.
    assert {"comp-iteration-1", "comp-iteration-2"} <= set(spec["components"])
    assert "comp-iteration-3" not in spec["components"]
    for iteration in (1, 2):
        tasks = spec["components"][f"comp-iteration-{iteration}"]["dag"]["tasks"]
        (loop,) = [name for name in tasks if name.startswith("for-loop")]
        assert set(tasks) == {loop, "collect-samples", "verify", "curate", "train", "evaluate"}
        (sample,) = spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"].values()
        assert sample["inputs"]["parameters"]["iteration"]["runtimeValue"]["constant"] == iteration
    assert {"comp-start-run", "comp-finish-run", "comp-prepare-model", "comp-prompts"} <= set(spec["components"])


def test_compile_sets_an_s3_pipeline_root(tmp_path):
    output = tmp_path / "topr.yaml"
    assert main(["compile", "--output", str(output), "--pipeline-root", "s3://topr/kfp"]) == 0
    assert next(yaml.safe_load_all(output.read_text()))["defaultPipelineRoot"] == "s3://topr/kfp"


def test_compile_takes_iterations_from_config(tmp_path, capsys):
    output = tmp_path / "topr.yaml"
    assert main(["compile", "--output", str(output), "run.iterations=3"]) == 0
    spec, _ = yaml.safe_load_all(output.read_text())
    assert "3 iterations" in spec["pipelineInfo"]["description"]
    assert "comp-iteration-3" in spec["components"] and "comp-iteration-4" not in spec["components"]


def test_lineage_of_an_unknown_model_exits_2_naming_it(tmp_path, capsys):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["lineage", "--tracking-uri", tracking_uri, "no-such-model/1"]) == 2
    assert "no registered model version 'no-such-model/1'" in capsys.readouterr().err
    assert main(["lineage", "--tracking-uri", tracking_uri, "just-a-name"]) == 2
    assert "use name@alias, name/version or a model URI" in capsys.readouterr().err


def test_experiment_list_names_every_experiment_and_what_it_compares(capsys):
    assert main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("objectives", "iterations", "composition", "baseline", "curation", "positives", "ratio_level", "seeds", "verifier"):
        assert f"\n{name}\n" in f"\n{out}"
    assert "arms: topr, rft, tis, reinforce; 6 replicate(s), compared with rft" in out
    assert main(["experiment"]) == 2
    assert "name one of these experiments" in capsys.readouterr().err


def test_experiment_rejects_unknown_arms_and_takes_overrides_after_options(tmp_path, capsys):
    assert main(["experiment", "objectives", "--arms", "topr,dpo", f"run.output_dir={tmp_path}"]) == 2
    assert "no arm(s) dpo in experiment objectives" in capsys.readouterr().err
    # The override comes after --arms and still reaches the configuration (and is checked there).
    assert main(["experiment", "objectives", "--arms", "topr", "train.objectiv=topr"]) == 2
    assert "unknown field train.objectiv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "objectives", "--arms", "topr", "--no-such-flag"])
    assert main(["experiment", "objectives", "--reference", "dpo", f"run.output_dir={tmp_path}"]) == 2
    assert "--reference dpo: no such arm" in capsys.readouterr().err
    assert main(["experiment", "objectives", "--replicates", "0", f"run.output_dir={tmp_path}"]) == 2
    assert "--replicates must be at least 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_subset_of_arms_without_the_reference_compares_with_its_first_arm():
    from topr.cli import _with_arms, _with_replicates_and_reference
    from topr.experiment import load_spec

    _, spec = load_spec("objectives")
    chosen = _with_replicates_and_reference(_with_arms(spec, "objectives", ["topr", "tis"]), 2, None)
    assert (list(chosen.arms), chosen.reference_arm, chosen.replicates) == (["topr", "tis"], "topr", 2)
    assert _with_arms(spec, "objectives", ["topr", "rft"]).reference_arm == "rft"


@pytest.mark.parametrize("command", [["lineage", "m/1"], ["submit", "--host", "http://kfp"], ["run"]])
def test_a_tracking_uri_flag_with_a_password_is_refused(capsys, command):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--tracking-uri", "http://topr:s3cret@mlflow:5000"])
    assert exited.value.code == 2
    assert "must not carry a password" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "extra"),
    [("kfp", "workflow"), ("kfp.kubernetes", "workflow"), ("mlflow.entities", "workflow"), ("boto3", "workflow"), ("vllm", "gpu"), ("torch", None), ("no_such_module", None)],
)
def test_a_missing_module_is_traced_to_the_extra_that_installs_it(module, extra):
    from topr.cli import missing_extra

    assert missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module)) == extra


def test_a_command_without_its_extra_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the workflow extra were not installed
    assert main(["lineage", "topr-arithmetic@champion", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    assert "topr lineage: error: this needs mlflow, from topr's workflow extra: pip install 'topr[workflow]'" in capsys.readouterr().err


def test_a_failed_run_shows_the_failing_stage_and_its_last_lines(tmp_path, monkeypatch, capsys):
    from kfp import dsl

    from topr_pipelines import runner

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def curate(config_json: str) -> str:
        for step in range(30):
            print(f"curating {step}")
        raise ValueError("curation left nothing to train on")

    @dsl.pipeline(name="failing")
    def failing(config_json: str, tracking_uri: str, run_name: str, resume_run_id: str) -> str:
        return curate(config_json=config_json).output

    monkeypatch.setattr(runner, "build_pipeline", lambda config: failing)
    assert main(["run", "--cold-tasks", f"run.output_dir={tmp_path}", "run.name=failing"]) == 2

    shown = capsys.readouterr()
    assert "curating 3" not in shown.out + shown.err  # the task's output is in run.log, only its end on the console
    error = shown.err[shown.err.index("'curate' failed"):]
    lines = error.splitlines()
    assert len(lines) <= 13 and 'raise ValueError("curation left nothing to train on")' in error
    assert lines.index("    ValueError: curation left nothing to train on") < next(i for i, line in enumerate(lines) if line.startswith("topr run: error:"))
    assert str(tmp_path / "failing" / "run.log") in error


def test_resume_names_what_it_cannot_resume(tmp_path, capsys):
    assert main(["run", "--resume", "never-ran", f"run.output_dir={tmp_path}"]) == 2
    assert f"--resume never-ran: no run folder with a config.yaml there or at {tmp_path / 'never-ran'}" in capsys.readouterr().err
    assert main(["run", "--runner", "docker", "--resume", "never-ran"]) == 2
    assert "only --runner process runs can be resumed" in capsys.readouterr().err
    assert main(["run", "--resume", "never-ran", "--from", "champion", "train.epochs=2"]) == 2
    assert "--resume: --from, train.epochs=2: a resumed run keeps its own configuration" in capsys.readouterr().err
