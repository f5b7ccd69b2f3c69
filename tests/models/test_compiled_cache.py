"""Where the compiled runtime's Inductor kernels are kept: $VQTOK_CACHE/inductor unless the user chose
another folder, set before anything in the process asks Inductor for its cache."""

from __future__ import annotations

import os

import pytest
import torch

from models.export import compiled
from models.presets import create_tokenizer


@pytest.fixture
def cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("VQTOK_CACHE", str(tmp_path / "vq"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    return tmp_path / "vq" / "inductor"


def test_unset_gets_ours(cache_env) -> None:  # type: ignore[no-untyped-def]
    compiled.configure_inductor()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_env)


def test_torch_default_written_earlier_is_replaced(cache_env) -> None:  # type: ignore[no-untyped-def]
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    torch_choice = cache_dir()  # what any earlier use of Inductor does: writes torch's default into the environment
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == torch_choice != str(cache_env)
    compiled.configure_inductor()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_env)
    assert cache_dir() == str(cache_env)  # and Inductor now uses it


def test_users_choice_is_kept(cache_env, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiled.configure_inductor()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_cache_is_set_before_the_search_op_is_defined(cache_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from models.quantizers import search_op

    seen: list[str | None] = []

    def register() -> bool:
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        return False  # no triton here: compiled_graphs then refuses fused=True

    monkeypatch.setattr(search_op, "register", register)
    tok = create_tokenizer("f8-fsq-64k", base_channels=8, norm_groups=4, num_res_blocks=1).eval()
    with pytest.raises(RuntimeError, match="triton"):
        compiled.compiled_graphs(tok, torch.device("cpu"), compile=True, fused=True)
    assert seen == [str(cache_env)]
