"""Kill a stage-1 training run with SIGKILL at random moments, resume it, compare with an uninterrupted run.

    python scripts/kill_resume_check.py --kills 5 --steps 30 --save-every 3 --seed 0

Runs ``scripts/train_stage1.py`` (tiny preset, toy data written to a temporary directory) once
without interruption, then again, killing it ``--kills`` times at seeded random moments and
restarting it with ``--resume latest`` each time. After every kill each ``checkpoints/step-*``
directory must be complete and readable (weights, optimiser state, trainer state); ``.tmp-*``
directories may be left behind and are ignored (the first ``--in-save`` kills are aimed at a
checkpoint being written: the process is frozen with SIGSTOP while ``.tmp-step-N`` exists and killed). At the end the weights in ``model/`` must equal
those of the uninterrupted run bit for bit (``torch.equal``), and so must the loss history.
Prints one line per attempt and a JSON summary; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json")


def write_data(root: Path) -> dict:
    from mmllm.toy.world import write_dataset

    paths = write_dataset(root, n=4, size=16, seconds=0.5, frames=4, n_dialogues=4)
    return {"captions": str(paths["captions"]), "generation": str(paths["generation"])}


def command(data: dict, out: Path, steps: int, save_every: int, resume: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "scripts/train_stage1.py"), "--model", "tiny", "--captions", data["captions"],
           "--generation", data["generation"], "--out", str(out), "--steps", str(steps), "--batch-size", "3",
           "--save-every", str(save_every), "--lr", "5e-3", "--shuffle-buffer", "5", "--seed", "0", "--no-progress"]
    return cmd + (["--resume", "latest"] if resume else [])


def start(cmd: list[str]) -> tuple[subprocess.Popen, threading.Event, list[str]]:
    """Start ``cmd``; the event is set once training has begun (the parameter table is printed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    started, lines = threading.Event(), []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "trainable parameters" in line:
                started.set()
        started.set()  # the process ended (or failed) before training

    threading.Thread(target=read, daemon=True).start()
    return proc, started, lines


def check_checkpoints(out: Path) -> int:
    """Every ``step-*`` dir is complete and readable; returns the newest step (0: none yet)."""
    import torch
    from safetensors.torch import load_file

    from mmllm.training.trainer import STATE_NAME, latest_checkpoint

    ckdir = out / "checkpoints"
    steps = []
    for d in sorted(ckdir.glob("step-*")) if ckdir.is_dir() else []:
        missing = [f for f in CHECKPOINT_FILES if not (d / f).is_file()]
        assert not missing, f"partial checkpoint {d}: missing {missing}"
        state = json.loads((d / STATE_NAME).read_text())
        assert state["step"] == int(d.name.split("-")[1]) and len(state["losses"]) == state["step"], d
        assert load_file(str(d / "model.safetensors")), f"{d}: no weights"
        torch.load(d / "optimizer.bin", weights_only=True)
        steps.append(state["step"])
    latest = latest_checkpoint(out)
    assert (latest is None) == (not steps) and (latest is None or latest.name == f"step-{max(steps):08d}")
    return max(steps, default=0)


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "trainable.safetensors"))


def stop_inside_save(proc: subprocess.Popen, out: Path, timeout: float) -> bool:
    """Freeze the process (SIGSTOP) while a checkpoint is being written after an earlier one is
    complete, so that a kill now lands inside the save and the restart resumes. A ``.tmp-step-N``
    dir seen by polling may be renamed to ``step-N`` before the stop lands; then the process is
    continued and the next save is tried. False if none was caught before ``timeout``."""
    from mmllm.training.trainer import latest_checkpoint

    ckdir, since = out / "checkpoints", time.time()
    end = time.monotonic() + timeout

    def fresh(tmp: Path) -> bool:  # written by this process, not left over by a killed one
        try:
            return tmp.stat().st_ctime >= since
        except FileNotFoundError:  # renamed to step-N meanwhile
            return False

    while time.monotonic() < end and proc.poll() is None:
        latest = latest_checkpoint(out)
        newest = int(latest.name.split("-")[1]) if latest is not None else None
        writing = [p for p in ckdir.glob(".tmp-step-*") if int(p.name.split("-")[2]) > newest and fresh(p)] \
            if newest is not None else []
        if writing:
            os.kill(proc.pid, signal.SIGSTOP)
            if writing[0].is_dir() and not (ckdir / writing[0].name.removeprefix(".tmp-")).exists():
                return True  # stopped mid-save
            os.kill(proc.pid, signal.SIGCONT)  # the save finished before the stop: try the next one
        time.sleep(0.001)
    return False


def wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    """Poll until a checkpoint of ``step`` or later is complete, or the process ends."""
    from mmllm.training.trainer import latest_checkpoint

    while proc.poll() is None:
        latest = latest_checkpoint(out)
        if latest is not None and int(latest.name.split("-")[1]) >= step:
            return
        time.sleep(0.01)


def kill_resume(workdir: Path, kills: int = 5, steps: int = 30, save_every: int = 3, seed: int = 0,
                in_save: int = 1, log=print) -> dict:
    """The whole check; returns a summary dict (``equal`` is the verdict). Raises on a broken checkpoint.
    The first ``in_save`` kills are aimed at a checkpoint being written, the others at random moments."""
    import torch

    workdir = Path(workdir)
    data = write_data(workdir / "data")
    rng = random.Random(seed)

    t0 = time.monotonic()
    proc, started, lines = start(command(data, workdir / "full", steps, save_every, resume=False))
    started.wait()
    t_train = time.monotonic()
    if proc.wait() != 0:
        raise RuntimeError("uninterrupted run failed:\n" + "".join(lines[-30:]))
    train_s = time.monotonic() - t_train
    log(f"uninterrupted run: {time.monotonic() - t0:.1f} s ({train_s:.1f} s training)")

    out = workdir / "cut"
    # The random kills land after a random checkpoint (sorted, so they spread over the run), a random
    # time into the next save interval: anchored to progress, so a faster or slower machine still
    # kills mid-run.
    n_random = max(0, kills - in_save)
    targets = sorted(save_every * rng.randint(1, max(1, steps // save_every - 2)) for _ in range(n_random))
    interval = train_s * save_every / steps
    attempts, killed, resumes = [], 0, 0
    while True:
        done = check_checkpoints(out)
        resume = done > 0
        proc, started, lines = start(command(data, out, steps, save_every, resume=resume))
        resumes += resume
        started.wait()
        if killed < kills:
            aimed = killed < in_save  # these first, while there are saves to come
            t_start = time.monotonic()
            if aimed:
                stop_inside_save(proc, out, 10 * train_s)  # the kill below lands on the frozen save
            else:
                wait_for_step(proc, out, targets[killed - in_save])
                time.sleep(rng.uniform(0.0, interval / 2))
            delay = time.monotonic() - t_start
            try:
                proc.wait(timeout=0)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        rc = proc.wait()
        if rc == -signal.SIGKILL:
            killed += 1
            latest = check_checkpoints(out)
            tmp = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*")) if (out / "checkpoints").is_dir() else []
            attempts.append({"kill": killed, "after_s": round(delay, 2), "aimed_at_save": aimed, "latest_step": latest,
                             "tmp_dirs": tmp})
            log(f"kill {killed}{' (aimed at a save)' if aimed else ''}: after {delay:.2f} s of training; "
                f"latest complete checkpoint step {latest}; "
                f"left-over tmp dirs {tmp}")
            continue
        if rc != 0:
            raise RuntimeError(f"run failed (rc {rc}):\n" + "".join(lines[-30:]))
        if killed < kills:
            log(f"run finished before the kill ({delay:.2f} s); starting over is not needed")
        break
    check_checkpoints(out)
    a, b = final_weights(workdir / "full"), final_weights(out)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    max_diff = max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0) if a.keys() == b.keys() else None
    la = json.loads((workdir / "full/checkpoints" / f"step-{steps:08d}" / "trainer_state.json").read_text())["losses"]
    lb = json.loads((out / "checkpoints" / f"step-{steps:08d}" / "trainer_state.json").read_text())["losses"]
    summary = {"kills": killed, "resumes": resumes, "steps": steps, "save_every": save_every, "seed": seed,
               "kills_aimed_at_saves": sum(a["aimed_at_save"] for a in attempts),
               "equal": equal and la == lb, "weights_equal": equal, "losses_equal": la == lb, "max_abs_diff": max_diff,
               "tensors": len(a), "left_over_tmp_dirs": sorted(p.name for p in (out / "checkpoints").glob(".tmp-*")),
               "attempts": attempts, "seconds": round(time.monotonic() - t0, 1)}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs before the run may finish")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps of the run")
    p.add_argument("--save-every", type=int, default=3, help="checkpoint interval in steps (a divisor of --steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    p.add_argument("--in-save", type=int, default=1, help="how many of the kills (the first ones) hit a checkpoint write")
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.steps % args.save_every:
        p.error("--save-every must divide --steps (the final checkpoint holds the loss history compared)")
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        summary = kill_resume(Path(args.workdir or tmp), args.kills, args.steps, args.save_every, args.seed, args.in_save)
    print(json.dumps(summary, indent=1))
    return 0 if summary["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
