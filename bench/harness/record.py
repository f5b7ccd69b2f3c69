"""Paths, the record every result carries, JSON and tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
DATA = Path(os.environ.get("VQTOK_DATA", REPO.parent / "shared" / "data"))  # the real data sets, beside the checkout
PHOTOS_VAL = DATA / "photos256" / "val"


def git_revision() -> str:
    """The checkout's short commit, or "unknown" without git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def revision(given: str | None = None) -> str:
    """The measured code's git revision: `given`, else $VQTOK_REVISION (set where the tree travels
    without .git, as on the GPU machines), else git's."""
    return given or os.environ.get("VQTOK_REVISION") or git_revision()


def host_fields(given_revision: str | None = None) -> dict[str, Any]:
    """What every result file records about where, when and how it ran. `given_revision`: the measured
    commit where this copy's .git cannot say (a GPU machine's copy may carry a stale one)."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "revision": revision(given_revision),
        "command": command_line(),
    }


def command_line() -> str:
    """How this process was started, as one would type it: `python -m bench.NAME ARGS` for a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join([*head, *sys.argv[1:]])


def write_json(path: Path | None, result: Any) -> None:
    """`result` as indented JSON at `path` (folders made; nothing when `path` is None). Written whole
    each call, so a script that calls it after every step leaves what it measured if cut short."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A markdown table (numbers right-aligned unless `right` says otherwise), as BENCHMARKS.md shows them."""
    if right is None:
        right = [all(isinstance(r[i], int | float) for r in rows) if rows else False for i in range(len(headers))]
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "–" if v is None else str(v)


def int_list(text: str) -> list[int]:
    """ "1,16,64" -> [1, 16, 64] (an argparse `type`)."""
    return [int(v) for v in text.split(",") if v]


def str_list(text: str) -> list[str]:
    """ "a,b" -> ["a", "b"] (an argparse `type`)."""
    return [v for v in text.split(",") if v]


def parse_engines(ap: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    """`--engines` as a list (raw always runs, so it is left out); an unknown name is an argparse error."""
    engines = [e for e in text.split(",") if e and e != "raw"]
    if bad := set(engines) - set(known):
        ap.error(f"unknown engines: {', '.join(sorted(bad))}")
    return engines
