import errno
import json
import shutil

import pytest

from topr import records as records_module
from topr.records import (
    PROMPT_FIELDS,
    RECORD_KEY,
    SCHEMA_VERSION,
    VERIFY_INPUT_FIELDS,
    DiskFullError,
    RecordError,
    atomic_path,
    chat_prompt,
    check_token_ids,
    read_records,
    write_json,
    write_records,
)

RECORDS = [
    {
        "prompt_id": "p1",
        "reference": "19",
        "completion": "Answer: 19",
        "completion_token_ids": [5, 6, 7],
        "behavior_logprobs": [-0.25, -1.5, -0.125],
        "extracted": "19",
        "correct": True,
        "reward": 1.0,
    },
    {
        "prompt_id": "p2",
        "reference": "5",
        "completion": "I do not know. ünïcödé",
        "completion_token_ids": [8],
        "behavior_logprobs": [-2.0],
        "extracted": None,
        "correct": False,
        "reward": -1.0,
    },
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip_stamps_schema_version(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    assert write_records(path, RECORDS) == 2
    back = read_records(path)
    assert back == [{"schema_version": SCHEMA_VERSION, **record} for record in RECORDS]
    assert isinstance(back[0]["correct"], bool) and back[0]["correct"] is True
    assert back[1]["extracted"] is None
    assert all(isinstance(token, int) for token in back[0]["completion_token_ids"])
    assert all(isinstance(value, float) for value in back[0]["behavior_logprobs"])


def test_jsonl_is_one_object_per_line_with_schema_version(tmp_path):
    path = tmp_path / "records.jsonl"
    write_records(path, RECORDS)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["schema_version"] == SCHEMA_VERSION for line in lines)
    assert "ünïcödé" in lines[1]


def test_required_fields_checked_on_parquet_too(tmp_path):
    path = tmp_path / "records.parquet"
    write_records(path, [{"prompt_id": "p1"}])
    with pytest.raises(RecordError, match=r"records\.parquet:1: .*reference"):
        read_records(path, required=VERIFY_INPUT_FIELDS)


def reject_empty_completions(record):
    if not record["completion"]:
        raise ValueError("completion is empty")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_stage_check_is_reported_with_file_and_line(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    write_records(path, [RECORDS[0], {**RECORDS[1], "completion": ""}])
    assert len(read_records(path, check=lambda record: None)) == 2
    with pytest.raises(RecordError, match=rf"records\{suffix}:2: completion is empty"):
        read_records(path, check=reject_empty_completions)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_lines(path, ['{"prompt_id": "p1"}', '{"prompt_id": "p2"', '{"prompt_id": "p3"}'])
    with pytest.raises(RecordError) as caught:
        read_records(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"{path}:2:" in message
    assert "not valid JSON" in message


def test_fixture_malformed_file_reports_line_3():
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "malformed.jsonl"
    with pytest.raises(RecordError, match=r"malformed\.jsonl:3: not valid JSON"):
        read_records(path)


@pytest.mark.parametrize("line, kind", [("[1, 2, 3]", "list"), ('"text"', "str"), ("42", "int"), ("null", "NoneType")])
def test_non_object_line(tmp_path, line, kind):
    path = tmp_path / "bad.jsonl"
    write_lines(path, ['{"prompt_id": "p1"}', line])
    with pytest.raises(RecordError) as caught:
        read_records(path)
    message = str(caught.value)
    assert f"{path}:2:" in message
    assert "expected a JSON object" in message
    assert kind in message


@pytest.mark.parametrize(
    "text, place, spelled",
    [
        ("NaN", "behavior_logprobs[1]", "NaN"),
        ("Infinity", "behavior_logprobs[1]", "Infinity"),
        ("-Infinity", "behavior_logprobs[1]", "-Infinity"),
        ("1e999", "behavior_logprobs[1]", "Infinity"),  # valid JSON that overflows a float
    ],
)
def test_non_finite_numbers_in_jsonl_are_refused_naming_line_and_field(tmp_path, text, place, spelled):
    path = tmp_path / "records.jsonl"
    write_lines(path, [json.dumps(RECORDS[0]), '{"prompt_id": "p2", "behavior_logprobs": [-0.5, %s]}' % text])
    with pytest.raises(RecordError) as caught:
        read_records(path)
    assert str(caught.value) == f"{path}:2: {place} is {spelled}; record files hold finite numbers only"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_non_finite_numbers_are_refused_in_every_format_and_nested_field(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    write_records(path, [RECORDS[0], {**RECORDS[1], "reward": float("nan")}])
    with pytest.raises(RecordError, match=rf"records\{suffix}:2: reward is NaN"):
        read_records(path)
    nested = tmp_path / "nested.jsonl"
    write_lines(nested, ['{"scores": {"judge": [1.0, -Infinity]}}'])
    with pytest.raises(RecordError, match=r"nested\.jsonl:1: scores\.judge\[1\] is -Infinity"):
        read_records(nested)


def test_missing_required_field_names_field_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    write_lines(
        path,
        [
            json.dumps({"prompt_id": "p1", "reference": "1", "completion": "x"}),
            json.dumps({"prompt_id": "p2", "completion": "y"}),
        ],
    )
    with pytest.raises(RecordError) as caught:
        read_records(path, required=VERIFY_INPUT_FIELDS)
    message = str(caught.value)
    assert f"{path}:2:" in message
    assert "reference" in message
    assert "completion" not in message.split("field(s)")[-1]


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + b'{"prompt_id": "p2", "completion": "caf\xe9"}\n')
    with pytest.raises(RecordError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at column 39\)"):
        read_records(path)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("completion_token_ids", "5 6 7", "a list of integers, got str"),
        ("completion_token_ids", [5, 6.5], "a list of integers, got a list holding float"),
        ("behavior_logprobs", [-0.5, "x"], "a list of numbers, got a list holding str"),
        ("reward", "1", "a number, got str"),
        ("reward", True, "a number, got bool"),
        ("correct", "yes", "true or false, got str"),
        ("completion", 19, "text, got int"),
        ("extracted", ["19"], "text or null, got list"),
        ("sample_index", 1.0, "an integer, got float"),
        ("messages", "What is 2 + 3?", "a list of {role, content} turns of text, got str"),
        ("messages", [{"role": "user"}], "a list of {role, content} turns of text, got a list holding dict"),
    ],
)
def test_a_field_of_the_wrong_type_names_file_line_and_field(tmp_path, field, value, expected):
    path = tmp_path / "records.jsonl"
    write_records(path, [RECORDS[0], {**RECORDS[1], field: value}])
    with pytest.raises(RecordError, match=rf"{path}:2: {field} should be {expected}"):
        read_records(path)


def test_a_parquet_column_of_the_wrong_type_names_the_row(tmp_path):
    path = tmp_path / "records.parquet"
    write_records(path, [{**record, "reward": str(record["reward"])} for record in RECORDS])
    with pytest.raises(RecordError, match=rf"{path}:1: reward should be a number, got str"):
        read_records(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_prompts_messages_come_back_and_are_what_the_chat_template_is_given(tmp_path, suffix):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    prompts = [
        {"prompt_id": "chat", "prompt": "What is 2 + 3?", "reference": "5", "messages": messages},
        {"prompt_id": "text", "prompt": "What is 4 * 6?", "reference": "24"},
    ]
    path = tmp_path / f"prompts{suffix}"
    write_records(path, prompts)
    chat, text = read_records(path, required=PROMPT_FIELDS)
    assert chat["messages"] == messages and text.get("messages") is None  # Parquet fills the column with null
    assert chat_prompt(chat) == messages and chat_prompt(text) == "What is 4 * 6?"


def test_references_and_ids_may_be_numbers(tmp_path):
    """Completions scored from elsewhere often carry numeric ids and answers."""
    path = tmp_path / "records.jsonl"
    write_records(path, [{**RECORDS[0], "prompt_id": 7, "reference": 19}])
    assert read_records(path)[0]["reference"] == 19


def test_missing_several_fields_names_all(tmp_path):
    path = tmp_path / "records.jsonl"
    write_lines(path, [json.dumps({"prompt_id": "p1"})])
    with pytest.raises(RecordError, match=r":1: .*reference, completion"):
        read_records(path, required=VERIFY_INPUT_FIELDS)


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unsupported_schema_version(tmp_path, version):
    path = tmp_path / "records.jsonl"
    write_lines(path, [json.dumps({"schema_version": SCHEMA_VERSION, "a": 1}), json.dumps({"schema_version": version, "a": 2})])
    with pytest.raises(RecordError) as caught:
        read_records(path)
    message = str(caught.value)
    assert f"{path}:2:" in message
    assert "schema_version" in message
    assert repr(version) in message


def test_record_without_schema_version_is_read_as_current(tmp_path):
    path = tmp_path / "records.jsonl"
    write_lines(path, [json.dumps({"a": 1})])
    assert read_records(path) == [{"a": 1}]


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(path)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_records(tmp_path / "nope.parquet")


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('\n{"a": 1}\n   \n\n{"a": 2}\n\n{"a": 3\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"records\.jsonl:7:"):
        read_records(path)
    path.write_text('\n{"a": 1}\n   \n\n{"a": 2}\n\n', encoding="utf-8")
    assert read_records(path) == [{"a": 1}, {"a": 2}]


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert read_records(path) == []


def test_atomic_path_keeps_previous_content_on_failure(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as temporary:
            assert temporary.parent == tmp_path
            assert temporary != path
            temporary.write_text("half-written")
            raise RuntimeError("boom")
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_replaces_on_success_and_creates_parents(tmp_path):
    path = tmp_path / "deep" / "dir" / "out.txt"
    with atomic_path(path) as temporary:
        temporary.write_text("new")
        assert not path.exists()
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_write_records_failure_keeps_previous_file(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    write_records(path, RECORDS)
    before = path.read_bytes()

    def exploding():
        yield {"prompt_id": "p9"}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        write_records(path, exploding())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_records_unserialisable_keeps_previous_file(tmp_path):
    path = tmp_path / "records.jsonl"
    write_records(path, RECORDS)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_records(path, [{"prompt_id": "p1"}, {"prompt_id": "p2", "bad": object()}])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]


def test_write_json(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"count": 3, "name": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"count": 3, "name": "é"}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


# ----------------------------------------------------- token ids, duplicate records, a full disk


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize(
    "field, ids, problem",
    [
        ("completion_token_ids", [5, 100, 7], "completion_token_ids[1] is 100"),
        ("completion_token_ids", [5, 10**7], "completion_token_ids[1] is 10000000"),
        ("prompt_token_ids", [-1, 5], "prompt_token_ids[0] is -1"),
    ],
)
def test_a_token_id_outside_the_vocabulary_names_file_line_field_and_position(tmp_path, suffix, field, ids, problem):
    path = tmp_path / f"records{suffix}"
    good = {"prompt_id": "p", "prompt_token_ids": [0, 2], "completion_token_ids": [3, 99]}
    write_records(path, [good, good, {**good, field: ids}])
    records = read_records(path)
    check_token_ids(path, records[:2], vocabulary=100)  # 0..99: the edges are in
    with pytest.raises(RecordError) as caught:
        check_token_ids(path, records, vocabulary=100)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: {problem}")
    assert "vocabulary of 100 tokens (ids 0 to 99)" in message


def test_a_token_id_outside_the_vocabulary_is_found_on_its_line_past_blank_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('\n{"completion_token_ids": [1]}\n\n   \n{"completion_token_ids": [1, 50]}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"records\.jsonl:5: completion_token_ids\[1\] is 50"):
        check_token_ids(path, read_records(path), vocabulary=50)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_duplicate_prompt_id_and_sample_index_names_both_lines(tmp_path, suffix):
    path = tmp_path / f"records{suffix}"
    rows = [("p1", 0), ("p1", 1), ("p2", 1), ("p1", 1), ("p2", 1)]
    write_records(path, [{"prompt_id": prompt_id, "sample_index": index} for prompt_id, index in rows])
    assert len(read_records(path)) == 5  # only a stage that asks for unique keys refuses them
    with pytest.raises(RecordError) as caught:
        read_records(path, unique=RECORD_KEY)
    message = str(caught.value)
    assert message.startswith(f"{path}:4: duplicate record: prompt_id 'p1', sample_index 1 is also at line 2")


def test_records_without_every_key_field_are_not_compared(tmp_path):
    """Completions from elsewhere may have no sample_index: several per prompt are then normal."""
    path = tmp_path / "records.jsonl"
    write_records(path, [{"prompt_id": "p1"}, {"prompt_id": "p1"}, {"prompt_id": 1, "sample_index": 0}, {"prompt_id": "1", "sample_index": 0}])
    assert len(read_records(path, unique=RECORD_KEY)) == 4


def test_verify_refuses_a_duplicate_sample_naming_both_lines(tmp_path):
    from topr.config import TaskConfig
    from topr.verify import run_verify

    sample = {"prompt_id": "p1", "reference": "4", "completion": "Answer: 4", "sample_index": 0}
    path, output = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_records(path, [sample, {**sample, "sample_index": 1}, sample])
    with pytest.raises(RecordError, match=r"samples\.jsonl:3: duplicate record: prompt_id 'p1', sample_index 0 is also at line 1"):
        run_verify(TaskConfig(), path, output)
    assert not output.exists()


def nearly_full(total=5 * 2**30, free=12 * 2**10):
    return lambda path: shutil._ntuple_diskusage(total, total - free, free)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_full_disk_while_writing_records_is_named_with_its_folder(tmp_path, suffix, monkeypatch):
    path = tmp_path / "out" / f"records{suffix}"
    write_records(path, RECORDS)
    before = path.read_bytes()
    monkeypatch.setattr(shutil, "disk_usage", nearly_full())

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records_module.json, "dumps", no_space)
    import pyarrow.parquet

    monkeypatch.setattr(pyarrow.parquet, "write_table", no_space)
    with pytest.raises(DiskFullError) as caught:
        write_records(path, RECORDS)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert f"the disk holding {path.parent} is full (12.0 KiB free of 5.0 GiB)" in message
    assert str(path) in message
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    "error",
    [RuntimeError("basic_ios::clear: iostream error"), RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed")],
)
def test_an_opaque_write_error_on_a_nearly_full_disk_is_named_as_a_full_disk(tmp_path, monkeypatch, error):
    path = tmp_path / "state.pt"
    monkeypatch.setattr(shutil, "disk_usage", nearly_full())
    with pytest.raises(DiskFullError) as caught:
        with atomic_path(path):
            raise error
    assert f"the disk holding {tmp_path} is full (12.0 KiB free of 5.0 GiB)" in str(caught.value)
    assert str(error) in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_an_opaque_write_error_with_room_left_on_the_disk_stays_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", nearly_full(free=40 * 2**30, total=100 * 2**30))
    with pytest.raises(RuntimeError, match=r"^basic_ios::clear: iostream error$"):
        with atomic_path(tmp_path / "state.pt"):
            raise RuntimeError("basic_ios::clear: iostream error")
