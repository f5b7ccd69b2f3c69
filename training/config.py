"""Training configuration: typed dataclasses, loaded from YAML or JSON, overridden with dotted
``key=value`` pairs, validated, and saved into the run directory.

Dataclasses (not pydantic) on purpose: the GPU machine has torch but no pydantic, and the trainer
must run there as it is. YAML needs PyYAML; JSON always works.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from models.config import TokenizerConfig

D = TypeVar("D", bound="DataclassInstance")

CONFIG_NAME = "train_config.json"


class TrainConfigError(ValueError):
    """An invalid training configuration: unknown key, wrong type or out-of-range value."""


MODEL_PARTS = ("encoder", "quantizer", "decoder")  # the Tokenizer's submodules


@dataclass
class ModelSection:
    preset: str = "cifar-fsq"  # registry name (models.list_presets())
    overrides: dict[str, Any] = field(default_factory=dict)  # TokenizerConfig fields to change
    init_from: str = ""  # optional model directory to start from instead of random weights
    # with init_from: the parts (encoder, quantizer, decoder) whose weights it gives; [] = the whole model, config
    # included. Naming parts builds init_from's config with `overrides` applied (e.g. decoder_channels: a wider
    # decoder) and leaves the other parts freshly initialised.
    init_parts: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)  # parts trained no further, e.g. [encoder, quantizer]: init_from's tokens
    # with init_from: build the network from `preset` + `overrides` (e.g. f16) and copy init_from's weights
    # wherever a tensor of the same role and shape exists (training/warmstart.py: a deeper network grown from
    # a shallower one); everything else starts fresh
    init_grow: bool = False


@dataclass
class DataSection:
    train: str = ""  # training images: image folder, parquet file/folder or webdataset .tar shards (folder or file)
    # more training sources mixed in, each a path or a glob pattern standing for every folder, .parquet
    # and .tar it matches, as one group (e.g. ../shared/data/photos-extra/*)
    extra_train: list[str] = field(default_factory=list)
    # one weight per source entry, `train` first, then each `extra_train` entry: the share of the samples
    # drawn from it (normalised; a glob's share is split among its sources by their sizes).
    # [] = uniform over all images (a plain concatenation: each epoch one pass over every image)
    train_weights: list[float] = field(default_factory=list)
    val: str = ""  # held-out set for the validation metrics ("" = none)
    resolution: int = 0  # training crop size; 0 = the model's native resolution
    augment: Literal["random_crop", "resize_crop", "center_crop"] = "random_crop"
    flip: bool = True  # random horizontal flip
    num_workers: int = 2  # DataLoader worker processes per training process (0 = decode/crop in the main process)
    cache_in_memory: bool = False  # decode the train set once into uint8 arrays (workers then crop from them)
    val_limit: int = 256  # at most this many validation images per evaluation
    image_column: str = "image"  # parquet column holding {bytes, path} structs

    def train_paths(self) -> list[str]:
        """Every training source entry, `train` first (globs not yet expanded)."""
        return [self.train, *self.extra_train] if self.train else list(self.extra_train)


@dataclass
class OptimSection:
    lr: float = 2e-4  # peak AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 500  # linear warmup, then cosine decay to min_lr_ratio·lr at max_steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (0 = off)


@dataclass
class LossSection:
    """The generator's loss, on images in [-1, 1]:
    l1·|x̂ − x| + l2·(x̂ − x)² + lpips·LPIPS(x̂, x) + quantizer·L_q + gan·λ·(−D(x̂)),
    λ = ‖∇_W L_rec‖ / (‖∇_W L_G‖ + 1e-4) at the decoder's last layer W (VQGAN's adaptive weight)."""

    l1_weight: float = 1.0  # mean absolute error
    l2_weight: float = 0.0  # mean squared error
    quantizer_weight: float = 1.0  # weight of the quantizer's own loss (zero for FSQ anyway)
    lpips_weight: float = 0.0  # LPIPS v0.1 perceptual loss, frozen, run in float32 (0 = off)
    lpips_net: Literal["vgg", "alex"] = "vgg"  # backbone: VGG16 is the usual training loss, AlexNet the metric
    lpips_start_step: int = 0  # the LPIPS term counts from this step on
    gan_weight: float = 0.0  # PatchGAN hinge loss weight; times λ when gan_adaptive (0 = no discriminator)
    gan_start_step: int = 2000  # generator and discriminator losses from this step on (once reconstruction settled)
    gan_adaptive: bool = True  # VQGAN's adaptive weight λ; False: the fixed weight gan_weight
    gan_max_weight: float = 1e4  # λ is clamped to [0, gan_max_weight]
    disc_lr: float = 1e-4  # the discriminator's own AdamW learning rate (constant)
    disc_betas: tuple[float, float] = (0.5, 0.9)
    disc_channels: int = 64  # width of the first discriminator layer
    disc_layers: int = 3  # strided layers: 3 gives 70×70 patches (30×30 logits at 256 px)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    max_steps: int = 1000  # optimizer steps in the whole run (across resumes)
    time_budget_minutes: float = 0.0  # wall-clock budget of ONE call; checkpoint and stop when hit (0 = none)
    batch_size: int = 16  # per process
    ema_decay: float = 0.999  # 0 disables the EMA (the final model is then the raw weights)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # keep the last k checkpoints
    log_every: int = 50  # train scalars to metrics.jsonl / TensorBoard
    eval_every: int = 500  # validation PSNR and whole-set usage (needs data.val)
    image_every: int = 1000  # reconstruction grid and code-usage histogram images
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto = bf16 on CUDA, off on CPU
    compile: bool = False  # torch.compile the tokenizer
    channels_last: bool = False  # NHWC activations: cuDNN's tensor-core convolutions need no transposes
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # torch's intra-op CPU threads in each training process, set at trainer start. 0 = auto: the value of
    # OMP_NUM_THREADS when set, else 1 on CUDA (the CPU only feeds the GPU, and every-core pools slow a
    # single-GPU run to less than half its images/s), else torch's default on a CPU-only run (every physical core)
    cpu_threads: int = 0
    progress: bool = True  # tqdm bar on rank 0

    def validate(self) -> None:
        def fail(key: str, msg: str) -> None:
            raise TrainConfigError(f"invalid config value for '{key}': {msg}")

        for key, value in [
            ("max_steps", self.max_steps),
            ("batch_size", self.batch_size),
            ("checkpoint_every", self.checkpoint_every),
            ("keep_checkpoints", self.keep_checkpoints),
            ("log_every", self.log_every),
            ("eval_every", self.eval_every),
            ("image_every", self.image_every),
            ("data.val_limit", self.data.val_limit),
        ]:
            if value < 1:
                fail(key, f"must be >= 1, got {value}")
        if self.time_budget_minutes < 0:
            fail("time_budget_minutes", f"must be >= 0, got {self.time_budget_minutes}")
        if not 0 <= self.ema_decay < 1:
            fail("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        mc = self.model
        for key, parts in (("model.init_parts", mc.init_parts), ("model.freeze", mc.freeze)):
            if any(p not in MODEL_PARTS for p in parts):
                fail(key, f"parts are {', '.join(MODEL_PARTS)}; got {parts}")
        if mc.init_parts and not mc.init_from:
            fail("model.init_parts", "names parts of model.init_from, which is not set")
        if mc.init_grow and (not mc.init_from or mc.init_parts or mc.freeze):
            fail("model.init_grow", "needs model.init_from, and neither init_parts nor freeze (it copies whatever fits)")
        if mc.init_from and mc.overrides and not mc.init_parts and not mc.init_grow:
            fail("model.overrides", "change the network that model.init_from gives: name the parts to load in model.init_parts")
        loaded = mc.init_parts or (MODEL_PARTS if mc.init_from and not mc.init_grow else ())
        if any(p not in loaded for p in mc.freeze):
            fail("model.freeze", f"only parts loaded from model.init_from can be frozen (loaded: {list(loaded)}), got {mc.freeze}")
        if self.optim.lr <= 0:
            fail("optim.lr", f"must be > 0, got {self.optim.lr}")
        if self.optim.warmup_steps < 0:
            fail("optim.warmup_steps", f"must be >= 0, got {self.optim.warmup_steps}")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.optim.min_lr_ratio}")
        if self.optim.grad_clip < 0:
            fail("optim.grad_clip", f"must be >= 0, got {self.optim.grad_clip}")
        if any(not 0 <= b < 1 for b in self.optim.betas):
            fail("optim.betas", f"each must be in [0, 1), got {self.optim.betas}")
        if self.data.num_workers < 0:
            fail("data.num_workers", f"must be >= 0, got {self.data.num_workers}")
        if self.data.resolution < 0:
            fail("data.resolution", f"must be >= 0, got {self.data.resolution}")
        if self.cpu_threads < 0:
            fail("cpu_threads", f"must be >= 0 (0 = auto), got {self.cpu_threads}")
        paths = self.data.train_paths()
        if any(not p for p in self.data.extra_train):
            fail("data.extra_train", f"every entry must be a non-empty path, got {self.data.extra_train!r}")
        if self.data.extra_train and not self.data.train:
            fail("data.train", "data.extra_train is set but data.train is empty")
        weights = self.data.train_weights
        if weights and (len(weights) != len(paths) or any(not w > 0 for w in weights)):
            fail("data.train_weights", f"one weight > 0 per source entry (data.train + data.extra_train: {len(paths)}), got {weights}")
        lc = self.loss
        for key, w in [
            ("loss.l1_weight", lc.l1_weight),
            ("loss.l2_weight", lc.l2_weight),
            ("loss.quantizer_weight", lc.quantizer_weight),
            ("loss.lpips_weight", lc.lpips_weight),
            ("loss.gan_weight", lc.gan_weight),
            ("loss.lpips_start_step", lc.lpips_start_step),
            ("loss.gan_start_step", lc.gan_start_step),
        ]:
            if w < 0:
                fail(key, f"must be >= 0, got {w}")
        if lc.l1_weight + lc.l2_weight + lc.lpips_weight <= 0:
            fail("loss.l1_weight", "at least one of loss.l1_weight, loss.l2_weight, loss.lpips_weight must be > 0")
        if lc.gan_max_weight <= 0:
            fail("loss.gan_max_weight", f"must be > 0, got {lc.gan_max_weight}")
        if lc.disc_lr <= 0:
            fail("loss.disc_lr", f"must be > 0, got {lc.disc_lr}")
        if any(not 0 <= b < 1 for b in lc.disc_betas):
            fail("loss.disc_betas", f"each must be in [0, 1), got {lc.disc_betas}")
        if lc.disc_layers < 1 or lc.disc_channels < 1:
            fail("loss.disc_layers", "disc_layers and disc_channels must be >= 1")
        from models.presets import list_presets  # light: models imports torch, but config checks need the registry

        if self.model.preset not in list_presets():
            fail("model.preset", f"unknown preset {self.model.preset!r}; known: {', '.join(list_presets())}")

    def tokenizer_config(self) -> TokenizerConfig:
        """The TokenizerConfig this run trains (preset + overrides), validated by models/."""
        from models.config import ConfigError
        from models.presets import preset_config

        try:
            return preset_config(self.model.preset, **self.model.overrides)
        except ConfigError as exc:
            raise TrainConfigError(f"invalid config value for 'model.overrides': {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# --- building from plain data, with errors that name the key ---


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert `value` to the annotated type `tp`; raise TrainConfigError naming `key`."""

    def bad(expected: str) -> TrainConfigError:
        return TrainConfigError(f"invalid config value for '{key}': expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("a mapping")
        return _from_dict(tp, value, prefix=key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad(f"one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise bad("a list")
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, key) for v in value]
    if origin in (typing.Union, types.UnionType):  # the first type the value fits
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except TrainConfigError:
                continue
        raise bad(" or ".join(_type_name(a) for a in typing.get_args(tp)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _from_dict(cls: type[D], data: dict[str, Any], prefix: str = "") -> D:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        keys = ", ".join(prefix + k for k in unknown)
        raise TrainConfigError(f"unknown config key(s): {keys}; known keys here: {', '.join(prefix + n for n in names)}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """Parse the value of a ``key=value`` override: YAML/JSON scalars and lists, else the raw string."""
    try:
        import yaml

        return yaml.safe_load(text) if text != "" else ""
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {"true": True, "false": False}.get(text.lower(), text)
    except Exception:  # yaml.YAMLError: treat as a plain string
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``a.b.c=value`` overrides to a nested dict (a copy). Unknown keys are caught later."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise TrainConfigError(f"override {item!r} has an empty key")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TrainConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = parse_value(text)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise TrainConfigError(f"{path} is YAML but PyYAML is not installed; install it or use a JSON config") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TrainConfigError(f"{path} is not valid YAML: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainConfigError(f"{path} is not valid JSON: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path} must hold a mapping at the top level")
    return data


def build_config(data: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Plain data (from a file) + dotted overrides -> validated TrainConfig."""
    merged = apply_overrides(data or {}, overrides)
    config = _from_dict(TrainConfig, merged)
    config.validate()
    config.tokenizer_config()  # the model part must build too
    return config


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    return build_config(read_config_file(path) if path else {}, overrides)
