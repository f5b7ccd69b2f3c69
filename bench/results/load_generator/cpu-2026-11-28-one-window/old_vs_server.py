"""The old load generator (ad36d11: each client process opened its own window) against the server's batch
counters, sampled by this process 3 s and 7 s after the start. Needs ad36d11's bench/http_front.py and
bench/service_load.py in /tmp/oldbench/bench/ (git show ad36d11:bench/http_front.py > ...).

    python old_vs_server.py URL PROCESSES CONCURRENCY IMAGES_PER_REQUEST
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from pathlib import Path
from typing import Any


def main() -> None:
    sys.path.insert(0, "/tmp/oldbench")
    sys.path.insert(1, str(Path(__file__).resolve().parents[4]))
    old = importlib.import_module("bench.http_front")  # the old one, first on the path
    scrape = importlib.import_module("bench.service_load").scrape
    url, procs, conc, per_req = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    files = old.read_jpegs(Path(__file__).resolve().parents[5] / "shared" / "data" / "photos256" / "val")[:32]
    marks: list[tuple[float, dict[str, Any]]] = []

    def sampler() -> None:
        t0 = time.monotonic()
        for at in (3.0, 7.0):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            marks.append((time.monotonic(), scrape(url)))

    thread = threading.Thread(target=sampler)
    thread.start()
    level = old.run_load(url, files, conc, 8.0, procs, "crop", per_req=per_req)
    thread.join()
    (t0, a), (t1, b) = marks
    server = (b["vqtok_batch_size_sum"] - a["vqtok_batch_size_sum"]) / (t1 - t0)
    print(
        f"procs {procs} c{conc} x{per_req}: old client count {level['images_per_s']:.1f} img/s, "
        f"server batched (3-7 s) {server:.1f} img/s, ratio {level['images_per_s'] / server:.3f}"
    )


if __name__ == "__main__":
    main()
