"""The current load generator (one window for every client process) against the server's batch counters
over that same window (`server_window`).

    python new_vs_server.py URL PROCESSES CONCURRENCY IMAGES_PER_REQUEST
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))

from bench.harness.load import read_jpegs, run_load  # noqa: E402


def main() -> None:
    url, procs, conc, per_req = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    files = read_jpegs(REPO.parent / "shared" / "data" / "photos256" / "val")[:32]
    level = run_load(url, files, conc, 8.0, procs, "crop", per_req=per_req)
    server = level["server_window"]["images_per_s"]
    print(
        f"procs {procs} c{conc} x{per_req}: new client count {level['images_per_s']:.1f} img/s, "
        f"server batched (same window) {server:.1f} img/s, ratio {level['images_per_s'] / server:.3f}"
    )


if __name__ == "__main__":
    main()
