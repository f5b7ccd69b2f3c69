"""Importers: tokenizers of other libraries turned into ordinary vqtok model directories
(config.json with a `source` field, model.safetensors, the ONNX export, model cards).

- `diffusers`: diffusers' `VQModel` (latent-diffusion VQ-f4/f8, aMUSEd's VQGAN, Kandinsky's MoVQ) as
  vqtok's taming network (`models/taming.py`), checked against diffusers on import; needs the
  `vqtok[diffusers]` extra, and only the importer does: the model directory it writes does not.
- `commands`: `vqtok import` (argparse and the torch-free core only at import time).
"""
