"""mmllm: any-to-any multimodal LLMs from frozen encoders, a LLaMA-class LLM and frozen diffusion decoders."""

from .api import generate, load
from .config import (
    DecoderConfig,
    EncoderConfig,
    InputConfig,
    LLMConfig,
    LoraConfig,
    MMLLMConfig,
    OutputConfig,
    ProjectorConfig,
    available_presets,
)
from .generation import GenerateResult
from .model import MMLLM

__version__ = "0.1.0"

__all__ = [
    "MMLLM",
    "MMLLMConfig",
    "LLMConfig",
    "EncoderConfig",
    "ProjectorConfig",
    "InputConfig",
    "OutputConfig",
    "DecoderConfig",
    "LoraConfig",
    "GenerateResult",
    "available_presets",
    "generate",
    "load",
]
