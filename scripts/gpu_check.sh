#!/usr/bin/env bash
# The ready GPU check (scripts/gpu_check.py): one line per check (PASS/FAIL/SKIP name: detail), then
# "gpu_check: N passed, M failed, K skipped" as the last line; exit status 1 when any check failed.
# Usage: bash scripts/gpu_check.sh [--dry-run] [--only NAME,...] [--model DIR] [--budget-s S]
# Python: $PYTHON, else .venv/bin/python when there is one, else python3 (a GPU machine's own torch).
# Without megatron-core, the wheels of .whl/ (scripts/gpu_check_wheels.sh) go into /tmp/rlv-gpu-check-site first.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null && ! "$py" -c "import megatron.core" >/dev/null 2>&1; then
  site=/tmp/rlv-gpu-check-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$py" scripts/gpu_check.py "$@"
