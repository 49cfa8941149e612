import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from topr.cluster import ServeConfig
from topr.config import (
    Config,
    ConfigError,
    apply_overrides,
    apply_run_form,
    build_config,
    config_to_dict,
    config_to_yaml,
    describe_fields,
    form_values,
    load_config,
)


def test_defaults_validate():
    config = load_config()
    assert config == Config()
    assert config.task.name == "arithmetic"
    assert config.train.objective == "topr"
    assert config.train.learning_rate == pytest.approx(1e-5)
    assert (config.train.gradient_accumulation, config.train.batch_order) == (4, "stratified")
    assert config.run.iterations == 2


def test_each_task_registers_into_its_own_model_by_default():
    """So that a run on one task is never gated against a champion trained on another."""
    assert load_config().run.registered_model == "topr-arithmetic"
    files = ["task.train_path=train.jsonl", "task.eval_path=eval.jsonl"]
    assert load_config(None, ["task.name=gsm8k", *files]).run.registered_model == "topr-gsm8k"
    assert load_config(None, ["task.name=gsm8k", *files, "run.registered_model=mine"]).run.registered_model == "mine"


def test_a_jsonl_task_registers_into_a_model_of_its_held_out_file():
    """Two jsonl runs on other files used to share topr-jsonl and gate against each other's champion."""

    def registered(*overrides: str) -> str:
        return load_config(None, ["task.name=jsonl", "task.train_path=train.jsonl", *overrides]).run.registered_model

    capitals, sums = registered("task.eval_path=/srv/capitals/test.jsonl"), registered("task.eval_path=/srv/sums/test.JSONL")
    assert (capitals, sums) == ("topr-jsonl-srv-capitals-test", "topr-jsonl-srv-sums-test")
    # A local path is made absolute: test.jsonl in two projects' folders is two datasets.
    assert registered("task.eval_path=test.jsonl") == "topr-jsonl-" + str(Path.cwd() / "test").strip("/").replace("/", "-")
    # A scheduled run reads the same URI each time, and keeps its model.
    assert registered("task.eval_path=S3://topr/prompts/eval.jsonl") == "topr-jsonl-topr-prompts-eval"
    assert registered("task.eval_path=/srv/capitals/test.jsonl", "run.registered_model=capitals") == "capitals"
    # A long location keeps its tail and a digest of the whole, so two stay apart.
    deep = [registered(f"task.eval_path=/{'folder/' * 30}{tail}/test.jsonl") for tail in ("a", "b")]
    assert deep[0] != deep[1] and all(len(name) <= 120 and name.endswith("-test") for name in deep)


@pytest.mark.parametrize("name", ["../elsewhere", "/etc", "a/b", "..", ".hidden", "with space"])
def test_a_run_name_is_one_safe_folder_name(name):
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, [f"run.name={name}"])


def test_a_tracking_uri_with_a_password_is_refused():
    """It would be logged as a parameter of every run and shown in the pipeline UI."""
    with pytest.raises(ConfigError, match="run.tracking_uri: .*must not carry a password.*MLFLOW_TRACKING_PASSWORD"):
        load_config(None, ["run.tracking_uri=https://topr:s3cret@mlflow.example.com"])
    assert load_config(None, ["run.tracking_uri=https://topr@mlflow.example.com"]).run.tracking_uri.startswith("https://topr@")


def test_yaml_round_trip(tmp_path):
    config = load_config(overrides=["train.objective=tis", "sample.temperature=0.7"])
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text())["train"]["objective"] == "tis"


def test_load_yaml_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "train:\n  objective: reinforce\n  learning_rate: 1.0e-4\n  positive_bounds: [0, 1]\n"
        "sample:\n  samples_per_prompt: 8\n"
        "run:\n  iterations: 3\n"
    )
    config = load_config(path)
    assert config.train.objective == "reinforce"
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.train.positive_bounds == (0.0, 1.0)
    assert config.sample.samples_per_prompt == 8
    assert config.run.iterations == 3
    # Untouched fields keep their defaults.
    assert config.train.batch_size == Config().train.batch_size


def test_empty_yaml_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  objective: reinforce\n  batch_size: 4\n")
    config = load_config(path, ["train.objective=ppo"])
    assert config.train.objective == "ppo"
    assert config.train.batch_size == 4


def test_overrides_parsed_as_yaml_scalars():
    config = load_config(
        overrides=[
            "train.learning_rate=1e-5",
            "train.batch_size=16",
            "train.positive_bounds=[0,1]",
            "train.negative_bounds=[0.5, 2]",
            "train.policy_temperature=null",
            "curate.drop_truncated=true",
            "curate.target_positive_fraction=0.25",
            "model.threads=3",
            "run.name=my-run",
            "sample.top_p=0.9",
        ]
    )
    assert config.train.learning_rate == pytest.approx(1e-5)
    assert isinstance(config.train.learning_rate, float)
    assert config.train.batch_size == 16
    assert config.train.positive_bounds == (0.0, 1.0)
    assert config.train.negative_bounds == (0.5, 2.0)
    assert config.train.policy_temperature is None
    assert config.curate.drop_truncated is True
    assert config.curate.target_positive_fraction == pytest.approx(0.25)
    assert config.model.threads == 3
    assert config.run.name == "my-run"
    assert config.sample.top_p == pytest.approx(0.9)


def test_apply_overrides_writes_into_data():
    data = {"train": {"batch_size": 2}}
    apply_overrides(data, ["train.learning_rate=0.5", "sample.seed=7", "model.threads=", "train.positive_bounds=[0,1]"])
    assert data == {
        "train": {"batch_size": 2, "learning_rate": 0.5, "positive_bounds": [0, 1]},
        "sample": {"seed": 7},
        "model": {"threads": None},
    }


@pytest.mark.parametrize(
    "override, section, field, expected",
    [
        ("run.name=2024", "run", "name", "2024"),
        ("run.name=1e5", "run", "name", "1e5"),
        ("model.system_prompt=yes", "model", "system_prompt", "yes"),
        ("model.system_prompt=null", "model", "system_prompt", None),
        ("run.experiment=3.5", "run", "experiment", "3.5"),
    ],
)
def test_text_fields_keep_their_text(override, section, field, expected):
    config = load_config(overrides=[override])
    assert getattr(getattr(config, section), field) == expected


def test_override_into_empty_section_of_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  # objective: topr\nsample:\n  seed: 3\n")
    config = load_config(path, ["train.objective=tis"])
    assert config.train.objective == "tis"
    assert config.sample.seed == 3


def test_override_into_non_mapping_section_of_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="'train' is not a mapping"):
        load_config(path, ["train.objective=tis"])


def test_empty_override_value_is_null():
    config = load_config(overrides=["train.policy_temperature=0.5", "train.policy_temperature="])
    assert config.train.policy_temperature is None


def test_override_value_may_contain_equals_sign():
    config = load_config(overrides=["model.system_prompt=a=b"])
    assert config.model.system_prompt == "a=b"


def test_unknown_section_lists_choices():
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=["trian.objective=topr"])
    message = str(caught.value)
    assert "unknown section 'trian'" in message
    for section in ("model", "task", "sample", "curate", "train", "evaluate", "run"):
        assert section in message


def test_unknown_field_lists_choices():
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=["train.lr=1e-5"])
    message = str(caught.value)
    assert "unknown field train.lr" in message
    for field in ("objective", "learning_rate", "baseline", "positive_bounds", "epochs"):
        assert field in message


@pytest.mark.parametrize("override", ["train", "train.objective", "train=topr", ".objective=x", "train.=x", "cluster..enabled=x"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(overrides=[override])


def test_an_override_reaches_a_section_of_a_section():
    assert load_config(overrides=["cluster.serve.gpus=0"]).cluster.serve.gpus == 0
    with pytest.raises(ConfigError, match=r"unknown section 'a'"):
        load_config(overrides=["a.b.c=1"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.learning_rate=-1e-5", "train.learning_rate"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.objective=foo", "train.objective"),
        ("train.positive_bounds=[1,0]", "train.positive_bounds"),
        ("train.negative_bounds=[-1,2]", "train.negative_bounds"),
        ("train.positive_bounds=[1]", "train.positive_bounds"),
        ("sample.temperature=0", "sample.temperature"),
        ("sample.top_p=1.5", "sample.top_p"),
        ("run.iterations=0", "run.iterations"),
        ("curate.strategy=best", "curate.strategy"),
        ("curate.target_positive_fraction=1", "curate.target_positive_fraction"),
        ("task.name=nope", "task.name"),
        ("task.extraction=loose", "task.extraction"),
        ("train.batch_size=many", "train.batch_size"),
        ("train.lr_schedule=exponential", "train.lr_schedule"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.batch_order=sorted", "train.batch_order"),
        ("train.length_normalization=token", "train.length_normalization"),
        ("train.float32_head=maybe", "train.float32_head"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    message = str(caught.value)
    assert f"\n  {field}" in message  # the error line starts with the field (its item for tuples)
    assert "command-line overrides" in message


def test_training_options_default_to_the_calibrated_set_up_and_take_their_choices():
    train = load_config().train
    assert (train.lr_schedule, train.warmup_steps, train.batch_order) == ("constant", 0, "stratified")
    assert (train.length_normalization, train.float32_head) == ("sequence", True)
    train = load_config(
        overrides=[
            "train.lr_schedule=cosine",
            "train.warmup_steps=3",
            "train.batch_order=shuffle",
            "train.length_normalization=constant",
            "train.float32_head=false",
        ]
    ).train
    assert (train.lr_schedule, train.warmup_steps, train.batch_order) == ("cosine", 3, "shuffle")
    assert (train.length_normalization, train.float32_head) == ("constant", False)


def test_invalid_objective_lists_choices():
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=["train.objective=foo"])
    message = str(caught.value)
    for objective in ("topr", "reinforce", "tis", "is", "rft", "ppo"):
        assert f"'{objective}'" in message


def test_invalid_value_in_file_names_file_and_field(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  learning_rate: -0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "train.learning_rate" in message


@pytest.mark.parametrize(
    "override, field",
    [
        ("gate.margin=nan", "gate.margin"),
        ("gate.margin=.nan", "gate.margin"),
        ("train.baseline=inf", "train.baseline"),
        ("train.baseline=-.inf", "train.baseline"),
        ("train.max_grad_norm=.inf", "train.max_grad_norm"),
        ("sample.temperature=.inf", "sample.temperature"),
        ("train.negative_bounds=[0, .inf]", "train.negative_bounds.1"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    message = str(caught.value)
    assert f"\n  {field}: Input should be a finite number" in message


def test_non_finite_number_in_file_names_file_and_field(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("gate:\n  margin: .nan\ntrain:\n  baseline: .inf\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "gate.margin: Input should be a finite number" in message
    assert "train.baseline: Input should be a finite number" in message


def test_unknown_field_in_file_is_rejected(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(path)


def test_unknown_section_in_file_is_rejected(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("trian:\n  objective: topr\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(path)


@pytest.mark.parametrize("task", ["gsm8k", "math", "jsonl"])
def test_file_task_needs_train_and_eval_paths(task):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[f"task.name={task}"])
    message = str(caught.value)
    assert "task.train_path" in message and "task.eval_path" in message
    with pytest.raises(ConfigError, match="task.eval_path"):
        load_config(overrides=[f"task.name={task}", "task.train_path=train.jsonl"])
    config = load_config(overrides=[f"task.name={task}", "task.train_path=train.jsonl", "task.eval_path=eval.jsonl"])
    assert config.task.name == task


def test_sections_reject_invalid_assignment():
    config = Config()
    with pytest.raises(ValueError):
        config.train.learning_rate = -1.0


def test_build_config_names_source():
    with pytest.raises(ConfigError, match=r"invalid configuration \(pipeline\)"):
        build_config({"train": {"objective": "foo"}}, source="pipeline")


def test_config_to_dict_round_trips():
    config = load_config(overrides=["train.positive_bounds=[0,1]", "task.level=hard"])
    assert build_config(config_to_dict(config)) == config


def test_describe_fields_documents_every_field():
    text = describe_fields()
    for section_name, section_info in Config.model_fields.items():
        assert f"{section_name}:" in text
        for field_name, info in section_info.annotation.model_fields.items():
            assert info.description, f"{section_name}.{field_name} has no description"
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                continue  # a section of the section: its fields below
            assert f"{section_name}.{field_name} = {repr(info.get_default(call_default_factory=True))[:57]}" in text
            assert info.description in text
    for field_name, info in ServeConfig.model_fields.items():
        assert f"cluster.serve.{field_name} = " in text and info.description in text
    assert "cluster.serve = " not in text
    assert "train.objective = 'topr'" in text
    assert "sample.temperature = 0.5" in text
    assert "cluster.s3_secret = 'topr-s3-credentials'" in text


def test_missing_config_file_names_it(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(path)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  objective: [topr\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_sampling_far_beyond_the_machine_is_refused_with_the_figure_and_how_to_allow_it():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["sample.samples_per_prompt=100000", "task.train_size=8"])
    message = str(caught.value)
    assert "task.train_size=8 × sample.samples_per_prompt=100000 = 800,000 completions per iteration" in message
    assert "more than sample.max_completions=100,000" in message
    assert "51,200,000 new tokens" in message  # 800k × sample.max_new_tokens=64
    assert "sample.max_completions=800000" in message  # how to ask for it anyway
    allowed = load_config(None, ["sample.samples_per_prompt=100000", "task.train_size=8", "sample.max_completions=800000"])
    assert allowed.sample.samples_per_prompt == 100000


def test_evaluation_samples_count_against_the_same_bound():
    with pytest.raises(ConfigError, match=r"task\.eval_size=200 × evaluate\.samples_per_prompt=1000 = 200,000 completions per evaluation"):
        load_config(None, ["evaluate.samples_per_prompt=1000"])


def test_the_default_bound_leaves_room_for_the_configs_in_the_repository():
    config = load_config()
    assert config.sample.max_completions == 100_000
    assert config.task.train_size * config.sample.samples_per_prompt <= config.sample.max_completions
    load_config(None, ["task.train_size=1000", "sample.samples_per_prompt=100"])  # 100,000: at the bound, allowed
    with pytest.raises(ConfigError, match="sample.max_completions"):
        load_config(None, ["sample.max_completions=0"])


def test_the_run_form_writes_what_differs_from_its_defaults_over_config_json():
    """A compiled pipeline's typed parameters (topr.config.RUN_FORM): one changed in the run form
    wins; one left at its default leaves config_json's value, edited in the form or not, alone."""
    config = load_config(None, ["train.learning_rate=2e-5"])
    config_json = json.dumps(config_to_dict(config))
    defaults = form_values(config)
    assert defaults["train_learning_rate"] == 2e-5 and defaults["task_train_path"] == "" and defaults["run_registered_model"] == "topr-arithmetic"
    assert apply_run_form(config_json, defaults, dict(defaults)) == config_json  # byte for byte: the cache keys hold it

    changed = json.loads(apply_run_form(config_json, defaults, {**defaults, "train_baseline": -0.5, "sample_samples_per_prompt": 8}))
    assert (changed["train"]["baseline"], changed["sample"]["samples_per_prompt"], changed["train"]["learning_rate"]) == (-0.5, 8, 2e-5)

    edited = json.dumps({**config_to_dict(config), "gate": {**config_to_dict(config)["gate"], "margin": 0.1}})
    assert json.loads(apply_run_form(edited, defaults, {**defaults, "train_baseline": 0.0}))["gate"]["margin"] == 0.1


def test_a_bad_value_in_the_run_form_names_the_parameter_and_the_field():
    config = load_config()
    defaults = form_values(config)
    with pytest.raises(ConfigError) as raised:
        apply_run_form(json.dumps(config_to_dict(config)), defaults, {**defaults, "sample_temperature": 0.0})
    assert "the run form's sample_temperature=0.0" in str(raised.value) and "sample.temperature: Input should be greater than 0" in str(raised.value)
    # An emptied text field is unset, and checked like any configuration.
    files = load_config(None, ["task.name=jsonl", "task.train_path=train.jsonl", "task.eval_path=eval.jsonl"])
    defaults = form_values(files)
    with pytest.raises(ConfigError, match="task.name=jsonl needs task.train_path and task.eval_path"):
        apply_run_form(json.dumps(config_to_dict(files)), defaults, {**defaults, "task_train_path": ""})


def test_a_file_task_refuses_a_validation_split_and_says_where_to_point_instead():
    with pytest.raises(ConfigError, match="task.eval_split=validation: task jsonl has no validation split.*task.eval_path"):
        load_config(None, ["task.name=jsonl", "task.train_path=t.jsonl", "task.eval_path=e.jsonl", "task.eval_split=validation"])
    assert load_config(None, ["task.eval_split=validation"]).task.eval_split == "validation"


def test_new_task_files_in_the_run_form_register_into_their_own_model():
    """Unless the form names the registered model, or config_json named one of its own."""
    config = load_config(None, ["task.name=jsonl", "task.train_path=/srv/a/train.jsonl", "task.eval_path=/srv/a/test.jsonl"])
    defaults = form_values(config)
    moved = {**defaults, "task_train_path": "/srv/b/train.jsonl", "task_eval_path": "/srv/b/test.jsonl"}
    assert json.loads(apply_run_form(json.dumps(config_to_dict(config)), defaults, moved))["run"]["registered_model"] == "topr-jsonl-srv-b-test"
    named = {**moved, "run_registered_model": "mine"}
    assert json.loads(apply_run_form(json.dumps(config_to_dict(config)), defaults, named))["run"]["registered_model"] == "mine"
    own = config.model_copy(update={"run": config.run.model_copy(update={"registered_model": "capitals"})})
    assert json.loads(apply_run_form(json.dumps(config_to_dict(own)), defaults, moved))["run"]["registered_model"] == "capitals"


def test_a_form_value_left_at_its_default_under_an_edited_config_json_is_warned_about(caplog):
    config = load_config()
    defaults = form_values(config)
    edited = config_to_dict(config)
    edited["train"]["learning_rate"] = 3e-5
    assert apply_run_form(json.dumps(edited), defaults, dict(defaults)) == json.dumps(edited)
    assert "the run form's train_learning_rate is at its compiled default 1e-05: config_json's train.learning_rate=3e-05 stands" in caplog.text


def test_an_emptied_required_text_field_is_refused_by_name():
    config = load_config()
    defaults = form_values(config)
    with pytest.raises(ConfigError, match="the run form's model_path is empty: model.path needs a value"):
        apply_run_form(json.dumps(config_to_dict(config)), defaults, {**defaults, "model_path": ""})


def reward_override(tmp_path, body: str, function: str = "score") -> str:
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return f"task.reward_function={path}:{function}"


def test_a_reward_function_and_its_weights_load_from_the_command_line(tmp_path):
    override = reward_override(tmp_path, "def score(record, completion):\n    return 0.0\n")
    task = load_config(overrides=[override, "task.format_weight=0.2", "task.function_weight=0.5"]).task
    assert task.reward_function == override.partition("=")[2]
    assert (task.correctness_weight, task.format_weight, task.function_weight) == (1.0, 0.2, 0.5)
    assert (Config().task.reward_function, Config().task.correctness_weight, Config().task.format_weight) == (None, 1.0, 0.0)


@pytest.mark.parametrize(
    "body, function, problem",
    [
        ("def score(record, completion):\n    return 0.0\n", "scor", "has no function 'scor'"),
        ("score = 0.5\n", "score", "is not callable: it is a float"),
        ("import no_such_package_here\n", "score", "failed to load: ModuleNotFoundError: No module named 'no_such_package_here'"),
        ("def score(record, completion)\n", "score", "failed to load: SyntaxError"),
    ],
)
def test_a_reward_function_that_cannot_be_loaded_is_refused_naming_the_field(tmp_path, body, function, problem):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[reward_override(tmp_path, body, function)])
    assert "\n  task.reward_function: " in str(caught.value) and problem in str(caught.value)


@pytest.mark.parametrize(
    "value, problem",
    [
        ("no_such_module_for_rewards:score", "cannot import module 'no_such_module_for_rewards': ModuleNotFoundError"),
        ("json:no_such_function", "json has no function 'no_such_function'"),
        ("missing/rewards.py:score", "no such file: "),
        ("score", "'score' is not of the form 'module:function' or 'path/to/file.py:function'"),
        ("json:", "is not of the form"),
    ],
)
def test_a_reward_function_named_wrong_is_refused_naming_the_field(value, problem):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[f"task.reward_function={value}"])
    assert "\n  task.reward_function: " in str(caught.value) and problem in str(caught.value)


def test_reward_weights_are_not_negative_and_not_all_zero():
    with pytest.raises(ConfigError, match=r"\n  task.format_weight: Input should be greater than or equal to 0"):
        load_config(overrides=["task.format_weight=-0.5"])
    with pytest.raises(ConfigError, match=r"\n  task: Value error, every reward would be 0"):
        load_config(overrides=["task.correctness_weight=0"])
    with pytest.raises(ConfigError, match="every reward would be 0"):
        load_config(overrides=["task.correctness_weight=0", "task.reward_function=json:dumps", "task.function_weight=0"])
    assert load_config(overrides=["task.correctness_weight=0", "task.format_weight=1"]).task.format_weight == 1.0
