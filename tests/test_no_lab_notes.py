"""Product code carries no lab notes: no line of the packages cites a git commit.

Comments say why the code is as it is; the figures, the runs that measured them and the commits they
ran at live in BENCHMARKS.md and the JSON under bench/results/. The check: a word-bounded run of 7–40
lowercase hex characters with at least one digit and one letter (an abbreviated or full commit id) in
any .py file of the product packages. A sha256 (64 hex characters) is not 7–40 characters between word
boundaries, and a hex literal (`0x1f2e3d4`) is glued to its `0x`, so neither counts."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("models", "training", "service", "clients", "vqtok")

COMMIT_ID = re.compile(r"(?<![0-9A-Za-z_])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![0-9A-Za-z_])")


def commit_ids(root: Path, packages: tuple[str, ...] = PRODUCT) -> list[str]:
    """`path:line: token` for every token under `root`'s product packages that looks like a commit id."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                found += [f"{path.relative_to(root)}:{number}: {m.group(0)}" for m in COMMIT_ID.finditer(line)]
    return found


def test_product_code_cites_no_commit() -> None:
    found = commit_ids(REPO)
    assert not found, "product code cites commits (move the figure to BENCHMARKS.md, say why in the comment):\n" + "\n".join(found)


def test_the_pattern_takes_commit_ids_and_leaves_other_hex() -> None:
    cites = ["797bc95's H100 run", "(dec86ed, 256², batch 64)", "at 4ce2cf2", "d158d54f0a1b2c3d4e5f60718293a4b5c6d7e8f9"]
    for text in cites:
        assert COMMIT_ID.search(text), text
    fine = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # a sha256 (64 characters)
        "mask = 0x1f2e3d4",  # a hex literal
        "deadbeef",  # no digit
        "1234567 images",  # no letter
        "f8-simvq-16k, fp16, cuda:0, 1e3",  # short tokens
        "Abc1234def",  # upper case: not git's spelling
        "var_ab12cd34",  # part of an identifier
    ]
    for text in fine:
        assert not COMMIT_ID.search(text), text


def test_the_check_catches_a_planted_commit(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "batcher.py").write_text('"""The batcher."""\n\nX = 1  # 3,328 images/s at 27561a8 on the H200\n')
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "hashes.py").write_text('SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"\n')
    assert commit_ids(tmp_path, ("models", "service")) == ["service/batcher.py:3: 27561a8"]
