"""`vqtok tokenize`: registration and handler (argparse and the torch-free core only at import time;
numpy, pyarrow, onnxruntime and ray load in the handler, with the engine it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.core.artefacts import DEFAULT_MODEL, resolve_model_dir
from models.core.errors import CLIError, ModelNotFound

if TYPE_CHECKING:
    from .job import Summary

ENGINES = ("local", "ray", "server")
RUNTIMES = ("auto", "onnxruntime", "compiled")  # models.runtime.choose.RUNTIMES, not imported here (the CLI imports no numpy at start)
RESIZE_MODES = ("none", "crop", "pad")  # models.core.pixels.RESIZE_MODES, not imported here: it loads numpy and Pillow
DEFAULT_RESIZE = "crop"  # format.DEFAULT_RESIZE and DEFAULT_MAX_TOKENS, not imported here: format loads pyarrow
DEFAULT_MAX_TOKENS = 256 * 256
LAYOUTS = ("plain", "chameleon", "lumina", "emu3")  # models.core.layouts.LAYOUTS, not imported here: it loads numpy
ORDERS = ("text-first", "image-first")  # sequences.ORDERS


def model_dir(name_or_dir: str | None) -> Path:
    """A model directory path, the NAME of a model shipped in `models/pretrained/`, or None: the
    default model (as `vqtok serve`)."""
    try:
        return resolve_model_dir(name_or_dir)
    except ModelNotFound as exc:
        raise CLIError(str(exc)) from exc


def _column_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("expected column names separated by commas (or --no-columns)")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="tokenize an image dataset (folder, parquet, webdataset tars) to parquet shards; resumable",
        description="Tokenize every image of a dataset into parquet shards of token ids. Re-running the same command "
        "after an interruption completes the job: committed shards are kept, the rest are redone.",
    )
    p.add_argument(
        "--input", required=True, help="image folder (recursive), parquet file/folder (HF 'image' column) or webdataset .tar file/folder"
    )
    p.add_argument(
        "--output",
        required=True,
        help="output folder: part-*.parquet (readable as a dataset by pyarrow, pandas, HF datasets), __vqtok__/ (job, errors)",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"model directory or name in models/pretrained (default: {DEFAULT_MODEL}; server engine: a served model, default the server's)",
    )
    p.add_argument("--engine", choices=ENGINES, default="local", help="local: this process; ray: Ray Data; server: a running vqtok service")
    p.add_argument("--server", default=None, help="service URL for --engine server (default $VQTOK_BASE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key for --engine server (default $VQTOK_API_KEY)")
    p.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default=DEFAULT_RESIZE,
        help="crop (default): short side to the model's native size, centre square: every photo, one sequence length, as "
        "LLM pipelines train on (LlamaGen's ImageNet codes); pad: whole images, edge-padded to a multiple of f (grids vary); "
        "none: sides must already be multiples of f (other images are refused)",
    )
    columns = p.add_mutually_exclusive_group()
    columns.add_argument(
        "--columns",
        type=_column_list,
        default=None,
        metavar="A,B",
        help="input columns to carry to the output (default: all: parquet columns besides the image; webdataset members "
        "and sidecar files such as cat.txt, by extension: txt, json, cls, ...)",
    )
    columns.add_argument("--no-columns", action="store_true", help="carry no input column: the output holds tokens only")
    p.add_argument(
        "--max-tokens",
        type=_positive,
        default=DEFAULT_MAX_TOKENS,
        help=f"refuse images whose token grid is larger (resize none/pad: the image's own size; default {DEFAULT_MAX_TOKENS} "
        "= 256²; the server engine applies the server's limits)",
    )
    p.add_argument("--batch-size", type=_positive, default=32, help="images per encode call")
    p.add_argument("--shard-size", type=_positive, default=4096, help="images per output shard (fixed for a job)")
    p.add_argument(
        "--decode-workers",
        type=_positive,
        default=None,
        help="image decoding workers (local/server; default: CPUs + 2 threads, CPUs - 1 processes)",
    )
    p.add_argument(
        "--decode-pool",
        choices=("auto", "thread", "process"),
        default="auto",
        help="decode images in threads or in processes (no GIL: many cores feeding a GPU); auto: processes when the model runs on CUDA",
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="local/ray: what encodes (as vqtok serve --runtime): auto (default) = the compiled runtime (torch.compile + CUDA "
        "graphs + fused code search) on a CUDA host where torch can run it, else ONNX Runtime; onnxruntime or compiled force "
        "one (a forced runtime that cannot run is an error)",
    )
    p.add_argument(
        "--ray-address", default=None, help="existing Ray cluster (e.g. ray://head:10001 or auto); default: a local Ray for this job"
    )
    p.add_argument("--num-actors", type=_positive, default=None, help="Ray: encoder actors (default: one per GPU, else CPUs / 4)")
    llm = p.add_argument_group(
        "LLM sequences",
        "each row's image as an LLM's id sequence (column `sequence`: image code k is vocab_offset + k, the layout's special "
        "tokens after the K codes); with a text tokenizer and a caption column also `text_ids` and `input_ids`; --packed adds "
        "the flat uint32 .bin and its Megatron .idx in OUT/__packed__/ (format: clients/tokenize/sequences.py)",
    )
    which = llm.add_mutually_exclusive_group()
    which.add_argument("--layout", choices=LAYOUTS, default=None, help="the layout's preset (sources in the README)")
    which.add_argument(
        "--vocab",
        default=None,
        metavar="DIR/vqtok_vocab.json",
        help="the layout, offset and grid limit of an LLM vocabulary extended by `vqtok vocab extend` (instead of --layout, "
        "--vocab-offset); its tokenizer.json tokenizes the captions unless --text-tokenizer is given",
    )
    llm.add_argument("--vocab-offset", type=_non_negative, default=0, help="with --layout: the LLM id of image code 0 (default 0)")
    llm.add_argument(
        "--text-tokenizer",
        default=None,
        metavar="PATH/tokenizer.json",
        help="a Hugging Face tokenizer.json for the captions (text_ids, no BOS/EOS added) and emu3's size text (pip install 'vqtok[llm]')",
    )
    llm.add_argument(
        "--caption-column",
        default=None,
        metavar="NAME",
        help="the input column holding each image's caption (webdataset or sidecar `txt`, a parquet column); always carried",
    )
    llm.add_argument(
        "--order",
        choices=ORDERS,
        default=None,
        help="input_ids = caption then image (text-first, the default) or image then caption (image-first)",
    )
    llm.add_argument(
        "--packed",
        action="store_true",
        help="also write OUT/__packed__/input_ids.bin (every row's input_ids, or sequence, as little-endian uint32) with a "
        "Megatron-LM index input_ids.idx, when the job completes",
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing output of another job in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from models.core.errors import SourceError

    from .format import TokenizeError

    if not Path(args.input).exists():
        raise CLIError(f"--input {args.input} does not exist")
    progress = False if args.no_progress else None
    try:
        summary = _run_engine(args, progress)
    except (TokenizeError, SourceError) as exc:
        raise CLIError(str(exc), code=1) from exc
    print(summary_line(summary))
    return 0


def summary_line(s: Summary) -> str:
    failed = f" (see {s.errors_file})" if s.errors else ""
    return (
        f"{s.output}: {s.images} images tokenized, {s.unreadable} unreadable, {s.refused} refused{failed}; "
        f"{s.shards_written} shard{'s' * (s.shards_written != 1)} written, {s.shards_skipped} already done; "
        f"{s.seconds:.1f} s, {s.images_per_s:.1f} images/s ({s.engine})"
    )


def sequence_options(args: argparse.Namespace) -> Any:
    """The LLM columns the flags ask for (a `sequences.SequenceOptions`), or None; a flag that needs a layout without one is an error."""
    if args.layout is None and args.vocab is None:
        given = [
            flag
            for flag, value in (
                ("--vocab-offset", args.vocab_offset),
                ("--text-tokenizer", args.text_tokenizer),
                ("--caption-column", args.caption_column),
                ("--order", args.order),
                ("--packed", args.packed),
            )
            if value
        ]
        if given:
            raise CLIError(f"{', '.join(given)} need a layout: --layout NAME (with --vocab-offset) or --vocab DIR/vqtok_vocab.json")
        return None
    if args.vocab is not None and args.vocab_offset:
        raise CLIError("--vocab gives the offset: drop --vocab-offset")
    from .sequences import SequenceOptions

    return SequenceOptions(
        layout=args.layout,
        vocab_offset=args.vocab_offset,
        vocab=args.vocab,
        text_tokenizer=args.text_tokenizer,
        caption_column=args.caption_column,
        order=args.order or ORDERS[0],
        packed=args.packed,
    )


def _run_engine(args: argparse.Namespace, progress: bool | None) -> Summary:
    from models.core.errors import ModelLoadError

    common: dict[str, Any] = dict(
        resize=args.resize,
        columns=() if args.no_columns else args.columns,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        progress=progress,
        sequences=sequence_options(args),
    )
    if args.engine != "server":  # the server applies its own limits
        common["max_tokens"] = args.max_tokens
    decoding: dict[str, Any] = dict(decode_workers=args.decode_workers, decode_pool=args.decode_pool)
    if args.engine == "ray":
        from .ray import tokenize_ray

        try:
            return tokenize_ray(
                args.input,
                args.output,
                model_dir(args.model),
                device=args.device,
                precision=args.precision,
                runtime=args.runtime,
                ray_address=args.ray_address,
                num_actors=args.num_actors,
                **common,
            )
        except ModelLoadError as exc:
            raise CLIError(str(exc), code=1) from exc
    if args.engine == "server":
        from clients.client import Client
        from clients.errors import VqtokError

        from .encoders import ServerEncoder
        from .local import tokenize_local

        try:
            with Client(args.server, api_key=args.api_key) as client:
                encoder = ServerEncoder(client, args.model)
                summary = tokenize_local(args.input, args.output, encoder, **decoding, **common)
        except VqtokError as exc:
            raise CLIError(f"server: {exc}", code=1) from exc
        summary.engine = "server"
        return summary

    from .encoders import RuntimeEncoder, load_encoder_runtime
    from .local import tokenize_local

    path = model_dir(args.model)
    try:
        runtime = load_encoder_runtime(
            path,
            runtime=args.runtime,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            resize=args.resize,
        )
    except ModelLoadError as exc:
        raise CLIError(str(exc), code=1) from exc
    return tokenize_local(args.input, args.output, RuntimeEncoder(runtime), **decoding, **common)
