"""The record schema that flows from stage to stage, and its atomic JSONL/Parquet I/O.

One record type travels the whole loop and gains fields on the way:

====================  =============  ==========  ==================================================
field                 type           written by  meaning
====================  =============  ==========  ==================================================
schema_version        int            every stage version of this schema (``SCHEMA_VERSION``)
prompt_id             str            prompts     stable id of the prompt within its task and split
prompt                str            prompts     the question as shown to the user (no template);
                                                 with ``messages``, the text of their last turn
reference             str            prompts     the final answer the checker compares against
messages              list[dict]     prompts     optional: the chat the prompt ends, as
                                                 ``{"role", "content"}`` turns (a system turn,
                                                 few-shot turns, last the user's, whose content is
                                                 ``prompt``); the chat template is applied to them
                                                 instead of to ``prompt`` alone (``chat_prompt``)
prompt_token_ids      list[int]      sample      the chat-templated prompt, as the model saw it
completion            str            sample      the decoded completion (special tokens removed)
completion_token_ids  list[int]      sample      the sampled tokens, end-of-sequence included
behavior_logprobs     list[float]    sample      log mu of each sampled token under the distribution
                                                 actually sampled from (temperature, top-k, top-p);
                                                 for the verifier's judgments, which are scored
                                                 rather than sampled, under the scoring model
sample_index          int            sample      0..n-1 within the prompt
behavior_model        str            sample      digest or path of the model that sampled (or
                                                 scored) it
finish_reason         str            sample      "stop" (end-of-sequence) or "length" (truncated)
extracted             str | None     verify      the answer parsed from the completion, None if none
correct               bool           verify      the checker's verdict
reward                float          verify      +1.0 when correct, -1.0 otherwise; in [-1, 1]
                                                 with a format term or a function (topr.rewards)
====================  =============  ==========  ==================================================

Each stage names the fields it needs (``PROMPT_FIELDS``, ``VERIFY_INPUT_FIELDS``, ...); a record
missing one is reported with the file, the line and the field. Fields a stage does not know pass
through unchanged, so users can score completions that came from elsewhere. Numbers are finite:
Python's ``json`` reads ``NaN``, ``Infinity`` and overflowing literals such as ``1e999``, which
standard JSON has no place for and which would poison a loss, so a record holding one is refused
(file, line and field). A stage that reads samples may ask for unique ``RECORD_KEY``s
(``unique``): a second record of the same prompt and sample index is a bug upstream, and would be
trained on twice, so it is refused with both lines. Token ids are checked against the model that
uses them (``check_token_ids``). A write that fails because the disk is full says so, naming the
folder (``DiskFullError``).
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

PROMPT_FIELDS = ("prompt_id", "prompt", "reference")
SAMPLE_FIELDS = PROMPT_FIELDS + (
    "prompt_token_ids",
    "completion",
    "completion_token_ids",
    "behavior_logprobs",
    "sample_index",
)
VERIFY_INPUT_FIELDS = ("prompt_id", "reference", "completion")
VERIFIED_FIELDS = ("extracted", "correct", "reward")
TRAIN_FIELDS = ("prompt_id", "prompt_token_ids", "completion_token_ids", "behavior_logprobs", "reward")
RECORD_KEY = ("prompt_id", "sample_index")
"""What names one sample: each (prompt_id, sample_index) appears once in a samples, verified or
training file (records that lack one of them, from elsewhere, are not compared)."""
TOKEN_FIELDS = ("prompt_token_ids", "completion_token_ids")

Record = dict[str, Any]


class RecordError(ValueError):
    """A record file that cannot be read as the schema says; the message names file and line."""


def chat_prompt(record: Record) -> str | list[dict[str, str]]:
    """What a prompt record asks the model, for the chat template: its ``messages`` when it has
    them, else its ``prompt`` (``topr.models.prompt_token_ids`` takes either)."""
    return record.get("messages") or record["prompt"]


def _is_parquet(path: str | os.PathLike) -> bool:
    return str(path).endswith(".parquet")


RecordCheck = Callable[[Record], None]


def read_records(
    path: str | os.PathLike, required: Sequence[str] = (), check: RecordCheck | None = None, unique: Sequence[str] = ()
) -> list[Record]:
    """Read every record of a JSONL (or ``.parquet``) file, checking the ``required`` fields.

    ``check`` is a stage's own test of one record; the ``ValueError`` it raises is reported
    with the file and line of the record. ``unique`` (e.g. ``RECORD_KEY``): fields whose values
    no two records that have them all may share; a second one is refused, naming both lines.
    """
    return list(iter_records(path, required, check, unique))


def iter_records(
    path: str | os.PathLike, required: Sequence[str] = (), check: RecordCheck | None = None, unique: Sequence[str] = ()
) -> Iterator[Record]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"record file not found: {path}")
    rows = _iter_parquet(path) if _is_parquet(path) else _iter_jsonl(path)
    first_lines: dict[tuple, int] = {}
    for line_number, record in rows:
        missing = [field for field in required if field not in record]
        if missing:
            raise RecordError(
                f"{path}:{line_number}: record is missing required field(s) {', '.join(missing)}"
            )
        problem = _type_problem(record)
        if problem:
            raise RecordError(f"{path}:{line_number}: {problem}")
        found = _first_non_finite(record)
        if found is not None:
            place, number = found
            raise RecordError(f"{path}:{line_number}: {place} is {_json_spelling(number)}; record files hold finite numbers only")
        version = record.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RecordError(
                f"{path}:{line_number}: schema_version {version!r} is not supported "
                f"(this topr reads version {SCHEMA_VERSION})"
            )
        if check is not None:
            try:
                check(record)
            except ValueError as error:
                raise RecordError(f"{path}:{line_number}: {error}") from None
        if unique and all(field in record for field in unique):
            key = tuple(record[field] for field in unique)
            first = first_lines.setdefault(key, line_number)
            if first != line_number:
                named = ", ".join(f"{field} {value!r}" for field, value in zip(unique, key))
                raise RecordError(f"{path}:{line_number}: duplicate record: {named} is also at line {first} (each must appear once)")
        yield record


def check_token_ids(path: str | os.PathLike, records: Sequence[Record], vocabulary: int) -> None:
    """Refuse a token id outside ``[0, vocabulary)`` in ``records`` (read from ``path``, in order),
    naming the file, line, field and position: the model's embedding would fail on it, mid-run,
    with an ``index out of range`` that names nothing."""
    for index, record in enumerate(records):
        for field in TOKEN_FIELDS:
            ids = record.get(field)
            if ids and not (0 <= min(ids) and max(ids) < vocabulary):
                position = next(place for place, token in enumerate(ids) if not 0 <= token < vocabulary)
                raise RecordError(
                    f"{path}:{_line_of(path, index)}: {field}[{position}] is {ids[position]}, outside the model's vocabulary "
                    f"of {vocabulary} tokens (ids 0 to {vocabulary - 1}): tokens of another model or tokenizer?"
                )


def _line_of(path: str | os.PathLike, index: int) -> int:
    """The line (JSONL) or row (Parquet) of the ``index``-th record of ``path`` (read again: only errors ask)."""
    path = Path(path)
    rows = _iter_parquet(path) if _is_parquet(path) else _iter_jsonl(path)
    return next(itertools.islice(rows, index, None))[0]


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(item_test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(map(item_test, value))


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str) for turn in value
    )


FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt_id": (lambda v: isinstance(v, str) or _is_integer(v), "text or an integer"),
    "prompt": (lambda v: isinstance(v, str), "text"),
    "reference": (lambda v: isinstance(v, str) or _is_number(v), "text or a number"),
    # null in a Parquet file that also holds records with messages
    "messages": (lambda v: v is None or _is_messages(v), "a list of {role, content} turns of text"),
    "prompt_token_ids": (_list_of(_is_integer), "a list of integers"),
    "completion": (lambda v: isinstance(v, str), "text"),
    "completion_token_ids": (_list_of(_is_integer), "a list of integers"),
    "behavior_logprobs": (_list_of(_is_number), "a list of numbers"),
    "sample_index": (_is_integer, "an integer"),
    "extracted": (lambda v: v is None or isinstance(v, str), "text or null"),
    "correct": (lambda v: isinstance(v, bool), "true or false"),
    "reward": (_is_number, "a number"),
}
"""The schema's fields that a stage reads, with their type test and how an error names the type.
Fields that only pass through (and fields the schema does not know) are not checked."""


def _type_problem(record: Record) -> str | None:
    """What is wrong with the first schema field of ``record`` that has the wrong type, if any."""
    for field, (is_valid, expected) in FIELD_TYPES.items():
        if field in record and not is_valid(record[field]):
            return f"{field} should be {expected}, got {_describe(record[field], is_valid, expected)}"
    return None


def _describe(value: Any, is_valid: Callable[[Any], bool], expected: str) -> str:
    """A wrong value's type; where a list is expected and given, the type of its first wrong item."""
    if isinstance(value, list) and expected.startswith("a list"):
        wrong = next(item for item in value if not is_valid([item]))
        return f"a list holding {type(wrong).__name__}"
    return type(value).__name__


def _first_non_finite(value: Any, place: str = "") -> tuple[str, float] | None:
    """The place (``field[2].name``) of the first NaN or infinite number inside ``value``, and the number."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (place, value)
    if isinstance(value, dict):
        children = ((f"{place}.{key}" if place else str(key), item) for key, item in value.items())
    elif isinstance(value, list) and _finite_numbers(value):
        return None
    elif isinstance(value, list):
        children = ((f"{place}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    return next(filter(None, (_first_non_finite(item, where) for where, item in children)), None)


def _finite_numbers(values: list) -> bool:
    """True for a list of finite numbers (token ids, log-probs), in one fast pass: a NaN or an
    infinity makes the exact sum non-finite or raises; anything else is left to the item walk."""
    try:
        return math.isfinite(math.fsum(values))
    except (TypeError, ValueError, OverflowError):
        return False


def _json_spelling(number: float) -> str:
    """A non-finite number as Python's ``json`` writes it: NaN, Infinity or -Infinity."""
    return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Record]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = raw[error.start]
                raise RecordError(f"{path}:{line_number}: not UTF-8 text (byte 0x{byte:02x} at column {error.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise RecordError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def _iter_parquet(path: Path) -> Iterator[tuple[int, Record]]:
    import pyarrow.parquet as pq

    for row_number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield row_number, record


class DiskFullError(OSError):
    """A write that failed because the disk is full (``errno.ENOSPC``); the message names the folder."""


OPAQUE_WRITE_ERRORS = ("iostream error", "file write failed", "unexpected pos")
"""What torch.save's C++ writer says when a write fails (``basic_ios::clear: iostream error``,
``PytorchStreamWriter failed writing file ...: file write failed``): it does not say why."""

NEARLY_FULL_BYTES = 256 * 2**20
"""Free space below which an opaque write error (``OPAQUE_WRITE_ERRORS``) is taken for a full disk."""


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count:.1f} TiB"


@contextmanager
def full_disk_named(folder: str | os.PathLike, target: str | os.PathLike) -> Iterator[None]:
    """Turn a write error of the block that comes from a full disk into a ``DiskFullError`` naming
    ``folder`` (where the block writes) and ``target`` (what it was writing): ``ENOSPC``, a
    library's "No space left on device" (safetensors), or torch's opaque ``OPAQUE_WRITE_ERRORS``
    when the disk has less than ``NEARLY_FULL_BYTES`` left. Other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        told = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error)
        opaque = isinstance(error, RuntimeError) and any(sign in str(error) for sign in OPAQUE_WRITE_ERRORS)
        if not (told or opaque):
            raise
        try:
            usage = shutil.disk_usage(folder)  # before the partial file goes: its space counts as used
        except OSError:
            usage = None
        if not told and (usage is None or usage.free >= NEARLY_FULL_BYTES):
            raise
        room = f" ({_size(usage.free)} free of {_size(usage.total)})" if usage else ""
        raise DiskFullError(
            errno.ENOSPC, f"the disk holding {folder} is full{room}: writing {target} failed ({error}); free space there"
        ) from error


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A failed write therefore never leaves a file that looks complete, and never replaces a
    good artifact with a broken one. A block that fails on a full disk raises ``DiskFullError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with full_disk_named(path.parent, path):
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    os.chmod(temporary_path, 0o644)  # mkstemp makes files owner-only; artifacts are shared
    try:
        with full_disk_named(path.parent, path):
            yield temporary_path
            os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records atomically as JSONL (or Parquet for ``.parquet``); return how many."""
    stamped = [{"schema_version": SCHEMA_VERSION, **record} for record in records]
    with atomic_path(path) as temporary:
        if _is_parquet(path):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(stamped), temporary)
        else:
            with temporary.open("w", encoding="utf-8") as handle:
                for record in stamped:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(stamped)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write a JSON document atomically (reports, metrics)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
