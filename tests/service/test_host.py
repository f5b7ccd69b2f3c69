"""What a newcomer's host gets: the device and runtime each model runs on, one clear warning when a GPU
is visible but unusable, a not-ready service (with the reason) for a default model that is not there,
and a one-line fix for a command whose extra is not installed."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from models.runtime import onnx as runtime_mod
from models.runtime.onnx import ModelRuntime

REPO = Path(__file__).resolve().parents[2]


def test_models_say_which_device_and_runtime_serve_them(serve) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime

    s = serve()
    body = httpx.get(f"{s.url}/v1/models", timeout=10).json()
    for m in body["models"]:
        assert m["device"] == "cpu"
        assert m["runtime"] == f"onnxruntime {onnxruntime.__version__}"


def test_a_visible_but_unusable_gpu_is_warned_about_once(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime_mod, "gpu_visible", lambda: True)
    monkeypatch.setattr(runtime_mod, "_warned_gpu", False)
    with caplog.at_level(logging.WARNING, logger="models.runtime.onnx"):
        for _ in range(2):
            rt = ModelRuntime.load(model_repo / "fsq4", device="auto")
            assert rt.device == "cpu"
    warnings = [r for r in caplog.records if "GPU is visible" in r.getMessage()]
    assert len(warnings) == 1
    assert "pip install 'vqtok[gpu]'" in warnings[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(runtime_mod, "_warned_gpu", False)
    monkeypatch.setattr(runtime_mod, "gpu_visible", lambda: False)
    with caplog.at_level(logging.WARNING, logger="models.runtime.onnx"):
        ModelRuntime.load(model_repo / "fsq4", device="auto")
    assert not [r for r in caplog.records if "GPU is visible" in r.getMessage()]


def test_a_missing_default_model_keeps_the_service_not_ready_with_the_reason(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve(ready=False, default_model="nope")
    r = httpx.get(f"{s.url}/readyz", timeout=10)
    for _ in range(100):  # wait until loading is over: the answer must stay 503, now with the reason
        if "nope" in r.text:
            break
        r = httpx.get(f"{s.url}/readyz", timeout=10)
    assert r.status_code == 503
    assert "default model 'nope' is not in the model repository" in r.json()["detail"]
    assert "fsq4" in r.json()["detail"]  # names what is there


@pytest.mark.parametrize(("module", "argv", "fix"), [("torch", ["train", "--out", "x", "--data", "."], "pip install 'vqtok[train]'")])
def test_a_missing_extra_answers_with_the_one_line_fix(module: str, argv: list[str], fix: str, tmp_path: Path) -> None:
    code = f"import sys; sys.modules[{module!r}] = None; from vqtok.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert fix in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
