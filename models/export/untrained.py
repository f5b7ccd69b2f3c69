"""`python -m models.export.untrained PRESET DIR`: a randomly initialised preset (fixed seed), saved and
exported to DIR. The service's no-model fallback runs it in a child process, so the server process
itself never imports torch."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def export_untrained(preset: str, model_dir: Path) -> int:
    import torch

    from ..presets import create_tokenizer
    from .driver import export_model
    from .parity import ExportError

    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    create_tokenizer(preset).eval().save_pretrained(tmp)
    try:
        export_model(tmp)
    except ExportError as exc:
        log.error("export of the untrained %s failed: %s", preset, exc)
        return 3
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)  # atomic: a half-exported model is never served
    return 0


if __name__ == "__main__":
    sys.exit(export_untrained(sys.argv[1], Path(sys.argv[2])))
