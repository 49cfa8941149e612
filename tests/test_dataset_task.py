"""The ``dataset`` task: Hugging Face datasets saved as local files (JSON/JSONL, CSV, Parquet, a
``save_to_disk`` folder), text or chat-message prompts, and the per-run chat template."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import datasets
import pytest

from topr.cli import main
from topr.config import ConfigError, TaskConfig, load_config
from topr.models import load_policy, load_tokenizer, prompt_token_ids
from topr.prompts import run_prompts
from topr.records import RecordError, chat_prompt, read_records, write_records
from topr.sample import run_sample
from topr.tasks import ANSWER_INSTRUCTION, get_task
from topr.tasks.dataset import DatasetTask
from topr.tasks.jsonl import EXACT_INSTRUCTION, JsonlTask

from helpers import write_jsonl

REPOSITORY = Path(__file__).resolve().parents[1]
FEW_SHOT = [
    {"role": "system", "content": "You are a careful calculator."},
    {"role": "user", "content": "What is 1 + 1?"},
    {"role": "assistant", "content": "Answer: 2"},
    {"role": "user", "content": "What is 2 + 3?"},
]
ROWS = [
    {"id": "sum", "question": "What is 2 + 3?", "messages": FEW_SHOT, "solution": "5"},
    {"id": "product", "question": "What is 4 * 6?", "messages": [{"role": "user", "content": "What is 4 * 6?"}], "solution": "24"},
]
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<reply>{% endif %}"


def write_parquet(path, rows: list[dict]):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def problems(path, **options) -> list[dict]:
    """Every row of ``path`` as the dataset task's prompt records, sorted by id."""
    return sorted(DatasetTask(str(path), None, **options).problems("train", 100, 0), key=lambda problem: problem["prompt_id"])


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["gsm8k", "openai/gsm8k"])
def test_a_hub_name_is_refused_naming_the_field_and_how_to_save_it_locally(location):
    task = DatasetTask("/srv/data/train.parquet", location)
    message = (
        rf"task\.eval_path {location!r} is neither a local file or folder nor an s3:// URI: topr loads datasets from "
        rf"local files or s3:// only.*datasets\.load_dataset\({location!r}.*\.save_to_disk\(DIR\)"
    )
    with pytest.raises(FileNotFoundError, match=message):
        task.problems("test", 5, 0)


def test_a_missing_column_names_the_file_the_field_and_the_columns_there(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [{"question": "Q?", "solution": "1"}])
    with pytest.raises(RecordError, match=r"train\.parquet: no column 'prompt' \(task\.prompt_field\); its columns: question, solution"):
        problems(path)
    with pytest.raises(RecordError, match=r"no column 'answer' \(task\.answer_field\)"):
        problems(path, prompt_field="question")


def test_a_row_without_a_value_names_the_file_and_the_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "answer": "1"}, {"prompt": "Q2?"}])
    with pytest.raises(RecordError, match=r"train\.jsonl: record 2: answer is missing"):
        problems(path)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ({"role": "user", "content": "Q?"}, r"messages should be text or a list of messages, got dict"),
        ([{"from": "human", "value": "Q?"}], r"messages\[0\] should be a message \{'role': \.\.\., 'content': \.\.\.\} with text in both"),
        ([{"role": "user", "content": 7}], r"messages\[0\] should be a message"),
        (["Q?"], r"messages\[0\] should be a message"),
        ([{"role": "human", "content": "Q?"}], r"messages\[0\] has role 'human' \(choices: system, user, assistant\)"),
        ([], r"messages is an empty list: a prompt ends with the user's turn"),
        (
            [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer: 1"}],
            r"the last turn of messages has role 'assistant': a prompt ends with the user's turn \(drop the reply\)",
        ),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "  "}], r"messages\[1\], the user's turn, is empty"),
    ],
)
def test_a_bad_messages_cell_names_the_file_the_row_and_the_turn(tmp_path, messages, problem):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Fine?"}], "answer": "1"}, {"messages": messages, "answer": "2"}])
    with pytest.raises(RecordError, match=rf"chat\.jsonl: record 2: {problem}"):
        problems(path, prompt_field="messages")


def test_an_empty_text_prompt_names_the_file_and_the_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "answer": "1"}, {"prompt": " \n", "answer": "2"}])
    with pytest.raises(RecordError, match=r"train\.jsonl: record 2: prompt is empty"):
        problems(path)


def test_answers_are_checked_as_the_jsonl_task_checks_them(tmp_path):
    path = write_parquet(tmp_path / "words.parquet", [{"prompt": "Capital?", "answer": "Paris"}])
    with pytest.raises(RecordError, match=r"words\.parquet: record 1: answer 'Paris' is not a number"):
        problems(path)
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"id": "a", "prompt": "P", "answer": 1}] * 2)
    with pytest.raises(RecordError, match=r"twice\.jsonl: record 2: id 'a' is used twice"):
        problems(twice)


def test_an_unknown_file_type_is_refused_with_the_formats_it_reads(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("What is 2 + 3?\n")
    with pytest.raises(ValueError, match=r"train\.txt: the dataset task reads \.json, \.jsonl, \.csv and \.parquet files and save_to_disk folders"):
        problems(path)


def test_a_malformed_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "Q?", "answer": 1}\n{"prompt": \n')
    with pytest.raises(RecordError, match=r"broken\.jsonl: not readable as json"):
        problems(path)


def test_a_folder_of_several_splits_is_refused_naming_them(tmp_path):
    folder = tmp_path / "gsm8k"
    split = datasets.Dataset.from_list([{"prompt": "Q?", "answer": "1"}])
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=rf"{folder} holds the splits train, test: point task\.train_path at one of them \({folder}/train\)"):
        problems(folder)


def test_without_the_datasets_package_the_task_says_which_extra_installs_it(tmp_path, monkeypatch):
    """The task imports ``datasets`` when it reads, so a missing one is traced to its extra (topr.cli.missing_extra)."""
    from packaging.requirements import Requirement

    workflow = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"]["workflow"]
    assert "datasets" in {Requirement(requirement).name for requirement in workflow}
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "answer": 1}])
    with pytest.raises(ModuleNotFoundError) as missing:
        problems(path)
    assert missing.value.name == "datasets"


def test_a_dataset_task_needs_its_files():
    with pytest.raises(ConfigError, match="task.name=dataset needs task.train_path and task.eval_path"):
        load_config(None, ["task.name=dataset", "task.train_path=train.parquet"])


def test_a_chat_template_file_that_is_not_there_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.chat_template: .*nowhere\.jinja"):
        load_config(None, [f"model.chat_template={tmp_path / 'nowhere.jinja'}"])


# --- formats and columns ---------------------------------------------------------------------

TEXT_ROWS = [{"key": "sum", "question": "What is 2 + 3?", "solution": "5"}, {"key": "product", "question": "What is 4 * 6?", "solution": "24"}]
WRITERS = {
    "parquet": lambda dataset, path: dataset.to_parquet(str(path)),
    "jsonl": lambda dataset, path: dataset.to_json(str(path)),
    "json": lambda dataset, path: dataset.to_json(str(path), lines=False),
    "csv": lambda dataset, path: dataset.to_csv(str(path), index=False),
    "folder": lambda dataset, path: dataset.save_to_disk(str(path)),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_every_format_gives_the_same_prompts_through_the_column_mapping(tmp_path, kind):
    path = tmp_path / ("train" if kind == "folder" else f"train.{kind}")
    WRITERS[kind](datasets.Dataset.from_list(TEXT_ROWS), path)
    read = problems(path, prompt_field="question", answer_field="solution", id_field="key")
    assert read == [
        {"prompt_id": "product", "prompt": f"What is 4 * 6?\n{ANSWER_INSTRUCTION}", "reference": "24"},
        {"prompt_id": "sum", "prompt": f"What is 2 + 3?\n{ANSWER_INSTRUCTION}", "reference": "5"},
    ]


def test_rows_without_an_id_are_numbered_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "capitals.jsonl", [{"id": "fr", "prompt": "France?", "answer": "Paris"}, {"prompt": "Peru?", "answer": "Lima"}])
    assert [problem["prompt_id"] for problem in problems(path, match="exact")] == ["capitals-1", "fr"]


def test_csv_cells_keep_the_text_they_hold(tmp_path):
    path = tmp_path / "codes.csv"
    path.write_text('id,prompt,answer\n007,"Agent, by number?",007\n')
    (problem,) = problems(path, match="exact")
    assert problem == {"prompt_id": "007", "prompt": f"Agent, by number?\n{EXACT_INSTRUCTION}", "reference": "007"}


def test_the_task_takes_its_options_from_the_config_and_checks_as_jsonl_does(tmp_path):
    options = dict(train_path="a.parquet", eval_path="b.parquet", prompt_field="messages", answer_field="solution", match="exact", id_field="key")
    task = get_task(TaskConfig(name="dataset", **options))
    assert isinstance(task, DatasetTask) and isinstance(task, JsonlTask)
    assert (task.prompt_field, task.answer_field, task.match, task.id_field, task.instruction) == ("messages", "solution", "exact", "key", EXACT_INSTRUCTION)
    assert task.extract("Let me see.\nAnswer: **Lima**") == "Lima" and task.is_correct("Lima", " Lima")
    assert task.registered_model(TaskConfig(name="dataset", **options)).startswith("topr-dataset-")


def test_a_parquet_object_and_a_published_folder_are_read_from_s3(s3, tmp_path):
    from topr import storage

    dataset = datasets.Dataset.from_list(TEXT_ROWS)
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    dataset.save_to_disk(str(tmp_path / "test"))
    task = DatasetTask(
        storage.upload_file(tmp_path / "train.parquet", f"{s3}/data/train.parquet"),
        f"{s3}/data/test",
        prompt_field="question",
        answer_field="solution",
        id_field="key",
    )
    storage.publish_directory(tmp_path / "test", f"{s3}/data/test")
    assert task.problems("train", 5, 0) == task.problems("test", 5, 0)
    assert {problem["prompt_id"] for problem in task.problems("train", 5, 0)} == {"sum", "product"}


# --- chat messages ---------------------------------------------------------------------------


def test_messages_get_the_instruction_on_the_users_last_turn_and_the_prompt_is_that_turn(tmp_path):
    path = write_parquet(tmp_path / "chat.parquet", ROWS)
    product, total = problems(path, prompt_field="messages", answer_field="solution")
    asked = f"What is 2 + 3?\n{ANSWER_INSTRUCTION}"
    assert total == {"prompt_id": "sum", "prompt": asked, "reference": "5", "messages": [*FEW_SHOT[:-1], {"role": "user", "content": asked}]}
    assert product["messages"] == [{"role": "user", "content": f"What is 4 * 6?\n{ANSWER_INSTRUCTION}"}]
    assert DatasetTask(None, None).question_text(total["prompt"]) == "What is 2 + 3?"  # what the verifier is shown


def test_other_keys_of_a_message_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Q?", "name": "ann"}], "answer": 1}])
    (problem,) = problems(path, prompt_field="messages")
    assert problem["messages"] == [{"role": "user", "content": f"Q?\n{ANSWER_INSTRUCTION}"}]


def test_message_prompts_are_the_chat_template_applied_to_the_messages(tmp_path, real_tokenizer):
    (_, total) = problems(write_parquet(tmp_path / "chat.parquet", ROWS), prompt_field="messages", answer_field="solution")
    asked = [*FEW_SHOT[:-1], {"role": "user", "content": f"What is 2 + 3?\n{ANSWER_INSTRUCTION}"}]
    expected = list(real_tokenizer.apply_chat_template(asked, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert prompt_token_ids(real_tokenizer, chat_prompt(total)) == expected
    text = real_tokenizer.decode(expected)
    assert text.count("<|im_start|>user") == 2 and "Answer: 2<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_the_system_prompt_opens_messages_only_when_they_have_no_system_turn(tmp_path, real_tokenizer):
    product, total = problems(write_parquet(tmp_path / "chat.parquet", ROWS), prompt_field="messages", answer_field="solution")
    own = prompt_token_ids(real_tokenizer, chat_prompt(total), system_prompt="Be brief.")
    assert own == prompt_token_ids(real_tokenizer, chat_prompt(total))
    assert "Be brief." not in real_tokenizer.decode(own) and "You are a careful calculator." in real_tokenizer.decode(own)
    added = real_tokenizer.decode(prompt_token_ids(real_tokenizer, chat_prompt(product), system_prompt="Be brief."))
    assert added.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 4 * 6?")


# --- the run's chat template -----------------------------------------------------------------


def test_a_chat_template_file_is_read_into_the_config(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(TEMPLATE)
    assert load_config(None, [f"model.chat_template={template}"]).model.chat_template == TEMPLATE
    assert load_config(None, [f"model.chat_template={TEMPLATE}"]).model.chat_template == TEMPLATE
    assert load_config(None, []).model.chat_template is None


def test_the_chat_template_sets_the_prompt_tokens_of_sampling_and_of_the_trained_model(tiny_model_dir, tmp_path, real_tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, [{"prompt_id": "sum", "prompt": "What is 2 + 3?", "reference": "5", "messages": FEW_SHOT}])
    config = load_config(None, [f"model.chat_template={TEMPLATE}", "model.system_prompt=Be brief.", "task.train_size=1",
                                "sample.samples_per_prompt=2", "sample.max_new_tokens=3", "train.batch_size=2", "train.baseline=0"])  # fmt: skip
    run_sample(config, tiny_model_dir, prompts, tmp_path / "samples.jsonl")
    samples = read_records(tmp_path / "samples.jsonl")
    expected = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in FEW_SHOT) + "<reply>"
    assert {real_tokenizer.decode(sample["prompt_token_ids"]) for sample in samples} == {expected}
    assert samples[0]["prompt_token_ids"] != prompt_token_ids(real_tokenizer, FEW_SHOT)  # not the model's own template

    from topr.train import run_train

    write_records(tmp_path / "train_set.jsonl", [{**sample, "reward": reward} for sample, reward in zip(samples, (1.0, -1.0))])
    run_train(config, tiny_model_dir, tmp_path / "train_set.jsonl", tmp_path / "trained")
    trained = load_tokenizer(str(tmp_path / "trained"))  # as it is served: without the override
    assert trained.chat_template == TEMPLATE
    assert prompt_token_ids(trained, FEW_SHOT) == samples[0]["prompt_token_ids"]
    assert load_policy(tiny_model_dir, chat_template=TEMPLATE)[1].chat_template == TEMPLATE


# --- end to end ------------------------------------------------------------------------------


def test_prompts_sample_and_verify_run_on_a_parquet_file_of_messages(tiny_model_dir, tmp_path, real_tokenizer):
    train = write_parquet(tmp_path / "train.parquet", ROWS)
    files = [f"task.train_path={train}", f"task.eval_path={train}"]
    overrides = ["task.name=dataset", *files, "task.prompt_field=messages", "task.answer_field=solution", "task.train_size=2", "task.eval_size=2"]
    run_prompts(load_config(None, overrides), tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    prompts = {record["prompt_id"]: record for record in read_records(tmp_path / "train.jsonl")}
    assert prompts["sum"]["messages"][0] == FEW_SHOT[0]

    sampling = ["sample.samples_per_prompt=1", "sample.max_new_tokens=3", "model.system_prompt=Be brief."]
    assert main(["sample", "--model", tiny_model_dir, "--prompts", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "samples.jsonl"), *overrides, *sampling]) == 0
    samples = {record["prompt_id"]: record for record in read_records(tmp_path / "samples.jsonl")}
    assert samples["sum"]["prompt_token_ids"] == prompt_token_ids(real_tokenizer, prompts["sum"]["messages"])
    assert "Be brief." in real_tokenizer.decode(samples["product"]["prompt_token_ids"])

    assert main(["verify", "--task", "dataset", "--input", str(tmp_path / "samples.jsonl"), "--output", str(tmp_path / "verified.jsonl"), "task.answer_field=solution"]) == 0
    verified = read_records(tmp_path / "verified.jsonl")
    assert {record["prompt_id"] for record in verified} == {"sum", "product"} and all("reward" in record for record in verified)
