"""Freezing, in one place: ``set_trainable(model, stage)`` decides what learns in each stage."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mmllm.config import LoraConfig

from .config import STAGES


def _is_signal_row(name: str) -> bool:
    return name.endswith(".new_rows")


def _is_lora(name: str) -> bool:
    return "lora_" in name


def trainable_rule(stage: str):
    """``name -> bool`` for the parameters that learn in ``stage``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; use one of {list(STAGES)}")
    enc = stage in ("stage1_enc", "stage1", "stage2")
    dec = stage in ("stage1_dec", "stage1", "stage2")
    lora = stage == "stage2"
    out = dec or stage == "align_outputs"  # align_outputs: the output projectors alone, LLM side frozen

    def rule(name: str) -> bool:
        if name.startswith("input_projectors."):
            return enc
        if name.startswith("output_projectors."):
            return out
        if name.startswith("llm.") and _is_signal_row(name):
            return dec  # only the signal tokens' own rows; the base matrices never learn
        if name.startswith("llm.") and _is_lora(name):
            return lora
        return False

    return rule


def set_trainable(model: nn.Module, stage: str, lora: LoraConfig | None = None) -> dict[str, int]:
    """Make exactly the parameters of ``stage`` trainable and everything else frozen.

    ``stage2`` needs LoRA on the LLM: if the model has none yet, adapters are injected from
    ``lora``, else from ``model.config.llm.lora``, else with ``LoraConfig()`` defaults.
    Frozen components are also put in eval mode (no dropout in frozen encoders).
    Returns the number of trainable parameters per component.
    """
    rule = trainable_rule(stage)
    if stage == "stage2" and not any(_is_lora(n) for n, _ in model.named_parameters()):
        model.add_lora(lora or model.config.llm.lora or LoraConfig())
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(rule(name))
    if stage == "stage2" and not any(p.requires_grad for n, p in model.named_parameters() if _is_lora(n)):
        raise ValueError("stage2 found no LoRA parameters; check llm.lora.target_modules against the LLM's module names")
    return {k: v[0] for k, v in parameter_counts(model).items()}


def component(name: str) -> str:
    """The table row a parameter belongs to."""
    if name.startswith(("input_projectors.", "output_projectors.", "encoders.")):
        return ".".join(name.split(".")[:2])
    if name.startswith("llm."):
        if _is_lora(name):
            return "llm (LoRA)"
        if _is_signal_row(name):
            return "llm (signal-token rows)"
        return "llm (base)"
    return name.split(".")[0]


def parameter_counts(model: nn.Module) -> "OrderedDict[str, tuple[int, int]]":
    """component -> (trainable, frozen) parameter counts (shared tensors counted once)."""
    counts: OrderedDict[str, list[int]] = OrderedDict()
    for name, p in model.named_parameters():
        row = counts.setdefault(component(name), [0, 0])
        row[0 if p.requires_grad else 1] += p.numel()
    return OrderedDict((k, (v[0], v[1])) for k, v in counts.items())


def parameter_table(model: nn.Module) -> str:
    """A printable table of trainable and frozen parameters per component."""
    rows = parameter_counts(model)
    width = max(len(k) for k in rows) if rows else 10
    lines = [f"{'component':<{width}}  {'trainable':>12}  {'frozen':>12}", "-" * (width + 28)]
    for k, (t, f) in rows.items():
        lines.append(f"{k:<{width}}  {t:>12,}  {f:>12,}")
    tt, ff = sum(v[0] for v in rows.values()), sum(v[1] for v in rows.values())
    lines += ["-" * (width + 28), f"{'total':<{width}}  {tt:>12,}  {ff:>12,}"]
    lines.append("(diffusion decoders: frozen, outside the module; used only for L2 targets)")
    return "\n".join(lines)
