#!/usr/bin/env bash
# The main job on a fresh machine: install, export a model, answer an image prompt without PyTorch.
#   bash scripts/demo.sh                      # tiny built-in random-weight Qwen3-VL (answers are noise)
#   bash scripts/demo.sh /path/to/Qwen3-VL-2B-Instruct [image] [prompt]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh export
source="${1:-}"
image="${2:-assets/astronaut.jpg}"
prompt="${3:-Describe this picture.}"
if [ -z "$source" ]; then
  out=demo-out
  .venv/bin/python -m vlm_core.export --demo -o "$out" --force
else
  out="out/$(basename "$source")"
  .venv/bin/python -m vlm_core.export "$source" -o "$out" --force
fi
.venv/bin/python -m vlm_core.runtime.generate -m "$out" --image "$image" -p "$prompt" --max-new-tokens 32
