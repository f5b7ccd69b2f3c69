"""The Ray engine (`--engine ray`): the tokenization pipeline on Ray Data, for datasets larger than one machine.

    pending shards, cut in chunks ─▶ map_batches(read + decode + resize: one CPU task a chunk)
        ─▶ map_batches(_EncodeActor, actor pool: one runtime per actor, num_gpus=1 each on GPU)
        ─▶ driver: rows into the same `JobRun` as the local engine (buffers, commits, manifest)

The driver writes the shards (token ids are small: a few KB per image) so that a shard is committed
atomically and the manifest has a single writer; the heavy work (reading, decoding, encoding) runs on
the cluster. Image paths and the model directory must be readable from every Ray node.

What keeps the GPUs fed: decode tasks of up to 512 images (`decode_task_images`: enough tasks for
every core, few enough that Ray's cost per task stays small), each a chunk of one shard, each one
output block. The decoded pixels of a chunk travel as one buffer (a large_binary column whose values
are the images back to back): the actor views a batch of them in place in Ray's object store (no
copy, no per-image Python) and hands them to the runtime as one (B, H, W, 3) array; the token ids go
back as one list column built from offsets. Each actor loads its runtime through
`models.runtime.choose.load_runtime` (`runtime`: auto, onnxruntime or compiled), warms the encoder's
batch shapes before its first batch and, on a GPU, runs 3 batches at once (the next ones are fetched
and viewed while one computes).

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
from models.core.errors import ModelLoadError

from .decoding import prepare_item
from .encoders import RUNTIMES, RuntimeEncoder, encode_pixels, load_encoder_runtime
from .format import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, DEFAULT_RESIZE, DEFAULT_SHARD_SIZE, ModelSpec, TokenizeError
from .job import JobRun, Summary

if TYPE_CHECKING:
    from models.core.sources import Columns

    from .sequences import SequenceOptions

log = logging.getLogger("vqtok.tokenize")

_DECODED = pa.schema(
    [
        ("shard", pa.int64()),
        ("index", pa.int64()),
        ("key", pa.string()),
        ("pixels", pa.large_binary()),  # uint8 (H, W, 3) bytes, the rows' images back to back in one buffer; b"" for an error
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
_PASSED = ("shard", "index", "key", "source_h", "source_w", "meta")  # columns the encoder hands on as they are


def _decode(batch: pa.Table, spec: ModelSpec, resize: str, max_tokens: int) -> pa.Table:
    """Chunks of pending shards (a pickled slice of the source each) -> their decoded images, one row
    each, the pixels of all of them in one buffer."""
    cols: dict[str, list[Any]] = {name: [] for name in _DECODED.names if name != "pixels"}
    pixels: list[np.ndarray] = []
    ends = [0]
    for shard, blob in zip(batch.column("shard").to_pylist(), batch.column("slice").to_pylist(), strict=True):
        for item in pickle.loads(blob):  # a slice object the driver made (never untrusted input)
            p = prepare_item(item, spec, resize, max_tokens)
            ok = p.pixels is not None
            h, w = p.pixels.shape[:2] if p.pixels is not None else (0, 0)
            if p.pixels is not None:
                pixels.append(p.pixels.reshape(-1))
            ends.append(ends[-1] + h * w * 3)
            for name, value in (
                ("shard", shard),
                ("index", item.index),
                ("key", item.key),
                ("height", h),
                ("width", w),
                ("source_h", p.source[0]),
                ("source_w", p.source[1]),
                ("error", None if ok else p.error),
                ("kind", None if ok else p.kind),
                ("meta", pickle.dumps(item.meta)),
            ):
                cols[name].append(value)
    data = np.concatenate(pixels) if pixels else np.zeros(0, np.uint8)
    column = pa.Array.from_buffers(pa.large_binary(), len(ends) - 1, [None, pa.py_buffer(np.asarray(ends, np.int64)), pa.py_buffer(data)])
    arrays = {name: (column if name == "pixels" else pa.array(cols[name], type=_DECODED.field(name).type)) for name in _DECODED.names}
    return pa.Table.from_arrays(list(arrays.values()), schema=_DECODED)


def _binary_view(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a large_binary column as numpy views (no copy when it is one chunk)."""
    arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    n, offsets_buf, data_buf = len(arr), arr.buffers()[1], arr.buffers()[2]
    offsets = (
        np.frombuffer(offsets_buf, np.int64)[arr.offset : arr.offset + n + 1] if offsets_buf is not None else np.zeros(n + 1, np.int64)
    )
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None and data_buf.size else np.zeros(0, np.uint8)
    return offsets, data


class _EncodeActor:
    """One runtime per actor (`load_runtime`: the compiled runtime on a GPU where it can run, else ONNX
    Runtime); encodes the same-shaped images of a batch together."""

    def __init__(
        self,
        model_dir: str,
        runtime: str,
        device: Device,
        precision: Precision,
        intra_op_threads: int | None,
        max_batch_size: int,
        resize: str,
        expected: ModelSpec,
    ) -> None:
        import warnings

        # the images are read-only views of Ray's object store; the runtimes only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.runtime = load_encoder_runtime(
            model_dir,
            runtime=runtime,
            device=device,
            precision=precision,
            intra_op_threads=intra_op_threads,
            batch_size=max_batch_size,
            resize=resize,
        )
        self.encoder = RuntimeEncoder(self.runtime)
        if self.encoder.spec != expected:  # a job never mixes graphs: the spec is in every shard and the job file
            raise TokenizeError(
                f"the encoder actor runs {getattr(self.runtime, 'runtime_name', '?')} with {self.encoder.spec.precision} graphs, "
                f"but the job was planned for {expected.precision}; choose the runtime with --runtime (onnxruntime or compiled)"
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        heights = batch.column("height").to_numpy()
        widths = batch.column("width").to_numpy()
        offsets, data = _binary_view(batch.column("pixels"))
        grids: list[np.ndarray | None] = [None] * n
        refused: dict[int, tuple[str | None, Any]] = {}
        for h, w in sorted({(int(heights[i]), int(widths[i])) for i in np.flatnonzero(ok)}):
            idx = np.flatnonzero(ok & (heights == h) & (widths == w))
            size, start, end = h * w * 3, int(offsets[idx[0]]), int(offsets[idx[-1] + 1])
            if end - start == len(idx) * size:  # back to back in the buffer (the usual case: one shape): a view
                images = data[start:end].reshape(len(idx), h, w, 3)
            else:
                images = np.stack([data[offsets[i] : offsets[i] + size].reshape(h, w, 3) for i in idx])
            for i, (grid, error, kind) in zip(idx, encode_pixels(self.encoder, images), strict=True):
                if grid is None:
                    refused[int(i)] = (error, kind)
                else:
                    grids[int(i)] = grid
        ends = np.zeros(n + 1, np.int32)
        np.cumsum([g.size if g is not None else 0 for g in grids], out=ends[1:])
        values = np.empty(int(ends[-1]), np.int32)
        for row, g in enumerate(grids):
            if g is not None:
                values[ends[row] : ends[row + 1]] = g.reshape(-1)
        shapes = np.array([g.shape if g is not None else (0, 0) for g in grids], np.int32).reshape(n, 2)
        out: dict[str, Any] = {name: batch.column(name) for name in _PASSED}
        out["tokens"] = pa.ListArray.from_arrays(pa.array(ends), pa.array(values))
        out["grid_h"], out["grid_w"] = pa.array(shapes[:, 0]), pa.array(shapes[:, 1])
        if refused:
            errors, kinds = batch.column("error").to_pylist(), batch.column("kind").to_pylist()
            for row, (error, kind) in refused.items():
                errors[row], kinds[row] = error, kind
            out["error"], out["kind"] = pa.array(errors, pa.string()), pa.array(kinds, pa.string())
        else:
            out["error"], out["kind"] = batch.column("error"), batch.column("kind")
        return pa.Table.from_arrays([out[name] for name in _ENCODED.names], schema=_ENCODED)


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
    runtime: str = "auto",
    ray_address: str | None = None,
    num_actors: int | None = None,
    actor_concurrency: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    sequences: SequenceOptions | None = None,
) -> Summary:
    """Tokenize with Ray Data; same output format, manifest and resume rules as `tokenize_local`.

    Uses the Ray instance already initialised in this process if there is one; else connects to
    `ray_address`, or starts a local Ray for the job (and stops it afterwards). `runtime`: what each
    encoder actor runs, as `models.runtime.choose.load_runtime` picks it ("auto": the compiled runtime
    on a GPU where torch can run it, else ONNX Runtime; "onnxruntime"/"compiled" forced; a forced
    runtime that cannot run is a ModelLoadError). `num_actors`: encoder actors (default: one per GPU
    of the cluster, one GPU each; on CPUs, CPUs / 4). `actor_concurrency`: batches each encoder
    actor runs at once (default 3 on GPUs, 1 on CPUs). `resize`, `columns`, `max_tokens`, `sequences`: as for
    `tokenize_local` (the LLM columns are computed on the driver, as there). Unless `progress` is False, a line on stderr says what it is doing while Ray
    starts and the encoder actors load the model, before the progress bar moves."""
    import ray

    if runtime not in RUNTIMES:
        raise ModelLoadError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "compiled" and precision != "auto":
        raise ModelLoadError(
            f"the compiled runtime chooses its own precision (fp16 networks, fp32-accurate search); got precision={precision!r}"
        )

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
        if runtime == "compiled" and not use_gpu:
            raise ModelLoadError(
                "the compiled runtime cannot run here: it runs on CUDA only"
                + (" (device='cpu')" if device == "cpu" else " and the Ray cluster has no GPUs")
                + "; use --runtime onnxruntime (or auto)"
            )
        # the model as the actors will run it: the precision rule applied for their device (the compiled
        # runtime's fp16 networks where it is forced), the graphs verified; each actor checks its own
        exported = open_exported(model_dir, precision=precision, on_cuda=use_gpu)
        spec = ModelSpec.from_info(exported.info)
        if runtime == "compiled":
            spec = dataclasses.replace(spec, precision="fp16")
        common: dict[str, Any] = dict(
            resize=resize,
            shard_size=shard_size,
            columns=columns,
            overwrite=overwrite,
            started=t0,
            sequences=sequences,
            max_tokens=max_tokens,
        )
        with JobRun.open(input_path, output_dir, spec, **common) as run:
            if run.ranges:
                _run(
                    ray,
                    run,
                    Path(model_dir).resolve(),
                    batch_size,
                    use_gpu,
                    spec,
                    runtime,
                    precision,
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
    """`actors` encoder actors, each running up to `concurrency` batches at once (the runtimes are
    thread-safe): on a GPU the next batches are fetched from the object store and queued while one
    computes, as the local engine does (`RuntimeEncoder`)."""
    if concurrency > 1:
        try:
            return ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=concurrency, enable_true_multi_threading=True)
        except TypeError:  # a Ray older than these options (2026): one batch at a time
            log.warning("this Ray (%s) cannot run %d batches at once per actor; running one", ray.__version__, concurrency)
    return ray.data.ActorPoolStrategy(size=actors)


DECODE_TASK_IMAGES = 512  # at most, per decode task


def decode_task_images(total: int, batch_size: int, cpus: int) -> int:
    """Images per decode task: a multiple of the batch size, large enough that Ray's cost per task
    (scheduling, an object per block: tens of milliseconds) stays small against decoding (about a
    millisecond an image), small enough that a job gives every core (two tasks each) something to
    decode."""
    per_task = min(DECODE_TASK_IMAGES, max(batch_size, -(-total // (2 * cpus))))
    return max(batch_size, per_task // batch_size * batch_size)


def chunks(ranges: list[tuple[int, int, int]], size: int) -> list[tuple[int, int, int]]:
    """(shard, start, end) pieces of at most `size` items, never across a shard: the decode tasks."""
    return [(k, a, min(a + size, e)) for k, s, e in ranges for a in range(s, e, size)]


def _run(
    ray: Any,
    run: JobRun,
    model_dir: Path,
    batch_size: int,
    use_gpu: bool,
    spec: ModelSpec,
    runtime: str,
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
    # on CPU each actor's ORT session gets a share of the cores; decoding tasks get the rest, at least
    # one core (actors holding every CPU would leave the decode tasks unscheduled: the job would hang)
    actor_cpus: float = 1 if use_gpu else max(1, cpus // (2 * actors))
    if actors * actor_cpus > cpus - 1:
        actor_cpus = max(cpus - 1, 0.5) / actors

    # Decode tasks of a few hundred images each (see decode_task_images): every free core decodes (a task
    # per shard kept as few busy as there were pending shards), each task's output is one block, and
    # the encoder's batches are zero-copy slices of it.
    pieces = chunks(run.ranges, decode_task_images(run.total, batch_size, cpus))
    specs = [{"shard": k, "slice": pickle.dumps(run.source.slice(s, e))} for k, s, e in pieces]
    ds = ray.data.from_items(specs, override_num_blocks=len(specs))
    # Decoding runs as CPU tasks spread over the cluster. The differing scheduling strategies also keep
    # Ray from fusing the decode step into the encoder actors, where it would run serially before each batch.
    ds = ds.map_batches(
        _decode,
        fn_kwargs={"spec": run.job.model, "resize": run.job.resize, "max_tokens": max_tokens},
        batch_size=None,  # a block (one chunk of the source) per call
        batch_format="pyarrow",
        zero_copy_batch=True,
        num_cpus=1,
        scheduling_strategy="SPREAD",
    )
    ds = ds.map_batches(
        _EncodeActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "runtime": runtime,
            "device": "cuda" if use_gpu else "cpu",
            "precision": precision,
            "intra_op_threads": None if use_gpu else max(1, int(actor_cpus)),
            "max_batch_size": batch_size,
            "resize": run.job.resize,
            "expected": spec,
        },
        batch_size=batch_size,  # batches are zero-copy slices of a decoded chunk (a multiple of the batch size)
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=actor_pool(ray, actors, actor_concurrency or (3 if use_gpu else 1)),
        num_gpus=1 if use_gpu else 0,
        num_cpus=actor_cpus,
        scheduling_strategy="DEFAULT",
    )
    say(f"{run.total} images to tokenize; {actors} encoder actor{'s' * (actors > 1)} loading {run.job.model.name}…")
    run.show_progress(f"tokenize {run.job.model.name} (ray, {actors} actor{'s' * (actors > 1)})", progress)
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        run.advance(_gather(table, run))
