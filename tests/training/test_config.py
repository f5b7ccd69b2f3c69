from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import TrainConfigError, build_config, load_config


def test_defaults_validate_and_round_trip(tmp_path: Path) -> None:
    config = build_config({}, ["optim.lr=1e-4", "model.preset=f8-simvq-16k", "data.cache_in_memory=true", "time_budget_minutes=9"])
    assert config.optim.lr == pytest.approx(1e-4)
    assert config.data.cache_in_memory is True
    assert config.tokenizer_config().codebook_size == 16384
    config.save(tmp_path / "c.json")
    again = load_config(tmp_path / "c.json")
    assert again.to_dict() == config.to_dict()


def test_yaml_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: cifar-simvq\n  overrides: {codebook_size: 512}\nmax_steps: 7\noptim: {betas: [0.5, 0.9]}\n")
    config = load_config(path, ["max_steps=9", "model.overrides.latent_dim=16"])
    assert config.max_steps == 9
    assert config.optim.betas == (0.5, 0.9)
    tok = config.tokenizer_config()
    assert (tok.codebook_size, tok.latent_dim) == (512, 16)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "unknown config key(s): optim.lrr"),
        (["optim.lr=abc"], "'optim.lr': expected a number"),
        (["optim.lr=-1"], "'optim.lr': must be > 0"),
        (["batch_size=2.5"], "'batch_size': expected an integer"),
        (["amp=fp8"], "'amp': expected one of"),
        (["model.preset=nope"], "unknown preset 'nope'"),
        (["model.overrides.codebook_size=1"], "'model.overrides'"),
        (["ema_decay=1"], "'ema_decay'"),
        (["max_steps"], "key=value"),
    ],
)
def test_invalid_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(TrainConfigError) as info:
        build_config({}, overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(TrainConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(TrainConfigError, match="mapping"):
        load_config(tmp_path / "list.json")
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_valid() -> None:
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs, "configs/ should hold the training configs"
    for path in configs:
        load_config(path)
