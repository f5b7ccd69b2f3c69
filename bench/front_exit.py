"""Does a front of the multi-process server that exits mid-load lose requests?

A `SplitServer` (CPU, a tiny exported model so that HTTP is the whole cost) with `--fronts` fronts takes a
closed-loop load of one-photo encodes from `--threads` clients (the Python client's retry transport, a new
connection for every request, so that connections are always on their way to a front); meanwhile each front in turn gets
SIGTERM (a restart or a scale-down: it hands back what it has not started and finishes what it holds),
then each gets SIGKILL (a crash), each time waiting until the supervisor has started it again. Counted per
run: answers, failed requests (what the client raised), with the client's retries off and on.

    python -m bench.front_exit --out bench/results/front_exit/cpu-2026-12-07/result.json
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness.fixtures import export_preset
from bench.harness.record import PHOTOS_VAL, host_fields, table, write_json
from bench.harness.server import free_port
from clients._retry import RetryPolicy, RetryTransport


def load_while(url: str, photos: list[bytes], threads: int, max_retries: int, stop: threading.Event, fresh: bool = True) -> dict[str, Any]:
    """`threads` clients encoding one photo per request, one after another, until `stop` is set, through
    the Python client's retry transport (`max_retries`); `fresh`: a new connection for every request (no
    keep-alive), so that connections are always on their way to the fronts. Returns the live counts
    (`ok`, `failed`, `errors`) and the threads (`workers`, to join)."""
    counts: dict[str, Any] = {"ok": 0, "failed": 0, "errors": []}
    lock = threading.Lock()
    limits = httpx.Limits(max_keepalive_connections=0 if fresh else None)

    def client(k: int) -> None:
        transport = RetryTransport(httpx.HTTPTransport(limits=limits), RetryPolicy(max_retries=max_retries, initial_backoff=0.1))
        with httpx.Client(base_url=url, transport=transport, timeout=60) as c:
            i = k
            while not stop.is_set():
                photo = photos[i % len(photos)]
                try:
                    r = c.post("/v1/encode", files={"images": ("p.jpg", photo, "image/jpeg")}, data={"resize": "crop"})
                    ok = r.status_code == 200
                    why = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, why = False, repr(exc)[:200]
                with lock:
                    if ok:
                        counts["ok"] += 1
                    else:
                        counts["failed"] += 1
                        counts["errors"].append(why)
                i += threads

    counts["workers"] = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(threads)]
    for w in counts["workers"]:
        w.start()
    return counts


def until(predicate: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def exits_under_load(server: Any, counts: dict[str, Any], signals: list[signal.Signals]) -> list[dict[str, Any]]:
    """Each signal to each front in turn, waiting for its successor and for answers again; per event the
    failures it cost."""
    events = []
    acceptor = server.acceptor
    for sig in signals:
        for index in range(len(server.fronts)):
            failed0, ok0 = counts["failed"], counts["ok"]
            victim = server.fronts[index]
            victim.send_signal(sig)
            victim.wait(60)
            back = until(lambda i=index, v=victim: server.fronts[i] not in (None, v) and all(acceptor.ready))
            until(lambda b=counts["ok"]: counts["ok"] >= b + 10)
            events.append(
                {"signal": sig.name, "front": index, "back": back, "failed": counts["failed"] - failed0, "ok": counts["ok"] - ok0}
            )
    return events


def run(model_repo: Path, photos: list[bytes], fronts: int, threads: int, max_retries: int) -> dict[str, Any]:
    from service.multiproc.server import SplitServer
    from service.settings import Settings

    port = free_port()
    settings = Settings(model_repo=model_repo, device="cpu", front_workers=fronts, port=port, warmup_sizes=[32], log_level="warning")
    server = SplitServer(settings).start().watch_in_thread()
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    counts: dict[str, Any] = {"workers": []}
    try:
        if not until(lambda: _ready(url), 120):
            raise SystemExit("the split server did not become ready")
        counts = load_while(url, photos, threads, max_retries, stop)
        until(lambda: counts["ok"] >= 20)
        events = exits_under_load(server, counts, [signal.SIGTERM, signal.SIGKILL])
    finally:
        stop.set()
        for w in counts["workers"]:
            w.join(120)
        handed_back = getattr(server.acceptor, "handed_back", 0)
        server.stop()
    return {
        "max_retries": max_retries,
        "ok": counts["ok"],
        "failed": counts["failed"],
        "handed_back": handed_back,
        "events": events,
        "errors": counts["errors"][:20],
    }


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fronts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--retries", default="0,3", help="client max_retries values to run, comma-separated")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    photos = [p.read_bytes() for p in sorted(PHOTOS_VAL.glob("*.jpg"))[:32]]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        export_preset("cifar-fsq", repo)
        runs = [run(repo, photos, args.fronts, args.threads, int(r)) for r in args.retries.split(",")]
    rows = [[r["max_retries"], e["signal"], e["front"], e["ok"], e["failed"]] for r in runs for e in r["events"]] + [
        [r["max_retries"], "all", "-", r["ok"], r["failed"]] for r in runs
    ]
    print(table(["client retries", "signal", "front", "answers meanwhile", "failed"], rows))
    write_json(
        args.out, {"question": "requests lost when a front exits (issue 29)", **host_fields(None), "settings": vars(args), "runs": runs}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
