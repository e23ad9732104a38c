"""Exact-match, lazy registries.

An entry is registered either with the ``@REGISTRY.register("name")`` decorator or as a
``"module:attribute"`` string that is imported on first use, so optional backends cost
nothing until they are asked for. Unknown names raise an error listing the valid ones.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, target: Any = None) -> Callable:
        """Register ``target`` (an object or a ``"module:attr"`` string) under ``name``."""
        if target is not None:
            self._add(name, target)
            return target

        def decorator(obj):
            self._add(name, obj)
            return obj

        return decorator

    def _add(self, name: str, target: Any) -> None:
        if name in self._entries and self._entries[name] is not target:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {self.names()}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self):
        """Names in registration order."""
        return iter(list(self._entries))

    def __contains__(self, name: str) -> bool:
        return name in self._entries
