"""The `vqtok` package: one import namespace for the public API, resolved lazily, and `python -m vqtok`."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import vqtok

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_vqtok_imports_neither_torch_nor_httpx(tmp_path: Path) -> None:
    code = (
        "import json, sys, vqtok\n"
        "heavy = ('torch', 'httpx', 'numpy', 'onnxruntime', 'pyarrow', 'fastapi', 'models', 'clients')\n"
        "before = [m for m in heavy if m in sys.modules]\n"
        "vqtok.TokenizerConfig\n"
        "after_config = [m for m in ('torch', 'httpx') if m in sys.modules]\n"
        "vqtok.__version__; vqtok.resolve_model_dir; vqtok.ModelNotFound\n"
        "print(json.dumps({'before': before, 'after_config': after_config, 'torch_free': 'torch' not in sys.modules}))"
    )
    result = run("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got == {"before": [], "after_config": [], "torch_free": True}


def test_the_public_names_are_their_modules_own() -> None:
    import importlib

    import models

    for name, module in vqtok._EXPORTS.items():
        assert getattr(vqtok, name) is getattr(importlib.import_module(module), name), name
    assert vqtok.Tokenizer is models.Tokenizer and vqtok.TokenizerConfig is models.TokenizerConfig  # DESIGN.md's spelling
    assert vqtok.create_tokenizer is models.create_tokenizer and vqtok.list_presets is models.list_presets
    assert issubclass(vqtok.NotFoundError, vqtok.APIStatusError)
    assert vqtok.__version__ == version("vqtok")
    assert "f8-simvq-16k" in vqtok.list_presets() and vqtok.DEFAULT_MODEL in vqtok.shipped_models()


def test_one_table_and_its_type_checking_imports_agree() -> None:
    """The table and the TYPE_CHECKING block (for IDEs) list the same names from the same modules, and no
    package other than `vqtok` (and `models`' four contract names) re-exports anything."""
    import ast

    tree = ast.parse((REPO / "vqtok" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    imported = {a.asname or a.name: n.module for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imported == vqtok._EXPORTS
    for package in ("clients", "clients/tokenize", "models/export", "service", "training"):
        init = ast.parse((REPO / package / "__init__.py").read_text())
        assert [type(n).__name__ for n in init.body] in ([], ["Expr"]), f"{package}/__init__.py holds more than a docstring"


def test_every_listed_name_resolves_and_others_do_not() -> None:
    namespace: dict[str, object] = {}
    exec("from vqtok import *", namespace)
    assert set(vqtok.__all__) <= set(namespace)
    assert set(vqtok.__all__) <= set(dir(vqtok))
    assert len(vqtok.__all__) == len(set(vqtok.__all__))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vqtok.nope  # noqa: B018


def test_python_m_vqtok_is_the_command_line(tmp_path: Path) -> None:
    result = run("-m", "vqtok", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: vqtok") and "tokenize" in result.stdout
    train = run("-m", "vqtok", "train", "--help", cwd=tmp_path)
    assert train.returncode == 0 and "-m vqtok train" in " ".join(train.stdout.split())
    bad = run("-m", "vqtok", "eval", "--model", "no-such-model", "--data", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "no such directory, and no shipped model" in bad.stderr
