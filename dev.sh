#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine: installs what is missing
# through apt (Python, liburing-dev, pkg-config, a C compiler, the tools the
# tests use), makes .venv, installs kvuring with its test extras, then runs
# what was asked.
#
#   ./dev.sh demo     the quick-start example
#   ./dev.sh test     lint, type check and the test suite (the C extension is
#                     built with warnings as errors: KVURING_STRICT_BUILD=1)
#   ./dev.sh bench    the benchmark (extra arguments go to python -m kvuring.bench)
#
# It prints one line per step; apt's and pip's output goes to a log that is
# shown (its last DEV_SH_TAIL lines, default 30) only when the step fails.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TAIL=${DEV_SH_TAIL:-30}
# Build requirements, bounded as in pyproject.toml's [build-system]
# (setuptools 77.0.3 to 84.2.1 checked; 77 is the first with SPDX license strings).
BUILD_REQS=("setuptools>=77,<85" "cffi>=1.15,<3")

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/dev.sh.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT

say() { echo "dev.sh: $*"; }

# step "what" CMD...: runs CMD with its output in a log; on failure prints the
# log's last lines and exits with CMD's status.
step() {
    local what=$1 log
    shift
    log="$LOGS/step-$(date +%s%N).log"
    say "$what"
    local rc=0
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        say "FAILED (exit $rc): $what; the last $TAIL lines of its output:" >&2
        tail -n "$TAIL" "$log" | sed 's/^/    /' >&2
        exit "$rc"
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "need root (or sudo) for: $*" >&2
        exit 1
    fi
}

have() { command -v "$1" >/dev/null 2>&1; }

# Does the C compiler find this header? (no compiler: no)
header() { have cc && printf '#include <%s>\n' "$1" | cc -E -x c - >/dev/null 2>&1; }

system_packages() {
    local missing=() why=()
    need() { # need "reason" package...
        why+=("${*:2} ($1)")
        missing+=("${@:2}")
    }
    if ! have "$PYTHON"; then
        need "no $PYTHON on PATH" python3 python3-venv python3-dev
    else
        "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
            need "$PYTHON has no venv/ensurepip" python3-venv
        "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
            >/dev/null 2>&1 || need "no Python.h for $PYTHON" python3-dev
    fi
    have cc || need "no C compiler" gcc libc6-dev
    if have cc && ! header stdio.h; then need "no C library headers" libc6-dev; fi
    have pkg-config || need "no pkg-config" pkg-config
    { have pkg-config && pkg-config --exists liburing; } || need "no liburing for pkg-config" liburing-dev
    header xxhash.h || need "no xxhash.h for the C core" libxxhash-dev
    have fio || need "no fio: benchmark and its tests" fio
    { have chattr && have mkfs.ext4; } || need "no chattr/mkfs.ext4: fault tests" e2fsprogs
    { have losetup && have mount; } || need "no losetup/mount: fault tests" util-linux mount
    { have fusermount3 && have pkg-config && pkg-config --exists fuse3; } ||
        need "no fuse3: FUSE fault tests" fuse3 libfuse3-dev

    if [ ${#missing[@]} -eq 0 ]; then
        say "system packages: nothing missing"
        return
    fi
    if ! have apt-get; then
        say "missing, and no apt-get here to install them: ${why[*]}" >&2
        exit 1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o Acquire::Retries=3) w
    say "to install through apt:"
    for w in "${why[@]}"; do say "    $w"; done
    step "apt-get update" as_root "${apt[@]}" update
    step "apt-get install ${missing[*]}" \
        as_root "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
}

python_env() {
    if [ ! -x "$VENV/bin/python" ]; then
        step "making $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')" \
            "$PYTHON" -m venv "$VENV"
    fi
    step "upgrading pip and the build requirements in $VENV (${BUILD_REQS[*]})" \
        "$VENV/bin/python" -m pip install --upgrade pip "${BUILD_REQS[@]}"
    # No build isolation: the build needs only setuptools and cffi, now in the venv.
    local how="editable"
    [ "${KVURING_STRICT_BUILD:-}" = 1 ] && how="editable, C warnings are errors"
    step "installing kvuring[test] into $VENV ($how)" \
        "$VENV/bin/python" -m pip install --no-build-isolation -e ".[test]"
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
        say "running examples/quickstart.py"
        "$VENV/bin/python" examples/quickstart.py "$@"
        ;;
    test)
        # build_uring.py adds -Werror: a compiler warning fails the test run.
        export KVURING_STRICT_BUILD=1
        setup
        say "ruff check, ruff format --check"
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check kvuring tests examples benchmarks build_uring.py setup.py
        say "mypy --strict"
        "$VENV/bin/mypy"
        say "pytest"
        "$VENV/bin/python" -m pytest -rs "$@"
        say "the C core built with AddressSanitizer + UndefinedBehaviorSanitizer, and its tests (tests/sanitize.sh)"
        PYTHON="$VENV/bin/python" tests/sanitize.sh
        ;;
    bench)
        setup
        say "running python -m kvuring.bench $*"
        "$VENV/bin/python" -m kvuring.bench "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo|test|bench [args]" >&2
        exit 2
        ;;
esac
