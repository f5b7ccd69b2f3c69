"""Does a reload of the compiled runtime hand its GPU memory back?

Loads and warms a model, then
`--cycles` times: loads and warms a new version, closes the old one (what the server's reload does:
`runtime.close()`, gc, `torch.cuda.empty_cache()`), and records device memory after each step
(torch's allocated / reserved, and the device's used memory from `torch.cuda.mem_get_info`), whether
the old runtime object is still alive after close (a weak reference), and if so what holds it.
Prints a table, writes JSON. A steady state after the first reload = no leak; a step per cycle = one.

    python -m bench.reload_memory --model models/pretrained/photo-f8-simvq-16k-v2 --cycles 3 --out $OUT/reload_memory.json
    python -m bench.reload_memory --model <tiny> --eager-cpu        # the same steps on the CPU (no CUDA figures)

Committed runs: bench/results/: serving (GPU runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import weakref
from pathlib import Path
from typing import Any

from bench.harness.record import REPO as ROOT
from models.core.artefacts import DEFAULT_MODEL


def memory(torch: Any, on_cuda: bool) -> dict[str, float]:
    if not on_cuda:
        return {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    mib = 1 << 20
    return {
        "allocated_mib": torch.cuda.memory_allocated() / mib,
        "reserved_mib": torch.cuda.memory_reserved() / mib,
        "device_used_mib": (total - free) / mib,
    }


def active_blocks(torch: Any) -> dict[int, dict[str, Any]]:
    """Every live CUDA block by address (size, allocation frames); needs
    `torch.cuda.memory._record_memory_history()` running for the frames."""
    blocks = {}
    for seg in torch.cuda.memory._snapshot()["segments"]:
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                blocks[block["address"]] = block
    return blocks


def allocation_sites(blocks: list[dict[str, Any]], top: int = 12) -> list[dict[str, Any]]:
    """`blocks` grouped by where they were allocated (the innermost frames of this project, torch or
    triton), largest first."""
    sites: dict[str, list[float]] = {}
    for block in blocks:
        frames = [f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in block.get("frames", [])]
        ours = [f for f in frames if not f.startswith(("<", "__init__"))][:4]
        key = " <- ".join(ours) or "(no frames)"
        entry = sites.setdefault(key, [0.0, 0])
        entry[0] += block["size"] / (1 << 20)
        entry[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"site": k, "mib": round(v[0], 1), "blocks": int(v[1])} for k, v in ranked]


def holders(obj: Any, skip: set[int]) -> list[str]:
    """The types (and, for dicts and frames, a hint) of what refers to `obj`, for a leak report."""
    out = []
    for r in gc.get_referrers(obj):
        if id(r) in skip:
            continue
        hint = type(r).__name__
        if isinstance(r, dict):
            hint += f" keys={list(r)[:6]}"
        out.append(hint)
    return out[:20]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "pretrained" / DEFAULT_MODEL)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--eager-cpu", action="store_true", help="the CPU mode of the compiled runtime (no CUDA): a dry run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--sites", action="store_true", help="record allocation stacks; after each close, where the closed version's live blocks come from"
    )
    args = ap.parse_args()
    import torch

    sites = args.sites and not args.eager_cpu  # allocation stacks: CUDA only
    if sites:
        torch.cuda.memory._record_memory_history(max_entries=200_000)

    from models.runtime.compiled import CompiledRuntime

    on_cuda = not args.eager_cpu
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"model": args.model.name, "gpu": torch.cuda.get_device_name(0) if on_cuda else None, "rows": rows}

    def record(step: str, **extra: Any) -> None:
        row = {"step": step, "t_s": round(time.perf_counter() - t0, 1), **memory(torch, on_cuda), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    def load() -> CompiledRuntime:
        rt = CompiledRuntime.load(args.model, max_batch_size=args.max_batch_size, eager_cpu=args.eager_cpu)
        rt.warmup([(args.size, args.size)])
        return rt

    t0 = time.perf_counter()
    record("start")
    before = active_blocks(torch) if sites else {}
    current = load()
    # born[v]: the blocks that appeared while version v loaded; what of them outlives v's close is its leak
    born = [set(active_blocks(torch)) - set(before)] if sites else []
    record("loaded v0")
    for cycle in range(1, args.cycles + 1):
        before = active_blocks(torch) if sites else {}
        new = load()
        if sites:
            born.append(set(active_blocks(torch)) - set(before))
        record(f"loaded v{cycle} (v{cycle - 1} still open)")
        old_ref = weakref.ref(current)
        current.close()
        current = new
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        alive = old_ref()
        extra: dict[str, Any] = {}
        if sites:
            live = active_blocks(torch)
            left = [live[a] for a in born[cycle - 1] if a in live]
            extra = {
                "left_by_closed_mib": round(sum(b["size"] for b in left) / (1 << 20), 1),
                "left_by_closed_sites": allocation_sites(left),
            }
        record(
            f"closed v{cycle - 1}",
            old_alive=alive is not None,
            old_holders=holders(alive, {id(rows), id(result)}) if alive is not None else [],
            **extra,
        )
        del alive
    result["verdict"] = {
        "device_used_after_each_close_mib": [r.get("device_used_mib") for r in rows if r["step"].startswith("closed")],
        "old_versions_alive": [r["old_alive"] for r in rows if r["step"].startswith("closed")],
    }
    record("end")
    print(json.dumps(result["verdict"]))


if __name__ == "__main__":
    main()
