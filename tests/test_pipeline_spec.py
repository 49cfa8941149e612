"""The compiled pipeline as a cluster sees it: cluster settings, shards, the committed YAML, submission.

No Kubeflow API server can run here, so these tests read the compiled spec (the pipeline
document and its Kubernetes platform document) and the requests ``topr submit`` sends to a
loopback server that records them.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import yaml

from topr_pipelines.runner import compile_pipeline, local_pipeline, print_restored
from topr.cli import main
from topr.config import load_config

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "pipelines" / "topr_pipeline.yaml"
GPU_STAGES = {"sample", "train", "evaluate", "gate"}
RETRIED_STAGES = {"sample", "verify", "evaluate"}


def compiled(tmp_path, *overrides: str) -> tuple[dict, dict]:
    """``(pipeline spec, kubernetes executors by name)`` for the default config plus ``overrides``."""
    path = compile_pipeline(load_config(None, list(overrides)), tmp_path / "topr.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def stage_of(executor: str) -> str:
    """``exec-collect-samples-2`` → ``collect_samples``."""
    name = executor.removeprefix("exec-")
    parts = name.split("-")
    if parts[-1].isdigit():
        parts = parts[:-1]
    return "_".join(parts)


def tasks_by_stage(spec: dict) -> dict[str, list[dict]]:
    """Every task of every DAG, grouped by the stage its executor runs."""
    executors = {name: component["executorLabel"] for name, component in spec["components"].items() if "executorLabel" in component}
    dags = [spec["root"]["dag"]] + [component["dag"] for component in spec["components"].values() if "dag" in component]
    grouped: dict[str, list[dict]] = {}
    for dag in dags:
        for task in dag["tasks"].values():
            executor = executors.get(task["componentRef"]["name"])
            if executor:
                grouped.setdefault(stage_of(executor), []).append(task)
    return grouped


@pytest.fixture(autouse=True)
def default_image(monkeypatch):
    monkeypatch.delenv("TOPR_IMAGE", raising=False)


def test_committed_pipeline_yaml_is_fresh(tmp_path):
    """``topr compile`` with the defaults must reproduce the committed YAML (the SDK version line aside)."""
    assert main(["compile", "--output", str(tmp_path / "fresh.yaml")]) == 0

    def without_sdk_version(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("sdkVersion:")]

    fresh, committed = (tmp_path / "fresh.yaml").read_text(), COMMITTED.read_text()
    assert without_sdk_version(fresh) == without_sdk_version(committed), (
        "pipelines/topr_pipeline.yaml is stale: run `topr compile` and commit it"
    )


def test_gpu_stages_ask_for_gpus_with_their_tolerations_and_node_selector(tmp_path):
    spec, executors = compiled(tmp_path, 'cluster.gpu_node_selector={"nvidia.com/gpu.product": "H100"}')
    for name, executor in spec["deploymentSpec"]["executors"].items():
        stage, resources = stage_of(name), executor["container"]["resources"]
        platform = executors[name]
        if stage in GPU_STAGES:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert resources["accelerator"]["resourceCount"] == "1", name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in platform["tolerations"], name
            assert platform["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "H100"}, name
        else:
            assert "accelerator" not in resources, name
            assert "tolerations" not in platform and "nodeSelector" not in platform, name
        assert resources["cpuRequest"] > 0 and resources["cpuLimit"] >= resources["cpuRequest"], name
        assert resources["memoryRequest"] > 0 and resources["memoryLimit"] >= resources["memoryRequest"], name


def test_every_stage_gets_credentials_from_secrets_and_runs_as_non_root(tmp_path):
    spec, executors = compiled(tmp_path, "cluster.mlflow_secret=mlflow-auth")
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for name, platform in executors.items():
        secrets = {entry["secretName"]: {pair["envVar"] for pair in entry["keyToEnv"]} for entry in platform["secretAsEnv"]}
        assert secrets == {
            "topr-s3-credentials": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
            "mlflow-auth": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
        }, name
        (endpoints,) = platform["configMapAsEnv"]
        assert endpoints["configMapName"] == "topr-endpoints"
        assert platform["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}  # int64 as JSON
        assert platform["imagePullPolicy"] == "IfNotPresent"
    # No credential value is ever written into the spec itself.
    text = json.dumps(spec)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "MLFLOW_TRACKING_PASSWORD" not in text


def empty_dirs(platform: dict) -> dict[str, dict]:
    """The emptyDir mounts of one executor, by mount path."""
    return {mount["mountPath"]: mount for mount in platform.get("emptyDirMounts", [])}


def test_every_stage_writes_to_bounded_empty_dirs_and_gpu_stages_get_a_memory_shm(tmp_path):
    # /tmp and /cache are emptyDirs with a sizeLimit (the kubelet evicts a pod past it), ready for
    # a read-only root filesystem; GPU stages get a memory-backed /dev/shm (NCCL, vLLM workers).
    _, executors = compiled(tmp_path)
    tmp = {}
    for name, platform in executors.items():
        mounts = empty_dirs(platform)
        assert mounts["/tmp"]["sizeLimit"] and "medium" not in mounts["/tmp"], name
        assert mounts["/cache"]["sizeLimit"] and "medium" not in mounts["/cache"], name
        if stage_of(name) in GPU_STAGES:
            assert mounts["/dev/shm"]["medium"] == "Memory" and mounts["/dev/shm"]["sizeLimit"], name
        else:
            assert "/dev/shm" not in mounts, name
        tmp[stage_of(name)] = mounts["/tmp"]["sizeLimit"]
    # train stages its checkpoint (~16 bytes per parameter) in /tmp: it gets the most room.
    gibibytes = {stage: int(size.removesuffix("Gi")) for stage, size in tmp.items()}
    assert gibibytes["train"] == max(gibibytes.values()) >= 100
    assert gibibytes["gate"] >= 50  # it downloads the champion into /tmp


def test_scratch_space_and_shared_memory_come_from_the_stage_settings(tmp_path):
    stages = (
        "cluster.stages={train: {ephemeral_storage: 300Gi},"
        " sample: {ephemeral_storage: 20Gi, ephemeral_storage_limit: 40Gi, shared_memory: 32Gi}}"
    )
    _, executors = compiled(tmp_path, stages)
    mounts = {stage_of(name): empty_dirs(platform) for name, platform in executors.items()}
    assert mounts["train"]["/tmp"]["sizeLimit"] == "300Gi"  # no limit given: the request
    assert mounts["sample"]["/tmp"]["sizeLimit"] == "40Gi"  # the limit, when one is given
    assert mounts["sample"]["/dev/shm"]["sizeLimit"] == "32Gi"
    assert main(["compile", "--output", str(tmp_path / "x.yaml"), "cluster.stages={train: {ephemeral_storage: lots}}"]) == 2


def test_pipeline_pods_never_reach_the_model_hub(tmp_path):
    spec, _ = compiled(tmp_path)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        env = {entry["name"]: entry["value"] for entry in executor["container"].get("env", [])}
        assert env.get("HF_HUB_OFFLINE") == "1", name


def test_a_stage_can_have_its_own_s3_secret(tmp_path):
    # e.g. read-only keys for the stages that publish nothing (docs/deploy.md, "S3 credentials per role").
    _, executors = compiled(tmp_path, "cluster.stages={sample: {s3_secret: topr-s3-read}, gate: {s3_secret: topr-s3-read}}")
    for name, platform in executors.items():
        (secret,) = platform["secretAsEnv"]
        expected = "topr-s3-read" if stage_of(name) in {"sample", "gate"} else "topr-s3-credentials"
        assert secret["secretName"] == expected, name


def test_secrets_can_be_left_out(tmp_path):
    _, executors = compiled(tmp_path, "cluster.s3_secret=null", "cluster.endpoints_config_map=null")
    assert all("secretAsEnv" not in platform and "configMapAsEnv" not in platform for platform in executors.values())


def test_retries_timeouts_and_caching(tmp_path):
    spec, executors = compiled(tmp_path, "cluster.stages={train: {timeout_minutes: 90}}")
    for stage, tasks in tasks_by_stage(spec).items():
        for task in tasks:
            retries = task.get("retryPolicy", {}).get("maxRetryCount", 0)
            if stage in RETRIED_STAGES:
                assert retries >= 1 and task["retryPolicy"]["backoffDuration"] == "60s", stage
            if stage == "train":
                assert retries == 1  # once: the retry resumes from the last checkpoint
            if stage == "train_verifier":
                assert retries == 0  # not checkpointed: a retry would repeat all of its GPU work
            assert task["cachingOptions"] == {}, stage  # caching off: stages log to MLflow
    deadlines = {stage_of(name): int(platform["activeDeadlineSeconds"]) for name, platform in executors.items()}
    assert deadlines["train"] == 90 * 60
    assert deadlines["sample"] == 360 * 60
    assert all(seconds > 0 for seconds in deadlines.values())


def test_kfp_local_honours_a_tasks_retry_policy(tmp_path, monkeypatch):
    """kfp 2.17's kfp.local runs a task again as its retry policy says, whatever made it fail
    (``kfp.local.orchestrator.task_executor.execute_single_task``), as a cluster would: so a local
    run must not carry the cluster's retries (``test_a_local_run_retries_no_stage``)."""
    from kfp import compiler, dsl, local

    def failing(counter: str):  # its source runs in the task, where the annotation is a type
        with open(counter, "a") as handle:
            handle.write("attempt\n")
        raise ValueError("an input error: certain to repeat")

    def retried(counter):
        component(counter=counter).set_retry(num_retries=2, backoff_duration="0s", backoff_factor=1.0)

    failing.__annotations__ = retried.__annotations__ = {"counter": str}  # here, types rather than __future__'s strings
    component = dsl.component(failing)
    retried = dsl.pipeline(name="retried")(retried)

    counter = tmp_path / "attempts.txt"
    monkeypatch.setattr(local.config.LocalExecutionConfig, "instance", None)  # put back after the test
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=False)
    retried(counter=str(counter))
    assert counter.read_text().count("attempt") == 3
    compiler.Compiler().compile(retried, str(tmp_path / "retried.yaml"))  # the policy is in the spec kfp.local reads
    assert yaml.safe_load((tmp_path / "retried.yaml").read_text())["root"]["dag"]["tasks"]["failing"]["retryPolicy"]["maxRetryCount"] == 2


def test_a_local_run_retries_no_stage(tmp_path):
    """kfp.local cannot tell a failure that will repeat (a prompt longer than the context, a
    refused promotion, a bad record) from a transient one, and would wait out the cluster's
    backoff (60 s, then 120 s, ...) before each repeat: ``topr run`` builds its pipeline without
    retries. The compiled cluster pipeline keeps them."""
    from kfp import compiler

    config = load_config(None, ["run.iterations=1", "verifier.enabled=true", "sample.shards=2"])
    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(local_pipeline(config), str(path))
    spec = yaml.safe_load_all(path.read_text()).__next__()
    stages = tasks_by_stage(spec)
    assert {"sample", "train", "curate", "promote", "start_run", "finish_run"} <= set(stages)
    assert all("retryPolicy" not in task for tasks in stages.values() for task in tasks)
    assert config.cluster.stage("sample").retries == 2  # the config itself is left as it was
    cluster_spec, _ = compiled(tmp_path, "run.iterations=1", "verifier.enabled=true", "sample.shards=2")
    assert tasks_by_stage(cluster_spec)["sample"][0]["retryPolicy"]["maxRetryCount"] == 2


def test_image_comes_from_config_or_environment(tmp_path, monkeypatch):
    spec, _ = compiled(tmp_path, "cluster.image=registry.example.com/topr:abc123")
    images = {executor["container"]["image"] for executor in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/topr:abc123"}
    monkeypatch.setenv("TOPR_IMAGE", "registry.example.com/topr:from-env")
    spec, _ = compiled(tmp_path)
    images = {executor["container"]["image"] for executor in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/topr:from-env"}


def test_two_shards_fan_sampling_out_and_collect_it(tmp_path):
    spec, _ = compiled(tmp_path, "sample.shards=2", "run.iterations=1")
    tasks = spec["components"]["comp-iteration-1"]["dag"]["tasks"]
    (loop,) = [task for name, task in tasks.items() if name.startswith("for-loop")]
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1]
    (sample,) = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
    assert sample["inputs"]["parameters"]["shards"]["runtimeValue"]["constant"] == 2
    collected = tasks["collect-samples"]["inputs"]["artifacts"]["shards"]
    assert collected["taskOutputArtifact"]["producerTask"] == next(name for name in tasks if name.startswith("for-loop"))
    # Verification and training read the collected samples, not one shard.
    assert tasks["verify"]["inputs"]["artifacts"]["samples"]["taskOutputArtifact"]["producerTask"] == "collect-samples"
    assert tasks["train"]["inputs"]["artifacts"]["samples"]["taskOutputArtifact"]["producerTask"] == "collect-samples"


def test_promote_runs_on_the_gate_decision_and_gets_the_champion_it_beat(tmp_path):
    spec, _ = compiled(tmp_path, "run.iterations=1")
    (promote,) = tasks_by_stage(spec)["promote"]
    # Inside the dsl.If, the gate's outputs arrive as channels of the condition's sub-DAG.
    assert promote["inputs"]["parameters"]["champion_version"] == {"componentInputParameter": "pipelinechannel--gate-champion_version"}
    (condition,) = [task for task in spec["components"]["comp-exit-handler-1"]["dag"]["tasks"].values() if "triggerPolicy" in task]
    # kfp.local evaluates a condition only on an output named Output (see components/gate).
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == 'promote'"


def test_bad_cluster_settings_name_the_field(capsys, tmp_path):
    assert main(["compile", "--output", str(tmp_path / "x.yaml"), "cluster.stages={trian: {gpus: 2}}"]) == 2
    assert "cluster.stages: Value error, unknown stage(s) trian" in capsys.readouterr().err
    assert main(["compile", "--output", str(tmp_path / "x.yaml"), "cluster.stages={train: {memory: lots}}"]) == 2
    assert "cluster.stages.train.memory" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_submit_sends_the_compiled_pipeline_and_prints_the_run_url(kfp_api, capsys):
    host, requests = kfp_api
    command = ["submit", "--host", host, "--tracking-uri", "http://mlflow.topr:5000", "--run-name", "nightly-1",
               "--pipeline-root", "s3://topr/kfp", "--service-account", "topr-pipeline",
               "run.iterations=1", "sample.shards=2"]  # fmt: skip
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "submitted run run-1 (nightly-1, 1 iterations)" in out
    assert f"{host}/#/runs/details/run-1" in out
    (sent,) = [body for method, path, body in requests if method == "POST" and path.startswith("/apis/v2beta1/runs")]
    assert sent["display_name"] == "nightly-1" and sent["experiment_id"] == "exp-1"
    assert sent["service_account"] == "topr-pipeline"
    runtime = sent["runtime_config"]
    assert runtime["pipeline_root"] == "s3://topr/kfp"
    assert runtime["parameters"]["tracking_uri"] == "http://mlflow.topr:5000"
    assert json.loads(runtime["parameters"]["config_json"])["sample"]["shards"] == 2
    # The run's typed parameters, as its run form shows them.
    assert runtime["parameters"]["train_learning_rate"] == 1e-5 and runtime["parameters"]["run_registered_model"] == "topr-arithmetic"
    # With platform settings, the client sends the pipeline and its Kubernetes settings together.
    package = sent["pipeline_spec"]
    assert "comp-iteration-1" in package["pipeline_spec"]["components"]
    assert "exec-train" in package["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize("source", ["environment", "file"])
def test_submit_sends_the_token_and_cookies_from_the_environment_or_a_file(kfp_api, kfp_authorizations, kfp_cookies, monkeypatch, tmp_path, source):
    host, requests = kfp_api
    arguments = ["submit", "--host", host, "--tracking-uri", "http://m:5000"]
    if source == "environment":
        monkeypatch.setenv("KF_PIPELINES_TOKEN", "secret-token")
        monkeypatch.setenv("KF_PIPELINES_COOKIES", "authservice_session=secret")
    else:
        monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
        monkeypatch.delenv("KF_PIPELINES_COOKIES", raising=False)
        (tmp_path / "token").write_text("secret-token\n")
        (tmp_path / "cookies").write_text("authservice_session=secret\n")
        arguments += ["--token-file", str(tmp_path / "token"), "--cookies-file", str(tmp_path / "cookies")]
    assert main(arguments) == 0
    assert len(kfp_authorizations) == len(requests) > 0
    assert set(kfp_authorizations) == {"Bearer secret-token"}
    assert set(kfp_cookies) == {"authservice_session=secret"}


@pytest.mark.parametrize(("flag", "variable", "file_flag"), [("--token", "KF_PIPELINES_TOKEN", "--token-file"), ("--cookies", "KF_PIPELINES_COOKIES", "--cookies-file")])
def test_a_credential_is_never_taken_on_the_command_line_where_ps_shows_it(capsys, flag, variable, file_flag):
    with pytest.raises(SystemExit) as exited:
        main(["submit", "--host", "http://kfp", "--tracking-uri", "http://m:5000", flag, "secret"])
    assert exited.value.code == 2
    assert f"{flag}: a credential on the command line shows in ps; put it in ${variable} or in a file given as {file_flag}" in capsys.readouterr().err
    assert main(["submit", "--host", "http://kfp", "--tracking-uri", "http://m:5000", file_flag, "/no/such/file"]) == 2
    assert f"{file_flag} /no/such/file" in capsys.readouterr().err


VERIFIER_STAGES = {"verifier_data", "train_verifier", "evaluate_verifier"}


def test_verifier_branch_follows_the_last_iteration(tmp_path):
    spec, executors = compiled(tmp_path, "verifier.enabled=true", "run.iterations=2")
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]

    def producers(name: str) -> dict[str, tuple[str, str]]:
        artifacts = tasks[name]["inputs"]["artifacts"]
        return {key: (value["taskOutputArtifact"]["producerTask"], value["taskOutputArtifact"]["outputArtifactKey"]) for key, value in artifacts.items()}

    assert producers("verifier-data") == {
        "model": ("iteration-2", "Output"),
        "train_prompts": ("prompts", "train_prompts"),
        "eval_prompts": ("prompts", "eval_prompts"),
    }
    assert producers("train-verifier") == {"base_model": ("prepare-model", "model"), "verifier_data": ("verifier-data", "verifier_data")}
    assert producers("evaluate-verifier") == {
        "base_model": ("prepare-model", "model"),
        "verifier": ("train-verifier", "verifier"),
        "verifier_data": ("verifier-data", "verifier_data"),
    }
    assert {tasks[name]["taskInfo"]["name"] for name in ("verifier-data", "train-verifier", "evaluate-verifier")} == {
        "verifier data", "train verifier", "evaluate verifier",
    }  # fmt: skip
    for name, executor in spec["deploymentSpec"]["executors"].items():
        if stage_of(name) in VERIFIER_STAGES:
            assert executor["container"]["resources"]["accelerator"]["resourceCount"] == "1", name
            assert int(executors[name]["activeDeadlineSeconds"]) > 0, name


def test_default_pipeline_has_no_verifier_branch(tmp_path):
    spec, _ = compiled(tmp_path)
    assert not VERIFIER_STAGES & set(tasks_by_stage(spec))


def test_a_print_swapped_inside_a_local_run_does_not_outlive_it():
    # kfp.local's threaded ParallelFor tasks can leave their indenting print installed (the fault injected here).
    interpreter_print = builtins.print
    with pytest.raises(RuntimeError), print_restored():
        builtins.print = lambda *args, **kwargs: interpreter_print("    ", *args, **kwargs)
        raise RuntimeError("task failed")
    assert builtins.print is interpreter_print


def test_evaluations_and_the_gate_publish_what_the_pipeline_ui_renders(tmp_path):
    """Kubeflow's UI renders HTML and Markdown artifacts in the run view: every evaluation
    publishes the run so far as a page, the gate its decision."""
    spec, _ = compiled(tmp_path, "run.iterations=2")
    outputs = {name: component.get("outputDefinitions", {}).get("artifacts", {}) for name, component in spec["components"].items()}
    evaluations = [name for name in outputs if name.startswith("comp-evaluate") and "verifier" not in name]
    assert evaluations and all(outputs[name]["accuracy_page"]["artifactType"]["schemaTitle"] == "system.HTML" for name in evaluations)
    assert outputs["comp-gate"]["decision_report"]["artifactType"]["schemaTitle"] == "system.Markdown"


def test_the_run_form_shows_typed_parameters_with_their_defaults_and_descriptions(tmp_path):
    spec, _ = compiled(tmp_path, "train.learning_rate=2e-5", "sample.samples_per_prompt=6")
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    expected = {
        "model_path": ("STRING", "embedded:smollm2-135m-instruct"),
        "task_train_path": ("STRING", ""),
        "task_eval_path": ("STRING", ""),
        "train_learning_rate": ("NUMBER_DOUBLE", 2e-5),
        "train_baseline": ("NUMBER_DOUBLE", -0.8),
        "sample_samples_per_prompt": ("NUMBER_INTEGER", 6),
        "sample_temperature": ("NUMBER_DOUBLE", 0.5),
        "gate_margin": ("NUMBER_DOUBLE", 0.0),
        "run_registered_model": ("STRING", "topr-arithmetic"),
    }
    assert {name: (parameters[name]["parameterType"], parameters[name]["defaultValue"]) for name in expected} == expected
    assert parameters["train_learning_rate"]["description"].startswith("train.learning_rate: ")
    assert "typed parameters below are written over it" in parameters["config_json"]["description"]
    assert set(parameters) == {"config_json", "tracking_uri", "run_name", "resume_run_id", *expected}


def test_every_stage_reads_the_configuration_with_the_run_form_applied(tmp_path):
    """start_run writes the form over config_json; every task after it reads start_run's output."""
    spec, _ = compiled(tmp_path)
    start = spec["root"]["dag"]["tasks"]["start-run"]["inputs"]["parameters"]
    assert start["train_learning_rate"] == {"componentInputParameter": "train_learning_rate"}
    assert json.loads(start["form_defaults"]["runtimeValue"]["constant"])["train_baseline"] == -0.8
    loop = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    prepare = loop["prepare-model"]["inputs"]["parameters"]["config_json"]
    assert prepare == {"componentInputParameter": "pipelinechannel--start-run-config_json"}
    assert spec["components"]["comp-exit-handler-1"]["inputDefinitions"]["parameters"]["pipelinechannel--start-run-config_json"]
    # The exit handler closes the run from the pipeline's own parameter: it may read no task's output.
    assert spec["root"]["dag"]["tasks"]["finish-run"]["inputs"]["parameters"]["config_json"] == {"componentInputParameter": "config_json"}
