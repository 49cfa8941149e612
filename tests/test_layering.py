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
    assert offenders == []


def test_importing_every_stage_and_building_the_cli_loads_no_workflow_package():
    # The pipeline's commands come in through an entry point, yet `topr --help` imports no kfp:
    # it works where only the core is installed.
    stages = "objectives logprobs records prompts sample verify curate train evaluate models tracking steps report config cli storage stack lineage verifier experiment workflow inprocess stats promotion"
    code = (
        f"import sys; import {', '.join('topr.' + s for s in stages.split())}; topr.cli._build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'kfp', 'mlflow', 'boto3', 'botocore', 'matplotlib', 'statsmodels', 'pandas'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_cli_lists_the_pipeline_commands_through_its_entry_point():
    from topr.cli import _installed_commands

    assert [command.name for command in _installed_commands()] == ["run", "compile", "submit", "schedule"]
