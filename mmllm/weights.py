"""Reading weights: safetensors only. Pickle-based files can execute code and are refused."""

from __future__ import annotations

import os
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_not_pickle(path: str | os.PathLike) -> None:
    """Refuse a pickle-based weight file (by its suffix), saying how to convert it."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing to load {str(path)!r}: pickle-based weight files can run arbitrary code. Convert it once, "
            "in a process you trust, with safetensors.torch.save_file(torch.load(path), 'weights.safetensors')"
        )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    check_not_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err}); re-save it") from err
