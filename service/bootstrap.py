"""Fallback for `vqtok serve` with no arguments while no trained default model is shipped: export a
randomly initialised preset once into a cache folder and serve that, with a loud warning.

The export runs in a child process (`python -m service.bootstrap PRESET DIR`), so the server process
itself never imports torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from clients.cli import CLIError

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
        proc = subprocess.run([sys.executable, "-m", "service.bootstrap", preset, str(model_dir)], check=False)
        if proc.returncode != 0:
            raise CLIError(
                f"no trained model is shipped and exporting an untrained {preset!r} failed (it needs torch: "
                "pip install 'vqtok[torch]'); or pass --model-repo DIR"
            )
    log.warning(_BANNER.format(preset=preset, path=model_dir))
    return repo


def _export(preset: str, model_dir: Path) -> int:
    """Child process: build the preset with a fixed seed, save it and export it to ONNX."""
    import torch

    from clients.cli import main as vqtok
    from models import create_tokenizer

    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    create_tokenizer(preset).eval().save_pretrained(tmp)
    rc = vqtok(["export", "--model", str(tmp)])
    if rc == 0:
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)  # atomic: a half-exported model is never served
    return rc


if __name__ == "__main__":
    sys.exit(_export(sys.argv[1], Path(sys.argv[2])))
