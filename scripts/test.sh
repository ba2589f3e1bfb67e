#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite, slow multi-process/engine tests included, on
# pytest-xdist workers, one per core up to RLV_TEST_WORKERS (default 2; 0: one process, no xdist), each worker
# and the processes its tests start pinned to its own core (tests/cores.py). Extra arguments go to pytest:
#   bash scripts/test.sh -m quick       the quick tier (under 3 minutes: run it before every commit)
#   bash scripts/test.sh tests/test_x.py -k name
# The slowest 30 tests are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cores=$(nproc)
workers=${RLV_TEST_WORKERS:-2}
[ "$workers" -gt "$cores" ] && workers=$cores
xdist=()
# --no-loadscope-reorder: keep tests/conftest.py's order (xdist's default sends the files with most tests first,
# which left the longest, with few tests each, for the end)
[ "$workers" -gt 1 ] && xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "${xdist[@]}" "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
