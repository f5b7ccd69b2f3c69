"""What asking for a layout costs over HTTP: the same 64 real photos (256², the shipped f8 model: 32×32
grids) sent to `POST /v1/encode` with and without `layout` (+ `vocab_offset`), alternating in the same
run against one `vqtok serve` (CPU, ONNX Runtime, one process), JSON and npy answers; plus, in this
process, the route's own answer building (`service.routes.encode._json_answer`) with and without the
layout, which is the whole of the extra server work (the encode is the same).

    python bench/layout_http.py --out bench/results/layout_cost/layout_http_cpu.json

Prints a table (median and best of `--rounds` requests per variant) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np

from bench.harness.record import REPO as ROOT
from bench.harness.record import git_revision
from bench.harness.server import free_port
from models.core import pixels
from models.core.artefacts import DEFAULT_MODEL, pretrained_repo
from models.core.layouts import Layout
from service.routes.encode import _json_answer

OFFSET = 32000  # a Llama-sized text vocabulary


def best_ms(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def start(model: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "vqtok",
        "serve",
        "--model-repo",
        model,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-format",
        "text",
        "--request-timeout-s",
        "900",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server was not ready after 300 s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(pretrained_repo() / DEFAULT_MODEL))
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "photos256" / "val")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="requests per variant, interleaved")
    ap.add_argument("--layout", default="lumina")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    files = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))[: args.batch]]
    assert len(files) == args.batch, f"{args.images} holds fewer than {args.batch} JPEGs"
    parts = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(files)]
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"layout_http_{port}.log"
    proc = start(args.model, port, log)
    variants: dict[str, tuple[dict[str, str], str]] = {
        "json": ({}, "application/json"),
        f"json + {args.layout}": ({"layout": args.layout, "vocab_offset": str(OFFSET)}, "application/json"),
        "npy": ({}, "application/x-npy"),
        f"npy + {args.layout}": ({"layout": args.layout, "vocab_offset": str(OFFSET)}, "application/x-npy"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    sizes: dict[str, int] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            card = c.get("/v1/models").json()["models"][0]
            for name, (fields, accept) in variants.items():  # warm each once, and check the answers
                r = c.post("/v1/encode", files=parts, data=fields, headers={"Accept": accept})
                assert r.status_code == 200, r.text
                sizes[name] = len(r.content)
            for _ in range(args.rounds):
                for name, (fields, accept) in variants.items():
                    t = time.perf_counter()
                    r = c.post("/v1/encode", files=parts, data=fields, headers={"Accept": accept})
                    times[name].append((time.perf_counter() - t) * 1e3)
                    assert r.status_code == 200
            tokens = np.stack([np.asarray(im["tokens"], dtype=np.int32) for im in c.post("/v1/encode", files=parts).json()["images"]])
    finally:
        proc.terminate()
        proc.wait(30)

    # the extra server work alone: the JSON answer with and without the layout, in this process
    info = SimpleNamespace(codebook_size=card["codebook_size"], downsample=card["downsample"])
    served: Any = SimpleNamespace(name=card["name"], runtime=SimpleNamespace(info=info))
    prepared = [pixels.PreparedImage(np.zeros((1, 1, 3), np.uint8), (256, 256)) for _ in tokens]
    grids = list(tokens)
    layout = Layout(args.layout, vocab_offset=OFFSET, codebook_size=card["codebook_size"], max_grid=card["layout_max_grid"])
    answer_ms = best_ms(lambda: _json_answer(served, grids, prepared, None), 20)
    answer_layout_ms = best_ms(lambda: _json_answer(served, grids, prepared, layout), 20)
    sequences_ms = best_ms(lambda: layout.to_sequences(tokens), 50)

    rows = [{"variant": k, "median_ms": statistics.median(v), "best_ms": min(v), "bytes": sizes[k], "runs_ms": v} for k, v in times.items()]
    print(f"{args.batch} photos 256² -> {tokens.shape[1]}×{tokens.shape[2]} grids, {card['name']}, CPU, {args.rounds} rounds interleaved")
    print(f"{'variant':18s} {'median ms':>10s} {'best ms':>9s} {'answer bytes':>13s}")
    for r in rows:
        print(f"{r['variant']:18s} {r['median_ms']:10.1f} {r['best_ms']:9.1f} {r['bytes']:13,d}")
    print(
        f"answer building in-process: JSON {answer_ms:.2f} ms, JSON + {args.layout} {answer_layout_ms:.2f} ms "
        f"(+{answer_layout_ms - answer_ms:.2f}); to_sequences of the batch {sequences_ms:.3f} ms"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "batch": args.batch,
            "model": card["name"],
            "layout": args.layout,
            "vocab_offset": OFFSET,
            "grid": list(tokens.shape[1:]),
            "rows": rows,
            "answer_json_ms": answer_ms,
            "answer_json_layout_ms": answer_layout_ms,
            "to_sequences_ms": sequences_ms,
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "revision": git_revision(),
            "date": time.strftime("%Y-%m-%d"),
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
