#!/usr/bin/env bash
# Create .venv and install afloc_engine with everything the demo and the tests need (offline-safe:
# torch 2.13.0 is the CPU wheel on this disk; every other package comes from PyPI).
# Re-running is cheap: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${AFLOC_VENV:-.venv}"
stamp="$VENV/.afloc-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# the real path: pip writes it into the console scripts (afloc), which must not name a symlink that may go
# (the docs test runs this script in scratch copies of the repository whose .venv links to this one)
VENV="$(cd "$VENV" && pwd -P)"
stamp="$VENV/$(basename "$stamp")"
# quiet pip whose failure still stops the set-up (grep's "no line left" is not a failure)
pip_q() {
    local log status
    log="$(mktemp)"
    status=0
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || status=$?
    grep -v "is ignored" "$log" >&2 || true
    rm -f "$log"
    return "$status"
}
echo "afloc setup: installing into $VENV (first run takes a few minutes)" >&2
pip_q "torch==2.13.0"
pip_q -e ".[efficientnet,dicomseg,train,samples,test]"
# IU X-ray reports for text-side pretraining; its torchvision does not work beside this torch
pip_q --no-deps "torchxrayvision==1.5.7"
"$VENV/bin/python" -c "import torch, monai, transformers, afloc_engine" >/dev/null
rm -f "$VENV"/.afloc-setup-*
touch "$stamp"
