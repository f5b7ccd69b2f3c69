"""`vqtok train`, `vqtok eval` and `vqtok codebook retrain` (argparse only at import time:
torch and the training modules are imported inside the handlers)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.core.artefacts import model_name, resolve_model_dir
from models.core.errors import CLIError, ModelNotFound

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

EXIT_RUNTIME = 1


def _need_path(path: str | None, what: str) -> Path:
    if not path:
        raise CLIError(f"{what} is required")
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {p} does not exist")
    return p


def _model_dir(name_or_dir: str, what: str = "--model") -> Path:
    """The model directory `name_or_dir` names (`models.core.artefacts.resolve_model_dir`: a path, a
    shipped NAME, or ORG/NAME on the Hugging Face hub); torch-free, so a wrong name fails at once."""
    if not name_or_dir:
        raise CLIError(f"{what} is required")
    try:
        return resolve_model_dir(name_or_dir)
    except ModelNotFound as exc:
        raise CLIError(f"{what}: {exc}") from exc


def _load_model(model_dir: Path) -> Tokenizer:
    from models.tokenizer import CheckpointError, Tokenizer

    try:
        return Tokenizer.from_pretrained(model_dir)
    except CheckpointError as exc:
        raise CLIError(f"cannot load model directory {model_dir}: {exc}") from exc


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: only when stderr is a terminal)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """`vqtok train`, `vqtok eval`, `vqtok codebook retrain`."""
    register_train(sub)
    register_eval(sub)
    register_codebook(sub)


# --- vqtok train ---


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a tokenizer (single process, or under torchrun for DDP)",
        description=(
            "Train a tokenizer. Config from a YAML/JSON file plus dotted key=value overrides "
            "(e.g. optim.lr=1e-4 model.preset=f8-simvq-16k data.cache_in_memory=true). Writes checkpoints, "
            "metrics.jsonl, TensorBoard logs and the final model directory (EMA weights) to --out/model. "
            "Multi-GPU: torchrun --nproc-per-node N -m vqtok train ..."
        ),
    )
    p.add_argument("--config", help="YAML or JSON training config (default: built-in defaults)")
    p.add_argument("--data", help="training images: folder, parquet or webdataset .tar (sets data.train)")
    p.add_argument("--val", help="validation images (sets data.val)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out (uses its saved config unless --config is given)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides with dotted keys")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from training.config import CONFIG_NAME, TrainConfigError, build_config, read_config_file
    from training.data import DataError

    run_dir = Path(args.out)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.val:
        overrides.append(f"data.val={args.val}")
    try:
        if args.config:
            _need_path(args.config, "--config")
            data = read_config_file(args.config)
        elif args.resume and (run_dir / CONFIG_NAME).is_file():
            data = read_config_file(run_dir / CONFIG_NAME)
        else:
            data = {}
        config = build_config(data, overrides)
    except TrainConfigError as exc:
        raise CLIError(str(exc)) from exc
    if not config.data.train:
        raise CLIError("no training data: pass --data PATH or set data.train in the config")
    _need_path(config.data.train, "training data")
    if config.data.val:
        _need_path(config.data.val, "validation data")
    if config.model.init_from:
        _load_model(_model_dir(config.model.init_from, "model.init_from"))

    from training.trainer import Trainer

    try:
        trainer = Trainer(config, run_dir, resume=args.resume)
    except (DataError, TrainConfigError) as exc:  # data, or init_from that does not fit
        raise CLIError(str(exc)) from exc
    result = trainer.train()
    if trainer.dist.main:
        state = "finished" if result.finished else f"stopped ({result.stop_reason})"
        print(
            f"{state} at step {result.step}/{config.max_steps} in {result.elapsed_s:.0f} s, {result.images_per_s:.1f} images/s; model: {result.model_dir}"
        )
        if not result.finished:
            print(f"continue with: vqtok train --out {run_dir} --resume")
    return 0


# --- vqtok eval ---


def register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model directory: PSNR, SSIM, MS-SSIM, LPIPS-Alex, rFID, KID, codebook usage, bpp, codecs at equal bpp",
        description=(
            "Evaluate a model directory on an image set. Sizes that are not multiples of the downsample factor f are "
            "reflect-padded bottom/right to the next multiple and the reconstruction is cropped back; metrics use the "
            "original pixels; bpp counts all tokens of the padded grid."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory (config.json + model.safetensors), shipped model NAME, or ORG/NAME on the Hugging Face hub",
    )
    p.add_argument("--data", required=True, help="images: folder, parquet or webdataset .tar")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument(
        "--compare-codecs",
        action="store_true",
        help="add JPEG and WebP (Pillow) at the same bits per pixel, with every metric (rFID/KID on the same Inception features)",
    )
    p.add_argument("--limit", type=int, default=0, help="evaluate at most N images (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--fid-min-images", type=int, default=100, help="compute rFID only with at least this many images (default 100)")
    p.add_argument("--no-fid", action="store_true", help="skip rFID (and KID, which uses the same Inception features)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS-Alex")
    _add_progress(p)
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    model_dir = _model_dir(args.model)
    _need_path(args.data, "--data")
    if args.batch_size < 1 or args.limit < 0:
        raise CLIError("--batch-size must be >= 1 and --limit >= 0")
    model = _load_model(model_dir)
    from training.data import DataError
    from training.evaluate import EvalOptions, evaluate, format_table

    opts = EvalOptions(
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        fid_min_images=args.fid_min_images,
        fid=not args.no_fid,
        compare_codecs=args.compare_codecs,
        lpips=not args.no_lpips,
    )
    try:
        report = evaluate(model, args.data, opts, progress=args.progress)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    report["model"] = str(args.model)
    print(format_table(report, model_name=model_name(model_dir) or "tokenizer"))
    _write_json(args.out, report)
    return 0


# --- vqtok codebook retrain ---


def register_codebook(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("codebook", help="codebook tools: `codebook retrain`")
    csub = p.add_subparsers(dest="codebook_command", metavar="ACTION", required=True)
    r = csub.add_parser(
        "retrain",
        help="re-initialise and retrain the codebook on new data with the encoder frozen",
        description=(
            "Freeze the encoder and encode --data once; re-initialise the codebook by k-means over those latents "
            "(for SimVQ the basis C becomes the centroids and W the identity), train it with dead-code restarts, "
            "optionally fine-tune the decoder, then keep whichever candidate (the original where K and the quantizer "
            "are unchanged, the k-means codebook, the trained codebook, the fine-tuned decoder) scores best on held-out "
            "images (--heldout, else --eval-images images set aside from --data), print every candidate and which was "
            "kept, and write a new model directory. --quantizer simvq turns a plain codebook (e.g. an imported model's) "
            "into a SimVQ one (frozen C, learned W, rotation-trick gradients), its encoder and decoder reused. FSQ has "
            "no learned codebook: only --finetune-decoder applies."
        ),
    )
    r.add_argument("--model", required=True, help="model to start from: directory, shipped model NAME, or ORG/NAME on the Hugging Face hub")
    r.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="training images: folders, parquet or webdataset .tar, globs allowed (several: read as one set)",
    )
    r.add_argument("--out", required=True, help="new model directory")
    r.add_argument("--codebook-size", type=int, help="new number of codes K (default: keep)")
    r.add_argument("--init", choices=["kmeans", "keep"], default="kmeans")
    r.add_argument(
        "--quantizer",
        choices=["keep", "simvq"],
        default="keep",
        help="simvq: retrain a plain codebook as a SimVQ one (linear_codebook, rotation trick); default: keep the model's",
    )
    r.add_argument("--steps", type=int, default=200, help="codebook training steps (default 200; 0: k-means only)")
    r.add_argument("--restart-every", type=int, default=20, help="steps between dead-code restarts (0: none)")
    r.add_argument("--finetune-decoder", action="store_true", help="also fine-tune the decoder (L1) on the cached latents")
    r.add_argument("--decoder-steps", type=int, default=0, help="decoder fine-tuning steps (default: --steps)")
    r.add_argument("--decoder-lr", type=float, default=1e-4)
    r.add_argument("--decoder-crop", type=int, default=0, help="decoder fine-tuning crop in pixels (default: half the resolution)")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--resolution", type=int, default=0, help="training crop (default: the model's)")
    r.add_argument(
        "--max-latents", type=int, default=0, help="latents cached for k-means and training (default: 64 a code, at least 65,536)"
    )
    r.add_argument("--kmeans-iters", type=int, default=20)
    r.add_argument("--heldout", help="held-out images for the before/after numbers and the choice (default: set aside from --data)")
    r.add_argument("--eval-images", type=int, default=64, help="held-out images (default 64)")
    r.add_argument("--select", choices=["psnr", "lpips"], default="psnr", help="what the kept candidate is best at on the held-out images")
    r.add_argument("--device", default="auto")
    r.add_argument("--seed", type=int, default=0)
    _add_progress(r)
    r.set_defaults(handler=_codebook_retrain)


def _codebook_retrain(args: argparse.Namespace) -> int:
    model_dir = _model_dir(args.model)
    data = [str(_need_path(d, "--data")) if not any(c in d for c in "*?[") else d for d in args.data]
    if args.heldout:
        _need_path(args.heldout, "--heldout")
    if min(args.steps, args.decoder_steps, args.restart_every, args.max_latents, args.decoder_crop) < 0 or args.batch_size < 1:
        raise CLIError("--steps, --decoder-steps, --restart-every, --max-latents and --decoder-crop must be >= 0, --batch-size >= 1")
    if args.codebook_size is not None and args.codebook_size < 2:
        raise CLIError("--codebook-size must be >= 2")
    if args.eval_images < 1 or args.kmeans_iters < 0:
        raise CLIError("--eval-images must be >= 1 and --kmeans-iters >= 0")
    model = _load_model(model_dir)
    from models.config import ConfigError
    from training.codebook import CodebookError, RetrainOptions, retrain_codebook
    from training.data import DataError

    opts = RetrainOptions(
        codebook_size=args.codebook_size,
        init=args.init,
        quantizer=args.quantizer,
        steps=args.steps,
        finetune_decoder=args.finetune_decoder,
        decoder_steps=args.decoder_steps,
        decoder_lr=args.decoder_lr,
        decoder_crop=args.decoder_crop,
        batch_size=args.batch_size,
        lr=args.lr,
        resolution=args.resolution,
        max_latents=args.max_latents,
        kmeans_iters=args.kmeans_iters,
        restart_every=args.restart_every,
        heldout=args.heldout,
        eval_images=args.eval_images,
        select=args.select,
        device=args.device,
        seed=args.seed,
    )
    try:
        new_model, report = retrain_codebook(model, data, opts, progress=args.progress)
    except (CodebookError, DataError, ConfigError) as exc:
        raise CLIError(str(exc)) from exc
    out = new_model.save_pretrained(args.out)
    print(format_retrain_table(report))
    _write_json(str(out / "retrain_report.json"), report)
    print(f"wrote model directory {out}", file=sys.stderr)
    return 0


def format_retrain_table(report: dict[str, Any]) -> str:
    """The original and every candidate on the held-out images, the kept one marked, then `after`."""

    def row(name: str, m: dict[str, Any], mark: str = "") -> str:
        lp = "–" if m.get("lpips_alex") is None else f"{m['lpips_alex']:.4f}"
        return f"{name:28}{m['usage'] * 100:>9.2f}%{m['perplexity']:>12.1f}{m['psnr']:>10.2f}{lp:>10}  {mark}".rstrip()

    lines = [f"{'':28}{'usage':>10}{'perplexity':>12}{'PSNR dB':>10}{'LPIPS':>10}"]
    lines.append(row("before", report["before"]))
    for name, m in report["candidates"].items():
        if name != "original":
            lines.append(row(f"  {name}", m, "<- kept" if name == report["kept"] else ""))
    lines.append(row("after", report["after"], f"({report['kept']})"))
    k0, k = report["codebook_size_before"], report["codebook_size"]
    lines.append(
        f"({report['eval_images']} held-out images: {report['heldout']}; usage = codes used at least once ÷ K; "
        f"K {k0}{f' -> {k}' if k != k0 else ''}; best {report['select']} kept)"
    )
    if report["kept"] == "original":
        lines.append("no candidate beat the original on the held-out images: the model is written unchanged")
    if report.get("passed_over"):
        lines.append(f"passed over: {report['passed_over']}")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)
