"""`vqtok serve` (argparse only at import time).

Every flag mirrors a setting (`--max-batch-size` is `VQTOK_MAX_BATCH_SIZE`); a flag given on the
command line wins over the environment. With no `--model-repo` (and no `VQTOK_MODEL_REPO`) the
repository shipped in `models/pretrained/` is served.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from models.core.errors import CLIError

# (flag, type, help); the setting's name is the flag's with '-' -> '_'.
_FLAGS: list[tuple[str, Any, str]] = [
    ("--model-repo", Path, "folder of exported model directories (or one model directory); default: the shipped models/pretrained"),
    ("--default-model", str, "model used when a request names none"),
    ("--device", str, "auto | cuda | cpu"),
    ("--precision", str, "auto | fp32 | fp16"),
    ("--intra-op-threads", int, "ONNX Runtime threads per session"),
    ("--warmup-sizes", str, "comma-separated square sizes warmed at load (e.g. 256,512)"),
    ("--warmup-batch-sizes", str, "comma-separated batch sizes warmed at load (default: every size the runtime runs)"),
    ("--host", str, "bind address (default 127.0.0.1)"),
    ("--port", int, "port (default 8000)"),
    ("--api-keys", str, "comma-separated Bearer keys for /v1; health and metrics stay open (prefer VQTOK_API_KEYS: flags show in ps)"),
    ("--admin-api-keys", str, "comma-separated keys for /v1/admin (default: the API keys)"),
    ("--max-batch-size", int, "images per inference call (default 32)"),
    ("--max-batch-delay-ms", float, "how long a partial batch waits for company (default 2)"),
    ("--max-queue-images", int, "images queued per model before 503 (default 512)"),
    ("--batch-workers", int, "batches one model runs at the same time (default 1)"),
    ("--request-timeout-s", float, "per-request deadline, 504 past it (default 30)"),
    ("--max-body-bytes", int, "request body limit (default 64 MiB)"),
    ("--max-images-per-request", int, "default 64"),
    ("--max-image-pixels", int, "decoded image size limit (default 4096²)"),
    ("--max-grid-tokens", int, "token grid h·w limit per image (default 128²)"),
    ("--decode-threads", int, "image decoding threads (default 4)"),
    ("--default-resize", str, "none | crop | pad (default none)"),
    ("--log-format", str, "json | text (default json)"),
    ("--log-level", str, "debug | info | warning | error"),
    ("--shutdown-timeout-s", float, "how long shutdown drains in-flight work (default 30)"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over HTTP (FastAPI on ONNX Runtime)",
        description="Serve a model repository over HTTP. Every flag can also be set as VQTOK_<FLAG> in the environment.",
    )
    for flag, kind, help_text in _FLAGS:
        p.add_argument(flag, type=kind, default=None, help=help_text)
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from . import logs
    from .app import create_app
    from .settings import Settings

    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in _FLAGS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise CLIError("invalid settings:\n" + "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    logs.configure(settings.log_format, "debug" if args.verbose else settings.log_level)
    if "model_repo" not in overrides and not os.environ.get("VQTOK_MODEL_REPO") and not _has_models(settings.model_repo):
        from .bootstrap import untrained_repository

        settings = settings.model_copy(update={"model_repo": untrained_repository()})
    elif not settings.model_repo.is_dir():
        raise CLIError(f"model repository {settings.model_repo} is not a directory")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
    )
    uvicorn.Server(config).run()
    return 0


def _has_models(repo: Path) -> bool:
    return repo.is_dir() and any((d / "manifest.json").exists() for d in repo.iterdir() if d.is_dir())
