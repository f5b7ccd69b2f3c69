"""Entry point of one DDP rank for test_trainer (module level so torch.multiprocessing can spawn it)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def run_rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    from training.config import build_config
    from training.trainer import Trainer

    trainer = Trainer(build_config({}, overrides), Path(out) / "run")
    trainer.train()
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    # both ranks are done before either tears its gloo connections down (one rank's process once
    # aborted in teardown under load, "terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
