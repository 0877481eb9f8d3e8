#!/usr/bin/env bash
# `make check-install`: does axs-lib install and run where users are?
#
# 1. Build the wheel from the working tree (a copy of the files git knows, so nothing is written
#    into the checkout), install it with its [data] extra into a fresh venv per Python
#    (3.11, 3.12, 3.13 by default, or the versions given as arguments) at the versions of
#    constraints.txt, and run a smoke subset there: `axs --version`, `axs verify --iterations 2`,
#    `axs tiles synth` and a four-step `axs train stage1`.
# 2. `make install` into a fresh venv with pip limited to the public package index (no find-links,
#    no config files): what a user's pip resolves. Skipped, with the reason printed, when the index
#    cannot be reached. AXS_CHECK_PUBLIC=0 skips it on purpose (it downloads torch and, from the
#    public index on Linux, its CUDA libraries: several GB).
#
# pip uses this machine's configuration in step 1, so a torch wheel already on disk is taken where
# one fits the Python; for other Pythons pip downloads torch from the index. The size and time of
# each venv are printed so that cost is visible.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${AXS_CHECK_DIR:-/tmp/axs-check-install}"
PYTHONS=("$@")
[ ${#PYTHONS[@]} -gt 0 ] || PYTHONS=(3.11 3.12 3.13)
INDEX_URL="${PIP_INDEX_URL:-https://pypi.org/simple}"
PIP_FLAGS=(--progress-bar off --disable-pip-version-check)
declare -a SUMMARY=()
FAILED=0

say() { printf 'check-install: %s\n' "$*"; }
record() { SUMMARY+=("$(printf '%-14s %-6s %s' "$1" "$2" "$3")"); [ "$2" = FAIL ] && FAILED=1; return 0; }

find_python() {  # an interpreter for version $1: pythonX.Y on PATH, else pyenv's
    local exe
    exe="$(command -v "python$1" 2>/dev/null)" && "$exe" -c 'pass' 2>/dev/null && { echo "$exe"; return; }
    for exe in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/python"$1"; do
        [ -x "$exe" ] && { echo "$exe"; return; }
    done
    return 1
}

smoke() {  # run the smoke subset with the axs of venv $1
    local venv="$1" scratch="$1/scratch"
    rm -rf "$scratch" && mkdir -p "$scratch" || return 1
    (
        set -e
        cd "$scratch"  # not the checkout: the installed wheel must be what runs
        "$venv/bin/axs" --version
        "$venv/bin/axs" verify --iterations 2 --num-workers 0
        "$venv/bin/axs" tiles synth tiles --count 6 --size 32 --seed 0
        "$venv/bin/axs" train stage1 --data-dir tiles --output-dir run --seed 1 --steps 4 --batch-size 2 \
            --width 8 --warmup-steps 0 --val-every 2 --checkpoint-every 2 --no-plots --no-tensorboard --quiet
        test -f run/checkpoints/checkpoint_step_4.pt
    )
}

build_wheel() {
    local src="$WORK/src"
    rm -rf "$src" "$WORK/dist" && mkdir -p "$src" "$WORK/dist" || return 1
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -c --ignore-failed-read 2>/dev/null) \
        | tar -x -C "$src" || return 1
    "$ROOT/.venv/bin/python" -m pip wheel "${PIP_FLAGS[@]}" --no-deps --no-build-isolation -w "$WORK/dist" "$src" >"$WORK/wheel.log" 2>&1 \
        || { cat "$WORK/wheel.log"; return 1; }
    ls "$WORK"/dist/axs_lib-*.whl
}

check_python() {  # fresh venv for Python $1, install the wheel, run the smoke subset
    local version="$1" wheel="$2" exe venv="$WORK/py$1" start elapsed
    if ! exe="$(find_python "$version")"; then
        record "python $version" SKIP "no python$version on PATH or in pyenv"
        return
    fi
    say "Python $version ($exe): fresh venv $venv"
    rm -rf "$venv"
    start=$(date +%s)
    if ! "$exe" -m venv "$venv" || ! "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" -c "$ROOT/constraints.txt" "$wheel[data]"; then
        record "python $version" FAIL "pip install failed (output above)"
        return
    fi
    elapsed=$(( $(date +%s) - start ))
    local size torch
    size="$(du -sh "$venv" | cut -f1)"
    torch="$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
    say "Python $version: installed in ${elapsed} s, venv ${size}, torch ${torch}"
    start=$(date +%s)
    if smoke "$venv"; then
        record "python $version" ok "install ${elapsed} s, venv ${size}, torch ${torch}, smoke $(( $(date +%s) - start )) s"
    else
        record "python $version" FAIL "smoke subset failed (output above)"
    fi
}

check_public_index() {  # `make install` as a user's pip sees it: the public index only
    local venv="$WORK/public" start
    if [ "${AXS_CHECK_PUBLIC:-1}" = 0 ]; then
        record "public index" SKIP "AXS_CHECK_PUBLIC=0"
        return
    fi
    if ! python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/pip/', timeout=15)" "$INDEX_URL" 2>/dev/null; then
        record "public index" SKIP "$INDEX_URL is not reachable from here"
        return
    fi
    say "make install with pip limited to $INDEX_URL: $venv"
    rm -rf "$venv"
    start=$(date +%s)
    if env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null PIP_INDEX_URL="$INDEX_URL" \
        make -C "$ROOT" install VENV="$venv" PYTHON="$(find_python 3.11 || echo python3)"; then
        record "public index" ok "make install $(( $(date +%s) - start )) s, venv $(du -sh "$venv" | cut -f1)"
    else
        record "public index" FAIL "make install failed (output above)"
    fi
}

mkdir -p "$WORK"
say "building the wheel in $WORK"
if WHEEL="$(build_wheel)"; then
    say "wheel: $WHEEL"
    for version in "${PYTHONS[@]}"; do
        check_python "$version" "$WHEEL"
    done
else
    record "wheel" FAIL "build failed (output above)"
fi
check_public_index

say "summary"
printf '  %s\n' "${SUMMARY[@]}"
exit "$FAILED"
