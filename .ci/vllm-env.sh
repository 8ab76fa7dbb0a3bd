#!/usr/bin/env bash
# The tests against real vLLM (tests/test_vllm_*.py) in an environment of
# their own: a virtualenv outside the checkout with the vLLM wheel (without
# its dependencies), a CPU build of torch, exactly the packages vLLM's
# offloading-tier modules import (vllm.v1.kv_offload.tiering.{base,factory,
# fs.manager}, found by importing them), and the test tools. It is keyed by
# those pinned versions and cached between runs; kvuring itself is installed
# into it from this checkout (editable) on every run.
#
#   .ci/vllm-env.sh              make or reuse the environment, install kvuring, run the tests
#   .ci/vllm-env.sh --env-only   make or reuse the environment, print its path
#   .ci/vllm-env.sh -- ARGS      extra pytest arguments
#
#   KVURING_CI_CACHE   where environments are kept (default /var/cache/kvuring-ci)
#   PYTHON             the Python to build it with (default python3; 3.10+)
#   KVURING_VLLM_TORCH torch version (default 2.13.0, CPU)
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.33.0
# The CPU build, which this machine serves from local disk. For the tier
# benchmark (benchmarks/vllm_tier.py) KVURING_VLLM_TORCH=2.14.1 gives a CUDA
# build, beside which vLLM's tier loads its C extension.
TORCH_VERSION=${KVURING_VLLM_TORCH:-2.13.0}
# Distributions that provide what vLLM's tier modules import; their version
# bounds are vLLM's own, read from the vLLM wheel's metadata.
TIER_DEPS=(numpy msgspec psutil pyzmq regex transformers cbor2 aiohttp requests
    oss-harmony openai pillow pybase64 cachetools cloudpickle uvloop py-cpuinfo
    prometheus_client xgrammar fastapi partial-json-parser llguidance)
# kvuring's runtime and build requirements (pyproject.toml), and the test tools.
OWN_DEPS=("cffi>=1.15,<3" "xxhash>=3.0" "setuptools>=77,<85"
    "pytest==9.2.0" "pytest-asyncio==1.5.0" "pytest-timeout==2.4.0")
TIER_MODULES="vllm.v1.kv_offload.tiering.base, vllm.v1.kv_offload.tiering.factory, vllm.v1.kv_offload.tiering.fs.manager"

PYTHON=${PYTHON:-python3}
CACHE=${KVURING_CI_CACHE:-/var/cache/kvuring-ci}
say() { echo "vllm-env: $*"; }

env_only=0
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --env-only) env_only=1 ;;
        --) shift; pytest_args=("$@"); break ;;
        *) echo "usage: .ci/vllm-env.sh [--env-only] [-- PYTEST_ARGS]" >&2; exit 2 ;;
    esac
    shift
done

pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$(printf '%s\n' "$VLLM_VERSION" "$TORCH_VERSION" "$pyver" "${TIER_DEPS[@]}" "${OWN_DEPS[@]}" |
    sha256sum | cut -c1-8)
ENV_DIR="$CACHE/vllm-$VLLM_VERSION-torch-$TORCH_VERSION-py$pyver-$key"
PY="$ENV_DIR/bin/python"
LOG=$(mktemp "${TMPDIR:-/tmp}/vllm-env.XXXXXX")
trap 'rm -f "$LOG"' EXIT

# step "what" CMD...: CMD's output goes to a log, shown only when it fails.
step() {
    local what=$1 start=$SECONDS
    shift
    say "$what"
    if ! "$@" >"$LOG" 2>&1; then
        say "FAILED: $what; the last 40 lines of its output:" >&2
        tail -n 40 "$LOG" | sed 's/^/    /' >&2
        exit 1
    fi
    [ $((SECONDS - start)) -lt 5 ] || say "  ($((SECONDS - start)) s)"
}

vllm_requirements() { # vLLM's own requirement line for each of TIER_DEPS
    "$PY" - "${TIER_DEPS[@]}" <<'EOF'
import importlib.metadata as md
import re
import sys

norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
wanted = {norm(n): n for n in sys.argv[1:]}
found = {}
for req in md.requires("vllm") or []:
    if "extra ==" in req:
        continue
    name = norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    if name in wanted:
        found[name] = re.sub(r"\[[^\]]*\]", "", req)  # no extras: what the import needs
for name, given in wanted.items():
    print(found.get(name, given))
EOF
}

build() {
    mkdir -p "$CACHE"
    rm -rf "$ENV_DIR"
    step "making $ENV_DIR ($("$PYTHON" -c 'import sys; print(sys.executable)'))" \
        "$PYTHON" -m venv "$ENV_DIR"
    step "pip install --no-deps vllm==$VLLM_VERSION" \
        "$PY" -m pip install --no-deps "vllm==$VLLM_VERSION"
    step "pip install torch==$TORCH_VERSION" "$PY" -m pip install "torch==$TORCH_VERSION"
    local reqs
    mapfile -t reqs < <(vllm_requirements)
    step "pip install what vLLM's tier modules import: ${reqs[*]}" \
        "$PY" -m pip install "${reqs[@]}" "torch==$TORCH_VERSION"
    step "pip install ${OWN_DEPS[*]}" "$PY" -m pip install "${OWN_DEPS[@]}"
    step "importing $TIER_MODULES" "$PY" -W ignore -c "import $TIER_MODULES"
    "$PY" -m pip freeze >"$ENV_DIR/freeze.txt" 2>/dev/null
    touch "$ENV_DIR/.complete"
}

# One builder at a time; a half-built environment (no .complete) is rebuilt.
mkdir -p "$CACHE"
exec 9>"$CACHE/.vllm-env.lock"
flock 9
if [ -f "$ENV_DIR/.complete" ] && "$PY" -W ignore -c "import $TIER_MODULES" >/dev/null 2>&1; then
    say "cached: $ENV_DIR"
else
    start=$SECONDS
    build
    say "built $ENV_DIR in $((SECONDS - start)) s ($(du -sh "$ENV_DIR" | cut -f1))"
fi
# Old environments (other keys, same torch) go, so the cache holds one per torch.
for old in "$CACHE"/vllm-*-torch-"$TORCH_VERSION"-*; do
    [ -d "$old" ] && [ "$old" != "$ENV_DIR" ] && rm -rf "$old"
done
flock -u 9
if [ "$env_only" = 1 ]; then
    echo "$ENV_DIR"
    exit 0
fi

step "installing kvuring from this checkout into it (editable)" \
    "$PY" -m pip install --no-deps --no-build-isolation -e .
"$PY" -m pip list 2>/dev/null | grep -E '^(vllm|torch|numpy|kvuring) ' | sed 's/^/vllm-env:   /'
say "pytest tests/test_vllm_*.py (vLLM required: KVURING_REQUIRE_VLLM=1)"
KVURING_REQUIRE_VLLM=1 "$PY" -m pytest -rsx -p no:cacheprovider \
    tests/test_vllm_import.py tests/test_vllm_tier.py tests/test_vllm_interop.py "${pytest_args[@]}"
