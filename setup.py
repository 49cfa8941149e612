"""The packages topr installs, found rather than listed: each folder of components/ holding a
component.py is the package ``topr_components.<folder>``, so a new stage adds no line here or in
pyproject.toml (setuptools lists packages mapped from another folder one by one). Everything
else about the project is in pyproject.toml."""

from pathlib import Path

from setuptools import setup

COMPONENTS = sorted(path.parent.name for path in Path(__file__).parent.glob("components/*/component.py"))

setup(
    packages=[
        "topr",
        "topr.tasks",
        "topr.experiments",
        "topr_pipelines",
        "topr_components",
        *(f"topr_components.{name}" for name in COMPONENTS),
    ]
)
