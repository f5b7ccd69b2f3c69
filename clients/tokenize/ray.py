"""The Ray engine (`--engine ray`): the tokenization pipeline on Ray Data, for datasets larger than one machine.

    pending shards ─▶ flat_map(read slice) ─▶ map_batches(decode + resize, CPU tasks)
        ─▶ map_batches(_EncodeActor, actor pool: one runtime per actor, num_gpus=1 each on GPU)
        ─▶ driver: rows into the same `JobRun` as the local engine (buffers, commits, manifest)

The driver writes the shards (token ids are small: a few KB per image) so that a shard is committed
atomically and the manifest has a single writer; the heavy work (reading, decoding, encoding) runs on
the cluster. Image paths and the model directory must be readable from every Ray node.

(`import ray` in this module is the Ray package: imports are absolute.)
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from models.core.artefacts import Device, Precision, open_exported
from models.core.sources import RawItem

from .decoding import Prepared, prepare_item
from .encoders import RuntimeEncoder, encode_batch
from .format import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, DEFAULT_RESIZE, DEFAULT_SHARD_SIZE, ModelSpec, TokenizeError
from .job import JobRun, Summary

if TYPE_CHECKING:
    from models.core.sources import Columns

log = logging.getLogger("vqtok.tokenize")

# an item's fields as Ray rows: its `meta` (values of any type) travels pickled, as bytes
_RAW_FIELDS = tuple(f.name for f in dataclasses.fields(RawItem) if f.name != "meta")

_DECODED = pa.schema(
    [
        ("shard", pa.int64()),
        ("index", pa.int64()),
        ("key", pa.string()),
        ("pixels", pa.large_binary()),  # uint8 (H, W, 3) bytes; shapes vary, so not a tensor column
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source_h", pa.int32()),
        ("source_w", pa.int32()),
        ("error", pa.string()),
        ("kind", pa.string()),  # with error: unreadable or refused
        ("meta", pa.binary()),  # the item's pickled `meta`, for the driver
    ]
)
_ENCODED = pa.schema(
    [
        ("shard", pa.int64()),
        ("index", pa.int64()),
        ("key", pa.string()),
        ("tokens", pa.list_(pa.int32())),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("source_h", pa.int32()),
        ("source_w", pa.int32()),
        ("error", pa.string()),
        ("kind", pa.string()),
        ("meta", pa.binary()),
    ]
)


def _read_slice(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One pending shard -> its raw items (bytes, or the path a decoder reads)."""
    out = []
    for item in pickle.loads(row["slice"]):  # a slice object the driver made (never untrusted input)
        out.append({"shard": row["shard"], **{f: getattr(item, f) for f in _RAW_FIELDS}, "meta": pickle.dumps(item.meta)})
    return out


def _decode(batch: pa.Table, spec: ModelSpec, resize: str, max_tokens: int) -> pa.Table:
    rows: dict[str, list[Any]] = {name: [] for name in _DECODED.names}
    for r in batch.to_pylist():
        p = prepare_item(RawItem(**{f: r[f] for f in _RAW_FIELDS}), spec, resize, max_tokens)
        ok = p.pixels is not None
        for name, value in (
            ("shard", r["shard"]),
            ("index", r["index"]),
            ("key", r["key"]),
            ("pixels", p.pixels.tobytes() if p.pixels is not None else b""),
            ("height", p.pixels.shape[0] if p.pixels is not None else 0),
            ("width", p.pixels.shape[1] if p.pixels is not None else 0),
            ("source_h", p.source[0]),
            ("source_w", p.source[1]),
            ("error", None if ok else p.error),
            ("kind", None if ok else p.kind),
            ("meta", r["meta"]),
        ):
            rows[name].append(value)
    return pa.table(rows, schema=_DECODED)


class _EncodeActor:
    """One ONNX Runtime session per actor; encodes same-shaped images together."""

    def __init__(self, model_dir: str, device: Device, precision: Precision, intra_op_threads: int | None, max_batch_size: int) -> None:
        from service.runtime import ModelRuntime

        self.runtime = ModelRuntime.load(
            model_dir, device=device, precision=precision, intra_op_threads=intra_op_threads, max_batch_size=max_batch_size
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols = {name: batch.column(name).to_pylist() for name in _DECODED.names}
        tokens: list[np.ndarray | None] = [None] * n
        errors: list[str | None] = list(cols["error"])
        kinds: list[str | None] = list(cols["kind"])
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            if errors[i] is None:
                by_shape.setdefault((cols["height"][i], cols["width"][i]), []).append(i)
        encoder = RuntimeEncoder(self.runtime)
        for (h, w), idx in by_shape.items():
            prepared = [
                Prepared(RawItem(cols["index"][i], cols["key"][i]), np.frombuffer(cols["pixels"][i], np.uint8).reshape(h, w, 3))
                for i in idx
            ]
            for i, (_, toks, err, kind) in zip(idx, encode_batch(encoder, prepared), strict=True):
                tokens[i], errors[i], kinds[i] = toks, err, kind
        grids = [t.shape if t is not None else (0, 0) for t in tokens]
        return pa.table(
            {
                "shard": cols["shard"],
                "index": cols["index"],
                "key": cols["key"],
                "tokens": [t.reshape(-1) if t is not None else np.zeros(0, np.int32) for t in tokens],
                "grid_h": [g[0] for g in grids],
                "grid_w": [g[1] for g in grids],
                "source_h": cols["source_h"],
                "source_w": cols["source_w"],
                "error": errors,
                "kind": kinds,
                "meta": cols["meta"],
            },
            schema=_ENCODED,
        )


def _gather(table: pa.Table, run: JobRun) -> int:
    """Hand encoded rows to the run (which commits each shard as it completes); returns the row count."""
    names = ("shard", "index", "key", "grid_h", "grid_w", "source_h", "source_w", "error", "kind", "meta")
    cols = {name: table.column(name).to_pylist() for name in names}
    tok = table.column("tokens").combine_chunks()
    offsets, values = tok.offsets.to_numpy(), tok.values.to_numpy(zero_copy_only=False)
    for i in range(table.num_rows):
        shard, index, key, error = cols["shard"][i], cols["index"][i], cols["key"][i], cols["error"][i]
        if error is not None:
            run.add_error(shard, index, key, error, "unreadable" if cols["kind"][i] == "unreadable" else "refused")
        else:
            grid = values[offsets[i] : offsets[i + 1]].astype(np.int32).reshape(cols["grid_h"][i], cols["grid_w"][i])
            meta = pickle.loads(cols["meta"][i])  # pickled by this job's own read tasks
            run.add(shard, index, key, grid, (cols["source_h"][i], cols["source_w"][i]), meta)
    return table.num_rows


def tokenize_ray(
    input_path: str | Path,
    output_dir: str | Path,
    model_dir: str | Path,
    *,
    resize: str = DEFAULT_RESIZE,
    columns: Columns = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str = "auto",
    precision: str = "auto",
    ray_address: str | None = None,
    num_actors: int | None = None,
    actor_concurrency: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Summary:
    """Tokenize with Ray Data; same output format, manifest and resume rules as `tokenize_local`.

    Uses the Ray instance already initialised in this process if there is one; else connects to
    `ray_address`, or starts a local Ray for the job (and stops it afterwards). `actor_concurrency`:
    batches each encoder actor runs at once (default 3 on GPUs, 1 on CPUs). `resize`, `columns`,
    `max_tokens`: as for `tokenize_local`. Unless `progress` is False, a line on stderr says what it
    is doing while Ray starts and the encoder actors load the model, before the progress bar moves."""
    import ray

    def say(message: str) -> None:
        if progress is not False:
            print(message, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    started = False
    if not ray.is_initialized():
        say(f"connecting to Ray at {ray_address}…" if ray_address else "starting a local Ray…")
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        started = True
    try:
        resources = ray.cluster_resources()
        if started:
            cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
            say(f"Ray ready: {cpus} CPU{'s' * (cpus != 1)}, {gpus} GPU{'s' * (gpus != 1)} ({time.perf_counter() - t0:.1f} s)")
        use_gpu = device != "cpu" and resources.get("GPU", 0) > 0
        if device == "cuda" and not use_gpu:
            raise TokenizeError("device='cuda' but the Ray cluster has no GPUs")
        # the model as the actors will run it: the precision rule applied for their device, the graphs verified
        exported = open_exported(model_dir, precision=precision, on_cuda=use_gpu)
        spec = ModelSpec.from_info(exported.info)
        common: dict[str, Any] = dict(resize=resize, shard_size=shard_size, columns=columns, overwrite=overwrite, started=t0)
        with JobRun.open(input_path, output_dir, spec, **common) as run:
            if run.ranges:
                _run(
                    ray,
                    run,
                    Path(model_dir).resolve(),
                    batch_size,
                    use_gpu,
                    spec.precision,
                    num_actors,
                    actor_concurrency,
                    max_tokens,
                    say,
                    progress,
                )
    finally:
        if started:
            ray.shutdown()
    return run.summary(engine="ray")


def actor_pool(ray: Any, actors: int, concurrency: int) -> Any:
    """`actors` encoder actors, each running up to `concurrency` batches at once (ORT sessions are
    thread-safe): on a GPU the next batches are copied in and queued while one computes, as the
    local engine does (`RuntimeEncoder`)."""
    if concurrency > 1:
        try:
            return ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=concurrency, enable_true_multi_threading=True)
        except TypeError:  # a Ray older than these options (2026): one batch at a time
            log.warning("this Ray (%s) cannot run %d batches at once per actor; running one", ray.__version__, concurrency)
    return ray.data.ActorPoolStrategy(size=actors)


def _run(
    ray: Any,
    run: JobRun,
    model_dir: Path,
    batch_size: int,
    use_gpu: bool,
    precision: str,
    num_actors: int | None,
    actor_concurrency: int | None,
    max_tokens: int,
    say: Callable[[str], None],
    progress: bool | None,
) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete in order: the driver holds about one at a time
    ctx.enable_progress_bars = False  # ours below counts images
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    actors = num_actors or (gpus if use_gpu else max(1, cpus // 4))
    # on CPU each actor's ORT session gets a share of the cores; decoding tasks get the rest
    actor_cpus = 1 if use_gpu else max(1, cpus // (2 * actors))

    specs = [{"shard": k, "slice": pickle.dumps(run.source.slice(s, e))} for k, s, e in run.ranges]
    # Blocks of about a batch of model-sized images: an encoder task answers once per input block,
    # so with Ray's default (128 MiB, ~650 decoded 256² images, a whole shard of small ones) the bar
    # stood still for minutes on a CPU; a batch per block moves it as batches arrive and changes no
    # row. A dataset keeps the context it was created with: the global one is put back at once.
    res, default_block = run.job.model.resolution, ctx.target_max_block_size
    ctx.target_max_block_size = max(1 << 16, batch_size * res * res * 3)
    try:
        ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    finally:
        ctx.target_max_block_size = default_block
    ds = ds.flat_map(_read_slice)
    # Decoding runs as CPU tasks spread over the cluster. The differing scheduling strategies also keep
    # Ray from fusing the decode step into the encoder actors, where it would run serially before each batch.
    ds = ds.map_batches(
        _decode,
        fn_kwargs={"spec": run.job.model, "resize": run.job.resize, "max_tokens": max_tokens},
        batch_size=batch_size,
        batch_format="pyarrow",
        scheduling_strategy="SPREAD",
    )
    ds = ds.map_batches(
        _EncodeActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "device": "cuda" if use_gpu else "cpu",
            "precision": precision,
            "intra_op_threads": None if use_gpu else actor_cpus,
            "max_batch_size": batch_size,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=actor_pool(ray, actors, actor_concurrency or (3 if use_gpu else 1)),
        num_gpus=1 if use_gpu else 0,
        num_cpus=actor_cpus,
        scheduling_strategy="DEFAULT",
    )
    say(f"{run.total} images to tokenize; {actors} encoder actor{'s' * (actors > 1)} loading {run.job.model.name}…")
    run.show_progress(f"tokenize {run.job.model.name} (ray, {actors} actor{'s' * (actors > 1)})", progress)
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        run.advance(_gather(table, run))
