"""A front of the multi-process server that exits mid-load loses no request: SIGTERM (a restart or a
scale-down) hands back what it has not started and finishes what it holds; SIGKILL (a crash) closes what
it held, which the Python client retries. A real server, real photos, the client with its retries on
(`python -m bench.front_exit` counts the same with them off as well)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from bench.front_exit import exits_under_load, load_while, until
from tests.helpers import SplitServerThread
from tests.service.conftest import cpu_settings


def test_fronts_stopped_and_killed_mid_load_lose_no_request(model_repo: Path, photos: list[Path]) -> None:
    s = SplitServerThread(cpu_settings(model_repo, default_model="fsq4", front_workers=2)).start()
    stop = threading.Event()
    counts: dict[str, Any] = {"workers": []}
    try:
        counts = load_while(s.url, [p.read_bytes() for p in photos[:16]], threads=6, max_retries=3, stop=stop)
        assert until(lambda: counts["ok"] >= 20)
        events = exits_under_load(s.server, counts, [signal.SIGTERM, signal.SIGKILL])
    finally:
        stop.set()
        for w in counts["workers"]:
            w.join(120)
        s.stop()
    assert all(e["back"] for e in events) and len(events) == 4
    assert counts["failed"] == 0, counts["errors"][:5]
    assert all(e["ok"] >= 10 for e in events)  # served on after each exit
