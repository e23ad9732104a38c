"""The media modalities mmllm knows, in one table: everything that lists modalities reads it.

    from mmllm.modalities import MODALITIES
    MODALITIES["audio"].placeholder      # "<audio>", the prompt's default placeholder
    MODALITIES["video"].result_field     # "videos", where GenerateResult holds rendered clips
    MODALITIES["image"].load(path)       # a decoded RGB PIL image (mmllm.media.load_image)

Loaders, suffixes and output classes are named by strings and imported on first use, so
this module costs nothing to import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Modality:
    """One modality: how prompts mark it, how its inputs are read and where its outputs go."""

    name: str
    placeholder: str  # the prompt's default placeholder (InputConfig.placeholder)
    loader: str  # "module:function" decoding a path / array / tensor for the encoder
    suffixes: str  # "module:constant": the file endings its loader reads
    output_class: str  # "module:class" of the decoders' outputs (pipelines.media)
    result_field: str  # GenerateResult's list of rendered outputs
    cli_help: str  # help of the command line's --<name> flag
    reads_sample_rate: bool = False  # the loader takes the encoder's sample rate

    @property
    def cli_flag(self) -> str:
        return f"--{self.name}"

    def load(self, item: Any, sample_rate: int | None = None) -> Any:
        """Decode ``item`` with this modality's loader (``sample_rate`` for audio)."""
        loader = _resolve(self.loader)
        return loader(item, sample_rate) if self.reads_sample_rate else loader(item)

    def file_suffixes(self) -> tuple[str, ...]:
        return tuple(_resolve(self.suffixes))

    def output_type(self) -> type:
        return _resolve(self.output_class)


MODALITIES: Mapping[str, Modality] = MappingProxyType({
    m.name: m
    for m in (
        Modality("image", "<image>", "mmllm.media:load_image", "mmllm.media:IMAGE_SUFFIXES",
                 "pipelines.media:ImageOutput", "images", "image file (PNG, JPEG, …)"),
        Modality("audio", "<audio>", "mmllm.media:load_audio", "mmllm.media:AUDIO_SUFFIXES",
                 "pipelines.media:AudioOutput", "audio", "audio file (WAV, FLAC, …)", reads_sample_rate=True),
        Modality("video", "<video>", "mmllm.media:load_video", "mmllm.media:VIDEO_SUFFIXES",
                 "pipelines.media:VideoOutput", "videos", "video file (MP4, GIF, .npy)"),
    )
})
NAMES: tuple[str, ...] = tuple(MODALITIES)


def get(name: str) -> Modality:
    """The modality called ``name``; an unknown name raises a KeyError listing the valid ones."""
    if name not in MODALITIES:
        raise KeyError(f"unknown modality {name!r}; valid names: {list(NAMES)}")
    return MODALITIES[name]


def result_fields() -> dict[str, str]:
    """``{modality: GenerateResult field}``."""
    return {m.name: m.result_field for m in MODALITIES.values()}


__all__ = ["MODALITIES", "NAMES", "Modality", "get", "result_fields"]
