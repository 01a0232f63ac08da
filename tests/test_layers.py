"""Static checks every change must pass: one-way layers (import-linter) and ruff, both configured in pyproject.

The layering contract is what keeps the runtime installable without TensorFlow: nothing in
``cxr_edge.runtime`` may import ``train``, ``export``, ``serve`` or ``bench``, lazily or not. In CI a
missing tool fails the test (the dev extra brings both); elsewhere it skips.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _need(module: str, extra: str = "dev") -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI installs the {extra} extra")
        pytest.skip(f"{module} is not installed ({extra} extra)")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``tree`` (PYTHONPATH first, so a copy is checked, not the install)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", code, "--config", str(tree / "pyproject.toml")], cwd=tree,
                          capture_output=True, text=True, env=env)


def test_no_import_points_up_a_layer():
    _need("importlinter")
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and "0 broken" in r.stdout, r.stdout[-2000:]


def test_the_layering_check_can_fail(tmp_path):
    """The contract is not vacuous: a runtime module that imports export lazily is caught."""
    _need("importlinter")
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "cxr_edge", tree / "cxr_edge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    with open(tree / "cxr_edge" / "runtime" / "overlay.py", "a") as f:
        f.write("\n\ndef _sneak():\n    from ..export import fp16  # noqa: F401\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "cxr_edge.runtime.overlay -> cxr_edge.export.fp16" in r.stdout


def test_ruff_is_clean():
    _need("ruff")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "cxr_edge", "tests", "benchmarks"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
