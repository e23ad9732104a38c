"""Interoperability with other checkpoint formats.

``mmllm.interop.llava``: transformers' ``LlavaForConditionalGeneration`` directories, both ways
(``from_llava`` and ``save_llava``). See ``docs/interop.md``.
"""

from .llava import from_llava, is_llava_checkpoint, save_llava

__all__ = ["from_llava", "is_llava_checkpoint", "save_llava"]
