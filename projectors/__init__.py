"""Trainable projectors between frozen encoders, the LLM and frozen decoders.

``INPUT_PROJECTORS``: encoder features ``(B, N, D_enc)`` -> LLM tokens ``(B, M, D_llm)``
(or, for ``gated_prefix``, per-layer adaption prompts).
``OUTPUT_PROJECTORS``: signal-token states ``(B, K, D_llm)`` -> a decoder's conditioning
``(B, *target_shape)``.
"""

import inspect

from mmllm.registry import Registry

INPUT_PROJECTORS = Registry("input projector")
INPUT_PROJECTORS.register("linear", "projectors.input:LinearProjector")
INPUT_PROJECTORS.register("mlp2x_gelu", "projectors.input:MLPProjector")
INPUT_PROJECTORS.register("flatten_mlp", "projectors.input:FlattenMLPProjector")
INPUT_PROJECTORS.register("resampler", "projectors.input:ResamplerProjector")
INPUT_PROJECTORS.register("gated_prefix", "projectors.input:GatedPrefixProjector")

OUTPUT_PROJECTORS = Registry("output projector")
OUTPUT_PROJECTORS.register("linear", "projectors.output:LinearOutputProjector")
OUTPUT_PROJECTORS.register("transformer", "projectors.output:TransformerOutputProjector")


def build_input_projector(name: str, in_dim: int, out_dim: int, num_in_tokens: int, **options):
    cls = INPUT_PROJECTORS.get(name)
    _check_options(name, cls, options, ("in_dim", "out_dim", "num_in_tokens"))
    return cls(in_dim, out_dim, num_in_tokens, **options)


def _check_options(name: str, cls, options: dict, positional: tuple) -> None:
    """A clear error for options the projector does not take (e.g. a type changed with a
    dotted override such as ``inputs.image.projector.type=linear``, keeping the old options)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in ("self", *positional)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"projector {name!r} does not take option(s) {unknown} (its options: {valid or 'none'}); "
                         "when changing a projector's type, set its options too, e.g. projector.options={}")


def build_output_projector(name: str, llm_dim: int, target_shape: tuple, num_signal_tokens: int, **options):
    return OUTPUT_PROJECTORS.get(name)(llm_dim, tuple(target_shape), num_signal_tokens, **options)


__all__ = [
    "INPUT_PROJECTORS",
    "OUTPUT_PROJECTORS",
    "build_input_projector",
    "build_output_projector",
]
