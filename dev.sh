#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine: installs what is missing
# (liburing-dev, pkg-config, a C compiler, python3-venv), makes .venv, installs
# kvuring with its test extras, then runs what was asked.
#
#   ./dev.sh demo     the quick-start example
#   ./dev.sh test     lint, type check and the test suite
#   ./dev.sh bench    the benchmark (extra arguments go to python -m kvuring.bench)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

system_packages() {
    local missing=()
    pkg-config --exists liburing 2>/dev/null || missing+=(liburing-dev pkg-config)
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing+=(python3-dev)
    command -v fio >/dev/null 2>&1 || missing+=(fio)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing ${missing[*]}" >&2
        sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

python_env() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel cffi
    # No build isolation: the build needs only setuptools and cffi, now in the venv.
    "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test]"
}

setup() {
    system_packages
    python_env
}

cmd=${1:-test}
shift || true
case "$cmd" in
    demo)
        setup
        exec "$VENV/bin/python" examples/quickstart.py "$@"
        ;;
    test)
        setup
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check kvuring tests examples benchmarks build_uring.py setup.py
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        setup
        exec "$VENV/bin/python" -m kvuring.bench "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo|test|bench [args]" >&2
        exit 2
        ;;
esac
