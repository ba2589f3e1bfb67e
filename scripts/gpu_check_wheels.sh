#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) for scripts/gpu_check.sh on a GPU machine without network that has torch, triton
# and transformers but not megatron-core (Python 3.12, x86-64; docs of this project's device machine):
#   .whl/megatron_core-0.16.1-cp312-*.whl     2.6 MB; needs torch>=2.6, numpy, packaging>=24.2 (all there)
#   .whl/smollm2-135m-instruct/               SmolLM2-135M-Instruct's config, tokenizer and chat template from
#                                             the `rlv fetch` cache, WITHOUT the weights (517 MiB fp32 do not
#                                             fit the 64 MiB a device call carries): the check trains random
#                                             weights of that architecture there
# Then, with the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600).
# Needs network here (PyPI) and a set-up checkout (scripts/setup.sh: .venv and .cache).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
mkdir -p .whl
rm -f .whl/megatron_core-*.whl  # one version only: two stop the install
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
src=$("$py" -c "from rlv_megatron import assets; print(assets.model_dir('smollm2-135m-instruct'))")
rm -rf .whl/smollm2-135m-instruct
mkdir -p .whl/smollm2-135m-instruct
for f in "$src"/*; do
  case "$(basename "$f")" in
    *.safetensors|*.bin|SHA256SUMS) ;;  # the weights (and the sums that list them) stay here
    *) cp "$f" .whl/smollm2-135m-instruct/ ;;
  esac
done
du -sh .whl
ls .whl .whl/smollm2-135m-instruct
