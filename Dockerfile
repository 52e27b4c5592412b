# EfficientNet serving image. Works with the legacy builder (no BuildKit features).
#
#   CPU:  docker build --target runtime -t effnet-serve:cpu .
#   GPU:  docker build --target gpu     -t effnet-serve:gpu .
#
# With BuildKit a plain `docker build .` gives the CPU image (the last stage, `cpu`).
# The legacy builder builds every stage before its target, so give it --target runtime
# for the CPU image (the `gpu` stage comes after `runtime` for exactly that reason).
#
# Build arguments (all optional):
#   BASE_IMAGE            Python 3.11 base (CI passes a debootstrapped one)
#   CUDA_IMAGE            CUDA + cuDNN runtime base for the gpu target
#   MODELS, WEIGHTS       what `effnet build` bakes into /models (`--models`, `--weights`)
#   BUILD_FLAGS           extra `effnet build` flags, e.g. a custom width/depth/resolution
#   TORCH_VERSION         CPU torch for the build stage only (never in the runtime image)
#   PIP_INDEX_URL         a PyPI mirror, if your network needs one (nothing is baked in)
#   PIP_EXTRA_INDEX_URL   where the CPU torch wheel comes from (empty: only wheelhouse/)
#   ORT_GPU_VERSION       onnxruntime-gpu for the gpu target; must match CUDA_IMAGE
#
# wheelhouse/ (git-ignored, optional) may hold wheels to install offline, e.g. the torch
# CPU wheel; the build stage uses it with `pip install --find-links /wheelhouse`.
#
# Base images: every FROM is a build argument or an earlier stage. The defaults are exact
# version tags, which a registry can move; for a reproducible build pass the digest your
# registry resolves them to (compose: EFFNET_BASE_IMAGE / EFFNET_CUDA_IMAGE in .env):
#   docker buildx imagetools inspect python:3.11-slim-bookworm     # Digest: sha256:...
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest> ...
# No digest is written here: none could be resolved where this file is tested (no registry).

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------
# deps: a virtualenv with the serving dependencies only; cached until pyproject.toml changes
FROM ${BASE_IMAGE} AS deps
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python3 -m venv /opt/venv \
 && python3 requirements.py pyproject.toml > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# ---------------------------------------------------------------------------------------
# builder: CPU torch and the build extra, to turn weights into ONNX
FROM deps AS builder
ARG TORCH_VERSION=2.13.0
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional local wheels: the glob copies wheelhouse/'s contents when the folder exists and
# nothing otherwise (pyproject.toml is there so that the COPY never has zero sources).
COPY pyproject.toml wheelhouse* /wheelhouse/
RUN pip install --no-compile --find-links /wheelhouse "torch==${TORCH_VERSION}" \
 && python3 requirements.py pyproject.toml --no-core --extra build --extra lite-weights --exclude torch \
      > /tmp/requirements.txt \
 && pip install --no-compile --find-links /wheelhouse -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# ---------------------------------------------------------------------------------------
# models: `effnet build` into /models. Only the build package and the CLI are copied, so
# a change to the server code does not rebuild the models.
FROM builder AS models
ARG MODELS=b0,lite0
ARG WEIGHTS=auto
ARG BUILD_FLAGS=
ENV PYTHONPATH=/src
# Under their installed names (pyproject.toml [tool.setuptools] package-dir), as the CLI imports them.
COPY app/__init__.py app/__main__.py app/cli.py /src/effnet_serve/
COPY build/ /src/effnet_build/
# BUILD_FLAGS is split into words on purpose (several flags in one argument).
# hadolint ignore=SC2086
RUN python3 -m effnet_serve build ${MODELS:+--models "$MODELS"} --weights "$WEIGHTS" --repo /models $BUILD_FLAGS \
 && chmod -R u=rwX,go=rX /models \
 && ls -l /models

# ---------------------------------------------------------------------------------------
# wheel: the effnet-serve package itself (pure Python)
FROM deps AS wheel
COPY pyproject.toml README.md /src/
COPY app/ /src/app/
COPY build/ /src/build/
RUN pip wheel --no-deps --wheel-dir /dist /src

# ---------------------------------------------------------------------------------------
# runtime: no torch; onnxruntime, Pillow, FastAPI and the baked model repository
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="effnet-serve" \
      org.opencontainers.image.description="EfficientNet family behind one HTTP API (ONNX Runtime, CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# glibc otherwise hands big freed blocks back to the OS after every request and faults
# them in again on the next (measured: 2x slower JPEG decode). 32 MiB is glibc's maximum
# mmap threshold; setting it also turns off the dynamic threshold.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=67108864 \
    MALLOC_ARENA_MAX=2 \
    EFFNET_REPOSITORY=/models
RUN useradd --system --uid 10001 --user-group --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin effnet
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /dist/ /tmp/dist/
# The image serves and never builds: the build step's package (effnet_build) is left out.
RUN pip install --no-deps --no-index /tmp/dist/*.whl \
 && rm -rf /tmp/dist "$(python3 -c 'import effnet_build, pathlib; print(pathlib.Path(effnet_build.__file__).parent)')"
COPY deploy/docker/healthcheck.py /usr/local/lib/effnet/healthcheck.py
# Owned by root, read-only for the server's user.
COPY --from=models /models /models
WORKDIR /srv
USER 10001:10001
# 8000 HTTP, 8001 gRPC (EFFNET_GRPC_PORT)
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
# GET /health/ready with the standard library (no curl in the image).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "/usr/local/lib/effnet/healthcheck.py"]
# Exec form: the server is PID 1 unless the runtime adds an init (`docker run --init`,
# compose `init: true`); either way SIGTERM reaches uvicorn, which drains and exits.
ENTRYPOINT ["effnet", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------
# gpu: CUDA + cuDNN runtime base with onnxruntime-gpu (CUDA execution provider)
FROM ${CUDA_IMAGE} AS gpu
ARG PIP_INDEX_URL
ARG ORT_GPU_VERSION=1.22.0
LABEL org.opencontainers.image.title="effnet-serve" \
      org.opencontainers.image.description="EfficientNet family behind one HTTP API (ONNX Runtime, CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=67108864 \
    MALLOC_ARENA_MAX=2 \
    EFFNET_REPOSITORY=/models \
    EFFNET_DEVICE=cuda
# The distribution's Python (3.12 on Ubuntu 24.04); versions follow the pinned base tag,
# and security updates of the release are wanted, so the apt packages are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin effnet
WORKDIR /src
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python3 -m venv /opt/venv \
 && python3 requirements.py pyproject.toml --exclude onnxruntime > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && rm /tmp/requirements.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-deps --no-index /tmp/dist/*.whl \
 && rm -rf /tmp/dist /src/requirements.py "$(python3 -c 'import effnet_build, pathlib; print(pathlib.Path(effnet_build.__file__).parent)')"
COPY deploy/docker/healthcheck.py /usr/local/lib/effnet/healthcheck.py
COPY --from=models /models /models
WORKDIR /srv
USER 10001:10001
# 8000 HTTP, 8001 gRPC (EFFNET_GRPC_PORT)
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python3", "/usr/local/lib/effnet/healthcheck.py"]
ENTRYPOINT ["effnet", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------
# cpu: the default target under BuildKit (which skips the unused gpu stage)
FROM runtime AS cpu
