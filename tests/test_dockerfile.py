"""What can only be read of the image definition: the GPU variant, and the build context.

The CPU image is built and run for real (tests/test_image.py). The GPU variant's bases (CUDA)
and PyTorch's CUDA index cannot be reached where topr is built, so these tests read the
Dockerfile the way the builder does (line continuations joined, comments dropped, one
instruction per logical line, stages split at FROM) and check what the GPU image promises:
pinned public bases, the CUDA torch and vLLM pins within pyproject's ranges, the extras each
variant installs, no secret-like build arguments; and what .dockerignore keeps out.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- a small Dockerfile parser ------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. RUN
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts (1-based)


@dataclass
class Stage:
    base: str  # image or stage the FROM names (unresolved, e.g. base-${VARIANT})
    name: str | None  # the AS alias
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def text(self) -> str:
        return "\n".join(f"{i.keyword} {i.args}" for i in self.instructions)


def parse_instructions(text: str) -> list[Instruction]:
    """Logical instructions: comment lines dropped (also inside continuations), `\\` joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and parser directives) never continue or end an instruction
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].rstrip() if continued else stripped)
        if not continued:
            logical = " ".join(part for part in pending if part)
            keyword, _, args = logical.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the build stages in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"line {instruction.line}: cannot read FROM {instruction.args}"
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG may precede FROM"
            key, _, value = instruction.args.partition("=")
            global_args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def key_values(args: str) -> dict[str, str]:
    """ENV/LABEL/ARG arguments: `k=v k2="v 2"` (and the legacy `ENV k v`)."""
    words = shlex.split(args)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs = {}
    for word in words:
        key, sep, value = word.partition("=")
        pairs[key] = value if sep else ""
    return pairs


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


GLOBAL_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
STAGE_NAMES = {stage.name for stage in STAGES if stage.name}
FINAL = STAGES[-1]


def stage(name: str) -> Stage:
    matches = [s for s in STAGES if s.name == name]
    assert matches, f"no stage named {name!r} (stages: {sorted(STAGE_NAMES)})"
    return matches[0]


def stage_env(stage_: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage_.all("ENV"):
        env.update(key_values(instruction.args))
    return env


def stage_args(stage_: Stage) -> dict[str, str]:
    """The stage's ARG defaults."""
    args: dict[str, str] = {}
    for instruction in stage_.all("ARG"):
        args.update(key_values(instruction.args))
    return args


def resolved_base(stage_: Stage, variant: str) -> str:
    return substitute(stage_.base, {**GLOBAL_ARGS, "VARIANT": variant})


def final_chain(variant: str) -> list[Stage]:
    """The final stage and the stages it is built FROM, for one value of VARIANT."""
    chain = [FINAL]
    while (base := resolved_base(chain[-1], variant)) in STAGE_NAMES:
        chain.append(stage(base))
    return chain


def pip_installs(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"pip install[^&;|\n]*", text)]


# --- the parser itself --------------------------------------------------------------------------


def test_parser_joins_continuations_and_skips_comments():
    text = "ARG A=1\nFROM x:1.2.3 AS one\n# comment\nRUN echo a \\\n# inside\n    && echo b\nENV K=v L=\"w x\"\n"
    global_args, stages = parse_dockerfile(text)
    assert global_args == {"A": "1"}
    assert [(s.base, s.name) for s in stages] == [("x:1.2.3", "one")]
    assert [(i.keyword, i.args) for i in stages[0].instructions] == [
        ("RUN", "echo a && echo b"),
        ("ENV", 'K=v L="w x"'),
    ]
    assert key_values(stages[0].instructions[1].args) == {"K": "v", "L": "w x"}


# --- base images --------------------------------------------------------------------------------


def external_bases() -> list[tuple[str, str]]:
    """(image, resolved image) for every FROM that is not one of this file's stages."""
    found = []
    for stage_ in STAGES:
        for variant in ("gpu", "cpu"):
            image = resolved_base(stage_, variant)
            if image not in STAGE_NAMES:
                found.append((stage_.base, image))
    return sorted(set(found))


def test_every_base_image_is_pinned_to_an_exact_version():
    bases = external_bases()
    assert {written for written, _ in bases} == {"${CPU_BASE}", "${GPU_BASE}"}, bases
    for written, image in bases:
        assert "$" not in image, f"{written}: no default in a global ARG"
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image}: no tag (that means :latest)"
        assert tag != "latest" and "latest" not in tag, f"{image}: a moving tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: tag {tag!r} is not an exact x.y.z version"


def test_gpu_base_is_cuda_runtime_and_cpu_base_has_no_cuda():
    gpu = resolved_base(stage("base-gpu"), "gpu")
    cpu = resolved_base(stage("base-cpu"), "cpu")
    assert gpu.startswith("nvidia/cuda:") and "runtime" in gpu, gpu
    assert "cuda" not in cpu, cpu


def test_variant_build_arg_selects_the_base_stage():
    assert GLOBAL_ARGS.get("VARIANT") == "gpu", "ARG VARIANT=gpu must be declared before the first FROM"
    assert "${VARIANT}" in FINAL.base or "$VARIANT" in FINAL.base, f"final stage FROM {FINAL.base}"
    for variant in ("gpu", "cpu"):
        assert resolved_base(FINAL, variant) == f"base-{variant}"


# --- user ---------------------------------------------------------------------------------------




def test_hf_hub_offline_is_documented_but_not_set():
    for stage_ in STAGES:
        assert "HF_HUB_OFFLINE" not in stage_env(stage_), "HF_HUB_OFFLINE must stay a run-time choice"
    comments = [line for line in DOCKERFILE.read_text().splitlines() if line.lstrip().startswith("#")]
    assert any("HF_HUB_OFFLINE" in line for line in comments), "say how to use HF_HUB_OFFLINE"


# --- the project --------------------------------------------------------------------------------




def test_torch_and_vllm_pins_satisfy_pyproject():
    torch_range = SpecifierSet(next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))[5:])
    for name in ("base-gpu", "base-cpu"):
        pins = re.findall(r"torch==([\w.]+)", stage(name).text())
        assert len(pins) == 1, f"{name}: expected one exact torch pin, found {pins}"
        assert Version(pins[0]) in torch_range, f"{name}: torch {pins[0]} outside pyproject's {torch_range}"
    index = {name: stage_args(stage(name))["TORCH_INDEX_URL"] for name in ("base-gpu", "base-cpu")}
    for name in index:
        assert "${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL}" in stage(name).text(), f"{name}: the index is not used"
    assert index["base-gpu"].rstrip("/").endswith("/cu130"), index
    assert index["base-cpu"].rstrip("/").endswith("/cpu"), index
    gpu_extra = SpecifierSet(PYPROJECT["project"]["optional-dependencies"]["gpu"][0].removeprefix("vllm"))
    vllm = re.findall(r"vllm==([\w.]+)", stage("base-gpu").text())
    assert len(vllm) == 1 and Version(vllm[0]) in gpu_extra, f"vllm pin {vllm} vs [gpu] {gpu_extra}"



def test_cpu_variant_installs_no_vllm_and_gpu_variant_does():
    cpu = final_chain("cpu")
    gpu = final_chain("gpu")
    assert [s.name for s in cpu] == ["runtime", "base-cpu"], [s.name for s in cpu]
    assert [s.name for s in gpu] == ["runtime", "base-gpu"], [s.name for s in gpu]
    for stage_ in cpu:
        for command in pip_installs(stage_.text()):
            assert "vllm" not in command.lower() and "gpu]" not in command, f"stage {stage_.name}: {command}"
    # The final stage installs the project with the extras its base chose: gpu only on GPU.
    assert "${TOPR_EXTRAS}" in FINAL.text()
    assert stage_env(stage("base-cpu"))["TOPR_EXTRAS"] == "[workflow]"
    assert stage_env(stage("base-gpu"))["TOPR_EXTRAS"] == "[workflow,gpu]"
    assert any("vllm==" in command for command in pip_installs(stage("base-gpu").text()))


# --- secrets, entry point, labels ---------------------------------------------------------------

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|^AWS_|^MLFLOW_TRACKING_(USERNAME|PASSWORD)")


def test_no_secrets_in_env_or_build_args():
    declared = dict(GLOBAL_ARGS)
    for stage_ in STAGES:
        declared.update(stage_env(stage_))
        for instruction in stage_.all("ARG"):
            key, _, value = instruction.args.partition("=")
            declared[key.strip()] = value
    assert "VARIANT" in declared  # the parser found the declarations at all
    offending = sorted(name for name in declared if SECRET_NAME.search(name.upper()))
    assert not offending, f"secret-like ENV/ARG names in the image: {offending}"
    text = DOCKERFILE.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id"
    assert "BEGIN PRIVATE KEY" not in text and "BEGIN RSA PRIVATE KEY" not in text




def test_header_says_how_to_build_both_variants():
    header = DOCKERFILE.read_text().split("\nARG ", 1)[0]
    assert re.search(r"docker build -t \S+ \.", header), "no plain build command in the header"
    assert re.search(r"docker build .*--build-arg VARIANT=cpu", header), "no CPU build command in the header"


# --- .dockerignore ------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line.strip("/"))
    return patterns


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (a repository-relative file or directory)."""
    ignored = False
    parts = Path(path).parts
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        glob = pattern.removeprefix("**/")
        hit = any(
            fnmatch.fnmatch(c, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(Path(c).name, glob))
            for c in candidates
        )
        if hit:
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", [".venv", ".git", "runs", "mlruns", "runs/mlflow.db", "src/topr/__pycache__/x.pyc"])
def test_dockerignore_excludes_local_state(path):
    assert is_ignored(path, dockerignore_patterns()), f".dockerignore does not exclude {path}"


def test_dockerignore_excludes_env_files_with_credentials():
    patterns = dockerignore_patterns()
    assert is_ignored("k8s/overlays/local/s3-credentials.env", patterns)
    assert is_ignored("deploy/prod.env", patterns)
    # ... but not what the image is built from.
    for path in ("pyproject.toml", "setup.py", "README.md", "src/topr/cli.py", "components/train/component.py"):
        assert not is_ignored(path, patterns), path
