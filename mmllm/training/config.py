"""``TrainConfig``: every training setting, as data (JSON round-trip, presets in ``configs/train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mmllm.config import JsonConfig, LoraConfig

STAGES = ("stage1_enc", "stage1_dec", "stage1", "stage2", "align_outputs")
PRECISIONS = ("fp32", "no", "bf16", "fp16", "auto")
NAN_POLICIES = ("skip", "stop")
MIXES = ("mixed", "alternate", "spread", "sequential")


@dataclass
class TrainConfig(JsonConfig):
    """One training run.

    stage: which parameters learn (``mmllm.training.freeze.set_trainable``): ``stage1_enc``
        (input projectors), ``stage1_dec`` (output projectors + signal-token rows), ``stage1``
        (both), ``stage2`` (LoRA + projectors + signal-token rows) or ``align_outputs`` (the
        output projectors alone; ``mmllm.training.align`` trains them fast on cached states).
    model: preset name or ``save_pretrained`` directory (a training output dir works too).
    captions / generation / conversations: data files (JSONL, CSV; conversations also LLaVA
        JSON). Captions feed the encoding side, generation pairs the decoding side, both in
        LLaVA's "plain" format; conversations are chat-template multi-turn dialogues.
    data_root: media paths in the data files are relative to it (default: each file's folder).
    steps: optimiser steps; ``epochs`` is used when ``steps`` is 0.
    batch_size: samples per micro-batch and process; global batch = batch_size x grad_accum x processes.
    lr / projector_lr: learning rate of LoRA and signal rows / of the projectors (None: ``lr``).
    warmup_ratio: linear warmup share of the steps, then cosine decay to 0.
    precision: ``fp32`` (or ``no``), ``bf16`` or ``fp16`` mixed precision (accelerate), or
        ``auto``: bf16 where the machine computes it natively (``native_bf16``), else fp32.
    l2_scale: per-modality weight of the L2 loss to the decoder's text conditioning.
    mix: ``mixed`` batches (sources interleaved row by row), ``alternate`` (whole batches, one
        source after another until each runs out, so the largest source ends the epoch alone)
        or ``spread`` (whole batches, each source's spread evenly over the epoch: all end together),
        or ``sequential`` (each file's batches in turn, in the order given: a curriculum).
    file_passes: how many times an epoch reads each data file, one number per file in the order
        captions, generation, conversations (None: once each). 2 reads a file twice, 0.25 its
        first quarter, 0 not at all; with ``mix="spread"`` this weights each file's share of the
        batches (LLaVA-style data mixing: up-weight a small or hard source).
    group_by_length: LLaVA-style length grouping: each window of this many batches' examples
        is sorted by token length before it is cut into batches, which run in a seeded random
        order; less padding, same examples per epoch. 0: batches in stream order.
    save_every / eval_every / log_every: in optimiser steps; 0 disables.
    resume: a checkpoint directory, or ``latest`` for the newest under ``out/checkpoints``.
    nan_policy: on a NaN/Inf loss, ``skip`` the step (weights untouched) or ``stop``.
    strict: stop at the first bad data row (with its row number) instead of skipping it.
    max_bad_row_share: the run fails, without saving a model, when more than this share of
        the rows it read were bad (and always when every row was bad); 1.0 never fails.
    allow_outside_data_root: open media paths that lead out of the data root (``../x``,
        absolute paths elsewhere); off, such a row is bad.
    feature_cache: directory written by ``scripts/cache_features.py``; media and targets found
        there are read instead of running the frozen encoders / decoder text encoders.
    """

    stage: str = "stage1"
    model: str = "tiny"
    out: str = "runs/stage1"
    captions: Optional[str] = None
    generation: Optional[str] = None
    conversations: Optional[str] = None
    data_root: Optional[str] = None
    steps: int = 0
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 4e-4
    projector_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    lm_scale: float = 1.0
    l2_scale: dict = field(default_factory=lambda: {"image": 1.0, "audio": 1.0, "video": 1.0})
    mix: str = "mixed"
    shuffle_buffer: int = 0
    file_passes: Optional[list] = None
    group_by_length: int = 0
    lora: Optional[LoraConfig] = None
    save_every: int = 0
    eval_every: int = 0
    log_every: int = 1
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    nan_policy: str = "skip"
    strict: bool = False
    max_bad_row_share: float = field(default=0.5, metadata={"minimum": 0, "maximum": 1})
    allow_outside_data_root: bool = False
    feature_cache: Optional[str] = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        checks = (("stage", self.stage, STAGES), ("precision", self.precision, PRECISIONS),
                  ("nan_policy", self.nan_policy, NAN_POLICIES), ("mix", self.mix, MIXES))
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"TrainConfig.{name}={value!r}; use one of {list(valid)}")
        if self.steps <= 0 and self.epochs <= 0:
            raise ValueError("set steps > 0 or epochs > 0")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if not 0 <= self.max_bad_row_share <= 1:
            raise ValueError(f"max_bad_row_share={self.max_bad_row_share}; use a share from 0 to 1 (1: never fail)")
        if self.group_by_length < 0:
            raise ValueError(f"group_by_length={self.group_by_length}; use 0 (off) or a window of N >= 1 batches")

    @property
    def mixed_precision(self) -> str:
        """The ``Accelerator(mixed_precision=...)`` value."""
        return mixed_precision(self.precision)


def mixed_precision(precision: str) -> str:
    """A ``precision`` setting (one of ``PRECISIONS``) as accelerate names the autocast it
    runs: "no", "bf16" or "fp16"; "auto" is "bf16" where ``native_bf16()`` holds."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16() else "no"
    return "no" if precision in ("fp32", "no") else precision


def native_bf16() -> bool:
    """Whether bf16 autocast runs natively here: on the CUDA GPU accelerate will pick (Ampere or
    later), else on a CPU with AVX512-BF16 or AMX. There the toy stages ran 1.16-1.33x faster
    than in fp32 (docs/RESULTS.md, "Mixed precision on the CPU"); a CPU without them emulates bf16,
    slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
