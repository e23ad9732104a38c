"""Faults during training: SIGKILL and resume, a full disk while checkpointing, out of memory,
a kill while an old checkpoint is deleted. Hermetic: the tiny preset and toy data in tmp_path.

The 5-kill version of the kill test is ``scripts/kill_resume_check.py`` (see docs/RELIABILITY.md).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mmllm.toy.world import write_dataset
from mmllm.training import TrainConfig, TrainingModule, train
from mmllm.training.trainer import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("kill_resume_check", ROOT / "scripts/kill_resume_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


krc = _load_script()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = write_dataset(tmp_path_factory.mktemp("toy"), n=4, size=16, seconds=0.5, frames=4, n_dialogues=4)
    return {"captions": str(paths["captions"]), "generation": str(paths["generation"])}


def config(data, out, **kw):
    base = dict(stage="stage1", out=str(out), captions=data["captions"], generation=data["generation"], steps=4,
                batch_size=3, lr=5e-3, save_every=2, progress=False, log_every=0)
    return TrainConfig(**{**base, **kw})


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------- kill -9 and resume


def test_sigkill_and_resume_gives_the_same_weights(tmp_path):
    """A subprocess run of scripts/train_stage1.py is SIGKILLed twice, once at a seeded random moment
    and once while a checkpoint is being written, and restarted with ``--resume latest`` each time: every checkpoint left behind is complete and readable, and the
    final weights and losses equal an uninterrupted run's bit for bit."""
    summary = krc.kill_resume(tmp_path, kills=2, steps=10, save_every=2, seed=1, in_save=1, log=print)
    assert summary["kills"] == 2 and summary["kills_aimed_at_saves"] == 1 and summary["resumes"] >= 1, summary
    assert summary["attempts"][0]["tmp_dirs"], "the first kill hit a checkpoint write"
    assert summary["weights_equal"] and summary["max_abs_diff"] == 0.0, summary
    assert summary["losses_equal"], summary
    assert summary["left_over_tmp_dirs"] == []


# --------------------------------------------------------------------------- full disk


def test_full_disk_while_checkpointing_says_the_fix_and_keeps_the_last_checkpoint(base_model, data, tmp_path,
                                                                                   monkeypatch, fresh):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    seen = {}

    def save_state(self, output_dir=None, **kwargs):
        if output_dir.endswith("step-00000004"):
            seen["kept"] = digest(Path(output_dir).parent / "step-00000002")
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")  # the disk filled up mid-write
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    with pytest.raises(OSError) as info:
        train(config(data, out), model=fresh(base_model))
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "no space left" in message and "Free disk space" in message and "--resume latest" in message
    assert "step-00000002 is intact" in message
    ckdir = out / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-00000002"], "the partial write is removed"
    assert digest(ckdir / "step-00000002") == seen["kept"]
    assert krc.check_checkpoints(out) == 2
    # Once there is space again, the run resumes from the kept checkpoint and finishes.
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    result = train(config(data, out, resume="latest"), model=fresh(base_model))
    assert result.steps == 4 and latest_checkpoint(out).name == "step-00000004"


# --------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 21474836480 bytes. "
                 "Error code 12 (Cannot allocate memory)"),
], ids=["cuda", "cpu"])
def test_out_of_memory_says_the_fix_and_keeps_the_last_checkpoint(base_model, data, tmp_path, monkeypatch, error, fresh):
    real_forward = TrainingModule.forward
    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # step 3, after the step-2 checkpoint
            raise error
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(TrainingModule, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(torch.OutOfMemoryError) as info:
        train(config(data, out), model=fresh(base_model))
    message = str(info.value)
    for fix in ("--batch-size", "--grad-accum", "--gradient-checkpointing", "--precision bf16",
                "step-00000002 is intact", "--resume latest"):
        assert fix in message, (fix, message)
    assert info.value.__cause__ is error
    assert krc.check_checkpoints(out) == 2


def test_other_runtime_errors_pass_through_unchanged(base_model, data, tmp_path, monkeypatch, fresh):
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(TrainingModule, "forward", lambda self, *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(RuntimeError) as info:
        train(config(data, tmp_path / "run"), model=fresh(base_model))
    assert info.value is error


# --------------------------------------------------------------------------- killed while deleting


def test_kill_while_deleting_an_old_checkpoint_leaves_no_partial_step_dir(base_model, data, tmp_path, monkeypatch, fresh):
    """keep_checkpoints=1 deletes step-1 when step-2 is saved; a crash half-way through that delete
    must not leave a ``step-*`` dir with files missing (``latest_checkpoint`` would trust it)."""
    import shutil

    import mmllm.training.trainer as trainer

    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.is_dir() and "step-00000001" in path.name and (path / "model.safetensors").exists():
            (path / "model.safetensors").unlink()  # one file gone, then the process dies
            raise KeyboardInterrupt("killed while deleting")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(trainer.shutil, "rmtree", rmtree)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(data, out, steps=3, save_every=1, keep_checkpoints=1), model=fresh(base_model))
    assert krc.check_checkpoints(out) == 2  # every step-* dir is complete
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000002"]
    monkeypatch.setattr(trainer.shutil, "rmtree", real_rmtree)
    result = train(config(data, out, steps=3, save_every=1, keep_checkpoints=1, resume="latest"),
                   model=fresh(base_model))
    assert result.steps == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"], "left-overs are cleaned"


# --------------------------------------------------------------------------- killed directory writers

_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("fileio", sys.argv[1])
fileio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fileio)
with fileio.atomic_directory(sys.argv[2]) as tmp:
    (tmp / "half").write_text("x")
    print(tmp.name, flush=True)
    time.sleep(600)
"""


def test_a_directory_write_clears_what_a_killed_writer_left_and_spares_a_live_one(tmp_path):
    import subprocess
    import sys

    from mmllm.fileio import atomic_directory

    target = tmp_path / "clip"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(ROOT / "mmllm/fileio.py"), str(target)],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        names = [w.stdout.readline().strip() for w in writers]
        assert all(n.startswith(".clip.tmp-") for n in names), names
        writers[0].kill()  # SIGKILL: its half-written directory stays behind
        writers[0].wait()
        unowned = tmp_path / ".clip.tmp-abc123"  # named before owners were recorded: not ours to judge
        unowned.mkdir()
        assert names[0] in {p.name for p in tmp_path.iterdir()}
        with atomic_directory(target) as tmp:
            (tmp / "whole").write_text("y")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"clip", names[1], unowned.name}, left
        assert [p.name for p in target.iterdir()] == ["whole"]
        umask = os.umask(0)
        os.umask(umask)
        assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # as readable as a plain mkdir's
    finally:
        for w in writers:
            w.kill()
            w.wait()


# --------------------------------------------------------------------------- a new run into an old run's folder


def test_a_new_run_into_a_folder_with_checkpoints_is_refused_and_keeps_them(base_model, data, tmp_path, fresh):
    """A fresh run into ``out`` would prune the earlier run's checkpoints by name (or have its
    own pruned) and a later ``--resume latest`` would pick whichever sorts last: it is refused,
    and ``resume`` continues the earlier run instead."""
    train(config(data, tmp_path / "run", steps=2), model=fresh(base_model))
    kept = latest_checkpoint(tmp_path / "run")
    before = digest(kept)
    with pytest.raises(FileExistsError, match=r"already holds checkpoints of an earlier run \(step-0+2\).*--resume latest"):
        train(config(data, tmp_path / "run", steps=2), model=fresh(base_model))
    assert latest_checkpoint(tmp_path / "run") == kept and digest(kept) == before
    result = train(config(data, tmp_path / "run", steps=4, resume="latest"), model=fresh(base_model))
    assert result.steps == 4
