"""models.core.vocab and `vqtok vocab`: a small BPE tokenizer trained here (no download) is extended
with each layout, reloaded with tokenizers and transformers, and its added ids checked against the
layout's; `vocab codebook` against the models' own code vectors; the commands' error paths."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from models.core.artefacts import pretrained_repo, sha256_file
from models.core.layouts import LAYOUTS, Layout
from models.core.vocab import VOCAB_FILE, VocabError, extend_tokenizer, layout_tokens, read_layout, read_vocab

K, MAX_GRID = 300, 8
SHIPPED = "photo-f8-simvq-16k-v2"
SENTENCES = [
    "a photo of a cat sitting on a mat",
    "the quick brown fox jumps over the lazy dog",
    "an image of 32*32 tokens, or 16*16, or 3*5",
    "draw me a lighthouse at dusk",
]


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences, saved as tokenizer.json."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    path = tmp_path_factory.mktemp("text") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("name", LAYOUTS)
def test_extended_tokenizer_gives_the_layout_ids(name: str, text_tokenizer: Path, tmp_path: Path) -> None:
    base = Tokenizer.from_file(str(text_tokenizer))
    layout = extend_tokenizer(text_tokenizer, tmp_path, name, codebook_size=K, max_grid=MAX_GRID)
    assert layout.vocab_offset == base.get_vocab_size(with_added_tokens=True)
    tokens = layout_tokens(layout)
    assert len(tokens) == layout.vocab_size_needed - layout.vocab_offset
    expected = dict(zip(tokens, range(layout.vocab_offset, layout.vocab_size_needed), strict=True))
    assert expected["<|img_00000|>"] == layout.vocab_offset and expected[f"<|img_{K - 1:05d}|>"] == layout.vocab_offset + K - 1
    for spelling, i in layout.special_ids().items():
        assert expected[f"<|{spelling}|>"] == i

    extended = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert {t: extended.token_to_id(t) for t in tokens} == expected
    assert dict(zip(tokens, hf.convert_tokens_to_ids(tokens), strict=True)) == expected
    assert len(hf) == layout.vocab_size_needed
    assert extended.encode("".join(tokens), add_special_tokens=False).ids == list(expected.values())

    grid = np.random.default_rng(0).integers(0, K, size=(3, 5))
    image = layout.to_sequence(grid).tolist()
    ids = base.encode("draw me a cat ").ids + image + base.encode(" at dusk").ids
    text = extended.decode(ids, skip_special_tokens=False)
    assert extended.encode(text, add_special_tokens=False).ids == ids
    assert hf.encode(text, add_special_tokens=False) == ids and hf.decode(ids) == text
    size_text = "3*5" if name == "emu3" else ""  # emu3's size is text, the rest of a span is special tokens
    assert hf.decode(ids, skip_special_tokens=True) == f"draw me a cat {size_text} at dusk"
    (span,) = layout.find_spans(hf.encode(text, add_special_tokens=False), grid=(3, 5) if name in ("plain", "chameleon") else None)
    assert (span.grid == grid).all()

    record = read_vocab(tmp_path)
    assert record["vocab_offset"] == layout.vocab_offset and record["codebook_size"] == K and record["layout"] == name
    assert record["special_ids"] == layout.special_ids() and record["vocab_size"] == layout.vocab_size_needed
    assert record["text_tokenizer"]["sha256"] == sha256_file(text_tokenizer)
    again = read_layout(tmp_path)
    assert again == layout
    assert (again.to_sequence(grid) == layout.to_sequence(grid)).all()


def test_emu3_size_text_is_the_text_tokenizers(text_tokenizer: Path, tmp_path: Path) -> None:
    """The "h*w" of an emu3 span is ordinary text: the same ids from the base tokenizer, the extended
    one, a transformers tokenizer, or a plain callable."""
    layout = extend_tokenizer(text_tokenizer, tmp_path, "emu3", codebook_size=K, max_grid=MAX_GRID)
    base = Tokenizer.from_file(str(text_tokenizer))
    size = base.encode("3*5", add_special_tokens=False).ids
    sequence = layout.to_sequence(np.zeros((3, 5), dtype=np.int64))
    assert sequence[1 : 1 + len(size)].tolist() == size
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text_ids in (base, hf, lambda text: base.encode(text, add_special_tokens=False).ids):
        other = Layout("emu3", vocab_offset=layout.vocab_offset, codebook_size=K, max_grid=MAX_GRID, text_ids=text_ids)
        assert (other.to_sequence(np.zeros((3, 5), dtype=np.int64)) == sequence).all()
    assert hf.decode(sequence.tolist()).startswith("<|boi|>3*5<|img|><|img_00000|>")


def test_extension_errors(text_tokenizer: Path, tmp_path: Path) -> None:
    extend_tokenizer(text_tokenizer, tmp_path / "once", "lumina", codebook_size=K, max_grid=MAX_GRID)
    with pytest.raises(VocabError, match=r"already has \d+ of the tokens to add"):
        extend_tokenizer(tmp_path / "once" / "tokenizer.json", tmp_path / "twice", "lumina", codebook_size=K)
    with pytest.raises(VocabError, match="no such file"):
        extend_tokenizer(tmp_path / "missing.json", tmp_path / "x", "lumina", codebook_size=K)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VocabError, match=r"not a Hugging Face tokenizer\.json"):
        extend_tokenizer(tmp_path / "bad.json", tmp_path / "x", "lumina", codebook_size=K)
    record = json.loads((tmp_path / "once" / VOCAB_FILE).read_text())
    record["special_ids"]["eol"] += 1
    (tmp_path / "once" / VOCAB_FILE).write_text(json.dumps(record))
    with pytest.raises(VocabError, match="id rule"):
        read_layout(tmp_path / "once")


# --- the command line ---


def vqtok(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """The root `vqtok` command with `vocab` registered as the one line in vqtok/cli.py."""
    from models import vocab_commands
    from vqtok import cli

    original = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "vocab" not in sub.choices:
            vocab_commands.register(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    return cli.main(argv)


def test_vocab_extend_with_the_shipped_model(text_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "llm"
    assert (
        vqtok(
            ["vocab", "extend", "--text-tokenizer", str(text_tokenizer), "--layout", "lumina", "--model", SHIPPED, "-o", str(out)],
            monkeypatch,
        )
        == 0
    )
    record = read_vocab(out)
    weights = pretrained_repo() / SHIPPED / "model.safetensors"
    assert record["model"] == {"name": SHIPPED, "codebook_size": 16384, "weights_sha256": sha256_file(weights)}
    layout = read_layout(out)
    assert layout.codebook_size == 16384 and layout.max_grid == 128
    extended = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert extended.token_to_id("<|img_16383|>") == layout.vocab_offset + 16383
    assert extended.token_to_id("<|w128|>") == layout.special_id("w128") == layout.vocab_size_needed - 1


def test_vocab_codebook_is_the_effective_codebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors import safe_open

    from models import Tokenizer as ImageTokenizer

    out = tmp_path / "codebook.safetensors"
    assert vqtok(["vocab", "codebook", "--model", SHIPPED, "-o", str(out)], monkeypatch) == 0
    with safe_open(str(out), framework="pt") as fh:
        vectors = fh.get_tensor("codebook")
        meta = fh.metadata()
    reference = ImageTokenizer.from_pretrained(SHIPPED).quantizer
    assert vectors.dtype == torch.float32 and tuple(vectors.shape) == (16384, 32)
    assert torch.equal(vectors, reference.codebook().detach())  # type: ignore[operator]
    assert not torch.allclose(vectors, reference.basis)  # type: ignore[arg-type]  # SimVQ: after the linear map, not the frozen C
    assert meta["model"] == SHIPPED and meta["weights_sha256"] == sha256_file(pretrained_repo() / SHIPPED / "model.safetensors")


def test_vocab_codebook_of_fsq_is_its_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.numpy import load_file

    from models import create_tokenizer

    model_dir = create_tokenizer("cifar-fsq").save_pretrained(tmp_path / "fsq", model_card=False)
    out = tmp_path / "fsq.safetensors"
    assert vqtok(["vocab", "codebook", "--model", str(model_dir), "-o", str(out)], monkeypatch) == 0
    vectors = load_file(str(out))["codebook"]
    levels = np.array([8, 5, 5, 5])
    k = np.arange(math.prod(levels))[:, None]
    basis = np.cumprod([1, *levels[:-1]])
    half = levels // 2
    expected = ((k // basis) % levels - half) / half  # DESIGN: first channel least significant, codes in [-1, 1]
    assert vectors.shape == (1000, 4) and np.allclose(vectors, expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extend", "--text-tokenizer", "{tmp}/missing.json", "--layout", "lumina", "-o", "{tmp}/out"], "missing.json: no such file"),
        (["extend", "--text-tokenizer", "{tok}", "--layout", "llava", "-o", "{tmp}/out"], "unknown layout 'llava'"),
        (["extend", "--text-tokenizer", "{tok}", "--layout", "lumina", "--model", "no-such-model", "-o", "{tmp}/out"], "no-such-model"),
        (["extend", "--text-tokenizer", "{tok}", "--layout", "lumina", "--max-grid", "0", "-o", "{tmp}/out"], "max_grid must be"),
        (["codebook", "--model", "no-such-model", "-o", "{tmp}/c.safetensors"], "no-such-model"),
        (["codebook", "--model", SHIPPED, "-o", "{tmp}"], "is a folder"),
    ],
)
def test_vocab_errors_are_one_line_and_exit_2(
    args: list[str], message: str, text_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["vocab", *(a.format(tmp=tmp_path, tok=text_tokenizer) for a in args)]
    assert vqtok(argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vqtok vocab: error: ") and message in err
    assert not (tmp_path / "out").exists()
