"""The ``dataset`` task: prompts and answers from a Hugging Face dataset kept in files.

``task.train_path`` and ``task.eval_path`` each name a JSON or JSONL, CSV or Parquet file, or a
folder that ``Dataset.save_to_disk`` wrote, read with the ``datasets`` package (topr's workflow
extra): a local path or an ``s3://`` URI (an object, or a folder topr published with its
manifest). The Hugging Face Hub is never asked, so runs read the same data offline and in
pipeline pods; a name such as ``openai/gsm8k`` is refused with how to save it to files.

Columns: ``task.prompt_field`` holds the prompt, as text or as chat ``messages`` (a list of
``{"role", "content"}`` turns: a system turn, few-shot user and assistant turns, and last the
user's turn); ``task.answer_field`` the reference, matched as the ``jsonl`` task matches it
(``task.match``); ``task.id_field``, when the dataset has it, each row's id (else
``<file stem>-<row>``). A CSV file's cells are read as the text they hold ("007" stays "007").

A text prompt gets the answer-format instruction as the ``jsonl`` task gives it. With messages,
the instruction ends the user's last turn, whose text is the record's ``prompt`` (what reports
and the verifier show), and the turns go into the record's ``messages``: the chat template is
applied to them (``topr.models.prompt_token_ids``), and ``model.system_prompt`` opens them only
when they hold no system turn of their own.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from topr.records import RecordError
from topr.storage import is_s3, local_directory, local_file
from topr.tasks.jsonl import JsonlTask, path_option, record_error, record_id

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
"""The ``datasets`` builder that reads each file suffix; any other location is a folder."""
ROLES = ("system", "user", "assistant")


class DatasetTask(JsonlTask):
    """A dataset's rows, with a prompt column (text or chat messages) and an answer column."""

    name = "dataset"

    def __init__(
        self,
        train_path: str | None,
        eval_path: str | None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        match: Literal["numeric", "exact"] = "numeric",
        id_field: str = "id",
    ):
        super().__init__(train_path, eval_path, prompt_field, answer_field, match)
        self.id_field = id_field

    @classmethod
    def from_config(cls, config) -> DatasetTask:
        return cls(config.train_path, config.eval_path, config.prompt_field, config.answer_field, config.match, config.id_field)

    @contextmanager
    def local_copy(self, split: str) -> Iterator[Path]:
        """The split's file or folder here: itself, or a download of an ``s3://`` object or published folder."""
        location = self._location(split)
        if not (is_s3(location) or Path(location).exists()):
            raise FileNotFoundError(_not_local_message(location, path_option(split)))
        opener = local_directory if is_s3(location) and _suffix(location) not in FORMATS else local_file
        with opener(location) as path:
            yield path

    def rows(self, path: Path) -> list[dict[str, Any]]:
        """The dataset's rows, each without its null cells (how ``datasets`` fills a column a row lacks)."""
        dataset = _load(path)
        for field, option in ((self.prompt_field, "prompt_field"), (self.answer_field, "answer_field")):
            if field not in dataset.column_names:
                raise RecordError(f"{path}: no column {field!r} (task.{option}); its columns: {', '.join(dataset.column_names)}")
        return [{column: value for column, value in row.items() if value is not None} for row in dataset.to_list()]

    def problem(self, record: dict[str, Any], path: Path, index: int) -> dict[str, Any]:
        for field in (self.prompt_field, self.answer_field):
            if field not in record:
                raise record_error(path, index, f"{field} is missing")
        return {
            "prompt_id": record_id(record, path, index, self.id_field),
            **self._prompt(record[self.prompt_field], path, index),
            "reference": self.reference(record, path, index),
        }

    def _prompt(self, cell: Any, path: Path, index: int) -> dict[str, Any]:
        """The record's ``prompt``, with its ``messages`` when the cell holds a chat."""
        if isinstance(cell, list):
            messages = self._asking(_messages(cell, self.prompt_field, path, index))
            return {"prompt": messages[-1]["content"], "messages": messages}
        if not isinstance(cell, str):
            raise record_error(path, index, f"{self.prompt_field} should be text or a list of messages, got {type(cell).__name__}")
        if not cell.strip():
            raise record_error(path, index, f"{self.prompt_field} is empty")
        return {"prompt": self.prompt_for(cell)}

    def _asking(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """``messages`` with the answer-format instruction ending the user's last turn."""
        *earlier, last = messages
        return [*earlier, {"role": "user", "content": self.prompt_for(last["content"])}]


def _suffix(location: str) -> str:
    return Path(location).suffix.lower()


def _not_local_message(location: str, option: str) -> str:
    return (
        f"task.{option} {location!r} is neither a local file or folder nor an s3:// URI: topr loads datasets from "
        f"local files or s3:// only, never from the Hugging Face Hub. On a machine with access, save it: "
        f"datasets.load_dataset({location!r}, split=...).save_to_disk(DIR) (or .to_parquet(FILE), .to_json(FILE)), "
        f"and set task.{option} to DIR or FILE (copied here, or to s3://)"
    )


def _load(path: Path):
    """The ``datasets.Dataset`` in a file or a ``save_to_disk`` folder, in memory."""
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path), keep_in_memory=True)
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(
                f"{path} holds the splits {', '.join(dataset)}: point task.train_path at one of them ({path / next(iter(dataset))}) "
                f"and task.eval_path at another"
            )
        return dataset
    builder = FORMATS.get(_suffix(str(path)))
    if builder is None:
        raise ValueError(f"{path}: the dataset task reads .json, .jsonl, .csv and .parquet files and save_to_disk folders")
    options = {"features": _text_columns(path)} if builder == "csv" else {}
    # A cache of its own: nothing is left in (or read from) ~/.cache, which a pod may not write.
    with tempfile.TemporaryDirectory(prefix="topr-datasets-") as cache:
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **options)
        except datasets.exceptions.DatasetGenerationError as error:
            raise RecordError(f"{path}: not readable as {builder} ({error.__cause__ or error})") from None


def _text_columns(path: Path):
    """Every column of a CSV file as text, as written: inferred types would turn "007" into 7."""
    import datasets

    with path.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    return datasets.Features({column: datasets.Value("string") for column in header})


def _messages(cell: list, field: str, path: Path, index: int) -> list[dict[str, str]]:
    """A messages cell as ``{"role", "content"}`` turns (other keys dropped), checked: known roles,
    text contents, and last a user's turn that is not empty."""
    messages = [_message(turn, f"{field}[{position}]", path, index) for position, turn in enumerate(cell)]
    if not messages:
        raise record_error(path, index, f"{field} is an empty list: a prompt ends with the user's turn")
    if messages[-1]["role"] != "user":
        raise record_error(path, index, f"the last turn of {field} has role {messages[-1]['role']!r}: a prompt ends with the user's turn (drop the reply)")
    if not messages[-1]["content"].strip():
        raise record_error(path, index, f"{field}[{len(messages) - 1}], the user's turn, is empty")
    return messages


def _message(turn: Any, place: str, path: Path, index: int) -> dict[str, str]:
    if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
        raise record_error(path, index, f"{place} should be a message {{'role': ..., 'content': ...}} with text in both, got {turn!r:.80}")
    if turn["role"] not in ROLES:
        raise record_error(path, index, f"{place} has role {turn['role']!r} (choices: {', '.join(ROLES)})")
    return {"role": turn["role"], "content": turn["content"]}
