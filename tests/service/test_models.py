"""The model repository: broken models are refused while others serve; reloads swap versions without
failing requests in flight; SIGHUP and `vqtok serve` in a real process; no torch in the service."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from tests.helpers import free_port

from .conftest import REPO, Faults, metric_value, png_bytes
from .test_batching import encode, wait_until
from .test_errors import assert_problem

# The `vqtok` console script's entry point (`python -m vqtok.cli` would import vqtok.cli twice).
VQTOK = [sys.executable, "-c", "import sys; from vqtok.cli import main; sys.exit(main())"]
IMG = png_bytes(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
ADMIN = {"Authorization": "Bearer admin-key-123"}


def make_repo(model_repo: Path, dest: Path, names: tuple[str, ...] = ("fsq4",)) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copytree(model_repo / n, dest / n)
    return dest


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_broken_models_are_refused_and_others_serve(serve, model_repo: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(model_repo, tmp_path / "repo")
    shutil.copytree(model_repo / "fsq4", repo / "corrupt")
    truncate(repo / "corrupt" / "encoder.onnx")
    (repo / "unexported").mkdir()
    shutil.copy(model_repo / "fsq4" / "config.json", repo / "unexported")
    s = serve(model_repo=repo)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["fsq4"]["state"] == "ready"
        assert models["corrupt"]["state"] == "failed" and models["corrupt"]["error"]
        assert models["unexported"]["state"] == "failed" and "vqtok export" in models["unexported"]["error"]
        assert c.get("/readyz").status_code == 200
        assert encode(c, IMG).status_code == 200
        assert_problem(c.post("/v1/encode", params={"model": "corrupt"}, files={"images": IMG}), 503, "failed")
        assert metric_line(c, 'vqtok_model_state{model="corrupt",vqtok_model_state="failed"} 1.0')


def metric_line(c: httpx.Client, line: str) -> bool:
    return line in c.get("/metrics").text


def test_reload_swaps_versions_without_failing_in_flight_requests(serve, model_repo: Path, tmp_path: Path, faults: Faults) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo(model_repo, tmp_path / "repo")
    s = serve(loader=faults.loader, model_repo=repo, admin_api_keys=["admin-key-123"])
    with httpx.Client(base_url=s.url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        before = encode(c, IMG).content
        loaded_at = c.get("/v1/models/fsq4").json()["loaded_at"]
        faults.gate.clear()
        faults.entered.clear()
        in_flight = pool.submit(encode, c, IMG)
        assert faults.entered.wait(10)
        r = c.post("/v1/admin/reload", params={"model": "fsq4"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["ok"], r.text
        assert faults.loads == 2
        assert c.get("/v1/models/fsq4").json()["loaded_at"] > loaded_at
        faults.gate.set()
        assert in_flight.result().status_code == 200  # finished on the old version
        assert in_flight.result().content == before
        assert encode(c, IMG).content == before  # and the new version serves
        first, second = faults.runtimes
        wait_until(lambda: first.closed)  # the retired version dropped its sessions (memory handed back)
        assert not second.closed

        # a broken new version: refused, the old one keeps serving
        truncate(repo / "fsq4" / "decoder.onnx")
        r = c.post("/v1/admin/reload", params={"model": "fsq4"}, headers=ADMIN)
        assert r.status_code == 200
        assert r.json()["ok"] is False and r.json()["results"][0]["state"] == "ready" and r.json()["results"][0]["error"]
        assert encode(c, IMG).content == before
        assert c.post("/v1/decode", json={"tokens": [[1, 2]]}).status_code == 200

        # rescan: a new directory is picked up
        shutil.copytree(model_repo / "simvq4", repo / "simvq4")
        r = c.post("/v1/admin/reload", headers=ADMIN)
        assert {o["model"]: o["reloaded"] for o in r.json()["results"]} == {"fsq4": False, "simvq4": True}
        assert c.post("/v1/encode", params={"model": "simvq4"}, files={"images": IMG}).status_code == 200
        assert_problem(c.post("/v1/admin/reload", params={"model": "nope"}, headers=ADMIN), 404)
        assert_problem(c.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong-key-000"}), 401)

        # rescan: a removed directory retires its model, and its metrics go with it
        assert metric_value(c.get("/metrics").text, "vqtok_model_runtime_info", model="simvq4") == 1
        shutil.rmtree(repo / "simvq4")
        r = c.post("/v1/admin/reload", headers=ADMIN)
        assert [o["model"] for o in r.json()["results"]] == ["fsq4"]
        metrics = c.get("/metrics").text
        assert 'model="simvq4"' not in "".join(
            line for line in metrics.splitlines() if line.startswith(("vqtok_model_runtime_info", "vqtok_model_state"))
        )
        assert_problem(c.post("/v1/encode", params={"model": "simvq4"}, files={"images": IMG}), 404)


def test_single_model_directory_is_a_repository(serve, model_repo: Path) -> None:  # type: ignore[no-untyped-def]
    s = serve(model_repo=model_repo / "simvq4")
    with httpx.Client(base_url=s.url, timeout=30) as c:
        listed = c.get("/v1/models").json()
        assert listed["default_model"] == "simvq4"
        assert encode(c, IMG).status_code == 200
    # the model's revision is the artefact's own (its weights' hash), whatever checkout exported it
    manifest = json.loads((model_repo / "simvq4" / "manifest.json").read_text())
    model = listed["models"][0]
    assert model["revision"] == manifest["files"]["model.safetensors"]["sha256"][:12]
    assert model["exported_from"] == manifest["revision"]


def test_readyz_is_503_until_models_are_warm(serve, model_repo: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import threading

    release = threading.Event()

    def slow_loader(path: Path, **kw: object):  # type: ignore[no-untyped-def]
        from models.runtime.onnx import ModelRuntime

        release.wait(10)
        return ModelRuntime.load(path, **kw)  # type: ignore[arg-type]

    s = serve(loader=slow_loader, ready=False)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/healthz").json() == {"status": "ok", "models": {}}
        body = assert_problem(c.get("/readyz"), 503, "loading")
        assert set(body["models"].values()) == {"loading"}
        assert_problem(encode(c, IMG), 503, "loading")
        release.set()
        wait_until(lambda: c.get("/readyz").status_code == 200)


def test_service_imports_no_torch() -> None:
    code = "import sys, service.app, service.commands, service.batcher, models.core.pixels; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_vqtok_serve_process_sighup_reload_and_sigterm(model_repo: Path, tmp_path: Path) -> None:
    repo = make_repo(model_repo, tmp_path / "repo")
    port = free_port()
    cmd = [*VQTOK, "serve", "--model-repo", str(repo), "--port", str(port)]
    cmd += ["--device", "cpu", "--warmup-sizes", "32", "--intra-op-threads", "1"]
    env = os.environ | {"VQTOK_MAX_BATCH_SIZE": "7"}  # environment settings apply, flags win
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as c:

            def ready() -> bool:
                try:
                    return c.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, timeout=60)
            assert c.get("/v1/models").json()["limits"]["max_batch_size"] == 7
            assert encode(c, IMG, headers={"X-Request-ID": "trace-me-1"}).status_code == 200
            shutil.copytree(model_repo / "simvq4", repo / "simvq4")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: any(m["name"] == "simvq4" and m["ready"] for m in c.get("/v1/models").json()["models"]), timeout=30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn re-raises the signal it caught once shutdown is complete: a clean SIGTERM exit is -15
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [r for r in lines if r.get("logger") == "vqtok.access" and r.get("request_id") == "trace-me-1"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/v1/encode"
    assert any(r["msg"] == "model ready" and r.get("model") == "simvq4" for r in lines)


def test_serve_help_and_bad_settings() -> None:
    r = subprocess.run([*VQTOK, "serve", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--max-batch-size" in r.stdout and "--model-repo" in r.stdout
    r = subprocess.run([*VQTOK, "serve", "--max-batch-size", "0", "--model-repo", "."], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "max_batch_size" in r.stderr
    t0 = time.monotonic()
    r = subprocess.run([*VQTOK, "serve", "--model-repo", "/does/not/exist"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "not a directory" in r.stderr and time.monotonic() - t0 < 30


def test_every_inference_thread_is_warmed_before_ready(serve, model_repo: Path) -> None:  # type: ignore[no-untyped-def]
    """Warm-up runs once on each batch worker's own thread (a CUDA runtime's per-shape state is per
    thread), and inference later runs on those same threads."""
    import threading

    from models.runtime.onnx import ModelRuntime

    warmed: list[str] = []
    ran: set[str] = set()

    class Recording:
        def __init__(self, real: ModelRuntime) -> None:
            self._real, self.info, self.providers = real, real.info, real.providers
            self.device, self.runtime_name = real.device, real.runtime_name

        def warmup(self, sizes: object, batch_sizes: object = None) -> None:
            warmed.append(threading.current_thread().name)
            self._real.warmup(sizes, batch_sizes)  # type: ignore[arg-type]

        def encode(self, images: object) -> object:
            ran.add(threading.current_thread().name)
            return self._real.encode(images)  # type: ignore[arg-type]

        def decode(self, tokens: object) -> object:
            return self._real.decode(tokens)  # type: ignore[arg-type]

    s = serve(loader=lambda path, **kw: Recording(ModelRuntime.load(path, **kw)), model_repo=model_repo / "simvq4", batch_workers=3)
    assert len(warmed) == 3 and len(set(warmed)) == 3 and all(n.startswith("infer-") for n in warmed)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        for _ in range(6):
            assert encode(c, IMG).status_code == 200
    assert ran and ran <= set(warmed)


def test_batch_workers_default_by_runtime_and_reported(serve, model_repo: Path) -> None:  # type: ignore[no-untyped-def]
    """Unset, a model runs one batch at a time on ONNX Runtime and two on the compiled runtime (whose
    calls overlap on the device); the setting overrides both; /v1/models says which, in both server modes."""
    from service.repository import batch_workers
    from service.settings import Settings

    class Compiled:
        runtime_kind = "compiled"

    assert batch_workers(Settings(), Compiled()) == 2
    assert batch_workers(Settings(), object()) == 1
    assert batch_workers(Settings(batch_workers=3), Compiled()) == 3
    s = serve(model_repo=model_repo / "simvq4")
    with httpx.Client(base_url=s.url, timeout=30) as c:
        assert [m["batch_workers"] for m in c.get("/v1/models").json()["models"]] == [1]
    s = serve(model_repo=model_repo / "simvq4", batch_workers=2)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        assert [m["batch_workers"] for m in c.get("/v1/models").json()["models"]] == [2]


def test_the_shipped_default_is_the_default_where_the_repository_holds_it(serve, model_repo: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Unset default_model: DEFAULT_MODEL when the repository has it (v1 sorts before v2 by name), else the first by name."""
    from models.core.artefacts import DEFAULT_MODEL

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(model_repo / "fsq4", repo / "aaa-first-by-name")
    shutil.copytree(model_repo / "simvq4", repo / DEFAULT_MODEL)
    s = serve(model_repo=repo, default_model=None)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/v1/models").json()["default_model"] == DEFAULT_MODEL
    shutil.rmtree(repo / DEFAULT_MODEL)
    s = serve(model_repo=repo, default_model=None)
    with httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/v1/models").json()["default_model"] == "aaa-first-by-name"
