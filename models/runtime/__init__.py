"""How an exported model directory runs, whoever calls it (the service, the local backend, dataset
tokenization): one `Runtime` contract, ONNX Runtime (`onnx`, torch-free, CPU or CUDA), the compiled GPU
runtime (`compiled`, torch; imported only when chosen), and the rule that picks one (`load_runtime`)."""

from .base import Runtime
from .choose import RUNTIMES, load_runtime

__all__ = ["RUNTIMES", "Runtime", "load_runtime"]
