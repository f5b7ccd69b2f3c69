"""Fallback for `vqtok serve` with no arguments while no trained default model is shipped: export a
randomly initialised preset once into a cache folder and serve that, with a loud warning.

The export runs in a child process (`python -m models.export.untrained PRESET DIR`), so the server
process itself never imports torch.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from models.core.errors import CLIError

PRESET = "f8-simvq-16k"
log = logging.getLogger("vqtok.bootstrap")

_BANNER = """
################################################################################################
# WARNING: NO TRAINED MODEL IS SHIPPED YET. Serving an UNTRAINED, randomly initialised
# '{preset}' tokenizer exported to {path}
# Its tokens carry NO meaning and its decoded images are noise: use it only to try the API.
# Pass --model-repo DIR to serve real models.
################################################################################################"""


def cache_dir() -> Path:
    base = os.environ.get("VQTOK_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vqtok")
    return Path(base) / "untrained"


def untrained_repository(preset: str = PRESET) -> Path:
    """A repository holding `<preset>-untrained`, exported on first use (needs torch, once)."""
    repo = cache_dir()
    model_dir = repo / f"{preset}-untrained"
    if not (model_dir / "manifest.json").exists():
        log.warning("exporting an untrained %s tokenizer (one-off, needs torch)", preset, extra={"path": str(model_dir)})
        proc = subprocess.run([sys.executable, "-m", "models.export.untrained", preset, str(model_dir)], check=False)
        if proc.returncode != 0:
            raise CLIError(
                f"no trained model is shipped and exporting an untrained {preset!r} failed (it needs torch: "
                "pip install 'vqtok[torch]'); or pass --model-repo DIR"
            )
    log.warning(_BANNER.format(preset=preset, path=model_dir))
    return repo
