"""The library holds all logic and imports no Kubeflow code; the floors above import it, not the reverse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import topr

LIBRARY = Path(topr.__file__).parent


def test_library_source_never_imports_kfp_or_the_upper_floors():
    offenders = [
        f"{path.relative_to(LIBRARY)}:{number}: {line.strip()}"
        for path in LIBRARY.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip().startswith(("import kfp", "from kfp", "from topr_components", "from topr_pipelines", "import topr_components", "import topr_pipelines"))
    ]
    # `topr run`, `compile` and `schedule` hand over to pipelines/ lazily, inside the command.
    offenders = [o for o in offenders if not o.startswith("cli.py") or "from topr_pipelines" not in o]
    assert offenders == []


def test_importing_every_stage_loads_no_kfp():
    stages = "objectives logprobs records prompts sample verify curate train evaluate models tracking steps report config cli storage stack lineage verifier experiment loop inprocess stats promotion"
    code = f"import sys; import {', '.join('topr.' + s for s in stages.split())}; print(any(m.split('.')[0] == 'kfp' for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
