#!/usr/bin/env bash
# Two-process DDP on CPU (gloo) through `accelerate launch`: a few stage-1 steps on toy data,
# with a checkpoint, then a resume. Usage: scripts/ddp_smoke.sh [workdir]   (about 30-60 s)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${1:-$(mktemp -d)}
PORT=${PORT:-$((29500 + RANDOM % 1000))}
"$PY" -c "from mmllm.toy.world import write_dataset; write_dataset('$WORK/data', n=4, size=16, seconds=0.5, frames=4, n_dialogues=2)"
ACCELERATE_USE_CPU=true "$PY" -m accelerate.commands.launch --config_file configs/accelerate/ddp_cpu.yaml --main_process_port "$PORT" \
    scripts/train_stage1.py --model tiny --captions "$WORK/data/captions.jsonl" \
    --generation "$WORK/data/generation.jsonl" --out "$WORK/run" --steps 4 --batch-size 2 \
    --save-every 2 --no-progress
"$PY" -c "import mmllm; mmllm.load('$WORK/run/model'); print('ddp smoke: ok, model in $WORK/run/model')"
