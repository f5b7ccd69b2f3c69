"""The training recipe (issue 14): loss config, the adaptive GAN weight against
VQGAN's formula, LPIPS in float32 under autocast, the CPU thread budget, several weighted training
sources with a resumable sampler, and the v2/ablation configs training on CPU with LPIPS + GAN on."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from models.presets import preset_config
from models.tokenizer import Tokenizer
from tests.helpers import free_port
from training.config import TrainConfigError, build_config, load_config
from training.data import DataError, MixtureSampler, StreamSampler, open_train_sources
from training.losses import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss, last_layer_grads
from training.lpips import LPIPS, weights_installed
from training.trainer import Trainer, cpu_thread_budget

from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
RECIPE_CONFIGS = ["v2-f8-simvq-16k.yaml", "ablation-l1.yaml", "ablation-lpips.yaml", "ablation-lpips-gan.yaml", "v2-wide-decoder.yaml"]
V1 = ROOT / "models" / "pretrained" / "photo-f8-simvq-16k"
needs_lpips = pytest.mark.skipif(not weights_installed(), reason="LPIPS weights not installed: run `python -m training.lpips fetch`")


def _link(photos: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for src in photos:
        (folder / src.name).symlink_to(src.resolve())
    return folder


@pytest.fixture
def two_groups(few_photos: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A main folder of 3 photos and `extra/` holding folders of 3 and 2 (a glob group)."""
    photos = sorted(few_photos.iterdir())
    main = _link(photos[:3], tmp_path / "main")
    _link(photos[3:6], tmp_path / "extra" / "a")
    _link(photos[6:8], tmp_path / "extra" / "b")
    (tmp_path / "extra" / "manifest.tsv").write_text("not a source\n")
    return main, tmp_path / "extra"


# --- config ---


def test_an_unknown_loss_key_names_itself() -> None:
    with pytest.raises(TrainConfigError, match="recon"):
        build_config({"loss": {"recon": "l1"}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.lpips_weight=-1"], "'loss.lpips_weight'"),
        (["loss.lpips_net=squeeze"], "'loss.lpips_net': expected one of"),
        (["loss.gan_start_step=-1"], "'loss.gan_start_step'"),
        (["loss.disc_betas=[0.5, 1.0]"], "'loss.disc_betas'"),
        (["loss.l1_weight=0"], "at least one of"),
        (["cpu_threads=-2"], "'cpu_threads'"),
        (["data.train=a", "data.extra_train=[b]", "data.train_weights=[1]"], "'data.train_weights'"),
        (["data.train=a", "data.train_weights=[0]"], "'data.train_weights'"),
        (["data.extra_train=b"], "'data.extra_train': expected a list"),
        (["data.extra_train=[b]"], "'data.train'"),
    ],
)
def test_recipe_values_are_validated(overrides: list[str], message: str) -> None:
    with pytest.raises(TrainConfigError) as info:
        build_config({}, overrides)
    assert message in str(info.value)


def test_cpu_thread_budget_rule() -> None:
    assert cpu_thread_budget(0, "cuda", {}) == 1  # one thread per GPU process
    assert cpu_thread_budget(0, "cuda", {"OMP_NUM_THREADS": "4"}) == 4  # the environment's choice (torchrun sets 1)
    assert cpu_thread_budget(3, "cuda", {"OMP_NUM_THREADS": "4"}) == 3  # an explicit setting wins
    assert cpu_thread_budget(0, "cpu", {}) is None  # CPU-only: torch's default, every physical core
    assert cpu_thread_budget(0, "cpu", {"OMP_NUM_THREADS": "2"}) == 2
    assert cpu_thread_budget(0, "cuda", {"OMP_NUM_THREADS": "lots"}) == 1


def test_trainer_applies_its_thread_budget(few_photos: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        Trainer(build_config({}, tiny_overrides(few_photos, cpu_threads=2)), tmp_path / "run")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- losses ---


def test_hinge_losses() -> None:
    assert float(hinge_d_loss(torch.tensor([2.0, 1.0]), torch.tensor([-3.0, -1.0]))) == 0.0  # confident and right: no loss
    assert float(hinge_d_loss(torch.tensor([0.0]), torch.tensor([0.0]))) == pytest.approx(1.0)
    assert float(generator_loss(torch.tensor([[0.5, 1.5]]))) == pytest.approx(-1.0)


def test_patch_discriminator_is_a_70px_patchgan() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(64, 3)
    assert disc(torch.zeros(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    first = disc.net[0]
    assert isinstance(first, torch.nn.Conv2d) and abs(float(first.weight.detach().std()) - 0.02) < 0.003


def test_adaptive_weight_and_decoupled_backward_match_vqgan() -> None:
    """λ from output gradients through the last layer equals autograd.grad(L, W) (taming's
    calculate_adaptive_weight), and backpropagating ⟨x̂, g⟩ gives every parameter the gradient of
    the whole loss."""
    torch.manual_seed(0)
    model = Tokenizer(preset_config("cifar-simvq", base_channels=8, norm_groups=4, num_res_blocks=1))
    disc = PatchDiscriminator(8, 2)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    last = model.decoder.conv_out.weight

    def nll_of(rec: torch.Tensor) -> torch.Tensor:
        return (rec - x).abs().mean() + 0.5 * (rec - x).pow(2).mean()

    # VQGAN / LlamaGen: gradients of the two losses at the last layer, directly
    out = model(x)
    nll, g_loss = nll_of(out.reconstruction), generator_loss(disc(out.reconstruction))
    nll_w = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_w = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    lam_ref = (nll_w.norm() / (g_w.norm() + 1e-4)).clamp(0, 1e4)
    total = nll + out.quantizer.loss + 0.5 * lam_ref.detach() * g_loss
    ref_grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)

    # the trainer's way: losses on a detached copy, then one backward of ⟨x̂, g⟩
    out = model(x)
    rec = out.reconstruction
    r = rec.detach().requires_grad_(True)
    g_nll = torch.autograd.grad(nll_of(r), r)[0]
    g_adv = torch.autograd.grad(generator_loss(disc(r)), r)[0]
    lam = adaptive_weight(*last_layer_grads(rec, last, g_nll, g_adv))
    torch.testing.assert_close(lam, lam_ref.detach(), rtol=1e-5, atol=0)
    surrogate = (rec * (g_nll + 0.5 * lam * g_adv)).sum() + out.quantizer.loss
    grads = torch.autograd.grad(surrogate, list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), ref_grads, grads, strict=True):
        if a is None:
            assert b is None or not b.any(), name
            continue
        assert b is not None, name
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7, msg=name)
    assert adaptive_weight(torch.ones(4), torch.zeros(4), max_weight=10.0) == 10.0  # the clamp


@needs_lpips
def test_lpips_loss_is_float32_under_autocast(few_photos: Path, tmp_path: Path) -> None:
    trainer = Trainer(build_config({}, tiny_overrides(few_photos, **{"loss.lpips_weight": 1.0})), tmp_path / "run")
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    reference = LPIPS.load("vgg")(x, y).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = trainer.perceptual(x, y)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, reference, rtol=1e-6, atol=0)


# --- several training sources ---


def test_train_sources_with_a_glob_and_weights(two_groups: tuple[Path, Path]) -> None:
    main, extra = two_groups
    multi, weights = open_train_sources([str(main), str(extra / "*")], [1.0, 3.0])
    assert multi.sizes == [3, 3, 2] and len(multi) == 8
    assert multi.names[1:] == [str(extra / "a"), str(extra / "b")]
    assert weights == pytest.approx([0.25, 0.75 * 3 / 5, 0.75 * 2 / 5])  # a glob's share split by size
    assert multi.locate(3) == (1, 0) and multi.item(7).key == sorted(p.name for p in (extra / "b").iterdir())[1]
    assert open_train_sources([str(main), str(extra / "*")])[1] is None  # no weights: uniform over all images
    with pytest.raises(DataError, match="matches no folder"):
        open_train_sources([str(main), str(extra / "nothing*")])


def test_mixture_sampler_resumes_exactly_and_follows_the_weights() -> None:
    sizes, weights = [3, 5, 2], [0.2, 0.5, 0.3]
    sampler = MixtureSampler(sizes, weights, seed=4)
    sampler.CHUNK = 16  # cross many draw blocks
    it = iter(sampler)
    stream = [next(it) for _ in range(3000)]
    assert [p for _, p in stream] == list(range(3000))
    for start in (0, 7, 16, 50, 1001):  # resume anywhere, inside a block or at its edge
        again = MixtureSampler(sizes, weights, seed=4, start=start)
        again.CHUNK = 16
        it2 = iter(again)
        assert [next(it2) for _ in range(40)] == stream[start : start + 40]
    # ranks take interleaved positions of the one stream
    for rank in (0, 1):
        part = MixtureSampler(sizes, weights, seed=4, rank=rank, world=2, start=6)
        part.CHUNK = 16
        it3 = iter(part)
        assert [next(it3) for _ in range(30)] == stream[6 + rank : 66 + rank : 2]
    # the shares follow the weights; within a source each epoch is one pass over its images
    source_of = [0] * 3 + [1] * 5 + [2] * 2
    shares = Counter(source_of[i] for i, _ in stream)
    for s, w in enumerate(weights):
        assert abs(shares[s] / len(stream) - w) < 0.03
    per_source: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i, _ in stream:
        per_source[source_of[i]].append(i)
    for s, seen in per_source.items():
        n = sizes[s]
        for e in range(len(seen) // n):
            assert sorted(seen[e * n : (e + 1) * n]) == list(range(sum(sizes[:s]), sum(sizes[:s]) + n))


def test_unweighted_sources_are_one_concatenated_stream(two_groups: tuple[Path, Path], tmp_path: Path) -> None:
    main, extra = two_groups
    overrides = tiny_overrides(main, max_steps=1, **{"data.extra_train": f"[{extra / '*'}]"})
    trainer = Trainer(build_config({}, overrides), tmp_path / "run")
    assert len(trainer.train_source) == 8 and trainer.train_weights is None
    it = iter(StreamSampler(8, seed=0))
    assert sorted(next(it)[0] for _ in range(8)) == list(range(8))


# --- the shipped recipe configs ---


@needs_lpips
@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_recipe_config_trains_two_steps_on_cpu(name: str, two_groups: tuple[Path, Path], tmp_path: Path) -> None:
    main, extra = two_groups
    base = load_config(ROOT / "configs" / name)
    assert base.tokenizer_config().codebook_size == 16384 and base.tokenizer_config().downsample == 8
    overrides = [
        # the recipe on a tiny network: not the v1 weights the configs start from (tested below)
        "model.init_from=",
        "model.init_parts=[]",
        "model.freeze=[]",
        "model.overrides={base_channels: 8, norm_groups: 4, num_res_blocks: 1}",
        f"data.train={main}",
        f"data.extra_train=[{extra / '*'}]" if base.data.extra_train else "data.extra_train=[]",
        f"data.val={main}",
        "data.val_limit=2",
        "data.resolution=32",
        "data.num_workers=0",
        "data.cache_in_memory=false",
        "batch_size=2",
        "max_steps=2",
        "optim.warmup_steps=1",
        "time_budget_minutes=0",
        "log_every=1",
        "eval_every=2",
        "image_every=2",
        "checkpoint_every=2",
        "compile=false",
        "device=cpu",
        "progress=false",
        "loss.gan_start_step=0",
        "loss.lpips_start_step=0",
    ]
    config = build_config(base.to_dict(), overrides)
    result = Trainer(config, tmp_path / "run").train()
    assert result.finished and result.step == 2
    train = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    keys = set(train[-1])
    assert {"l1", "l2", "loss"} <= keys
    if config.loss.lpips_weight > 0:
        assert "lpips" in keys
    if config.loss.gan_weight > 0:
        assert {"g_loss", "d_loss", "adaptive_weight", "g_weight", "logits_real", "logits_fake"} <= keys
        assert all(torch.isfinite(torch.tensor(train[-1][k])) for k in ("g_loss", "d_loss", "adaptive_weight"))


def test_recipe_configs_and_finetune_script() -> None:
    configs = {name: load_config(ROOT / "configs" / name) for name in RECIPE_CONFIGS}
    v2, l1, lp, gan, wide = configs.values()
    assert v2.loss.lpips_weight == 1.0 and v2.loss.lpips_net == "vgg" and v2.loss.gan_weight == 0.5 and v2.loss.gan_adaptive
    assert v2.data.extra_train and v2.ema_decay > 0
    # v2 and the three arms fine-tune the v1 model; the arms on one budget, one change per arm
    for c in (v2, l1, lp, gan):
        assert c.model.init_from == "models/pretrained/photo-f8-simvq-16k" and not c.model.init_parts and not c.model.freeze
    assert l1.max_steps == lp.max_steps == gan.max_steps and l1.batch_size == lp.batch_size == gan.batch_size
    assert (l1.loss.lpips_weight, l1.loss.gan_weight) == (0.0, 0.0)
    assert (lp.loss.lpips_weight, lp.loss.gan_weight) == (1.0, 0.0)
    assert gan.loss.lpips_weight == 1.0 and gan.loss.gan_weight > 0 and 0 < gan.loss.gan_start_step < gan.max_steps
    for c in (lp, gan):
        assert c.data == l1.data and c.optim == l1.optim
    # the wide-decoder candidate: v1's encoder and codebook, frozen; only the decoder is new
    assert wide.model.init_parts == wide.model.freeze == ["encoder", "quantizer"]
    assert wide.model.overrides == {"decoder_channels": 96}
    script = ROOT / "scripts" / "gpu" / "finetune.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "for arm in l1 lpips lpips-gan" in text and "configs/ablation-$arm.yaml" in text
    assert "configs/v2-f8-simvq-16k.yaml" in text and "configs/v2-wide-decoder.yaml" in text
    assert sorted(p.name for p in (ROOT / "configs").glob("ablation-*.yaml")) == sorted(RECIPE_CONFIGS[1:4])


# --- starting from a trained model: named parts, frozen parts, a wider decoder ---


def _tiny_source(tmp_path: Path) -> Path:
    model = Tokenizer(preset_config("cifar-fsq", base_channels=8, norm_groups=4, num_res_blocks=1))
    return Path(model.save_pretrained(tmp_path / "source"))


def _init_overrides(source: Path, photos: Path, *extra: str) -> list[str]:
    return [
        "model.preset=cifar-fsq",
        f"model.init_from={source}",
        f"data.train={photos}",
        "data.resolution=32",
        "data.num_workers=0",
        "batch_size=2",
        "max_steps=2",
        "optim.warmup_steps=1",
        "optim.lr=1e-2",
        "ema_decay=0",
        "log_every=1",
        "eval_every=100",
        "image_every=100",
        "checkpoint_every=100",
        "compile=false",
        "device=cpu",
        "progress=false",
        *extra,
    ]


def test_wider_decoder_from_frozen_encoder_and_quantizer(few_photos: Path, tmp_path: Path) -> None:
    source_dir = _tiny_source(tmp_path)
    source = Tokenizer.from_pretrained(source_dir)
    overrides = _init_overrides(
        source_dir,
        few_photos,
        "model.init_parts=[encoder, quantizer]",
        "model.freeze=[encoder, quantizer]",
        "model.overrides={decoder_channels: 16}",
    )
    trainer = Trainer(build_config({}, overrides), tmp_path / "run")
    model = trainer.model
    assert model.config.decoder_channels == 16 and model.config.base_channels == 8
    assert model.decoder.conv_in.out_channels == 16 * model.config.channel_mult[-1]  # twice the source's width
    assert model.decoder.conv_in.out_channels == 2 * source.decoder.conv_in.out_channels
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.decoder.parameters()}  # only the new decoder learns
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.train()
    assert result.finished
    after = Tokenizer.from_pretrained(tmp_path / "run" / "model")
    for name, value in after.state_dict().items():
        if name.startswith(("encoder.", "quantizer.")):  # the source's weights, untouched: the same tokens
            torch.testing.assert_close(value, source.state_dict()[name], rtol=0, atol=0)
    assert any(not torch.equal(after.state_dict()[k], before[k]) for k in before if k.startswith("decoder."))
    # the exported config names the wider decoder; a config without it reads as before
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["decoder_channels"] == 16
    assert "decoder_channels" not in json.loads((source_dir / "config.json").read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.init_from=", "model.init_parts=[encoder]"], "model.init_from, which is not set"),
        (["model.overrides={decoder_channels: 16}"], "name the parts to load in model.init_parts"),
        (["model.init_parts=[encoder]", "model.freeze=[decoder]"], "only parts loaded from model.init_from can be frozen"),
        (["model.init_parts=[encoders]"], "parts are encoder, quantizer, decoder"),
    ],
)
def test_init_parts_and_freeze_are_validated(few_photos: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        build_config({}, _init_overrides(tmp_path / "absent", few_photos, *extra))


def test_init_part_that_does_not_fit_is_a_clear_error(few_photos: Path, tmp_path: Path) -> None:
    source_dir = _tiny_source(tmp_path)
    overrides = _init_overrides(source_dir, few_photos, "model.init_parts=[decoder]", "model.overrides={decoder_channels: 16}")
    with pytest.raises(TrainConfigError, match=r"decoder of .* does not fit the new network"):
        Trainer(build_config({}, overrides), tmp_path / "run")


# --- DDP with the discriminator ---


def _run_gan_rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    import os

    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    trainer = Trainer(build_config({}, overrides), Path(out) / "run")
    trainer.train()
    assert isinstance(trainer.disc, DistributedDataParallel)
    state = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"disc.{k}": v.clone() for k, v in trainer.disc.module.state_dict().items()})
    torch.save(state, Path(out) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_process_ddp_with_the_discriminator_keeps_replicas_identical(few_photos: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        few_photos, max_steps=3, checkpoint_every=3, **{"loss.gan_weight": 0.5, "loss.gan_start_step": 1, "loss.disc_channels": 8}
    )
    mp.spawn(_run_gan_rank, args=(2, free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert any(k.startswith("disc.") for k in r0)
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
    init = Trainer(build_config({}, overrides), tmp_path / "init")
    assert init.disc is not None
    disc0 = init.disc.state_dict()
    assert any(not torch.equal(disc0[k], r0["disc." + k]) for k in disc0), "the discriminator did not train"
