#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, slow multi-process/engine tests included.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick subset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
