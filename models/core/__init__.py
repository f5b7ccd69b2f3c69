"""The torch-free floor of vqtok: what every other layer may import.

- `artefacts`: the model directory and export manifest format, hashing, name → directory rule,
  the precision rule.
- `pixels`: the one pixel rule (decoding, EXIF, alpha, grey, resize modes, uint8 <-> [−1, 1]).
- `sources`: the one dataset reader (folders, parquet, webdataset tars).
- `errors`: the error types shared across layers.
- `fileio`: atomic file writes.

Nothing here imports torch, onnxruntime, fastapi or any other layer of vqtok.
"""
