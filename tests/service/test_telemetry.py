"""FastAPI's native OpenTelemetry (FastAPI >= 0.165) is off unless asked for: its per-request check
reads the environment on every request, for providers this service does not configure."""

from __future__ import annotations

import inspect

import pytest
from fastapi import FastAPI

from service.app import _telemetry, create_app
from service.settings import Settings

native = "telemetry" in inspect.signature(FastAPI.__init__).parameters


@pytest.mark.skipif(not native, reason="this FastAPI has no native OpenTelemetry")
@pytest.mark.parametrize("on", [False, True])
def test_native_telemetry_follows_the_setting(on: bool, tmp_path) -> None:
    app = create_app(Settings(model_repo=tmp_path, opentelemetry=on))
    config = app._telemetry  # what FastAPI checks per request
    assert [config[k] for k in ("tracing", "metrics", "logs")] == [on, on, on]


def test_an_older_fastapi_gets_no_telemetry_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    def old_init(self: object, *, title: str = "") -> None: ...

    monkeypatch.setattr(FastAPI, "__init__", old_init)
    assert _telemetry(Settings(opentelemetry=True)) == {}
