#!/usr/bin/env bash
# Set up (first run), then lint, check formatting and run every test (engine, trainer, Slicer logic).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest Testing "$@"
