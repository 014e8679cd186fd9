#!/usr/bin/env bash
# Install everything the tests need into .venv and run them (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh export,test,serve
.venv/bin/python -m pytest -q --durations=25 "$@"
