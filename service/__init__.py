"""The HTTP service: ONNX Runtime sessions, model repository, dynamic batcher, routes. No torch."""
