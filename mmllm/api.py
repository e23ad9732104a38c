"""The public entry points: ``load`` and ``generate``."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from .config import MMLLMConfig, available_presets
from .model import CONFIG_NAME, MMLLM

DEFAULT_MODEL = "smollm2"  # text only; used when the toy default is not built
TOY = "toy"  # the embedded multimodal default, built by scripts/build_default.py


def default_model_name() -> str:
    """The toy MMLLM's directory when it is built, else ``DEFAULT_MODEL`` (with a one-line hint)."""
    from .toy.mmllm_build import HINT, is_built, model_dir

    if is_built():
        return str(model_dir())
    logging.getLogger("mmllm").warning("%s; using the text-only %r meanwhile", HINT, DEFAULT_MODEL)
    return DEFAULT_MODEL


def load(name_or_path: str | None = None, *, device=None, dtype=None, **overrides) -> MMLLM:
    """A model from a ``save_pretrained`` directory, a transformers Llava directory (see
    ``mmllm.interop.llava.from_llava``), a preset name, ``"toy"`` (the built toy MMLLM), or
    (no name) the embedded default: the toy MMLLM when built, else text-only ``smollm2``.

    ``overrides`` change config fields (``seed=1``, ``**{"llm.dtype": "bfloat16"}``).
    """
    name = name_or_path or default_model_name()
    if name == TOY:
        from .toy.mmllm_build import HINT, is_built, model_dir

        if not is_built():
            raise FileNotFoundError(f"{HINT} (looked in {model_dir()})")
        name = str(model_dir())
    path = Path(name)
    if (path / CONFIG_NAME).is_file():
        from .interop.llava import from_llava, is_llava_checkpoint

        if is_llava_checkpoint(path):  # a transformers Llava directory (unsupported variants are refused there)
            return from_llava(path, device=device, dtype=dtype, **overrides)
        return MMLLM.from_pretrained(path, device=device, dtype=dtype, **overrides)
    if name in available_presets():
        return MMLLM.from_config(MMLLMConfig.from_preset(name, **overrides), device=device, dtype=dtype)
    raise FileNotFoundError(
        f"{name!r} is neither a directory with {CONFIG_NAME} nor a preset; presets: {available_presets()}"
    )


@functools.lru_cache(maxsize=2)
def _cached(name: str | None) -> MMLLM:
    return load(name)


def generate(prompt: str | None = None, *, model: str | MMLLM | None = None, **kwargs):
    """``mmllm.generate(image=..., prompt=...)``: answer with ``model`` (default: the embedded
    default, loaded once and kept). Takes every argument of ``MMLLM.generate``."""
    m = model if isinstance(model, MMLLM) else _cached(model)
    return m.generate(prompt, **kwargs)
