"""Two-process DDP on CPU (gloo) through ``accelerate launch`` (about 30 s on 2 cores)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import mmllm
from mmllm.toy.world import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu(tmp_path):
    paths = write_dataset(tmp_path / "data", n=4, size=16, seconds=0.5, frames=4, n_dialogues=2)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/ddp_cpu.yaml"), "--main_process_port", str(_free_port()),
           str(ROOT / "scripts/train_stage1.py"), "--model", "tiny", "--captions", str(paths["captions"]),
           "--generation", str(paths["generation"]), "--out", str(out), "--steps", "3", "--batch-size", "2",
           "--save-every", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    state = json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    trained = mmllm.load(str(out / "model"))
    init = mmllm.load("tiny")
    a, b = trained.trainable_state_dict(), init.trainable_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("input_projectors."))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("llm.") and "lora_" in k)
    assert torch.equal(trained.llm.get_input_embeddings().base.weight, init.llm.get_input_embeddings().base.weight)
