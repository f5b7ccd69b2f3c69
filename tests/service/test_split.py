"""The split server (`front_workers` > 0): front processes in front of one inference process.

Real servers on real ports with real photos: concurrent requests through several fronts give the
runtime's own tokens and still form full batches; the inference process dying answers 503 (never a
hang) until it is back; shutdown leaves no shared memory behind, even of a killed front. (The rest of
the service suite runs against a split server too: see conftest.py.)"""

from __future__ import annotations

import asyncio
import glob
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.harness.procs import established_by_process
from models.core import pixels
from models.runtime.onnx import ModelRuntime
from service.metrics import Metrics
from service.multiproc import ipc
from service.multiproc.inference import _Merged
from service.settings import Settings
from tests.helpers import REPO, SplitServerThread, free_port
from tests.service.conftest import cpu_settings, metric_value

NPY = "application/x-npy"


def _settings(model_repo: Path, **overrides: object) -> Settings:
    return cpu_settings(model_repo, **({"default_model": "fsq4", "front_workers": 3} | overrides))


def _segments(server_id: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ipc.SHM_DIR, ipc.segment_prefix(server_id) + "*")))


def _jpegs(photos: list[Path], n: int) -> list[bytes]:
    return [photos[i % len(photos)].read_bytes() for i in range(n)]


async def _post_all(url: str, bodies: list[list[bytes]], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def one(files: list[bytes]) -> httpx.Response:
            async with sem:
                return await c.post(
                    "/v1/encode?resize=crop",
                    files=[("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(files)],
                    headers={"Accept": NPY},
                )

        return await asyncio.gather(*(one(b) for b in bodies))


def test_concurrent_requests_through_several_fronts_give_the_runtimes_tokens_in_full_batches(model_repo: Path, photos: list[Path]) -> None:
    s = SplitServerThread(_settings(model_repo, max_batch_size=16, max_batch_delay_ms=20, front_shm_mib=1)).start()
    try:
        jpegs = _jpegs(photos, 40)
        # one image per request, and 8-image requests; the 1 MiB slab overflows under this load, so
        # some arrays travel inline over the socket: both paths must give the same tokens
        bodies = [[j] for j in jpegs] + [jpegs[i : i + 8] for i in range(0, 40, 8)]
        answers = asyncio.run(_post_all(s.url, bodies, concurrency=32))
        assert [r.status_code for r in answers] == [200] * len(bodies), [r.text for r in answers if r.status_code != 200][:3]
        runtime = ModelRuntime.load(model_repo / "fsq4", device="cpu")
        f, res = runtime.info.downsample, runtime.info.resolution
        want = {
            i: runtime.encode(pixels.prepare(j, downsample=f, resolution=res, resize="crop").pixels[None])[0] for i, j in enumerate(jpegs)
        }
        for k, r in enumerate(answers):
            got = np.load(io.BytesIO(r.content))
            first = k if k < 40 else (k - 40) * 8
            for j in range(got.shape[0]):
                np.testing.assert_array_equal(got[j], want[first + j])
        text = httpx.get(f"{s.url}/metrics", timeout=10).text
        calls = metric_value(text, "vqtok_batch_size_count", model="fsq4", op="encode")
        images = metric_value(text, "vqtok_batch_size_sum", model="fsq4", op="encode")
        assert images == 80
        assert calls <= 40, f"{calls} inference calls for 80 images: the fronts' requests did not batch together"
        # every front's HTTP counts are in the one exposition, whichever front answered the scrape
        assert metric_value(text, "vqtok_http_requests_total", route="/v1/encode", status="200") == len(bodies)
        assert metric_value(text, "vqtok_images_total", model="fsq4", op="encode") == 80
    finally:
        s.stop()
    assert _segments(s.server.server_id) == []


def _distinct_jpegs(photos: list[Path], n: int) -> list[bytes]:
    """`n` different JPEGs: the photos, then the photos mirrored."""
    out = [p.read_bytes() for p in photos]
    for p in photos:
        with Image.open(p) as im:
            buf = io.BytesIO()
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, format="JPEG", quality=95)
            out.append(buf.getvalue())
    assert len(out) >= n and len(set(out)) == len(out)
    return out[:n]


def _runtime_tokens(model_repo: Path, jpegs: list[bytes]) -> list[np.ndarray]:
    runtime = ModelRuntime.load(model_repo / "fsq4", device="cpu")
    f, res = runtime.info.downsample, runtime.info.resolution
    return [runtime.encode(pixels.prepare(j, downsample=f, resolution=res, resize="crop").pixels[None])[0] for j in jpegs]


def test_one_image_requests_of_a_front_go_to_the_inference_process_grouped_and_each_gets_its_own_tokens(
    model_repo: Path, photos: list[Path]
) -> None:
    s = SplitServerThread(_settings(model_repo, front_workers=1, max_batch_size=16, max_batch_delay_ms=5)).start()
    try:
        jpegs = _distinct_jpegs(photos, 80)
        answers = asyncio.run(_post_all(s.url, [[j] for j in jpegs], concurrency=32))
        assert [r.status_code for r in answers] == [200] * len(jpegs), [r.text for r in answers if r.status_code != 200][:3]
        for r, want in zip(answers, _runtime_tokens(model_repo, jpegs), strict=True):
            np.testing.assert_array_equal(np.load(io.BytesIO(r.content))[0], want)
        text = httpx.get(f"{s.url}/metrics", timeout=10).text
        requests = metric_value(text, "vqtok_infer_message_requests_sum", model="fsq4", op="encode")
        messages = metric_value(text, "vqtok_infer_message_requests_count", model="fsq4", op="encode")
        assert requests == 80
        assert messages < 80, "every request reached the inference process in a message of its own"
        assert metric_value(text, "vqtok_shared_memory_used_bytes") == 0
    finally:
        s.stop()


def test_clients_that_leave_take_only_their_own_requests_and_the_slab_is_freed(model_repo: Path, photos: list[Path]) -> None:
    # a long batch delay keeps every request queued long enough for its client's leaving to be seen
    s = SplitServerThread(_settings(model_repo, front_workers=1, max_batch_size=64, max_batch_delay_ms=500)).start()
    jpegs = _distinct_jpegs(photos, 48)
    leaving = set(range(1, 48, 3))

    async def leave(body: bytes) -> None:
        request = httpx.Request("POST", f"{s.url}/v1/encode?resize=crop", files=[("images", ("0.jpg", body, "image/jpeg"))])
        raw = b"POST /v1/encode?resize=crop HTTP/1.1\r\nHost: x\r\n"
        raw += b"".join(f"{k}: {v}\r\n".encode() for k, v in request.headers.items() if k.lower() != "host")
        raw += b"\r\n" + request.read()
        _, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(0.1)  # long enough to be read and queued; far shorter than the batch delay
        writer.close()

    async def run() -> list[httpx.Response | None]:
        async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:

            async def one(i: int) -> httpx.Response | None:
                if i in leaving:
                    await leave(jpegs[i])
                    return None
                files = [("images", (f"{i}.jpg", jpegs[i], "image/jpeg"))]
                return await c.post("/v1/encode?resize=crop", files=files, headers={"Accept": NPY})

            return await asyncio.gather(*(one(i) for i in range(len(jpegs))))

    try:
        answers = asyncio.run(run())
        want = _runtime_tokens(model_repo, jpegs)
        for i, r in enumerate(answers):
            if i not in leaving:
                assert r is not None and r.status_code == 200, r.text if r is not None else i
                np.testing.assert_array_equal(np.load(io.BytesIO(r.content))[0], want[i])
        deadline = time.monotonic() + 60  # a wait for the counters, not a bound
        while time.monotonic() < deadline:
            text = httpx.get(f"{s.url}/metrics", timeout=10).text
            if metric_value(text, "vqtok_http_requests_total", route="/v1/encode", status="499") == len(leaving):
                break
            time.sleep(0.05)
        assert metric_value(text, "vqtok_http_requests_total", route="/v1/encode", status="499") == len(leaving)
        assert metric_value(text, "vqtok_infer_message_requests_count", model="fsq4", op="encode") < len(jpegs)
        assert metric_value(text, "vqtok_shared_memory_used_bytes") == 0
        assert metric_value(text, "vqtok_queue_depth", model="fsq4") == 0
    finally:
        s.stop()
    assert _segments(s.server.server_id) == []


def test_the_inference_process_dying_answers_503_then_serves_again(model_repo: Path, photos: list[Path]) -> None:
    s = SplitServerThread(_settings(model_repo, front_workers=2, max_batch_delay_ms=50, admin_api_keys=["admin-key-123"])).start()
    try:
        jpegs = _jpegs(photos, 64)
        engine = s.server.inference
        assert engine is not None

        async def load_then_kill() -> list[httpx.Response]:
            task = asyncio.ensure_future(_post_all(s.url, [[j] for j in jpegs] * 4, concurrency=32))
            await asyncio.sleep(0.3)
            engine.kill()
            return await task

        t0 = time.monotonic()
        answers = asyncio.run(load_then_kill())
        assert time.monotonic() - t0 < 30  # nothing waited for its deadline
        codes = {r.status_code for r in answers}
        assert codes <= {200, 503} and 503 in codes, codes
        gone = next(r for r in answers if r.status_code == 503)
        assert gone.json()["type"] == "urn:vqtok:problem:model-not-ready" and gone.headers["retry-after"] == "1"
        while s.server.inference in (None, engine):  # until the supervisor starts it again (after its backoff), 503s
            models = httpx.get(f"{s.url}/v1/models", timeout=10)
            reload = httpx.post(f"{s.url}/v1/admin/reload", headers={"Authorization": "Bearer admin-key-123"}, timeout=10)
            if s.server.inference in (None, engine):
                assert models.status_code == 200 and reload.status_code == 503, reload.text
                assert reload.json()["type"] == "urn:vqtok:problem:model-not-ready"
            time.sleep(0.05)
        # the supervisor starts it again; until it is ready, 503s with the reason
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = httpx.get(f"{s.url}/readyz", timeout=10)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.json()["type"] == "urn:vqtok:problem:not-ready"
            time.sleep(0.1)
        assert r.status_code == 200
        assert s.server.inference not in (None, engine) and s.server.restarts == 1
        again = asyncio.run(_post_all(s.url, [[j] for j in jpegs[:8]], concurrency=8))
        assert [r.status_code for r in again] == [200] * 8
    finally:
        s.stop()
    assert _segments(s.server.server_id) == []


def test_shutdown_leaves_no_shared_memory_even_of_a_killed_front(model_repo: Path) -> None:
    s = SplitServerThread(_settings(model_repo, front_workers=2)).start()
    try:
        assert len(_segments(s.server.server_id)) == 2  # one slab per front
        victim = s.server.fronts[0]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            s.server.fronts[0] not in (None, victim) and httpx.get(f"{s.url}/readyz", timeout=10).status_code == 200
        ):
            time.sleep(0.1)
        assert s.server.fronts[0] not in (None, victim)  # started again (None: its restart is still pending)
    finally:
        s.stop()
    assert _segments(s.server.server_id) == []
    assert not os.path.exists(s.server.socket_path)


def test_vqtok_serve_front_workers_stops_cleanly_on_sigterm(model_repo: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from vqtok.cli import main; sys.exit(main())", "serve", "--model-repo", str(model_repo)]
    cmd += ["--port", str(port), "--front-workers", "2", "--warmup-sizes", "32", "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        img = pixels.encode_png(np.zeros((32, 32, 3), np.uint8))
        assert httpx.post(f"http://127.0.0.1:{port}/v1/encode", files={"images": img}, timeout=30).status_code == 200
        assert _segments(f"{proc.pid}.0")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _segments(f"{proc.pid}.0") == []


def test_a_port_in_use_is_one_clear_line(model_repo: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-c", "import sys; from vqtok.cli import main; sys.exit(main())", "serve", "--model-repo", str(model_repo)]
        done = subprocess.run([*cmd, "--port", str(port), "--front-workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_slab_allocates_first_fit_and_coalesces() -> None:
    slab = ipc.Slab(f"vqtok-test{os.getpid()}-slab", 4096)
    try:
        a = slab.alloc((10,), "u1")
        b = slab.alloc((100,), "<i4")
        c = slab.alloc((1000,), "u1")
        assert a is not None and b is not None and c is not None
        assert (a.offset, a.nbytes, b.offset, b.nbytes, c.offset) == (0, 64, 64, 448, 512)
        assert slab.alloc((4096,), "u1") is None  # no run that long is free
        b.view(slab.shm.buf)[...] = np.arange(100)
        assert b.view(slab.shm.buf).sum() == 4950
        slab.free(a)
        slab.free(c)
        slab.free(b)
        assert slab.free_bytes == 4096 and slab.alloc((4096,), "u1") is not None  # coalesced into one run
    finally:
        slab.close()
    assert not os.path.exists(os.path.join(ipc.SHM_DIR, f"vqtok-test{os.getpid()}-slab"))


def test_metrics_of_several_processes_are_summed() -> None:
    a, b = Metrics(), Metrics()
    a.requests.labels("/v1/encode", "POST", "200").inc(3)
    b.requests.labels("/v1/encode", "POST", "200").inc(2)
    b.requests.labels("/v1/decode", "POST", "200").inc()
    a.batch_size.labels("m", "encode").observe(4)
    b.batch_size.labels("m", "encode").observe(8)
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Merged([list(a.registry.collect()), list(b.registry.collect())]))  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    assert metric_value(text, "vqtok_http_requests_total", route="/v1/encode") == 5
    assert metric_value(text, "vqtok_http_requests_total", route="/v1/decode") == 1
    assert metric_value(text, "vqtok_batch_size_sum") == 12 and metric_value(text, "vqtok_batch_size_count") == 2
    assert text.count("# TYPE vqtok_http_requests_total counter") == 1


@pytest.mark.parametrize("front_shm_mib", [0])
def test_no_shared_memory_at_all_still_serves(model_repo: Path, photos: list[Path], front_shm_mib: int) -> None:
    s = SplitServerThread(_settings(model_repo, front_workers=1, front_shm_mib=front_shm_mib)).start()
    try:
        assert _segments(s.server.server_id) == []
        answers = asyncio.run(_post_all(s.url, [[j] for j in _jpegs(photos, 4)], concurrency=4))
        assert [r.status_code for r in answers] == [200] * 4
        r = httpx.post(f"{s.url}/v1/decode", json={"tokens": np.ones((8, 8), int).tolist()}, headers={"Accept": NPY}, timeout=30)
        assert r.status_code == 200 and np.load(io.BytesIO(r.content)).shape == (1, 32, 32, 3)
    finally:
        s.stop()


def test_deadlines_queue_full_and_reload_behave_as_in_one_process(model_repo: Path) -> None:
    """What needs the batcher to be slow, without fault injection: a partial batch waits a whole second."""
    s = SplitServerThread(
        _settings(
            model_repo,
            front_workers=2,
            max_batch_size=64,
            max_batch_delay_ms=1000,
            max_queue_images=2,
            max_images_per_request=2,
            admin_api_keys=["admin-key-123"],
            retry_after_s=3,
        )
    ).start()
    img = pixels.encode_png(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    try:
        # the deadline: 504 at 0.2 s, and the item leaves the inference process's queue (cancelled there)
        t0 = time.monotonic()
        r = httpx.post(f"{s.url}/v1/encode", files={"images": img}, headers={"X-Request-Timeout": "0.2"}, timeout=10)
        assert r.status_code == 504 and r.json()["type"] == "urn:vqtok:problem:deadline-exceeded"
        assert time.monotonic() - t0 < 0.9
        deadline = time.monotonic() + 60  # a wait for the counters, not a bound
        while time.monotonic() < deadline:
            text = httpx.get(f"{s.url}/metrics", timeout=10).text
            if metric_value(text, "vqtok_rejected_total", model="fsq4", reason="cancelled") >= 1:
                break
            time.sleep(0.05)
        assert metric_value(text, "vqtok_rejected_total", model="fsq4", reason="cancelled") >= 1
        assert metric_value(text, "vqtok_rejected_total", model="fsq4", reason="deadline") >= 1
        assert metric_value(text, "vqtok_queue_depth", model="fsq4") == 0

        # the queue bound: two images wait for the batch delay; the next request is 503 queue-full
        async def full() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                first = asyncio.ensure_future(c.post("/v1/encode", files=[("images", img), ("images", img)]))
                await asyncio.sleep(0.3)
                second = await c.post("/v1/encode", files={"images": img})
                return await first, second

        first, second = asyncio.run(full())
        assert first.status_code == 200
        assert second.status_code == 503 and second.json()["type"] == "urn:vqtok:problem:queue-full"
        assert second.headers["retry-after"] == "3"

        # reload through a front: every front sees the new version
        before = httpx.get(f"{s.url}/v1/models/fsq4", timeout=10).json()["loaded_at"]
        assert httpx.post(f"{s.url}/v1/admin/reload?model=fsq4", timeout=60).status_code == 401
        r = httpx.post(f"{s.url}/v1/admin/reload?model=fsq4", headers={"Authorization": "Bearer admin-key-123"}, timeout=60)
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
        for _ in range(6):  # whichever front answers
            assert httpx.get(f"{s.url}/v1/models/fsq4", timeout=10).json()["loaded_at"] > before
        assert httpx.post(f"{s.url}/v1/encode", files={"images": img}, timeout=30).status_code == 200
    finally:
        s.stop()
    assert _segments(s.server.server_id) == []


def test_a_slab_gets_its_pages_up_front_and_a_front_without_room_runs_without_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A slab's pages are allocated when it is made: on a full /dev/shm that fails (ENOSPC) instead of a
    later write killing the front with SIGBUS; the front then runs without a slab (the socket path) and
    says why; nothing is left in /dev/shm."""
    import errno

    from service.multiproc import front as front_module
    from service.multiproc import ipc
    from service.settings import Settings

    name = f"vqtok-test-slab-{os.getpid()}"
    slab = ipc.Slab(name, 2 * 2**20)
    try:
        assert os.stat(os.path.join(ipc.SHM_DIR, slab.name.lstrip("/"))).st_blocks * 512 >= slab.size  # allocated, not sparse
    finally:
        slab.close()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ipc.os, "posix_fallocate", full)
    with pytest.raises(OSError):
        ipc.Slab(name, 2 * 2**20)
    assert not os.path.exists(os.path.join(ipc.SHM_DIR, name))
    with caplog.at_level("WARNING", logger="vqtok.front"):
        assert front_module.front_slab(Settings(front_shm_mib=8), name) is None
    assert "no room for this front's 8 MiB slab" in caplog.text
    assert front_module.front_slab(Settings(front_shm_mib=0), name) is None


# --- connections: handed to the fronts in turn (service/multiproc/handoff.py) ---


def _open_keepalive(port: int, n: int) -> list[socket.socket]:
    """`n` connections opened in one burst, then one GET /healthz answered on each (so each is with a front)."""
    conns = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(n)]
    for c in conns:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    for c in conns:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = c.recv(4096)
            assert chunk, "connection closed without an answer"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head[:80]
    return conns


def test_a_burst_of_keepalive_connections_is_spread_evenly_over_the_fronts(model_repo: Path) -> None:
    s = SplitServerThread(_settings(model_repo, front_workers=4)).start()
    conns: list[socket.socket] = []
    try:
        conns = _open_keepalive(s.port, 40)
        pids = [p.pid for p in s.server.fronts if p is not None]
        assert established_by_process(pids, s.port) == [10, 10, 10, 10]  # the kernel's choice on a shared socket: e.g. 25/3/23/13 of 64
        assert s.server.acceptor is not None and sum(s.server.acceptor.handed) >= 40
    finally:
        for c in conns:
            c.close()
        s.stop()


def test_a_killed_front_gets_no_connections_until_it_is_back_then_its_share(model_repo: Path) -> None:
    s = SplitServerThread(_settings(model_repo, front_workers=4)).start()
    conns: list[socket.socket] = []
    try:
        victim = s.server.fronts[0]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        conns += _open_keepalive(s.port, 9)  # every one answered by the three left (or by the new one)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and s.server.fronts[0] in (None, victim):
            time.sleep(0.05)
        assert s.server.fronts[0] not in (None, victim)
        acceptor = s.server.acceptor
        assert acceptor is not None
        while time.monotonic() < deadline and not (
            all(acceptor.ready) and httpx.get(f"{s.url}/readyz", timeout=10).status_code == 200
        ):  # /readyz: every front reaches the engine; `ready`: every front has told the supervisor it serves
            time.sleep(0.1)
        before = established_by_process([p.pid for p in s.server.fronts if p is not None], s.port)
        conns += _open_keepalive(s.port, 8)
        after = established_by_process([p.pid for p in s.server.fronts if p is not None], s.port)
        assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 2, 2]
    finally:
        for c in conns:
            c.close()
        s.stop()


def test_shared_accept_still_serves(model_repo: Path, photos: list[Path]) -> None:
    s = SplitServerThread(_settings(model_repo, front_workers=2, front_accept="shared")).start()
    try:
        assert s.server.acceptor is None
        answers = asyncio.run(_post_all(s.url, [[j] for j in _jpegs(photos, 16)], concurrency=8))
        assert [r.status_code for r in answers] == [200] * 16
    finally:
        s.stop()


def test_reuseport_fronts_each_listen_and_a_killed_fronts_waiting_connections_are_served_by_its_successor(
    model_repo: Path, photos: list[Path]
) -> None:
    """SO_REUSEPORT: a socket of its own for each front, held by the supervisor, so the connections the
    kernel queues on a dead front's socket wait for the front started in its place instead of failing."""
    s = SplitServerThread(_settings(model_repo, front_workers=2, front_accept="reuseport")).start()
    conns: list[socket.socket] = []
    try:
        assert s.server.acceptor is None and len(s.server.front_socks) == 2
        assert {sock.getsockname()[1] for sock in s.server.front_socks} == {s.port}
        answers = asyncio.run(_post_all(s.url, [[j] for j in _jpegs(photos, 8)], concurrency=4))
        assert [r.status_code for r in answers] == [200] * 8
        victim = s.server.fronts[0]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        conns = _open_keepalive(s.port, 12)  # some hash to the dead front's socket: answered once it is back
        assert s.server.fronts[0] not in (None, victim)
    finally:
        for c in conns:
            c.close()
        s.stop()


def test_restart_backoff_doubles_on_quick_exits_and_resets_after_a_stable_run() -> None:
    from service.multiproc.server import Restarts

    r = Restarts(first_s=0.5, max_s=4.0, stable_s=30.0)
    r.start(100.0)
    assert r.exited(101.0) == 101.5  # quick: the first delay
    r.start(101.5)
    assert r.exited(102.0) == 103.0  # quick again: twice as long
    for now, want in [(103.0, 105.0), (105.0, 109.0), (109.0, 113.0)]:  # doubling up to max_s
        r.start(now)
        assert r.exited(now) == want
    r.start(113.0)
    assert r.exited(200.0) == 200.0  # after a stable run: at once, and the doubling starts over
    r.start(200.0)
    assert r.exited(201.0) == 201.5


def test_a_front_that_keeps_dying_is_started_again_later_each_time(model_repo: Path) -> None:
    """The supervisor's backoff on a real split server: a front killed right after each start waits
    0.5 s, then 1 s, before it is started again (lower bounds only: a start can never come sooner),
    and the server serves with every front once they are back."""
    s = SplitServerThread(_settings(model_repo, front_workers=2)).start()
    try:
        waits = []
        for _ in range(2):
            front = s.server.fronts[0]
            assert front is not None
            front.kill()
            t0 = time.monotonic()
            while s.server.fronts[0] is None or s.server.fronts[0] is front:
                time.sleep(0.02)
            waits.append(time.monotonic() - t0)
        assert waits[0] >= 0.5 and waits[1] >= 1.0, waits
        assert s.server.restarts == 2
        deadline = time.monotonic() + 60
        while httpx.get(f"{s.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the fronts did not come back"
            time.sleep(0.1)
        img = pixels.encode_png(np.zeros((32, 32, 3), np.uint8))
        answers = [httpx.post(f"{s.url}/v1/encode", files={"images": img}, timeout=30).status_code for _ in range(4)]
        assert answers == [200] * 4
    finally:
        s.stop()


def test_a_front_that_cannot_be_started_is_tried_again(model_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart that fails to spawn (no process, no socket pair: EMFILE and the like) is tried again
    after the backoff instead of leaving the slot empty for good."""
    s = SplitServerThread(_settings(model_repo, front_workers=2)).start()
    try:
        real_spawn = s.server._spawn_front
        failures = []

        def spawn(index: int) -> subprocess.Popen[bytes]:
            if not failures:
                failures.append(index)
                raise OSError(24, "Too many open files")
            return real_spawn(index)

        monkeypatch.setattr(s.server, "_spawn_front", spawn)
        victim = s.server.fronts[0]
        assert victim is not None
        victim.kill()
        deadline = time.monotonic() + 60
        while s.server.fronts[0] in (None, victim):
            assert time.monotonic() < deadline, "the front was not started again"
            time.sleep(0.05)
        assert failures == [0] and s.server.restarts == 1
    finally:
        s.stop()
