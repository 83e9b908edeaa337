# syntax=docker/dockerfile:1
# zhllama worker image: the pipeline + a CPU build of llama.cpp (llama-cpp-python), running a
# Prefect worker on the process work pool. Build and run:
#
#   docker build -t zhllama .
#   docker run --rm -e PREFECT_API_URL=http://prefect:4200/api -v zhllama-cache:/cache zhllama
#
# The artifact store, the Hugging Face cache and published builds live on the /cache volume, so
# a rebuild in a new container is all cache hits. Deployment entrypoints are module paths of the
# installed package (flows.build.build_model), so the worker needs no source folder. Deploy from
# inside the image:  docker run ... zhllama zhllama server --no-worker   (or prefect deploy --all ...)
# A team's services (PostgreSQL, Redis, server, Dask, workers) from this image: deployments/compose.yaml.

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36

# ---------------------------------------------------------------- build: compile llama.cpp, install
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VERSION
ARG LLAMA_CPP_PYTHON_VERSION

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade pip setuptools wheel

# CPU-only torch first: an unpinned torch would pull a multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# llama.cpp for CPU, portable (no -march=native: the image must run on other x86-64 hosts), OpenMP on.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON" \
    FORCE_CMAKE=1 \
    CMAKE_BUILD_PARALLEL_LEVEL=4
RUN pip install --no-binary llama-cpp-python "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline_lib ./pipeline_lib
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments
# [team]: prefect-dask (Dask task runner, `dask scheduler` / `dask worker`) and prefect-redis (locks), so one
# image serves as Prefect worker, Dask scheduler and Dask worker (docs/team.md, deployments/compose.yaml).
RUN pip install '.[team]' && python -c "import llama_cpp, pipeline_lib, flows.build, flows.cli.main, tasks.stage, \
    tasks.locks, prefect_dask, distributed, deployments"

# ---------------------------------------------------------------- runtime: no compilers, non-root
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin zhllama \
    && mkdir -p /cache \
    && chown zhllama:zhllama /cache

COPY --from=build /opt/venv /opt/venv

WORKDIR /home/zhllama

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ZHLLAMA_HOME=/cache/zhllama \
    HF_HOME=/cache/huggingface \
    PREFECT_HOME=/home/zhllama/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1

VOLUME ["/cache"]
USER zhllama

HEALTHCHECK --interval=60s --timeout=10s --start-period=30s \
    CMD python -c "import pipeline_lib, llama_cpp" || exit 1

ENTRYPOINT ["tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "zhllama-process", "--type", "process"]
