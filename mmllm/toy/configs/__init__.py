"""The toy world's build recipes as data: one JSON file per recipe in this folder.

Each file holds every setting of a recipe in two sections: ``"components"`` (the frozen
encoders' and decoders' training runs, ``components.BuildSettings``) and ``"stages"`` (the
MMLLM's data sizes and training stages, ``mmllm_build.DefaultSettings``). ``default.json``
gives both classes their field defaults; ``quick`` (the under-30-minute CPU build), ``fast``
(a few steps, for tests) and ``smoke`` (every loss falls, in about a minute) are whole
recipes beside it, in the way open_clip keeps ``model_configs/*.json``.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, ClassVar

DIRECTORY = Path(__file__).parent
SECTIONS = ("components", "stages")


def names() -> list[str]:
    """The recipes in this folder."""
    return sorted(p.stem for p in DIRECTORY.glob("*.json"))


@functools.lru_cache(maxsize=None)
def _text(name: str) -> str:
    path = DIRECTORY / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown toy recipe {name!r}; valid names: {names()}")
    return path.read_text()


def read(name: str) -> dict[str, dict[str, Any]]:
    """``{"components": {...}, "stages": {...}}`` of recipe ``name`` (a fresh copy)."""
    data = json.loads(_text(name))
    if sorted(data) != sorted(SECTIONS):
        raise ValueError(f"toy recipe {name!r} must have exactly the sections {list(SECTIONS)}, got {sorted(data)}")
    return data


def defaults(section: str) -> Callable[..., Any]:
    """``default(name, help=None)``: a dataclass field whose default is ``default.json``'s
    value of ``section.name`` (copied for each instance), with ``help`` for command lines."""
    values = read("default")[section]

    def default(name: str, help: str | None = None) -> Any:
        value = values[name]
        return field(default_factory=functools.partial(copy.deepcopy, value),
                     metadata={"help": help} if help else {})

    return default


class Recipe:
    """For a settings dataclass filled from one section of a recipe (``SECTION``)."""

    SECTION: ClassVar[str]

    @classmethod
    def from_recipe(cls, name: str):
        """The settings of recipe ``name`` (``names()``)."""
        return cls(**read(name)[cls.SECTION])

    @classmethod
    def fast(cls):
        """A few steps of everything, for tests."""
        return cls.from_recipe("fast")

    @classmethod
    def quick(cls):
        """``build_default.py --quick``: under 30 minutes from nothing on 2 CPU cores, a weaker model."""
        return cls.from_recipe("quick")

    @classmethod
    def smoke(cls):
        """Enough steps of everything for each loss to fall, in about a minute on a CPU."""
        return cls.from_recipe("smoke")


__all__ = ["DIRECTORY", "SECTIONS", "Recipe", "defaults", "names", "read"]
