"""The layering contract (pyproject.toml, run by import-linter): it holds, and it fails when broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("models", "training", "service", "clients")


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the packages under `cwd` shadow the installed ones
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def copy_tree(dst: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.safetensors"))
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_layering_contract_holds() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def plant(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}\n")


def test_contract_fails_on_an_upward_import(tmp_path: Path) -> None:
    """A planted import of the service into the torch-free core, and one of the root command into
    training, each break the contract; the same tree without them passes."""
    tree = copy_tree(tmp_path / "clean")
    assert lint(tree).returncode == 0
    upward = copy_tree(tmp_path / "upward")
    plant(upward, "models.core.pixels", "import service.settings  # noqa")
    result = lint(upward)
    assert result.returncode != 0
    assert "models.core is torch-free and imports nothing else of vqtok BROKEN" in result.stdout.replace("\n", " ")
    leaf = copy_tree(tmp_path / "leaf")
    plant(leaf, "training.commands", "import vqtok.cli  # noqa")
    result = lint(leaf)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout


def test_contract_fails_on_a_cycle(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "cycle")
    plant(tree, "service.settings", "import service.app  # noqa")  # service.app imports settings already
    result = lint(tree)
    assert result.returncode != 0
    assert "no import cycles" in result.stdout
