from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.tokenizer import Tokenizer
from tests.helpers import free_port
from training.checkpointing import list_checkpoints, load_checkpoint
from training.config import build_config
from training.data import Augment, ImageDataset, open_source, to_float
from training.lpips import weights_installed
from training.trainer import Trainer

from .conftest import tiny_overrides
from .ddp_worker import run_rank


def _l1_on(model: Tokenizer, images: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        x = to_float(images)
        return float((model(x).reconstruction - x).abs().mean())


def test_few_steps_lower_the_loss(few_photos: Path, tmp_path: Path) -> None:
    config = build_config({}, tiny_overrides(few_photos, max_steps=20, ema_decay=0.0, **{"optim.lr": 5e-3}))
    trainer = Trainer(config, tmp_path / "run")
    dataset = ImageDataset(open_source(few_photos), Augment(32, "center_crop", flip=False))
    images = torch.stack([dataset[i] for i in range(8)])  # type: ignore[misc]
    before = _l1_on(trainer.model, images)
    result = trainer.train()
    after = _l1_on(trainer.model, images)
    assert result.finished and result.step == 20
    assert after < 0.9 * before, (before, after)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    model = Tokenizer.from_pretrained(tmp_path / "run" / "model")  # the final artefact loads
    assert model.codebook_size == 1000


def _states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_killed_and_resumed_equals_uninterrupted(few_photos: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(few_photos, max_steps=6, **{"data.num_workers": 1})
    straight = Trainer(build_config({}, overrides), tmp_path / "a")
    straight.train()

    first = Trainer(build_config({}, overrides), tmp_path / "b")
    stopped = first.train(stop_at_step=3)  # the process "dies" after the step-3 checkpoint
    assert (stopped.step, stopped.finished) == (3, False)
    del first
    resumed = Trainer(build_config({}, overrides), tmp_path / "b", resume=True)
    assert resumed.step == 3
    result = resumed.train()
    assert result.step == straight.step == 6

    _states_close(straight.model.state_dict(), resumed.model.state_dict())
    assert straight.ema is not None and resumed.ema is not None
    _states_close(straight.ema.model.state_dict(), resumed.ema.model.state_dict())
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in sa:
        torch.testing.assert_close(sa[key]["exp_avg_sq"], sb[key]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    # and the weights did change, so the comparison means something
    fresh = Trainer(build_config({}, overrides), tmp_path / "c")
    assert not torch.allclose(fresh.model.decoder.conv_out.weight, resumed.model.decoder.conv_out.weight)


@pytest.mark.parametrize(
    "lpips",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(not weights_installed(), reason="LPIPS weights not installed: run `python -m training.lpips fetch`"),
        ),
    ],
)
def test_resume_is_exact_with_gan_lpips_and_weighted_sources(lpips: bool, few_photos: Path, tmp_path: Path) -> None:
    # LPIPS from step 1 and the GAN from step 2 are both on across the step-3 resume point; two
    # sources mixed 1:2 by the weighted sampler
    extra = tmp_path / "extra"
    extra.mkdir()
    for src in sorted(few_photos.iterdir())[:3]:
        (extra / src.name).symlink_to(src.resolve())
    loss = {"loss.lpips_weight": 1.0 if lpips else 0.0, "loss.lpips_start_step": 1, "loss.gan_weight": 0.5, "loss.gan_start_step": 2}
    data = {"data.extra_train": f"[{extra}]", "data.train_weights": "[1, 2]", "loss.disc_channels": 8}
    overrides = tiny_overrides(few_photos, max_steps=6, **loss, **data)
    straight = Trainer(build_config({}, overrides), tmp_path / "a")
    straight.train()

    first = Trainer(build_config({}, overrides), tmp_path / "b")
    first.train(stop_at_step=3)
    del first
    resumed = Trainer(build_config({}, overrides), tmp_path / "b", resume=True)
    assert resumed.step == 3
    assert resumed.train().step == straight.step == 6
    _states_close(straight.model.state_dict(), resumed.model.state_dict())
    assert straight.ema is not None and resumed.ema is not None
    _states_close(straight.ema.model.state_dict(), resumed.ema.model.state_dict())
    assert straight.disc is not None and resumed.disc is not None and straight.disc_opt is not None and resumed.disc_opt is not None
    _states_close(straight.disc.state_dict(), resumed.disc.state_dict())
    da, db = straight.disc_opt.state_dict()["state"], resumed.disc_opt.state_dict()["state"]
    assert da.keys() == db.keys() and da
    for key in da:
        torch.testing.assert_close(da[key]["exp_avg_sq"], db[key]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "train"][-1]
    assert {"g_loss", "d_loss", "adaptive_weight", "logits_real", "logits_fake"} <= set(last)
    assert ("lpips" in last) == lpips
    fresh = Trainer(build_config({}, overrides), tmp_path / "c")
    assert fresh.disc is not None
    assert not torch.allclose(fresh.disc.state_dict()["net.0.weight"], resumed.disc.state_dict()["net.0.weight"])


def _with_broken(few_photos: Path, folder: Path, good: int, broken: int) -> Path:
    """`good` real photos then `broken` undecodable files (they sort last: source indices good…)."""
    folder.mkdir()
    for src in sorted(few_photos.iterdir())[:good]:
        (folder / src.name).symlink_to(src.resolve())
    for i in range(broken):
        (folder / f"zz_broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return folder


def test_resume_is_exact_across_empty_and_short_batches(few_photos: Path, tmp_path: Path) -> None:
    # 2 readable + 2 broken, batch 2, seed 0: the stream's batches hold 2, 0, 1, 1 | 2, 0, 0, 2, 1 readable
    # images, so the first call skips an empty batch and trains on short ones before its step-3 checkpoint
    data = _with_broken(few_photos, tmp_path / "data", good=2, broken=2)
    overrides = tiny_overrides(data, max_steps=6, batch_size=2)
    straight = Trainer(build_config({}, overrides), tmp_path / "a")
    straight.train()

    first = Trainer(build_config({}, overrides), tmp_path / "b")
    first.train(stop_at_step=3)
    assert (first.step, first.data_position, first.skipped_images) == (3, 8, 4)  # 4 batches drawn for 3 steps
    del first
    resumed = Trainer(build_config({}, overrides), tmp_path / "b", resume=True)
    assert (resumed.step, resumed.data_position) == (3, 8)
    assert resumed.train().step == 6
    assert resumed.data_position == straight.data_position == 18
    assert resumed.skipped_images == straight.skipped_images == 9
    _states_close(straight.model.state_dict(), resumed.model.state_dict())
    assert straight.ema is not None and resumed.ema is not None
    _states_close(straight.ema.model.state_dict(), resumed.ema.model.state_dict())


def test_time_budget_stops_checkpoints_and_resumes(few_photos: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(few_photos, max_steps=1000, time_budget_minutes=0.0001, checkpoint_every=500, keep_checkpoints=1)
    result = Trainer(build_config({}, overrides), tmp_path / "run").train()
    assert not result.finished and result.stop_reason == "time_budget" and result.step < 1000
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [result.step]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "time_budget" and not summary["finished"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()  # usable after every call
    more = Trainer(
        build_config({}, [*overrides, "time_budget_minutes=0", "max_steps=" + str(result.step + 2)]), tmp_path / "run", resume=True
    )
    assert more.train().step == result.step + 2


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_model(few_photos: Path, tmp_path: Path) -> None:
    """A scheduler's pre-emption or a script ending a detached run (scripts/gpu/budgets.sh stop): the run
    stops as its time budget would, resumable, with the exported model."""
    import os
    import signal
    import threading

    overrides = tiny_overrides(few_photos, max_steps=100000, checkpoint_every=100000)
    trainer = Trainer(build_config({}, overrides), tmp_path / "run")
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    result = trainer.train()
    assert not result.finished and result.stop_reason == "terminated" and 0 < result.step < 100000
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [result.step]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stop_reason"] == "terminated"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the trainer's only while it trains


def test_two_process_ddp_keeps_replicas_identical(few_photos: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(few_photos, max_steps=3, checkpoint_every=3)
    mp.spawn(run_rank, args=(2, free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
    init = Trainer(build_config({}, overrides), tmp_path / "init").model.state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in r0), "DDP run did not train"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3


def test_two_process_ddp_skips_an_empty_batch_on_one_rank_together(few_photos: Path, tmp_path: Path) -> None:
    # 3 readable + 1 broken, batch 1 per rank: with seed 0 the broken image falls to rank 0 on the
    # 2nd batch and to rank 1 on the 3rd; both ranks must skip both (before this, a hang)
    data = _with_broken(few_photos, tmp_path / "data", good=3, broken=1)
    overrides = tiny_overrides(data, max_steps=3, checkpoint_every=3, batch_size=1, log_every=1)
    ctx = mp.spawn(run_rank, args=(2, free_port(), overrides, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 540  # a hang guard under pytest's 600 s: ≈ 15 s alone, 75 s beside 3 busy cores' worth
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise AssertionError("the DDP run hung on an empty batch")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3 and summary["finished"]
    [(_, path)] = list_checkpoints(tmp_path / "run")
    assert load_checkpoint(path)["data_position"] == 10  # 5 batches of 2 drawn, 2 of them skipped
