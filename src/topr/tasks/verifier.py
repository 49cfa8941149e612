"""The verifier task: judge whether a proposed solution is correct, answering Yes or No.

Its prompt files are written by ``topr.verifier`` (``prompt_id``, ``prompt``, ``reference`` "Yes"
or "No", plus where the judged solution came from) and are read as they are. A judgment is the
first word of the reply; anything else ("Maybe", "The answer is yes", nothing) is no judgment,
which ``topr.verify`` scores as wrong, so a malformed judgment earns the same -1 as a wrong one.
The verifier trains on the two replies "Yes" and "No" of every pair (``topr.verifier.both_judgments``),
which this checker scores +1 and -1 by the label; malformed replies show in held-out evaluation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from topr.records import PROMPT_FIELDS
from topr.tasks.jsonl import FileTask

# The first word, after whitespace and markdown ("**Yes**", "> no"), and not the start of a
# longer word ("Yesterday", "Nope").
_JUDGMENT = re.compile(r"[\s*_`#>\"']*(yes|no)(?![a-z0-9])", re.IGNORECASE)


class VerifierTask(FileTask):
    name = "verifier"
    required_fields = PROMPT_FIELDS
    needs_task_files = False  # the verifier branch writes its files and sets them itself

    def problem(self, record: dict[str, Any], path: Path, index: int) -> dict[str, Any]:
        return dict(record)

    def extract(self, completion: str) -> str | None:
        """"Yes" or "No" from the reply's first word, None when it is neither."""
        match = _JUDGMENT.match(completion)
        return match.group(1).capitalize() if match else None

    def is_correct(self, extracted: str, reference: str) -> bool:
        return extracted == reference
