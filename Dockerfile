# vqtok service image: FastAPI + uvicorn on ONNX Runtime (CUDA EP). No torch.
#   docker build -t vqtok .
#   docker run --gpus all -p 8000:8000 -v $PWD/models/pretrained:/models:ro vqtok
# The CUDA/cuDNN runtime must match the onnxruntime-gpu wheel (1.31 on PyPI is built for CUDA 13).
ARG BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first (a layer that survives code changes): the base install plus onnxruntime-gpu.
COPY pyproject.toml README.md ./
RUN mkdir -p vqtok models training service clients \
 && touch vqtok/__init__.py models/__init__.py training/__init__.py service/__init__.py clients/__init__.py \
 && pip install ".[gpu]" && pip uninstall -y vqtok
COPY vqtok ./vqtok
COPY models ./models
COPY training ./training
COPY service ./service
COPY clients ./clients
# the console script's module and the app import, and neither pulls in torch
RUN pip install --no-deps . && python -c "import vqtok.cli, service.app, sys; assert 'torch' not in sys.modules" \
 && vqtok serve --help >/dev/null

RUN useradd --system --uid 10001 vqtok
USER vqtok
# /models: the model repository (one exported model directory per model name). The image also
# holds whatever models/pretrained shipped with the package; mount over /models to serve others.
ENV VQTOK_MODEL_REPO=/models VQTOK_HOST=0.0.0.0 VQTOK_PORT=8000 VQTOK_DEVICE=auto VQTOK_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
CMD ["vqtok", "serve"]
