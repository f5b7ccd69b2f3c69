"""Dataset tokenization: images in, parquet shards of token ids out, resumable after any interruption.

Layout of an output folder:
    part-00000.parquet ...   one row per image: key, index, tokens (int32 list, row-major h·w),
                             grid_h, grid_w, source_h, source_w; file metadata names the model
    manifest.json            the job (input fingerprint, model, resize, shard size) and every
                             committed shard with its row count, errors and sha256
    errors.jsonl             one line per unreadable image: key, index, reason (rebuilt from the manifest)

Shard k holds source items [k·S, (k+1)·S) (see `models.core.sources`). A shard is committed by
renaming its file into place, then rewriting the manifest atomically; a re-run skips the shards the
manifest lists and redoes the rest. A kill at any moment therefore loses no image and duplicates
none, and a re-run writes byte-identical shards.

Floor plan, each module importing only those above it:
    format     the output format: schema, `Job`, `ModelSpec`, shard files (`ShardBuffer`,
               `commit_shard`), `read_tokens`
    job        the job flow, written once: `plan`, `JobManifest`, `JobRun` (pending shards, per-shard
               buffers and commits, errors file), `Summary`
    decoding   reading and decoding images in worker threads or processes (`prepare_item`, `prepared_stream`)
    encoders   `PixelEncoder` / `FileEncoder`; `RuntimeEncoder` (in-process), `ServerEncoder` (a running
               service, fed the stored files); `encode_batch`
    local      engine: `tokenize_local`, decoding here, encoding with either encoder
    ray        engine: `tokenize_ray`, the same flow on Ray Data
    cli        `vqtok tokenize`
The engines differ only in how rows are produced; both drive a `JobRun`.

The names below resolve lazily: `vqtok` imports `clients.tokenize.cli` for every command and must not
pay for numpy and pyarrow before `tokenize` runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # re-exported names, for type checkers and IDEs
    from .decoding import Prepared, prepare_item
    from .encoders import REFUSALS, FileEncoder, PixelEncoder, RuntimeEncoder, ServerEncoder, encode_batch
    from .format import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_SHARD_SIZE,
        ERRORS,
        FORMAT,
        MANIFEST,
        SCHEMA,
        Job,
        ModelSpec,
        TokenizeError,
        read_tokens,
    )
    from .job import JobManifest, JobRun, Summary
    from .local import tokenize_local
    from .ray import actor_pool, tokenize_ray

_MODULES = {
    "format": (
        "DEFAULT_BATCH_SIZE",
        "DEFAULT_SHARD_SIZE",
        "ERRORS",
        "FORMAT",
        "MANIFEST",
        "SCHEMA",
        "Job",
        "ModelSpec",
        "TokenizeError",
        "read_tokens",
    ),
    "job": ("JobManifest", "JobRun", "Summary"),
    "decoding": ("Prepared", "prepare_item"),
    "encoders": ("REFUSALS", "FileEncoder", "PixelEncoder", "RuntimeEncoder", "ServerEncoder", "encode_batch"),
    "local": ("tokenize_local",),
    "ray": ("actor_pool", "tokenize_ray"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SHARD_SIZE",
    "ERRORS",
    "FORMAT",
    "MANIFEST",
    "REFUSALS",
    "SCHEMA",
    "FileEncoder",
    "Job",
    "JobManifest",
    "JobRun",
    "ModelSpec",
    "PixelEncoder",
    "Prepared",
    "RuntimeEncoder",
    "ServerEncoder",
    "Summary",
    "TokenizeError",
    "actor_pool",
    "encode_batch",
    "prepare_item",
    "read_tokens",
    "tokenize_local",
    "tokenize_ray",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
