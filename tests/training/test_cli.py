"""The real `vqtok` command: help, end-to-end train/eval/retrain on real images, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vqtok.cli import main

from .conftest import tiny_overrides

LAUNCH = "import sys; from vqtok.cli import main; sys.exit(main(sys.argv[1:]))"


def vqtok(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""}
    )


@pytest.mark.parametrize("argv", [["train", "--help"], ["eval", "--help"], ["codebook", "retrain", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: vqtok" in capsys.readouterr().out


def test_train_eval_retrain_end_to_end(few_photos: Path, kodak_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(few_photos, val=few_photos, max_steps=3) if not o.startswith("data.train=")]
    assert main(["train", "--out", str(run), "--data", str(few_photos), *overrides]) == 0
    assert main(["train", "--out", str(run), "--resume", "max_steps=4"]) == 0  # saved config + override
    assert json.loads((run / "summary.json").read_text())["step"] == 4
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run / "model"), "--data", str(kodak_dir), "--limit", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 1
    code = main(["codebook", "retrain", "--model", str(run / "model"), "--data", str(few_photos), "--out", str(tmp_path / "m2")])
    assert code == 2  # FSQ: no codebook to retrain, said plainly


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--out", "OUT", "--data", "MISSING"], "does not exist"),
        (["train", "--out", "OUT", "--data", "PHOTOS", "optim.lrr=1"], "unknown config key(s): optim.lrr"),
        (["train", "--out", "OUT", "--data", "PHOTOS", "batch_size=zero"], "'batch_size': expected an integer"),
        (["train", "--out", "OUT", "--config", "MISSING"], "does not exist"),
        (["eval", "--model", "PHOTOS", "--data", "PHOTOS"], "cannot load model directory"),
        (["eval", "--model", "MISSING", "--data", "PHOTOS"], "--model"),
        (["codebook", "retrain", "--model", "PHOTOS", "--data", "MISSING", "--out", "OUT"], "--data"),
    ],
)
def test_bad_input_gives_one_clear_line_and_nonzero_exit(args: list[str], message: str, few_photos: Path, tmp_path: Path) -> None:
    subst = {"OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing"), "PHOTOS": str(few_photos)}
    result = vqtok(*[subst.get(a, a) for a in args])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
