"""A deeper network grown from a shallower one (`model.init_grow`): every tensor of the source lands on the
tensor of the same role (the encoder aligned at its input, the decoder's blocks at its output) where the
shapes agree, the rest keeps its fresh initialisation, and the grown f16 network starts as a working
tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models.presets import create_tokenizer
from training.config import TrainConfigError, build_config
from training.warmstart import check_growable, grow_into


def small(preset: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_tokenizer(preset, base_channels=8, norm_groups=4, num_res_blocks=1, **overrides)


def test_the_image_side_levels_come_from_the_source_and_the_new_level_is_fresh() -> None:
    source = small("f8-simvq-16k", codebook_size=256)
    target = small("f16-simvq-16k", codebook_size=256, channel_mult=(1, 1, 2, 2, 2))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = grow_into(target, source)
    s, t = source.state_dict(), target.state_dict()
    shift = len(target.decoder.up) - len(source.decoder.up)
    assert shift == 3  # one level more: num_res_blocks + 1 blocks and an upsample in front of the old ones
    for name, tensor in s.items():  # every source tensor is copied: the same widths throughout
        if name.startswith("decoder.up."):
            index, rest = name.split(".", 3)[2:]
            name = f"decoder.up.{int(index) + shift}.{rest}"
        assert torch.equal(t[name], tensor), name
    new = [k for k in t if k.startswith("encoder.down.") and int(k.split(".")[2]) >= len(source.encoder.down)]
    new += [k for k in t if k.startswith("decoder.up.") and int(k.split(".")[2]) < shift]
    assert new and all(torch.equal(t[k], fresh[k]) for k in new)  # the new level keeps its initialisation
    assert (report.copied, report.skipped) == (len(s), 0) and report.fresh == len(t) - len(s)


def test_a_wider_new_level_copies_what_fits_and_skips_the_rest() -> None:
    source = small("f8-simvq-16k", codebook_size=256)
    target = small("f16-simvq-16k", codebook_size=256)  # 2x the channels at the new level: the bottleneck widths differ
    report = grow_into(target, source)
    assert 0 < report.copied < len(source.state_dict()) and report.skipped > 0
    assert torch.equal(target.state_dict()["encoder.conv_in.weight"], source.state_dict()["encoder.conv_in.weight"])


def test_a_shallower_target_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer blocks"):
        grow_into(small("f8-simvq-16k", codebook_size=256), small("f16-simvq-16k", codebook_size=256))


def test_init_grow_needs_init_from_and_excludes_parts() -> None:
    with pytest.raises(TrainConfigError, match="init_grow"):
        build_config({"model": {"preset": "f16-simvq-16k", "init_grow": True}})
    with pytest.raises(TrainConfigError, match="init_grow"):
        build_config({"model": {"preset": "f16-simvq-16k", "init_grow": True, "init_from": "x", "init_parts": ["encoder"]}})
    config = build_config({"model": {"preset": "f16-simvq-16k", "init_grow": True, "init_from": "x", "overrides": {"codebook_size": 256}}})
    assert config.model.init_grow and config.tokenizer_config().downsample == 16


def test_only_vqtoks_own_network_with_the_same_blocks_per_level_grows() -> None:
    source, target = small("f8-simvq-16k", codebook_size=256), small("f16-simvq-16k", codebook_size=256)
    check_growable(source.config, target.config)
    with pytest.raises(ValueError, match="num_res_blocks 1 in the source, 2 in the target"):
        check_growable(source.config, target.config.replace(num_res_blocks=2))
    taming = SimpleNamespace(architecture="taming", num_res_blocks=1)  # an imported network's config, as far as the check reads it
    with pytest.raises(ValueError, match="vqtok's own network only"):
        check_growable(taming, target.config)  # type: ignore[arg-type]
