"""Models that ship inside the package, one folder each under ``mmllm/shipped/``.

A shipped folder holds a model directory (``model/``), the frozen components its config names
relative to itself (``../clip``), and ``manifest.json``: every file with its size and sha256,
the command and recipe fingerprint that built it, and its measured scores. Opening a shipped
model checks every file against the manifest first, so a missing or damaged file is an error
that names it, never a silent rebuild or download.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
MANIFEST_NAME = "manifest.json"
MODEL_SUBDIR = "model"
DEFAULT_NAME = "toy"  # the embedded default
DEFAULT_ENV = "MMLLM_DEFAULT"  # names another default: a model directory, preset or hub id

_verified: set[tuple[str, float]] = set()  # (folder, manifest mtime) checked in this process


class ShippedModelError(FileNotFoundError):
    """A shipped model is missing or does not match its manifest."""


def shipped_models() -> list[str]:
    """Names of the models that ship with this installation."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / MANIFEST_NAME).is_file())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShippedModelError(f"{path} is missing; {_REINSTALL}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ShippedModelError(f"{path} is not valid JSON ({err}); {_REINSTALL}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ShippedModelError(f"{path} has no 'files' table; {_REINSTALL}")
    return manifest


_REINSTALL = "reinstall mmllm (`pip install --force-reinstall mmllm`, or `git checkout -- mmllm/shipped` in a clone)"


def verify(folder: str | os.PathLike) -> dict:
    """Check every file a shipped folder's manifest lists (present, same size, same sha256)
    and that nothing unlisted sits among the weights; return the manifest. Raises
    ``ShippedModelError`` naming the first bad file and the fix."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ShippedModelError(f"shipped model file {path} is missing; {_REINSTALL}")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise ShippedModelError(
                f"shipped model file {path} does not match its manifest (sha256 differs: damaged or edited); "
                f"{_REINSTALL}")
    return manifest


def shipped_model_dir(name: str = DEFAULT_NAME, check: bool = True) -> Path:
    """The model directory of shipped model ``name``, checked against its manifest once per
    process (``check=False`` skips that)."""
    folder = SHIPPED_DIR / name
    if not (folder / MANIFEST_NAME).is_file():
        have = shipped_models()
        fix = BUILD_HINT if name == DEFAULT_NAME else _REINSTALL
        raise ShippedModelError(
            f"no shipped model {name!r} in {SHIPPED_DIR} (shipped: {have or 'none'}); {fix}, "
            f"or name a model directory, e.g. mmllm.load('path/to/model') or {DEFAULT_ENV}=path/to/model")
    if check:
        key = (str(folder), (folder / MANIFEST_NAME).stat().st_mtime)
        if key not in _verified:
            verify(folder)
            _verified.add(key)
    return folder / MODEL_SUBDIR


TEXT_ONLY = "smollm2"  # the embedded LLM alone, when no multimodal default is installed
BUILD_HINT = (f"no trained multimodal default ships with this installation; build one with `python "
              f"scripts/build_default.py --root runs/toy` (about two hours on 2 CPU cores, `--device cuda` on a GPU) "
              f"and set {DEFAULT_ENV}=runs/toy/model")


def default_model() -> str:
    """What ``mmllm.load()`` opens with no name: ``$MMLLM_DEFAULT`` when set (a model directory,
    preset or hub id), else the shipped toy model, else (an installation that carries none,
    with a warning saying how to build one) the text-only SmolLM2."""
    if os.environ.get(DEFAULT_ENV):
        return os.environ[DEFAULT_ENV]
    if (SHIPPED_DIR / DEFAULT_NAME / MANIFEST_NAME).is_file():
        return DEFAULT_NAME
    import logging

    logging.getLogger("mmllm").warning("%s; using the text-only %r meanwhile", BUILD_HINT, TEXT_ONLY)
    return TEXT_ONLY


def _copy_weights(src: Path, dst: Path, dtype) -> None:
    """Copy a safetensors file, storing floating tensors in ``dtype`` (the loaders upcast them
    to the model's dtype); integer tensors and the file's metadata are kept. A tensor that
    does not survive the cast (overflow to inf) is an error."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and t.dtype != dtype:
                cast = t.to(dtype)
                if not torch.isfinite(cast).all() and torch.isfinite(t).all():
                    raise ValueError(f"{src}: tensor {key!r} overflows {dtype} (max |x| = {t.abs().max():.3g}); "
                                     "pack it in float32 or bfloat16")
                t = cast
            tensors[key] = t.contiguous()
    save_file(tensors, str(dst), metadata=metadata)


def _copy_tree(src: Path, dst: Path, dtype) -> None:
    import shutil

    for path in sorted(src.rglob("*")):
        if path.is_dir() or any(part.startswith(".") for part in path.relative_to(src).parts):
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors" and dtype is not None:
            _copy_weights(path, target, dtype)
        else:
            shutil.copy2(path, target)


def pack(model_dir: str | os.PathLike, dest: str | os.PathLike, *, dtype: str | None = "float16",
         info: dict | None = None) -> dict:
    """Write ``model_dir`` and every local component its config names into ``dest`` as a
    shipped folder: ``dest/model`` plus one folder per component (named as on disk), the
    config naming them relative to the model (``../clip``), weights stored in ``dtype``
    (``None`` keeps them), and ``manifest.json`` listing each file's size and sha256 beside
    ``info`` (how it was built, how it scores). ``dest`` is replaced atomically. Returns the
    manifest."""
    import time

    from .config import MMLLMConfig
    from .fileio import atomic_directory
    from .llm import resolve_dtype

    model_dir = Path(model_dir)
    config = MMLLMConfig.from_json(model_dir / "config.json").resolved(model_dir)
    store = resolve_dtype(dtype) if dtype is not None else None
    components: dict[str, Path] = {}
    for _, obj, attr in config._sources():
        value = getattr(obj, attr)
        if value and os.path.isabs(value) and os.path.isdir(value):
            folder = Path(value)
            if folder.name in (MODEL_SUBDIR, MANIFEST_NAME) or components.get(folder.name, folder) != folder:
                raise ValueError(f"two components would share the folder name {folder.name!r} ({folder}); "
                                 "give them distinct directory names before packing")
            components[folder.name] = folder
    with atomic_directory(dest) as tmp:
        for name, folder in components.items():
            _copy_tree(folder, tmp / name, store)
        _copy_tree(model_dir, tmp / MODEL_SUBDIR, store)
        moved = config
        for _, obj, attr in moved._sources():  # point at the copies, then write them relative
            value = getattr(obj, attr)
            if value and os.path.isabs(value) and Path(value).name in components:
                setattr(obj, attr, str(tmp / Path(value).name))
        moved.relative_to(tmp / MODEL_SUBDIR, tree=tmp).to_json(tmp / MODEL_SUBDIR / "config.json")
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {"format": 1, "stored_dtype": dtype or "as built", "packed_at": time.strftime("%Y-%m-%d"),
                    "total_bytes": sum(f["size"] for f in files.values()), **(info or {}), "files": files}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


__all__ = ["pack", "DEFAULT_ENV", "DEFAULT_NAME", "SHIPPED_DIR", "ShippedModelError", "default_model", "read_manifest",
           "sha256_file", "shipped_model_dir", "shipped_models", "verify"]
