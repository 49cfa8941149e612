"""Plain helper functions shared by test modules: ``from helpers import write_jsonl``.

Fixtures (anything with a set-up, a teardown or a scope) live in ``conftest.py``; functions that
only compute something live here, so that tests and their module-level helpers call them
directly, with arguments, as pytest's documentation recommends over importing from conftest.
``tests/`` is on ``sys.path`` because its ``conftest.py`` sits there (pytest's default
``prepend`` import mode).
"""

from __future__ import annotations

import json
from pathlib import Path

from topr.config import Config, load_config


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSON lines (UTF-8, one object a line, a final newline); returns ``path``."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def train_config(*overrides: str) -> Config:
    """The default config with the training settings the tiny-model training checks were written
    for: sampling temperature 1.0, learning rate 3e-3, one micro-batch a step, c = 0 and a step per
    global batch. Each caller passes what differs (batch size, batch order, ...) in ``overrides``;
    later overrides win."""
    return load_config(
        None,
        [
            "sample.temperature=1.0",
            "train.learning_rate=3e-3",
            "train.gradient_accumulation=1",
            "train.baseline=0",
            "train.steps_per_epoch=null",
            *overrides,
        ],
    )


def flatten_choices(prompts: list, results: list[list]) -> tuple[list, list]:
    """An engine's ``generate`` result (a list of choices per prompt) as two parallel lists, one
    entry per choice: the prompt each came from, and the choice."""
    pairs = [(prompt, choice) for prompt, choices in zip(prompts, results) for choice in choices]
    return [p for p, _ in pairs], [c for _, c in pairs]


def kserve_class(name: str):
    """A class of KServe's Python models, or of the Kubernetes models they use (V1Toleration …)."""
    import kserve.models
    import kubernetes.client.models

    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name)


def check_against(type_name: str, value, where: str = ""):
    """``value`` (a manifest as YAML gives it) built as KServe's model ``type_name``: only fields the
    model defines, each of its declared type, recursively (unknown or misspelled fields fail), and
    the model's own constructor checks (required fields). Returns the built object."""
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list"
        return [check_against(type_name[5:-1], item, f"{where}[{index}]") for index, item in enumerate(value)]
    if type_name.startswith("dict("):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        item_type = type_name[5:-1].split(", ", 1)[1]
        return {key: check_against(item_type, item, f"{where}.{key}") for key, item in value.items()}
    native = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in native:
        assert isinstance(value, native[type_name]), f"{where}: {value!r} is not {type_name}"
        return value
    cls = kserve_class(type_name)
    assert isinstance(value, dict), f"{where}: expected a {type_name} mapping"
    fields = {json_key: attribute for attribute, json_key in cls.attribute_map.items()}
    for key in value:
        assert key in fields, f"{where}.{key}: no such field in KServe's {type_name} (fields: {sorted(fields)})"
    return cls(**{fields[key]: check_against(cls.openapi_types[fields[key]], item, f"{where}.{key}") for key, item in value.items()})
