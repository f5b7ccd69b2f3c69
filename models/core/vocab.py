"""An LLM's text tokenizer extended with a layout's tokens: what `vqtok vocab extend` writes and reads.

Given a Hugging Face `tokenizer.json`, a layout and a model's codebook size K, the output folder holds
- `tokenizer.json`: the text tokenizer with the K image tokens, then the layout's special tokens,
  added as special tokens. The offset is the base vocabulary size, so the token of image code k gets
  id `offset + k` and special i gets `offset + K + i`: exactly the ids `models.core.layouts` assigns
  (checked by encoding every added token after adding them, before anything is written);
- `vqtok_vocab.json`: the format tag, the layout, offset, K, max_grid, the special ids by name, the
  token spelling, the model's name and weights hash, and the base tokenizer's hash.

Token spelling: image code k is `<|img_00042|>` (k zero-padded to five digits, more when K > 10^5);
special token s is `<|s|>`: `<|boi|>`, `<|eoi|>`, `<|eol|>`, `<|eof|>`, `<|img|>`, `<|h32|>`, `<|w32|>`.

`tokenizers` is imported only when a tokenizer is read or written (the `vqtok[llm]` extra).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artefacts import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, model_name, read_manifest, sha256_file
from .errors import ModelLoadError
from .fileio import atomic_path, atomic_write
from .layouts import DEFAULT_MAX_GRID, Layout, LayoutError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vqtok_vocab.json"
VOCAB_FORMAT = "vqtok-vocab"
VOCAB_VERSION = 1  # written by this vqtok; read: up to this one
LLM_INSTALL = "pip install 'vqtok[llm]'"


class VocabError(ValueError):
    """A text tokenizer or vocabulary file that cannot be extended or read (missing, corrupt, clashing tokens)."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which image tokenizer the extended vocabulary belongs to."""

    name: str
    codebook_size: int
    weights_sha256: str | None  # sha256 of model.safetensors (None: a directory without weights or a recorded hash)


def model_identity(model_dir: str | Path) -> ModelIdentity:
    """Name, K and weights hash of a model directory: K from config.json (FSQ: the product of its levels)
    or the export manifest; the hash of model.safetensors as it is now, else as the manifest recorded it."""
    model_dir = Path(model_dir)
    manifest: dict[str, Any] = read_manifest(model_dir)[0] if (model_dir / MANIFEST_FILE).is_file() else {}
    codebook_size = _config_codebook_size(model_dir / CONFIG_FILE)
    if codebook_size is None:
        try:
            codebook_size = int(manifest["model"]["codebook_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{model_dir} has neither a config.json nor a manifest.json that gives the codebook size") from exc
    weights = model_dir / WEIGHTS_FILE
    if weights.is_file():
        digest: str | None = sha256_file(weights)
    else:
        entry = manifest.get("files", {}).get(WEIGHTS_FILE, {})
        digest = entry.get("sha256") if isinstance(entry, dict) else None
    return ModelIdentity(model_name(model_dir), codebook_size, digest)


def _config_codebook_size(path: Path) -> int | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        size = int(config.get("codebook_size", 0))
        if size == 0 and config.get("fsq_levels"):  # an FSQ config may leave K to be derived from its levels
            size = math.prod(int(level) for level in config["fsq_levels"])
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{path} is corrupt or not a vqtok config: {exc}") from exc
    return size or None


# --- token spelling ---


def image_token_format(codebook_size: int) -> str:
    """The spelling of image tokens for K codes, as a `str.format` template of `code`."""
    return f"<|img_{{code:0{max(5, len(str(codebook_size - 1)))}d}}|>"


def image_token(code: int, codebook_size: int) -> str:
    return image_token_format(codebook_size).format(code=code)


def special_token(name: str) -> str:
    return f"<|{name}|>"


def layout_tokens(layout: Layout) -> list[str]:
    """Every token the layout adds, in id order: token i has id `layout.vocab_offset + i`."""
    k = layout.codebook_size
    spelling = image_token_format(k)
    return [spelling.format(code=code) for code in range(k)] + [special_token(name) for name in layout.special_names]


# --- extending ---


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError(f"reading or extending a Hugging Face tokenizer needs the tokenizers package: {LLM_INSTALL}") from exc
    return tokenizers


def load_text_tokenizer(path: str | Path) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json file, or VocabError in one line."""
    path = Path(path)
    tokenizers = _tokenizers()
    if not path.is_file():
        raise VocabError(f"{path}: no such file (expected a Hugging Face tokenizer.json)")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for any parse failure
        reason = " ".join(str(exc).split())
        raise VocabError(f"{path} is not a Hugging Face tokenizer.json: {reason}") from exc


def extend_tokenizer(
    text_tokenizer: str | Path,
    output: str | Path,
    layout_name: str,
    *,
    codebook_size: int,
    max_grid: int = DEFAULT_MAX_GRID,
    model: ModelIdentity | None = None,
) -> Layout:
    """Write `output`/tokenizer.json (the text tokenizer plus the layout's tokens) and `output`/vqtok_vocab.json;
    return the layout, whose offset is the text tokenizer's vocabulary size."""
    tokenizers = _tokenizers()
    source = Path(text_tokenizer)
    tok = load_text_tokenizer(source)
    offset = int(tok.get_vocab_size(with_added_tokens=True))
    layout = Layout(layout_name, vocab_offset=offset, codebook_size=codebook_size, max_grid=max_grid, text_ids=_base_ids(tok, layout_name))
    tokens = layout_tokens(layout)
    vocab = tok.get_vocab(with_added_tokens=True)
    taken = [t for t in tokens if t in vocab]
    if taken:
        raise VocabError(
            f"{source} already has {len(taken)} of the tokens to add ({', '.join(taken[:3])}...): extend the original tokenizer"
        )
    if vocab and max(vocab.values()) != offset - 1:
        raise VocabError(
            f"{source}: its ids are not 0..{offset - 1} (largest {max(vocab.values())}): image ids would not follow the text ids"
        )
    size_ids = layout.size_text_ids(32, 32) if layout_name == "emu3" else None
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens])
    _verify(tok, layout, tokens, size_ids, source)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TOKENIZER_FILE) as tmp:
        tok.save(str(tmp))
    atomic_write(out / VOCAB_FILE, json.dumps(vocab_record(layout, model, source), indent=2) + "\n")
    return layout


def _base_ids(tok: Any, layout_name: str) -> Any:
    """emu3 writes the grid size as text: its ids come from the text tokenizer itself."""
    if layout_name != "emu3":
        return None
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def _verify(tok: Any, layout: Layout, tokens: list[str], size_ids: tuple[int, ...] | None, source: Path) -> None:
    """Every added token encodes to exactly the layout's id, and the size text (emu3) is unchanged."""
    expected = list(range(layout.vocab_offset, layout.vocab_size_needed))
    got = tok.encode("".join(tokens), add_special_tokens=False).ids
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
        raise VocabError(
            f"{source}: after adding the tokens, {tokens[min(first, len(tokens) - 1)]} encodes to "
            f"{got[first] if first < len(got) else 'nothing'}, not {expected[min(first, len(expected) - 1)]}: this tokenizer "
            "does not give added tokens the next free ids"
        )
    if size_ids is not None and tuple(tok.encode("32*32", add_special_tokens=False).ids) != size_ids:
        raise VocabError(f"{source}: the added tokens change how the size text '32*32' is tokenized")


def vocab_record(layout: Layout, model: ModelIdentity | None, source: Path | None = None) -> dict[str, Any]:
    """The content of vqtok_vocab.json."""
    return {
        "format": VOCAB_FORMAT,
        "format_version": VOCAB_VERSION,
        "layout": layout.name,
        "vocab_offset": layout.vocab_offset,
        "codebook_size": layout.codebook_size,
        "max_grid": layout.max_grid,
        "vocab_size": layout.vocab_size_needed,
        "image_token": image_token_format(layout.codebook_size),
        "special_ids": layout.special_ids(),
        "special_tokens": {name: special_token(name) for name in layout.special_names},
        "model": None
        if model is None
        else {"name": model.name, "codebook_size": model.codebook_size, "weights_sha256": model.weights_sha256},
        "text_tokenizer": None
        if source is None
        else {"file": source.name, "sha256": sha256_file(source), "vocab_size": layout.vocab_offset},
    }


# --- reading back ---


def read_vocab(path: str | Path) -> dict[str, Any]:
    """vqtok_vocab.json (or the folder holding it), checked for its format."""
    path = Path(path)
    file = path / VOCAB_FILE if path.is_dir() else path
    if not file.is_file():
        raise VocabError(f"{file}: no such file (written by `vqtok vocab extend`)")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VocabError(f"{file} is corrupt (not JSON): {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != VOCAB_FORMAT:
        raise VocabError(f"{file} is not a vqtok vocabulary file")
    if int(record.get("format_version", 0)) > VOCAB_VERSION:
        raise VocabError(f"{file} has format_version {record['format_version']}; this vqtok reads up to {VOCAB_VERSION}")
    return record


def read_layout(path: str | Path, *, text_ids: Any = None) -> Layout:
    """The Layout a vqtok_vocab.json describes, checked against the id rule. For emu3, `text_ids` (a
    callable or a tokenizer) defaults to the tokenizer.json beside the file."""
    path = Path(path)
    record = read_vocab(path)
    folder = path if path.is_dir() else path.parent
    if record.get("layout") == "emu3" and text_ids is None:
        text_ids = load_text_tokenizer(folder / TOKENIZER_FILE)
    try:
        layout = Layout(
            str(record["layout"]),
            vocab_offset=int(record["vocab_offset"]),
            codebook_size=int(record["codebook_size"]),
            max_grid=int(record["max_grid"]),
            text_ids=text_ids,
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, LayoutError):
            raise VocabError(f"{folder / VOCAB_FILE}: {exc}") from exc
        raise VocabError(f"{folder / VOCAB_FILE} is incomplete or malformed ({exc!r})") from exc
    if record.get("special_ids") != layout.special_ids():
        raise VocabError(f"{folder / VOCAB_FILE}: its special ids do not follow this vqtok's id rule for {layout.name}")
    return layout
