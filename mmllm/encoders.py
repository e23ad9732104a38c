"""Frozen encoders behind one small interface.

Every encoder is an ``nn.Module`` with:

* ``preprocess(items) -> Tensor``: decoded media (PIL images, ``(H, W, 3)`` arrays,
  ``(samples,)`` waveforms at ``sample_rate``, ``(T, H, W, 3)`` frame arrays) to the
  batch tensor the tower expects. Files never reach an encoder: ``mmllm.media`` decodes them.
* ``forward(x) -> Tensor``: ``(B, N, D)`` features, run frozen in eval mode under no-grad.
* ``hidden_size`` and ``num_tokens``: read from the built tower, never typed in.

Backends are registered by name in ``ENCODERS``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import EncoderConfig
from .meta import building_on_meta
from .registry import Registry

ENCODERS = Registry("encoder backend")


class Encoder(nn.Module):
    """Base class: frozen, eval-mode, no-grad towers returning ``(B, N, D)``."""

    modality: str = "image"
    sample_rate: int | None = None

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.features not in ("patch", "all", "pooled"):
            raise ValueError(f"features={cfg.features!r}; use 'patch', 'all' or 'pooled'")

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, items: Sequence[Any]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True):
        # Frozen towers stay in eval mode whatever the parent module does (dropout, norms).
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x.to(device=self.device, dtype=self.dtype))


def _select_tokens(hidden: torch.Tensor, features: str, num_prefix: int) -> torch.Tensor:
    """(B, prefix + P, D) -> patch tokens (prefix dropped) or all tokens."""
    return hidden[:, num_prefix:] if features == "patch" else hidden


def _to_pil_list(items: Sequence[Any]):
    from PIL import Image

    out = []
    for it in items:
        if isinstance(it, Image.Image):
            out.append(it.convert("RGB"))
        else:
            arr = np.asarray(it)
            out.append(Image.fromarray(arr.astype(np.uint8)).convert("RGB"))
    return out


# --------------------------------------------------------------------------- open_clip


@ENCODERS.register("open_clip")
class OpenClipImageEncoder(Encoder):
    """Image tower of any open_clip model.

    ``source`` is an open_clip architecture name (``ViT-L-14-336``) or ``local-dir:``/
    ``hf-hub:`` spec; ``pretrained`` a tag or local checkpoint. ``init="random"`` builds the
    architecture, optionally from ``arch`` (a full open_clip model config with
    ``embed_dim``, ``vision_cfg``, ``text_cfg``), without weights.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        import open_clip

        if cfg.arch:
            model = open_clip.CLIP(**cfg.arch)
            if cfg.init == "pretrained" and cfg.pretrained:
                from .weights import load_state_dict

                model.load_state_dict(load_state_dict(cfg.pretrained))
        else:
            if not cfg.source:
                raise ValueError("open_clip encoder needs source= (an architecture name) or arch=")
            meta = building_on_meta()
            pretrained = cfg.pretrained if cfg.init == "pretrained" and not meta else None
            if pretrained and os.path.isfile(pretrained):
                from .weights import check_not_pickle

                check_not_pickle(pretrained)
            model = open_clip.create_model(cfg.source, pretrained=pretrained, device="meta" if meta else "cpu")
        visual = model.visual
        self.visual = visual
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.num_blocks = len(visual.transformer.resblocks)

    @property
    def hidden_size(self) -> int:
        if self.cfg.features == "pooled":
            return self.visual.output_dim
        return self.visual.transformer.width

    @property
    def num_tokens(self) -> int:
        if self.cfg.features == "pooled":
            return 1
        gh, gw = self.visual.grid_size
        return gh * gw + (1 if self.cfg.features == "all" else 0)

    def preprocess(self, items):
        return _resize_normalize(_to_pil_list(items), self.image_size, self.mean, self.std)

    def encode(self, x):
        if self.cfg.features == "pooled":
            return self.visual(x).unsqueeze(1)  # (B, 1, D)
        layer = self.cfg.feature_layer % self.num_blocks
        out = self.visual.forward_intermediates(
            x, indices=[layer], stop_early=True, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        patches = out["image_intermediates"][0]  # (B, P, D)
        if self.cfg.features == "all":
            return torch.cat([out["image_intermediates_prefix"][0], patches], dim=1)
        return patches


def _resize_normalize(images, size, mean, std) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float, resized (bicubic) to ``size`` and normalised."""
    from PIL import Image

    arrs = [np.asarray(im.resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32) / 255.0 for im in images]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return (x - mean.cpu()) / std.cpu()


# --------------------------------------------------------------------------- transformers CLIP vision


@ENCODERS.register("hf_clip")
class HFClipVisionEncoder(Encoder):
    """transformers CLIP vision tower (LLaVA's encoder), with layer and feature selection.

    ``arch`` is a ``CLIPVisionConfig`` dict used with ``init="random"`` or on the meta device.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if cfg.init == "pretrained" and cfg.source and not building_on_meta():
            # A full CLIPModel checkpoint (openai/clip-*, the toy CLIP) also holds the text
            # tower: those keys are expected to go unused.
            self.tower = load_tower(CLIPVisionModelWithProjection, cfg.source,
                                    unused=("text_model.", "text_projection", "logit_scale"))
        else:
            conf = CLIPVisionConfig(**cfg.arch) if cfg.arch else CLIPVisionConfig.from_pretrained(cfg.source)
            self.tower = CLIPVisionModelWithProjection(conf)
        conf = self.tower.config
        self.image_size = (conf.image_size, conf.image_size)
        mean = cfg.options.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        std = cfg.options.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def hidden_size(self) -> int:
        conf = self.tower.config
        return conf.projection_dim if self.cfg.features == "pooled" else conf.hidden_size

    @property
    def num_tokens(self) -> int:
        if self.cfg.features == "pooled":
            return 1
        conf = self.tower.config
        return (conf.image_size // conf.patch_size) ** 2 + (1 if self.cfg.features == "all" else 0)

    def preprocess(self, items):
        return _resize_normalize(_to_pil_list(items), self.image_size, self.mean, self.std)

    def encode(self, x):
        if self.cfg.features == "pooled":
            return self.tower(pixel_values=x).image_embeds.unsqueeze(1)
        out = self.tower.vision_model(pixel_values=x, output_hidden_states=True)
        return _select_tokens(out.hidden_states[self.cfg.feature_layer], self.cfg.features, 1)


# --------------------------------------------------------------------------- transformers audio


@ENCODERS.register("hf_audio")
class HFAudioEncoder(Encoder):
    """A transformers audio tower with its own feature extractor.

    Works with CLAP (``ClapAudioModelWithProjection``: pooled ``audio_embeds``) and
    encoder-only towers such as the Audio Spectrogram Transformer (``ASTModel``).
    ``arch`` holds ``{"model_type": ..., **config}``; ``options.feature_extractor`` the
    feature extractor's class name and kwargs for random builds.
    """

    modality = "audio"

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        import transformers
        from transformers import AutoConfig, AutoFeatureExtractor

        if cfg.init == "pretrained" and cfg.source and not building_on_meta():
            conf = AutoConfig.from_pretrained(cfg.source)
            self.tower = _audio_tower_class(conf.model_type).from_pretrained(cfg.source, use_safetensors=True,
                                                                              dtype=torch.float32)
            self.extractor = AutoFeatureExtractor.from_pretrained(cfg.source)
        else:
            self.tower = _random_audio_tower(dict(cfg.arch))
            fe = dict(cfg.options.get("feature_extractor", {}))
            fe_cls = getattr(transformers, fe.pop("class", "ASTFeatureExtractor"))
            self.extractor = fe_cls(**fe)
        self.sample_rate = self.extractor.sampling_rate
        self.is_clap = self.tower.config.model_type.startswith("clap")
        if self.is_clap and cfg.features != "pooled":
            raise ValueError("CLAP audio towers give pooled features here; set features='pooled'")

    @property
    def hidden_size(self) -> int:
        conf = self.tower.config
        if self.is_clap:
            return conf.projection_dim
        return conf.hidden_size

    @property
    def num_tokens(self) -> int:
        if self.cfg.features == "pooled":
            return 1
        if _param_on_meta(self):
            return _ast_tokens(self)
        # Token count depends on the extractor's padding length: measure it once on silence.
        dummy = self.preprocess([np.zeros(self.sample_rate, dtype=np.float32)])
        return self(dummy).shape[1]

    def preprocess(self, items):
        feats = self.extractor(
            [np.asarray(w, dtype=np.float32) for w in items], sampling_rate=self.sample_rate, return_tensors="pt"
        )
        return feats["input_features"] if "input_features" in feats else feats["input_values"]

    def encode(self, x):
        if self.is_clap:
            return self.tower(input_features=x).audio_embeds.unsqueeze(1)
        out = self.tower(x, output_hidden_states=True)
        if self.cfg.features == "pooled":
            return out.pooler_output.unsqueeze(1)
        num_prefix = 2 if self.tower.config.model_type == "audio-spectrogram-transformer" else 1
        return _select_tokens(out.hidden_states[self.cfg.feature_layer], self.cfg.features, num_prefix)


def load_tower(cls, source: str, unused: tuple[str, ...] = ()) -> nn.Module:
    """``cls.from_pretrained(source)`` in float32 whatever the file stores (a checkpoint saved in
    float16 is upcast; the model's dtype is set once, by ``MMLLM.from_config``), without
    transformers' load-report table, checked here:
    weights the tower needs but the checkpoint lacks are an error (they would stay random);
    unused checkpoint keys other than the ``unused`` prefixes get a one-line warning."""
    import logging

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tower, info = cls.from_pretrained(source, output_loading_info=True, use_safetensors=True,
                                          dtype=torch.float32)
    except RuntimeError as err:  # weights of other shapes: another architecture or size
        raise ValueError(f"{source!r} does not hold {cls.__name__} weights of the shapes its config gives ({err}); "
                         "point the encoder's source at a checkpoint of that architecture") from err
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{source!r} lacks {len(missing)} weight(s) of {cls.__name__} (e.g. {missing[:3]}); point "
                         "the encoder's source at a checkpoint of that architecture")
    extra = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(unused))
    if extra:
        logging.getLogger("mmllm").warning("%s: %d checkpoint weight(s) unused by %s (e.g. %s)", source, len(extra),
                                           cls.__name__, extra[:3])
    return tower


def _param_on_meta(module: nn.Module) -> bool:
    return next(module.parameters()).device.type == "meta"


def _ast_tokens(enc: HFAudioEncoder) -> int:
    conf = enc.tower.config
    f = (conf.num_mel_bins - conf.patch_size) // conf.frequency_stride + 1
    t = (conf.max_length - conf.patch_size) // conf.time_stride + 1
    return f * t + (2 if enc.cfg.features == "all" else 0)


def _audio_tower_class(model_type: str):
    from transformers import AutoModel, ClapAudioModelWithProjection

    if model_type in ("clap", "clap_audio_model"):
        return ClapAudioModelWithProjection  # pooled, projected audio_embeds
    return AutoModel


def _random_audio_tower(arch: dict) -> nn.Module:
    """A randomly initialised audio tower from ``{"model_type": ..., **config}``."""
    from transformers import AutoConfig, AutoModel, ClapAudioConfig, ClapAudioModelWithProjection

    model_type = arch.pop("model_type", None)
    if model_type is None:
        raise ValueError("encoder.arch needs a model_type, e.g. 'audio-spectrogram-transformer' or 'clap_audio_model'")
    if model_type in ("clap", "clap_audio_model"):
        return ClapAudioModelWithProjection(ClapAudioConfig(**arch))
    return AutoModel.from_config(AutoConfig.for_model(model_type, **arch))


# --------------------------------------------------------------------------- video


@ENCODERS.register("frames")
class FrameVideoEncoder(Encoder):
    """Video through an image encoder: sample ``num_frames`` frames uniformly, encode each,
    then mean-pool over time (``frame_pooling="mean"``) or keep every frame's tokens."""

    modality = "video"

    def __init__(self, cfg: EncoderConfig, image_encoder: Encoder):
        super().__init__(cfg)
        if cfg.frame_pooling not in ("mean", "none"):
            raise ValueError(f"frame_pooling={cfg.frame_pooling!r}; use 'mean' or 'none'")
        self.image_encoder = image_encoder

    @property
    def hidden_size(self) -> int:
        return self.image_encoder.hidden_size

    @property
    def num_tokens(self) -> int:
        per_frame = self.image_encoder.num_tokens
        return per_frame if self.cfg.frame_pooling == "mean" else per_frame * self.cfg.num_frames

    def preprocess(self, items):
        # items: (T, H, W, 3) uint8 arrays -> (B, F, 3, h, w)
        clips = []
        for frames in items:
            frames = np.asarray(frames)
            idx = np.linspace(0, len(frames) - 1, self.cfg.num_frames).round().astype(int)
            clips.append(self.image_encoder.preprocess([frames[i] for i in idx]))
        return torch.stack(clips)

    def encode(self, x):
        b, f = x.shape[:2]
        tokens = self.image_encoder.encode(x.flatten(0, 1))  # (B*F, N, D)
        tokens = tokens.view(b, f, *tokens.shape[1:])
        return tokens.mean(1) if self.cfg.frame_pooling == "mean" else tokens.flatten(1, 2)


def build_encoder(cfg: EncoderConfig, modality: str, shared: dict[str, Encoder] | None = None) -> Encoder:
    """Build a frozen encoder from config; ``frames`` reuses ``shared[cfg.share_with]``."""
    cls = ENCODERS.get(cfg.backend)
    if cfg.backend == "frames":
        if not cfg.share_with or not shared or cfg.share_with not in shared:
            raise ValueError(
                f"video encoder 'frames' needs share_with= naming an image modality built before it; "
                f"got share_with={cfg.share_with!r}"
            )
        enc = cls(cfg, shared[cfg.share_with])
    else:
        enc = cls(cfg)
    enc.modality = modality
    enc.requires_grad_(False)
    enc.eval()
    return enc
