"""Tokenizer, config, presets and checkpoints."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from models.config import ConfigError, TokenizerConfig
from models.presets import create_tokenizer, list_presets
from models.tokenizer import CheckpointError, Tokenizer

TINY = dict(base_channels=8, norm_groups=4, num_res_blocks=1)


def test_registry_has_the_required_presets() -> None:
    names = set(list_presets())
    assert {"cifar-vq-rotation", "cifar-simvq", "cifar-fsq"} <= names
    configs = {n: create_tokenizer(n, **TINY).config for n in names}
    simvq_256 = {(c.downsample, c.codebook_size) for c in configs.values() if c.resolution == 256 and c.linear_codebook}
    assert {(8, 16384), (16, 65536)} <= simvq_256
    fsq_levels = {c.fsq_levels for c in configs.values() if c.resolution == 256 and c.quantizer == "fsq"}
    assert {(8, 8, 8, 5, 5, 5), (8, 5, 5, 5)} <= fsq_levels


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    tok = create_tokenizer(name)
    f = tok.downsample
    x = torch.rand(2, 3, 2 * f, 3 * f) * 2 - 1
    out = tok(x)
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, 2, 3)
    loss = (out.reconstruction - x).abs().mean() + out.loss
    loss.backward()
    grads = [p.grad for p in tok.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads if g is not None), "no gradient reached the encoder"


@pytest.mark.parametrize("name", ["cifar-vq-rotation", "cifar-fsq", "f8-simvq-16k", "f16-fsq-1k"])
@pytest.mark.parametrize("hw", [(32, 32), (48, 80), (96, 32)])
def test_encode_decode_shapes_and_dtypes(name: str, hw: tuple[int, int]) -> None:
    tok = create_tokenizer(name, **TINY).eval()
    h, w = hw
    f = tok.downsample
    if h % f or w % f:
        pytest.skip("size not divisible by this preset's downsample factor")
    x = torch.rand(3, 3, h, w) * 2 - 1
    ids = tok.encode(x)
    assert ids.dtype == torch.int64 and ids.shape == (3, h // f, w // f)
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.codebook_size
    y = tok.decode(ids)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    assert torch.equal(tok.encode(x), ids)  # deterministic


def test_save_load_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    tok = create_tokenizer("cifar-simvq").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids, y = tok.encode(x), tok.decode(tok.encode(x))
    tok.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]  # README.md: the hub model card
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)  # the weights too (safetensors writes its own file 0600)
    loaded = Tokenizer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == tok.config
    assert torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.decode(ids), y)


def test_wrong_input_shapes_are_clear_errors() -> None:
    tok = create_tokenizer("cifar-fsq", **TINY)
    with pytest.raises(ValueError, match="multiples of 4"):
        tok.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        tok.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        tok.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="token ids must lie in"):
        tok.decode(torch.full((1, 8, 8), tok.codebook_size))
    with pytest.raises(ValueError, match="token ids"):
        tok.decode(torch.zeros(8, 8, dtype=torch.long))


def test_corrupt_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    tok = create_tokenizer("cifar-vq-rotation", **TINY)
    d = tok.save_pretrained(tmp_path / "m")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        Tokenizer.from_pretrained(d)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        Tokenizer.from_pretrained(d)
    tok.save_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Tokenizer.from_pretrained(d)
    cfg = tok.config.to_dict() | {"codebook_size": 512}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        Tokenizer.from_pretrained(d)
    with pytest.raises(CheckpointError, match="missing"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quantizer": "fsq", "fsq_levels": (8, 5), "latent_dim": 3, "codebook_size": 40, "linear_codebook": False}, "latent_dim"),
        ({"quantizer": "fsq", "fsq_levels": (8, 5), "latent_dim": 2, "codebook_size": 41, "linear_codebook": False}, "prod"),
        ({"quantizer": "fsq", "fsq_levels": (8, 5), "latent_dim": 2, "codebook_size": 40}, "linear_codebook"),
        ({"fsq_levels": (8, 5)}, "fsq_levels given"),
        ({"channel_mult": (1, 2)}, "downsample 2"),
        ({"resolution": 100}, "multiple"),
        ({"gradient": "magic"}, "gradient"),
        ({"base_channels": 10, "norm_groups": 4}, "divisible"),
        ({"norm_groups": 0}, "must be positive"),
    ],
)
def test_invalid_config_combinations(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TokenizerConfig(**changes)  # type: ignore[arg-type]


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = create_tokenizer("f16-fsq-1k", **TINY).config
    assert TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        TokenizerConfig.from_dict(cfg.to_dict() | {"codebok_size": 3})
    with pytest.raises(KeyError, match="unknown preset"):
        create_tokenizer("no-such-preset")


def test_wider_decoder_config(tmp_path: Path) -> None:
    """decoder_channels widens only the decoder; 0 (the default) is left out of config.json, so configs
    written before the field existed, and older readers of new default configs, see the same keys."""
    base = TokenizerConfig(base_channels=8, norm_groups=4, num_res_blocks=1, channel_mult=(1, 2, 2, 2))
    assert base.decoder_base_channels == 8 and "decoder_channels" not in base.to_dict()
    wide = base.replace(decoder_channels=16)
    assert wide.to_dict()["decoder_channels"] == 16 and TokenizerConfig.from_dict(wide.to_dict()) == wide
    model = Tokenizer(wide)
    assert [m.out_channels for m in (model.encoder.conv_in, model.decoder.conv_in)] == [8, 32]
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model(x).reconstruction.shape == x.shape
    back = Tokenizer.from_pretrained(model.save_pretrained(tmp_path / "wide"))
    assert back.config == wide
    with pytest.raises(ConfigError, match="decoder_channels must be >= 0"):
        base.replace(decoder_channels=-1)
    with pytest.raises(ConfigError, match="not divisible by norm_groups"):
        base.replace(decoder_channels=6)
