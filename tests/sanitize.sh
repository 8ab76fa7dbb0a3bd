#!/usr/bin/env bash
# Build kvuring's C core a second time with AddressSanitizer and
# UndefinedBehaviorSanitizer, and run the tests that drive it hardest (both
# engines, both loops, faults and corrupt blocks) against that build.
#
#   tests/sanitize.sh [pytest args]      (dev.sh test runs it after the suite)
#
# The build goes to build/sanitize/; the package's Python files are linked
# beside it, so the sanitized extension is the one imported.  Any report from
# a sanitizer fails the run (halt_on_error, -fno-sanitize-recover).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=build/sanitize

rm -rf "$OUT"
mkdir -p "$OUT/kvuring"
for f in kvuring/*.py kvuring/py.typed; do ln -s "../../../$f" "$OUT/kvuring/"; done
ln -s ../../../kvuring/bench "$OUT/kvuring/bench"
KVURING_SANITIZE=1 KVURING_STRICT_BUILD=1 "$PY" -c '
import os, sys
sys.path.insert(0, ".")
import build_uring
build_uring.make_ffi(os.path.abspath("kvuring/_csrc")).compile(tmpdir=sys.argv[1], verbose=False)
' "$OUT" > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }

# An editable install's import hook would still find the normal build:
# take it out of the way in this tree's interpreter only.
cat > "$OUT/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
PY

asan=$(${CC:-cc} -print-file-name=libasan.so)
# Python's own allocations are not freed at exit: leak reports would be noise.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
LD_PRELOAD="$asan" PYTHONSAFEPATH=1 PYTHONPATH="$OUT" "$PY" -c '
import kvuring._uring as u, sys
assert "/build/sanitize/" in u.__file__, u.__file__
print("kvuring: sanitized build", u.__file__.split("/build/")[-1], file=sys.stderr)
'
# -s: a sanitizer's report goes to stderr as the process stops; pytest
# would otherwise swallow it.
LD_PRELOAD="$asan" PYTHONSAFEPATH=1 PYTHONPATH="$OUT" "$PY" -m pytest -q -s -p no:cacheprovider \
    tests/test_engine.py tests/test_store_api.py tests/test_store_integrity.py \
    tests/test_store_gate.py tests/test_store_offload.py tests/test_store_deadlines.py \
    tests/test_store_roots.py tests/test_store_fuse.py tests/test_store_capacity_roots.py "$@"
