"""Frozen-feature cache: encoder outputs and decoder targets precomputed into safetensors shards.

Layout of a cache directory::

    index.json              {"fingerprints": {...}, "entries": {key: shard file}}
    shard-00000.safetensors tensors named by the sha256 of their key

Keys are ``enc/<modality>/<absolute media path>`` (the encoder's output ``(N, D)`` for one
item) and ``dec/<modality>/<caption>`` (the decoder's ``encode_text`` target). The index
records a fingerprint of every encoder and decoder config; opening the cache for a model
whose components differ raises, so stale features are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from mmllm.fileio import atomic_directory
from mmllm.processor import decode_media

INDEX = "index.json"


def _name(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]


def fingerprints(model) -> dict[str, str]:
    """Config hashes of the frozen components whose outputs are cached."""
    cfg = model.config
    out = {}
    for m, icfg in cfg.inputs.items():
        out[f"enc/{m}"] = hashlib.sha256(json.dumps([icfg.encoder.to_dict(), cfg.seed], sort_keys=True).encode()).hexdigest()
    for m, ocfg in cfg.outputs.items():
        out[f"dec/{m}"] = hashlib.sha256(json.dumps([ocfg.decoder.to_dict(), cfg.seed], sort_keys=True).encode()).hexdigest()
    return out


class FeatureCache:
    """Read side. ``FeatureCache(dir, model)`` checks the fingerprints against ``model``."""

    def __init__(self, directory: str | os.PathLike, model=None):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{str(self.directory)!r} has no {INDEX}; write it with scripts/cache_features.py")
        index = json.loads(index_path.read_text())
        self.entries: dict[str, str] = index["entries"]
        if model is not None:
            mine = fingerprints(model)
            stale = sorted(k for k, v in index["fingerprints"].items() if k in mine and mine[k] != v)
            if stale:
                raise ValueError(f"feature cache {str(self.directory)!r} was written for other {stale}; "
                                 "rebuild it with scripts/cache_features.py for this model")
        self._open: dict[str, object] = {}

    def _get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.entries[key]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.directory / shard), framework="pt")
        return self._open[shard].get_tensor(_name(key))

    def has_feature(self, modality: str, path: str) -> bool:
        return f"enc/{modality}/{path}" in self.entries

    def feature(self, modality: str, path: str) -> torch.Tensor:
        return self._get(f"enc/{modality}/{path}")

    def has_target(self, modality: str, caption: str) -> bool:
        return f"dec/{modality}/{caption}" in self.entries

    def target(self, modality: str, caption: str) -> torch.Tensor:
        return self._get(f"dec/{modality}/{caption}")


class _ShardWriter:
    def __init__(self, directory: Path, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        self.entries: dict[str, str] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_keys: list[str] = []
        self.count = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.entries or key in self.pending_keys:
            return
        self.pending[_name(key)] = tensor.detach().cpu().contiguous()
        self.pending_keys.append(key)
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        shard = f"shard-{self.count:05d}.safetensors"
        save_file(self.pending, str(self.directory / shard))
        self.entries.update({k: shard for k in self.pending_keys})
        self.pending, self.pending_keys = {}, []
        self.count += 1


def _cache_file(name: str) -> bool:
    """A file an earlier ``build_feature_cache`` wrote (its set of shards may differ)."""
    return name == INDEX or (name.startswith("shard-") and name.endswith(".safetensors"))


@torch.no_grad()
def build_feature_cache(model, examples: Iterable, out: str | os.PathLike, shard_size: int = 1024,
                        batch_size: int = 32) -> dict[str, int]:
    """Encode every distinct media file and target caption of ``examples`` into ``out``.

    Written to a temporary directory and renamed at the end, so a cache is whole or absent.
    Returns counts per kind.
    """
    # A cache is whole or absent; an older cache's shards may be replaced, nothing else in ``out``.
    with atomic_directory(out, owns=_cache_file) as tmp:
        writer = _ShardWriter(tmp, shard_size)
        proc = model.processor
        todo_media: dict[str, list[str]] = {m: [] for m in proc.modalities}
        todo_caps: dict[str, list[str]] = {m: [] for m in model.signal_groups}
        seen: set[str] = set()
        counts = {"features": 0, "targets": 0}

        def run_media(m: str) -> None:
            paths, todo_media[m] = todo_media[m], []
            if not paths:
                return
            spec = proc.modalities[m]
            x = spec.encoder.preprocess([decode_media(m, p, spec) for p in paths]).to(model.device)
            feats = model.encoders[m](x)  # (M, N, D_enc)
            for p, f in zip(paths, feats):
                writer.add(f"enc/{m}/{p}", f)
            counts["features"] += len(paths)

        def run_caps(m: str) -> None:
            caps, todo_caps[m] = todo_caps[m], []
            if caps:
                for c, t in zip(caps, model.decoders[m].encode_text(caps)):
                    writer.add(f"dec/{m}/{c}", t)
                counts["targets"] += len(caps)

        for ex in examples:
            for m, paths in ex.media.items():
                for p in paths:
                    if f"enc/{m}/{p}" not in seen:
                        seen.add(f"enc/{m}/{p}")
                        todo_media[m].append(p)
                if len(todo_media[m]) >= batch_size:
                    run_media(m)
            for m, caps in ex.targets.items():
                for c in caps:
                    if c is not None and f"dec/{m}/{c}" not in seen:
                        seen.add(f"dec/{m}/{c}")
                        todo_caps[m].append(c)
                if len(todo_caps[m]) >= batch_size:
                    run_caps(m)
        for m in todo_media:
            run_media(m)
        for m in todo_caps:
            run_caps(m)
        writer.flush()
        (tmp / INDEX).write_text(json.dumps({"fingerprints": fingerprints(model), "entries": writer.entries}))
    return counts
