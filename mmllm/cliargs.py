"""Command-line flags generated from config dataclasses, so scripts stay thin.

    add_dataclass_args(parser, TrainConfig, ["lr", "steps", "captions"])
    overrides = dataclass_overrides(args, TrainConfig, ["lr", "steps", "captions"])  # flags given

A field becomes ``--field-name`` with the field's type: ``int``, ``float`` and ``str`` as
they are (``Optional[...]`` unwrapped), a ``dict`` or ``list`` as JSON. Every flag
defaults to None, meaning "not given", so a script can layer flags over a config file or
a recipe. The help is the field's ``metadata["help"]``; ``metadata["choices"]`` (or the
``choices`` argument) restricts the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Iterable, Optional


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> Any:
    """``Optional[int]`` -> int; ``str | dict`` -> str (its first member)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _base_type(args[0]) if args else typing.get_origin(hint) or hint


def _fields(cls, names: Optional[Iterable[str]]) -> list[dataclasses.Field]:
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    if names is None:
        return list(by_name.values())
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise KeyError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(by_name)}")
    return [by_name[n] for n in names]


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls,
                       fields: Optional[Iterable[str]] = None, *, choices: Optional[dict[str, Iterable]] = None,
                       defaults: Any = None) -> None:
    """One ``--flag`` per field of dataclass ``cls`` named in ``fields`` (default: all).
    ``choices`` adds allowed values per field; ``defaults`` (an instance of ``cls``) puts
    each field's value into its help."""
    hints = typing.get_type_hints(cls)
    for f in _fields(cls, fields):
        tp = _base_type(hints[f.name])
        text = f.metadata.get("help")
        if defaults is not None:
            value = getattr(defaults, f.name)
            shown = json.dumps(value) if tp in (dict, list) else value
            text = f"{text} (default {shown})" if text else f"default {shown}"
        kwargs: dict[str, Any] = {"default": None, "help": text}
        if tp in (dict, list):
            kwargs.update(type=json.loads, metavar="JSON")
        elif tp is bool:
            kwargs.update(type=_boolean, metavar="BOOL")
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line type for {hints[f.name]!r}")
        allowed = (choices or {}).get(f.name, f.metadata.get("choices"))
        if allowed is not None:
            kwargs["choices"] = tuple(allowed)
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def dataclass_overrides(args: argparse.Namespace, cls, fields: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """``{field: value}`` for each flag of ``add_dataclass_args`` that was given."""
    return {f.name: getattr(args, f.name) for f in _fields(cls, fields) if getattr(args, f.name, None) is not None}


__all__ = ["add_dataclass_args", "dataclass_overrides"]
