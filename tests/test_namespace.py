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


def test_the_public_names_are_the_packages_own() -> None:
    import clients
    import clients.tokenize
    import models
    import models.export
    from models.core import artefacts, errors

    assert vqtok.Tokenizer is models.Tokenizer and vqtok.TokenizerConfig is models.TokenizerConfig
    assert vqtok.create_tokenizer is models.create_tokenizer and vqtok.list_presets is models.list_presets
    assert vqtok.Client is clients.Client and vqtok.AsyncClient is clients.AsyncClient and vqtok.LocalBackend is clients.LocalBackend
    assert vqtok.VqtokError is clients.VqtokError and issubclass(vqtok.NotFoundError, vqtok.APIStatusError)
    assert vqtok.tokenize_local is clients.tokenize.tokenize_local and vqtok.read_tokens is clients.tokenize.read_tokens
    assert vqtok.export_model is models.export.export_model
    assert vqtok.resolve_model_dir is artefacts.resolve_model_dir and vqtok.ModelNotFound is errors.ModelNotFound
    assert vqtok.__version__ == version("vqtok")
    assert "f8-simvq-16k" in vqtok.list_presets() and vqtok.DEFAULT_MODEL in vqtok.shipped_models()


def test_every_listed_name_resolves_and_others_do_not() -> None:
    namespace: dict[str, object] = {}
    exec("from vqtok import *", namespace)
    assert set(vqtok.__all__) <= set(namespace)
    assert set(vqtok.__all__) <= set(dir(vqtok))
    assert len(vqtok.__all__) == len(set(vqtok.__all__))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vqtok.nope  # noqa: B018


def test_load_tokens_follows_clients_tokenize() -> None:
    """Re-exported by name: present in `vqtok` exactly when `clients.tokenize` has it."""
    import clients.tokenize

    assert getattr(vqtok, "load_tokens", None) is getattr(clients.tokenize, "load_tokens", None)


def test_python_m_vqtok_is_the_command_line(tmp_path: Path) -> None:
    result = run("-m", "vqtok", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: vqtok") and "tokenize" in result.stdout
    train = run("-m", "vqtok", "train", "--help", cwd=tmp_path)
    assert train.returncode == 0 and "-m vqtok train" in " ".join(train.stdout.split())
    bad = run("-m", "vqtok", "eval", "--model", "no-such-model", "--data", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "no such directory, and no shipped model" in bad.stderr
    legacy = run("-m", "clients", "--help", cwd=tmp_path)  # the older spelling keeps working
    assert legacy.returncode == 0 and legacy.stdout == result.stdout
