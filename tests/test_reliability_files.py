"""Untrusted model directories and saving: writes that must never delete what they did not
write, loaders that must never run code or read files that a model directory names outside
itself, and config files that must be type-checked. See docs/RELIABILITY.md."""

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

import mmllm
from mmllm.config import ConfigError, MMLLMConfig
from mmllm.fileio import ForeignFilesError, atomic_directory
from mmllm.model import CONFIG_NAME, WEIGHTS_NAME, MMLLM

# --------------------------------------------------------------------------- saving


def test_saving_into_a_folder_with_other_files_refuses_and_keeps_them(tiny, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "notes.txt").write_text("mine")
    (runs / "stage1").mkdir()
    (runs / "stage1" / "log.txt").write_text("also mine")
    with pytest.raises(ForeignFilesError, match=r"refusing to replace '.*runs': it holds files this write did not "
                                                r"make \(notes.txt, stage1/\)\. Write to a new or empty directory"):
        tiny.save_pretrained(runs)
    assert (runs / "notes.txt").read_text() == "mine"
    assert (runs / "stage1" / "log.txt").read_text() == "also mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"], "no work directory is left behind"


def test_saving_over_a_saved_model_replaces_it(tiny, tmp_path):
    out = tmp_path / "model"
    tiny.save_pretrained(out)
    (out / WEIGHTS_NAME).write_bytes(b"stale")
    tiny.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (out / WEIGHTS_NAME).read_bytes() != b"stale"
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny.save_pretrained(empty)  # an empty folder is fine
    assert sorted(p.name for p in empty.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_saving_onto_a_file_is_refused_and_leaves_nothing(tiny, tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"cannot write the directory '.*model': that path is a file\. "
                                                 r"Remove it or choose another path"):
        tiny.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert target.read_text() == "a file"


def test_concurrent_saves_to_one_path_are_safe(tiny, tmp_path):
    """Four writers, each saving twice, and a reader: no error, the last writer wins, every read
    finds a complete model, and nothing is left beside the target."""
    target = tmp_path / "model"
    errors, reads = [], []
    done = threading.Event()

    def writer(k):
        try:
            for _ in range(2):
                with atomic_directory(target) as tmp:
                    (tmp / "who.txt").write_text(str(k))
                    (tmp / "check.txt").write_text(str(k))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def reader():
        while not done.is_set():
            if target.exists():
                try:
                    who, check = (target / "who.txt").read_text(), (target / "check.txt").read_text()
                    reads.append(who == check)
                except FileNotFoundError:
                    reads.append(False)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    assert errors == []
    assert reads and all(reads), f"{reads.count(False)} of {len(reads)} reads saw a missing or mixed model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "who.txt").read_text() in {"0", "1", "2", "3"}

    # The same through save_pretrained: four threads, one model dir, a loadable result.
    errors.clear()

    def save():
        try:
            tiny.save_pretrained(tmp_path / "saved")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "saved"]
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_feature_cache_replaces_its_own_shards_only(tmp_path):
    from mmllm.training.cache import INDEX, _cache_file

    out = tmp_path / "cache"
    with atomic_directory(out, owns=_cache_file) as tmp:
        for k in range(3):
            (tmp / f"shard-{k:05d}.safetensors").write_text("old")
        (tmp / INDEX).write_text("{}")
    with atomic_directory(out, owns=_cache_file) as tmp:  # fewer shards now: the old ones are its own
        (tmp / "shard-00000.safetensors").write_text("new")
        (tmp / INDEX).write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [INDEX, "shard-00000.safetensors"]
    (out / "README").write_text("user's")
    with pytest.raises(ForeignFilesError, match=r"\(README\)"):
        with atomic_directory(out, owns=_cache_file) as tmp:
            (tmp / INDEX).write_text("{}")
    assert (out / "README").read_text() == "user's"
