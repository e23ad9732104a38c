"""Diffusion decoders: the LLM's signal-token states, projected into a frozen decoder's
text-conditioning space, rendered by stock diffusers pipelines.

    decoder = build_decoder(DecoderConfig(backend="stable_diffusion", source="runwayml/stable-diffusion-v1-5"))
    decoder.conditioning_shape            # (77, 768), read from the pipeline
    targets = decoder.encode_text(["a dog"])   # training targets for the output projector
    images = decoder.generate(projected, seed=0)   # list[ImageOutput]
"""

from mmllm.config import DecoderConfig
from mmllm.registry import Registry

from .media import AudioOutput, ImageOutput, VideoOutput

DECODERS = Registry("decoder")
DECODERS.register("stable_diffusion", "pipelines.decoders:StableDiffusionDecoder")
DECODERS.register("audioldm", "pipelines.decoders:AudioLDMDecoder")
DECODERS.register("text_to_video_sd", "pipelines.decoders:TextToVideoDecoder")
DECODERS.register("animatediff", "pipelines.decoders:AnimateDiffDecoder")
DECODERS.register("spectrogram_sd", "pipelines.spectrogram:SpectrogramDecoder")


def generation_settings() -> tuple[str, ...]:
    """Every registered decoder's generation settings (the keys of its ``defaults``), in
    registration order: the ``generate`` keywords that go to the decoders, not the LLM."""
    names = {}
    for backend in DECODERS:
        names.update(dict.fromkeys(DECODERS.get(backend).defaults))
    return tuple(names)


def build_decoder(config: DecoderConfig, pipeline=None):
    """The registered decoder for ``config.backend``; loads lazily unless ``pipeline`` is given."""
    return DECODERS.get(config.backend)(config, pipeline=pipeline)


__all__ = ["DECODERS", "build_decoder", "generation_settings", "ImageOutput", "AudioOutput", "VideoOutput"]
