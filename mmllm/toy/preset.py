"""The toy MMLLM: SmolLM2-135M with the toy world's frozen encoders and decoders.

``toy_config(root)`` points every component at ``root`` (built by
``scripts/build_toy.py``; default ``~/.cache/mmllm/toy``)::

    from mmllm import MMLLM
    from mmllm.toy.preset import toy_config
    model = MMLLM.from_config(toy_config())

Choices, for a model that trains on 2 CPU cores:

- image: ``hf_clip``, the last layer's class token and 16 patch tokens (17 of width 64;
  32x32 images, 8x8 patches) into a ``flatten_mlp`` projector: 4 tokens from all 17
  flattened, one position-invariant summary token, and the 17 tokens each through one shared
  ``mlp2x_gelu`` (``per_token``; 22 LLM tokens). LLaVA takes layer -2 patches of a
  24-layer CLIP; in this 3-layer tower the class token is where the contrastive objective
  put colour, and shape, size, position and count sit in whichever patches hold the
  objects (linear probes: shape 0.85 from the class token, 1.00 from all 17 flattened).
  In short caption runs this reads position, size and count far better than a per-token
  ``mlp2x_gelu`` alone. The flattened map alone learns an attribute once per patch position,
  so it memorises held-out colour x shape pairs; the per-token tokens learn it once for all
  positions (held-out caption colour 0.60 -> 0.92 in the ninth build, docs/research/README.md).
- audio: ``hf_audio`` (AST) patch tokens, 22 tokens of width 64, into the same
  ``flatten_mlp`` (4 + summary + per-token, 27 LLM tokens): the number of beeps is where the
  tones are in time.
- video: ``frames`` through the image encoder, the first and last of the 4 frames,
  ``frame_pooling="none"`` (34 tokens: where the shape starts and ends gives the
  direction; mean pooling averages the shape over its path and loses it, see docs/toy.md),
  into a ``flatten_mlp`` of 4 tokens plus the 34 per-token ones (38 LLM tokens): direction
  is where the shape is in one frame against the other, which a per-token projector alone
  leaves to the LLM (direction 0.29 held-in, against 1.00 with the flattened map in a
  120-step run), while colour from the flattened map alone was memorised with the direction
  (held-out 0.38; with the per-token tokens 1.00).
- outputs: 4 / 8 / 8 signal tokens (NExT-GPT uses 24 for video; 8 keep sequences
  short) and a small ``transformer`` projector (d_model 64, 2 + 2 layers) into each
  decoder's (32, 64) text-conditioning space. The build's align step replaces the audio
  one by a ``linear`` projector (``DefaultSettings.align_projectors``), which composes
  held-out pitch x count requests where the transformer memorised the 18 trained specs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from mmllm.config import EncoderConfig, MMLLMConfig

from .components import VIDEO_FRAMES, default_root, video_decoder_backend

VIDEO_INPUT_FRAMES = 2  # frames the video encoder reads (first and last); clips have VIDEO_FRAMES
# Every input's flatten_mlp options: 4 tokens from all encoder tokens flattened (where things
# are), a position-invariant summary token for image and audio, and every encoder token
# through one shared mlp2x_gelu (per_token), which learns an attribute once for all positions
# and so composes held-out pairs (docs/research/README.md).
# The image's flattened map is one linear layer (hidden=0): an MLP's hidden layer formed
# colour x shape detectors for the trained pairs (held-out caption shape 0.44 -> 0.71, colour
# 0.83 -> 0.65; docs/research/README.md).
PROJECTOR_OPTIONS = {
    "image": {"num_tokens": 4, "summary_token": True, "per_token": True, "hidden": 0},
    "audio": {"num_tokens": 4, "summary_token": True, "per_token": True},
    "video": {"num_tokens": 4, "per_token": True},
}


def _root(root: Optional[str | os.PathLike]) -> Path:
    return Path(root) if root is not None else default_root()


def image_encoder_config(root: Optional[str | os.PathLike] = None, feature_layer: int = -1,
                         features: str = "all") -> EncoderConfig:
    """``hf_clip`` over ``<root>/clip`` with the mean/std the toy CLIP was trained with."""
    clip = _root(root) / "clip"
    processor = clip / "preprocessor_config.json"
    if not processor.is_file():
        raise FileNotFoundError(f"{processor} is missing; build the toy components with `python scripts/build_toy.py`"
                                f" (or mmllm.toy.components.build_components({str(_root(root))!r}))")
    stats = json.loads(processor.read_text())
    return EncoderConfig(backend="hf_clip", source=str(clip), feature_layer=feature_layer, features=features,
                         options={"image_mean": stats["image_mean"], "image_std": stats["image_std"]})


def decoder_options(modality: str) -> dict:
    """Generation settings of the toy decoders. Guidance 6 for images and sounds (measured:
    image colour 0.40 -> 0.56, audio timbre 0.73 -> 0.84 from guidance 3); 3 for video,
    whose motion degrades at higher guidance (docs/toy.md). The zero-terminal-SNR image
    decoder rescales its guidance by 0.7 (held-out shape from true captions 0.64 -> 0.72 over
    three draws of 48; docs/research/README.md) and takes
    30 steps (0.72 -> 0.76, for 1.4x the decoding time; 50 or 100 steps draw the same)."""
    common = {"num_inference_steps": 30 if modality == "image" else 20,
              "guidance_scale": 3.0 if modality == "video" else 6.0}
    if modality == "image":
        return {**common, "guidance_rescale": 0.7, "height": 32, "width": 32}
    if modality == "video":
        return {**common, "height": 32, "width": 32, "num_frames": VIDEO_FRAMES, "fps": 4}
    return {**common, "audio_length_in_s": 1.0}  # the spectrogram's 64 frames


def _transformer_projector() -> dict:
    return {"type": "transformer",
            "options": {"d_model": 64, "heads": 4, "encoder_layers": 2, "decoder_layers": 2, "ff": 128}}


def toy_config(root: Optional[str | os.PathLike] = None, **overrides) -> MMLLMConfig:
    """The toy MMLLM's config with every component under ``root``; ``overrides`` as in
    ``MMLLMConfig.from_preset`` (dotted keys allowed)."""
    root = _root(root)
    image = image_encoder_config(root).to_dict()
    data = {
        "name": "toy",
        "max_length": 1024,
        # Shorter than SmolLM2's default system prompt (~20 tokens): every training example
        # and every request carries it, and on a CPU each token costs.
        "system_prompt": "You are a helpful assistant.",
        "llm": {"source": "smollm2", "dtype": "float32"},
        "inputs": {
            "image": {"placeholder": "<image>", "encoder": image,
                      "projector": {"type": "flatten_mlp", "options": dict(PROJECTOR_OPTIONS["image"])}},
            "audio": {"placeholder": "<audio>",
                      "encoder": {"backend": "hf_audio", "source": str(root / "audio_encoder"),
                                  "features": "patch", "feature_layer": -1},
                      "projector": {"type": "flatten_mlp", "options": dict(PROJECTOR_OPTIONS["audio"])}},
            "video": {"placeholder": "<video>",
                      "encoder": {"backend": "frames", "share_with": "image", "num_frames": VIDEO_INPUT_FRAMES,
                                  "frame_pooling": "none", "features": "patch"},
                      "projector": {"type": "flatten_mlp", "options": dict(PROJECTOR_OPTIONS["video"])}},
        },
        "outputs": {
            "image": {"num_signal_tokens": 4, "signal_prefix": "IMG", "projector": _transformer_projector(),
                      "decoder": {"backend": "stable_diffusion", "source": str(root / "image_decoder"),
                                  "options": decoder_options("image")}},
            "audio": {"num_signal_tokens": 8, "signal_prefix": "AUD", "projector": _transformer_projector(),
                      "decoder": {"backend": "spectrogram_sd", "source": str(root / "audio_decoder"),
                                  "options": decoder_options("audio")}},
            "video": {"num_signal_tokens": 8, "signal_prefix": "VID", "projector": _transformer_projector(),
                      "decoder": {"backend": video_decoder_backend(root / "video_decoder"),
                                  "source": str(root / "video_decoder"),
                                  "options": decoder_options("video")}},
        },
    }
    config = MMLLMConfig.from_dict(data)
    return config.replace(**overrides) if overrides else config
