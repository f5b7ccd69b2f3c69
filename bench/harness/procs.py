"""CPU seconds and memory of processes, threads and the host, from /proc (Linux), and the GPU memory
nvidia-smi reports for them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stats() -> tuple[dict[int, int], dict[int, float]]:
    """(parent pid, user + system CPU seconds) of every live process, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return parents, times


def process_tree(root: int, parents: dict[int, int] | None = None) -> set[int]:
    """`root` and every live descendant."""
    if parents is None:
        parents = _proc_stats()[0]
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """user + system CPU seconds of `root` and every live descendant (from /proc), by role: `engine`
    (the inference process of a split server), `fronts`, `supervisor`, or `server` (single process)."""
    parents, times = _proc_stats()
    tree = process_tree(root, parents)
    out = {"total": 0.0}
    for p in tree:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = (
            "engine" if "service.multiproc.server inference" in cmd else "fronts" if "service.multiproc.server front" in cmd else "server"
        )
        if role == "server" and "resource_tracker" in cmd:
            role = "fronts"
        out[role] = out.get(role, 0.0) + times.get(p, 0.0)
        out["total"] += times.get(p, 0.0)
        if role == "engine":  # its event-loop thread (tid = pid): every request passes through it, one at a time
            out["engine_loop"] = thread_cpu_seconds(p)
    return out


def thread_cpu_seconds(pid: int, tid: int | None = None) -> float:
    try:
        stat = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy (all cores, /proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / _TICK


def established_by_process(pids: list[int], port: int) -> list[int]:
    """Established TCP connections on the server side of `port` that each process holds (/proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    counts = []
    for pid in pids:
        held = 0
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            held += link.startswith("socket:[") and link[8:-1] in inodes
        counts.append(held)
    return counts


def _status_kib(pid: int, field: str, file: str = "status") -> int:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/{file}").read_text(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def gpu_memory_mib() -> tuple[dict[int, float], float] | None:
    """({pid: MiB} of the compute processes, MiB used on all GPUs), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        apps = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        total = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    per_pid: dict[int, float] = {}
    for line in apps.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].replace(".", "").isdigit():
            per_pid[int(parts[0])] = per_pid.get(int(parts[0]), 0.0) + float(parts[1])
    used = sum(float(v) for v in total.split() if v.replace(".", "").isdigit())
    return per_pid, used


def tree_memory(root: int) -> dict[str, Any]:
    """Host RSS and PSS (MiB) summed over `root` and its descendants, and the GPU memory (MiB) that
    nvidia-smi reports for those pids (`gpu_mib` null without nvidia-smi or when no pid matches, as in
    a container whose pids nvidia-smi does not see; `gpu_total_used_mib` is then the device's total)."""
    pids = sorted(process_tree(root))
    rss = sum(_status_kib(p, "VmRSS") for p in pids) / 1024
    pss = sum(_status_kib(p, "Pss", "smaps_rollup") for p in pids) / 1024
    gpu = gpu_memory_mib()
    matched = {p: v for p, v in gpu[0].items() if p in pids} if gpu else {}
    return {
        "pids": len(pids),
        "rss_mib": round(rss, 1),
        "pss_mib": round(pss, 1) if pss else None,
        "gpu_mib": round(sum(matched.values()), 1) if matched else None,
        "gpu_by_pid_mib": {str(p): v for p, v in matched.items()} if matched else None,
        "gpu_total_used_mib": gpu[1] if gpu else None,
    }


def cpu_probe(server_pid: int) -> Callable[[], dict[str, float]]:
    """CPU seconds so far of the server's processes by role (`tree_cpu_seconds`) and of the whole host (`host`)."""
    return lambda: {**tree_cpu_seconds(server_pid), "host": host_busy_seconds()}


def rss_mib(pid: int) -> float:
    """One process's resident set (MiB)."""
    return _status_kib(pid, "VmRSS") / 1024
