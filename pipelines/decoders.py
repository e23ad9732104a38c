"""Frozen diffusion decoders: thin wrappers over stock diffusers pipelines.

The LLM's signal-token states are projected into the decoder's own text-conditioning
space and handed to an unmodified pipeline as ``prompt_embeds``. A ``Decoder`` knows
that space's shape (read from the pipeline's tokenizer and text encoder), computes
training targets with the pipeline's own prompt encoder, and renders media.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mmllm.config import DecoderConfig
from mmllm.llm import resolve_dtype

from .media import AudioOutput, ImageOutput, VideoOutput



def _dtype_keyword() -> str:
    """``dtype`` on diffusers that renamed it (they warn on ``torch_dtype``), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


class TargetCache:
    """Per-caption conditioning targets, in memory and optionally as safetensors files.

    Use one cache (one directory) per decoder: a stored target whose shape differs from
    the decoder's conditioning shape raises instead of being returned.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}

    @staticmethod
    def key(caption: str) -> str:
        return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]

    def _path(self, caption: str) -> Path:
        return self.directory / f"{self.key(caption)}.safetensors"

    def get(self, caption: str) -> Optional[torch.Tensor]:
        if caption in self._memory:
            return self._memory[caption]
        if self.directory is None or not self._path(caption).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self._path(caption)), framework="pt") as f:
            if (f.metadata() or {}).get("caption") != caption:
                return None  # hash collision: recompute rather than return a wrong target
            target = f.get_tensor("target")
        self._memory[caption] = target
        return target

    def put(self, caption: str, target: torch.Tensor) -> None:
        target = target.detach().to("cpu").contiguous()
        self._memory[caption] = target
        if self.directory is not None:
            from safetensors.torch import save_file

            save_file({"target": target}, str(self._path(caption)), metadata={"caption": caption})

    def __contains__(self, caption: str) -> bool:
        return self.get(caption) is not None

    def __len__(self) -> int:
        return len(self._memory)


class Decoder:
    """Base class: one stock diffusers pipeline, loaded lazily.

    Subclasses set ``backend`` (registry name), ``pipeline_class`` (diffusers name),
    ``tiny_builder`` (``pipelines.tiny`` function used when ``init="random"``) and
    ``defaults`` (generation settings that ``DecoderConfig.options`` may override), and
    implement ``_shape``, ``_encode``, ``_call_kwargs`` and ``_outputs``.
    """

    backend = ""  # the name in pipelines.DECODERS
    modality = ""
    pipeline_class = ""
    tiny_builder = ""
    defaults: dict[str, Any] = {}
    # Options that are not generation settings.
    load_options = ("dtype",)

    def __init__(self, config: DecoderConfig | None = None, pipeline: Any = None):
        self.config = config if config is not None else DecoderConfig(backend=self.backend)
        unknown = sorted(set(self.config.options) - set(self.defaults) - set(self.load_options))
        if unknown:
            raise KeyError(
                f"unknown decoder option(s) {unknown} for {type(self).__name__}; valid options are "
                f"{sorted(self.defaults) + list(self.load_options)}"
            )
        self.options = {**self.defaults, **self.config.options}
        self._pipeline = pipeline
        self._device: Optional[torch.device] = None
        self._negative: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> (1, *shape) embedding of ""

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(cls, pipeline: Any, **options) -> "Decoder":
        """Wrap an already-built pipeline; ``options`` override the generation defaults."""
        import diffusers

        if not isinstance(pipeline, getattr(diffusers, cls.pipeline_class)):
            raise TypeError(
                f"{cls.__name__} wraps diffusers.{cls.pipeline_class}, got {type(pipeline).__name__}; "
                f"use the decoder backend that matches this pipeline"
            )
        return cls(DecoderConfig(backend=cls.backend, options=options), pipeline=pipeline)

    @property
    def pipeline(self) -> Any:
        """The stock pipeline, built or loaded on first use."""
        if self._pipeline is None:
            self._pipeline = self._load()
            if self._device is not None:
                self._pipeline.to(self._device)
        return self._pipeline

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def _load(self) -> Any:
        cfg = self.config
        if cfg.init == "random":
            builder = getattr(importlib.import_module("pipelines.tiny"), self.tiny_builder)
            return builder(**cfg.arch)
        if cfg.init != "pretrained":
            raise ValueError(f"decoder init must be 'pretrained' or 'random', got {cfg.init!r}")
        if cfg.source is None:
            raise ValueError(
                f"decoder {cfg.backend!r} has no source: set decoder.source to a hub id or a local "
                f"diffusers directory (save_pretrained layout), or use init='random' with arch "
                f"for a tiny random decoder"
            )
        import diffusers

        dtype = resolve_dtype(self.options.get("dtype", "float32"))  # an unknown name raises, listing the valid ones
        cls = getattr(diffusers, self.pipeline_class)
        # Weights only from safetensors: a pickle (.bin) can run code.
        return cls.from_pretrained(cfg.source, use_safetensors=True, **{_dtype_keyword(): dtype})

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        self.pipeline.save_pretrained(str(directory))
        return Path(directory)

    # ------------------------------------------------------------------ devices

    def to(self, device: str | torch.device) -> "Decoder":
        self._device = torch.device(device)
        if self.loaded:
            self._pipeline.to(self._device)
        return self

    def enable_cpu_offload(self) -> bool:
        """Move each model to the GPU only while it runs; returns whether offload is on.

        Needs CUDA and ``accelerate``; without them the pipeline stays where it is and a
        warning says so.
        """
        if not torch.cuda.is_available() or importlib.util.find_spec("accelerate") is None:
            warnings.warn(
                "CPU offload needs a CUDA device and the accelerate package; the decoder stays on "
                f"{self.device}",
                stacklevel=2,
            )
            return False
        self.pipeline.enable_model_cpu_offload()
        return True

    @property
    def device(self) -> torch.device:
        """Where the pipeline runs its models (the GPU under CPU offload)."""
        if not self.loaded:
            return self._device or torch.device("cpu")
        return self._pipeline._execution_device

    # ------------------------------------------------------------------ conditioning

    @property
    def conditioning_shape(self) -> tuple[int, ...]:
        """Shape of one caption's conditioning, without batch, read from the pipeline.

        Before the pipeline is loaded this reads only the tokenizer and text-encoder
        config from ``source``, so projectors can be sized without loading the UNet.
        """
        if self.loaded or self.config.init == "random" or self.config.source is None:
            return self._shape(self.pipeline.tokenizer, self.pipeline.text_encoder.config)
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.config.source, subfolder="tokenizer")
        text_config = AutoConfig.from_pretrained(self.config.source, subfolder="text_encoder")
        return self._shape(tokenizer, text_config)

    def _shape(self, tokenizer, text_config) -> tuple[int, ...]:
        raise NotImplementedError

    def _encode(self, captions: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, captions: list[str], cache: TargetCache | None = None) -> torch.Tensor:
        """The pipeline's own conditioning for ``captions``: ``(B, *conditioning_shape)``.

        Computed by the pipeline's prompt encoder, so a target equals what the pipeline
        would build from that text. With ``cache``, only captions it lacks are encoded.
        """
        if isinstance(captions, str):
            raise TypeError("encode_text takes a list of captions; wrap a single caption as [caption]")
        if cache is None:
            return self._encode(list(captions))
        shape = self.conditioning_shape
        found = {c: cache.get(c) for c in dict.fromkeys(captions)}
        for caption, target in found.items():
            if target is not None and tuple(target.shape) != shape:
                raise ValueError(
                    f"cached target for {caption!r} has shape {tuple(target.shape)} but this decoder's "
                    f"conditioning is {shape}; use a separate TargetCache directory per decoder"
                )
        missing = [c for c, t in found.items() if t is None]
        if missing:
            for caption, target in zip(missing, self._encode(missing)):
                cache.put(caption, target)
                found[caption] = cache.get(caption)
        return torch.stack([found[c] for c in captions]).to(self.device)

    @torch.no_grad()
    def negative_embeds(self, batch: int) -> torch.Tensor:
        """Conditioning of the empty prompt, ``(batch, *conditioning_shape)``, for guidance."""
        key = (str(self.device), str(self.pipeline.text_encoder.dtype))
        if key not in self._negative:
            self._negative[key] = self._encode([""])
        one = self._negative[key]
        return one.expand(batch, *one.shape[1:]).clone()

    def check_embeds(self, prompt_embeds: torch.Tensor, name: str = "prompt_embeds") -> None:
        shape = self.conditioning_shape
        if not isinstance(prompt_embeds, torch.Tensor) or tuple(prompt_embeds.shape[1:]) != shape:
            got = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds)
            raise ValueError(
                f"{name}: expected (B, {', '.join(map(str, shape))}) from this decoder's text encoder, "
                f"got {got}; size the output projector from decoder.conditioning_shape"
            )

    # ------------------------------------------------------------------ generation

    def settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Generation settings: class defaults < ``config.options`` < call overrides."""
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.generate got unknown setting(s) {unknown}; valid settings are "
                f"{sorted(self.defaults)} plus seed and negative_prompt_embeds"
            )
        merged = {k: v for k, v in self.options.items() if k in self.defaults}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return merged

    @torch.no_grad()
    def generate(
        self,
        prompt_embeds: torch.Tensor,
        *,
        seed: Optional[int] = 0,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        **settings,
    ) -> list:
        """Render one output per row of ``prompt_embeds`` ``(B, *conditioning_shape)``.

        ``settings`` are the backend's ``defaults`` keys (e.g. ``num_inference_steps``,
        ``guidance_scale``). The generator is a CPU ``torch.Generator`` seeded with
        ``seed`` (``None``: unseeded), so results repeat across devices. Without
        ``negative_prompt_embeds`` the empty prompt's conditioning is used for guidance.
        """
        self.check_embeds(prompt_embeds)
        opts = self.settings(settings)
        if negative_prompt_embeds is None:
            negative_prompt_embeds = self.negative_embeds(prompt_embeds.shape[0])
        elif negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match prompt_embeds "
                f"{tuple(prompt_embeds.shape)}; omit it to use the empty prompt"
            )
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        result = self.pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            generator=generator,
            num_inference_steps=opts["num_inference_steps"],
            guidance_scale=opts["guidance_scale"],
            **self._call_kwargs(opts),
        )
        return self._outputs(result, opts)

    def _call_kwargs(self, opts: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _outputs(self, result: Any, opts: dict[str, Any]) -> list:
        raise NotImplementedError

    def __repr__(self) -> str:
        where = "loaded" if self.loaded else f"source={self.config.source!r}, not loaded"
        return f"{type(self).__name__}({where})"


class _TokenLevelDecoder(Decoder):
    """Pipelines conditioned on per-token CLIP text states ``(max_length, width)``."""

    def _shape(self, tokenizer, text_config) -> tuple[int, ...]:
        return (tokenizer.model_max_length, text_config.hidden_size)

    def _encode(self, captions: list[str]) -> torch.Tensor:
        # encode_prompt -> (prompt_embeds, negative_prompt_embeds); no guidance, 1 per prompt.
        embeds, _ = self.pipeline.encode_prompt(captions, self.device, 1, False)
        return embeds


class StableDiffusionDecoder(_TokenLevelDecoder):
    """``diffusers.StableDiffusionPipeline`` (SD-1.x: (77, 768); SD-2.x: (77, 1024))."""

    modality = "image"
    backend = "stable_diffusion"
    pipeline_class = "StableDiffusionPipeline"
    tiny_builder = "tiny_stable_diffusion"
    # guidance_rescale (diffusers' ``guidance_rescale``, Lin et al. 2023): rescales the guided
    # noise prediction toward the conditional one's spread; 0.7 is the paper's value for
    # zero-terminal-SNR models, 0.0 (off) is the pipeline's default.
    defaults = {"num_inference_steps": 50, "guidance_scale": 7.5, "guidance_rescale": 0.0, "height": None,
                "width": None}

    def _call_kwargs(self, opts):
        # height/width None: the pipeline's default, unet.sample_size * vae_scale_factor.
        return {"height": opts["height"], "width": opts["width"], "guidance_rescale": opts["guidance_rescale"],
                "output_type": "pil"}

    def _outputs(self, result, opts):
        return [ImageOutput(image) for image in result.images]


class TextToVideoDecoder(_TokenLevelDecoder):
    """``diffusers.TextToVideoSDPipeline`` (ModelScope / Zeroscope: (77, 1024))."""

    modality = "video"
    backend = "text_to_video_sd"
    pipeline_class = "TextToVideoSDPipeline"
    tiny_builder = "tiny_text_to_video"
    defaults = {
        "num_inference_steps": 50,
        "guidance_scale": 9.0,
        "height": None,
        "width": None,
        "num_frames": 16,
        "fps": 8,
    }

    def _call_kwargs(self, opts):
        return {
            "height": opts["height"],
            "width": opts["width"],
            "num_frames": opts["num_frames"],
            # "pil": diffusers does the float -> uint8 conversion, so frames match its own output.
            "output_type": "pil",
        }

    def _outputs(self, result, opts):
        # result.frames: one list of PIL frames per video -> (T, H, W, 3) uint8
        return [
            VideoOutput(np.stack([np.asarray(f.convert("RGB")) for f in video]), fps=int(opts["fps"]))
            for video in result.frames
        ]


class AnimateDiffDecoder(TextToVideoDecoder):
    """``diffusers.AnimateDiffPipeline``: a Stable Diffusion 1.x image UNet with motion modules
    ((77, 768)). Its motion modules know each frame's place (sinusoidal frame positions)."""

    backend = "animatediff"
    pipeline_class = "AnimateDiffPipeline"
    tiny_builder = "tiny_animatediff"
    defaults = {**TextToVideoDecoder.defaults, "guidance_scale": 7.5}


class AudioLDMDecoder(Decoder):
    """``diffusers.AudioLDMPipeline``, conditioned on the pooled, L2-normalised CLAP text embedding."""

    modality = "audio"
    backend = "audioldm"
    pipeline_class = "AudioLDMPipeline"
    tiny_builder = "tiny_audioldm"
    defaults = {"num_inference_steps": 50, "guidance_scale": 2.5, "audio_length_in_s": None}

    def _shape(self, tokenizer, text_config) -> tuple[int, ...]:
        return (text_config.projection_dim,)

    def _encode(self, captions: list[str]) -> torch.Tensor:
        # _encode_prompt is AudioLDM's only prompt encoder: CLAP text_embeds, L2-normalised, (B, dim).
        return self.pipeline._encode_prompt(captions, self.device, 1, False)

    def _call_kwargs(self, opts):
        # audio_length_in_s None: the pipeline's default from the UNet sample size.
        return {"audio_length_in_s": opts["audio_length_in_s"], "output_type": "np"}

    def _outputs(self, result, opts):
        rate = self.pipeline.vocoder.config.sampling_rate
        return [AudioOutput(np.asarray(w, dtype=np.float32), rate) for w in result.audios]
