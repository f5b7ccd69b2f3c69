"""The torch-free floor of vqtok: what every other layer may import.

- `artefacts`: the model directory and export manifest format, hashing, name → directory rule,
  the precision rule.
- `pixels`: the one pixel rule (decoding, EXIF, alpha, grey, resize modes, uint8 <-> [−1, 1]).
- `sources`: the one dataset reader (folders, parquet, webdataset tars).
- `errors`: the error types shared across layers.
- `fileio`: atomic file writes.
- `layouts`: LLM sequence layouts (plain, chameleon, lumina, emu3): grid <-> ids, span parsing, allowed ids.
- `vocab`: a Hugging Face tokenizer.json extended with a layout's tokens, and vqtok_vocab.json (`tokenizers` lazily).

Nothing here imports torch, onnxruntime, fastapi or any other layer of vqtok.
"""
