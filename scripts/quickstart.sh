#!/usr/bin/env bash
# Sets up, then runs the main job: an offline generation on the embedded default model, printing its answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
rm -f outputs/quickstart.jsonl
.venv/bin/python scripts/generate.py --config configs/smollm2-135m.yaml \
    --input examples/quickstart.jsonl --output outputs/quickstart.jsonl --print
