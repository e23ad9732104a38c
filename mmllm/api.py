"""The public entry points: ``load`` and ``generate``."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

from .config import MMLLMConfig, available_presets
from .model import CONFIG_NAME, MMLLM
from .shipped import DEFAULT_ENV, DEFAULT_NAME, default_model, shipped_model_dir, shipped_models


def resolve(name_or_path: str | os.PathLike | None = None, revision: str | None = None) -> str | Path:
    """Where ``load`` finds a model, in this order:

    1. a local directory holding ``config.json`` (an mmllm model or a transformers Llava one);
    2. a model that ships with the package (``"toy"``, the embedded default);
    3. a preset (``mmllm/presets/*.json``);
    4. a hub id (``org/name``), through ``huggingface_hub.snapshot_download``, which reads its
       local cache when offline.

    No name means ``$MMLLM_DEFAULT`` when set, else the shipped ``"toy"``. Returns the model
    directory (a ``Path``) or the preset name (a ``str``).
    """
    name = os.fspath(name_or_path) if name_or_path is not None else default_model()
    path = Path(name).expanduser()
    if (path / CONFIG_NAME).is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is a directory without {CONFIG_NAME}; point to a directory written "
                                "by save_pretrained (or a transformers Llava checkpoint)")
    if name in shipped_models() or name == DEFAULT_NAME:
        return shipped_model_dir(name)  # a missing default says how to get it
    if name in available_presets():
        return name
    if _looks_like_hub_id(name):
        return _from_hub(name, revision)
    where = f" (from ${DEFAULT_ENV})" if name_or_path is None and os.environ.get(DEFAULT_ENV) else ""
    raise FileNotFoundError(
        f"{name!r}{where} is neither a directory with {CONFIG_NAME}, a shipped model {shipped_models()}, nor a hub "
        f"id (org/name); presets: {available_presets()}")


def default_model_name() -> str:
    """What ``load()`` opens with no name (``$MMLLM_DEFAULT``, else the shipped ``"toy"``)."""
    return default_model()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _from_hub(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # a dependency of transformers, so normally present
        raise ImportError("loading a hub id needs huggingface_hub: `pip install huggingface_hub`") from err
    try:
        folder = Path(snapshot_download(repo_id=repo_id, revision=revision))
    except Exception as err:  # offline with nothing cached, unknown repo, no access
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, shipped model or preset, and the hub copy could not be read "
            f"({type(err).__name__}: {err}). Download it where there is a network (`huggingface-cli download "
            f"{repo_id}`) or pass a local directory") from None
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"hub repository {repo_id!r} has no {CONFIG_NAME}; it is not an mmllm or Llava model")
    return folder


def load(name_or_path: str | os.PathLike | None = None, *, device=None, dtype=None, revision: str | None = None,
         **overrides) -> MMLLM:
    """Open a model: a ``save_pretrained`` directory, a transformers Llava directory (see
    ``mmllm.interop.llava.from_llava``), a shipped model (``"toy"``), a preset name, or a hub
    id; with no name, the embedded default (``resolve`` gives the order).

    ``overrides`` change config fields (``seed=1``, ``**{"llm.dtype": "bfloat16"}``).
    """
    where = resolve(name_or_path, revision=revision)
    if isinstance(where, Path):
        from .interop.llava import from_llava, is_llava_checkpoint

        if is_llava_checkpoint(where):  # a transformers Llava directory (unsupported variants are refused there)
            return from_llava(where, device=device, dtype=dtype, **overrides)
        return MMLLM.from_pretrained(where, device=device, dtype=dtype, **overrides)
    return MMLLM.from_config(MMLLMConfig.from_preset(where, **overrides), device=device, dtype=dtype)


@functools.lru_cache(maxsize=2)
def _cached(name: str | None) -> MMLLM:
    return load(name)


def generate(prompt: str | None = None, *, model: str | MMLLM | None = None, image: Any = None, audio: Any = None,
             video: Any = None, history: list[dict] | None = None, output_modalities: Sequence[str] | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = None, stream: bool = False,
             **options: Any):
    """Answer ``prompt`` with ``model`` (a name for ``load``, or a model; default: the default
    model, loaded once and kept), e.g. ``mmllm.generate(image="cat.png", prompt="What is this?")``.

    Args:
        prompt: the request; media given without a placeholder in it get one at its start.
        image, audio, video: one item or a list each: paths, PIL images, arrays or tensors.
        history: earlier ``{"role", "content"}`` messages, which may carry their own media.
        output_modalities: the media the answer may produce (default: every output).
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 decodes greedily; above 0 samples.
        seed: makes text and media repeatable.
        stream: return a ``TextStream`` of text pieces that holds the result at the end.
        options: the rest of ``MMLLM.generate``'s settings (``top_p``, ``max_media``,
            ``media_seed``, decoder settings such as ``num_inference_steps``).

    Returns:
        a ``GenerateResult`` (``text``, ``images``, ``audio``, ``videos``), or a ``TextStream``.
    """
    m = model if isinstance(model, MMLLM) else _cached(model if model is not None else default_model())
    return m.generate(prompt, image=image, audio=audio, video=video, history=history,
                      output_modalities=output_modalities, max_new_tokens=max_new_tokens, temperature=temperature,
                      seed=seed, stream=stream, **options)
