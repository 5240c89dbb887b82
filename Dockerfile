# One image for every role: `wanserve api`, `wanserve worker`, `wanserve serve` (deploy/kubernetes uses it).
#   docker build -t registry.example.com/wanserve:0.1.0 .
# PyPI's torch for Linux x86_64 is a CUDA build, which the GPU workers need; the API never imports it.
# TORCH_SPEC picks another (e.g. --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Triton (torch.compile's GPU kernels, the presets' regional compilation) builds a small C helper at run
# time: without a compiler the workers serve uncompiled.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch on its own first (as the Makefile does): its layer stays cached while wanserve changes.
RUN pip install $TORCH_SPEC

COPY pyproject.toml README.md /build/
COPY src /build/src
RUN pip install /build && rm -rf /build

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin wanserve
USER 10001
WORKDIR /home/wanserve
ENV WANSERVE_HOST=0.0.0.0 \
    WANSERVE_DATA_DIR=/home/wanserve/data
EXPOSE 8088 8089
ENTRYPOINT ["wanserve"]
CMD ["serve"]
