"""``TrainConfig``: every training setting, as data (JSON round-trip, presets in ``configs/train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mmllm.config import JsonConfig, LoraConfig

STAGES = ("stage1_enc", "stage1_dec", "stage1", "stage2", "align_outputs")
PRECISIONS = ("fp32", "no", "bf16", "fp16", "auto")
NAN_POLICIES = ("skip", "stop")
MIXES = ("mixed", "alternate", "spread", "sequential")


def _flag(default, help: str):
    """A field with a command-line flag (``mmllm.cliargs``) and its help."""
    return field(default=default, metadata={"help": help})


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
    model: str = _flag("tiny", "preset name, save_pretrained dir, or a previous stage's --out dir")
    out: str = _flag("runs/stage1", "output dir: checkpoints/, logs/, model/ (the finished stage), bad_rows.json")
    captions: Optional[str] = _flag(None, "caption pairs (.jsonl/.csv: modality, path, caption), encoding side")
    generation: Optional[str] = _flag(None, "generation pairs (.jsonl/.csv: modality, caption), decoding side")
    conversations: Optional[str] = _flag(None, "LLaVA conversations (.json list or .jsonl)")
    data_root: Optional[str] = _flag(None, "media paths are relative to this (default: each data file's folder)")
    steps: int = _flag(0, "optimiser steps (0: use --epochs)")
    epochs: int = _flag(1, "passes over the data when --steps is 0")
    batch_size: int = _flag(8, "samples per micro-batch per process")
    grad_accum: int = _flag(1, "micro-batches per optimiser step")
    lr: float = _flag(4e-4, "learning rate (LoRA, signal-token rows)")
    projector_lr: Optional[float] = _flag(None, "learning rate of the projectors (default: --lr)")
    weight_decay: float = _flag(0.0, "AdamW weight decay")
    warmup_ratio: float = _flag(0.03, "share of steps with linear warmup before cosine decay")
    max_grad_norm: float = 1.0
    precision: str = _flag("fp32", "fp32 | bf16 | fp16 (mixed precision through accelerate) | "
                                   "auto (bf16 where native, else fp32)")
    gradient_checkpointing: bool = False
    lm_scale: float = 1.0
    l2_scale: dict = field(default_factory=lambda: {"image": 1.0, "audio": 1.0, "video": 1.0})
    mix: str = _flag("mixed", "mixed | alternate | spread | sequential: how several data files share batches")
    shuffle_buffer: int = _flag(0, "streaming shuffle buffer size (0: file order)")
    file_passes: Optional[list] = None
    group_by_length: int = _flag(0, "batch similar lengths together within windows of N batches (0: off)")
    lora: Optional[LoraConfig] = None
    save_every: int = _flag(0, "checkpoint every N steps (0: never)")
    eval_every: int = _flag(0, "run the evaluation hook every N steps (library use)")
    log_every: int = _flag(1, "TensorBoard scalars every N steps")
    keep_checkpoints: int = 2
    resume: Optional[str] = _flag(None, "checkpoint dir to resume from, or 'latest'")
    nan_policy: str = _flag("skip", "skip | stop on a NaN/Inf loss")
    strict: bool = False
    max_bad_row_share: float = field(default=0.5, metadata={
        "minimum": 0, "maximum": 1, "help": "fail the run when more than this share of rows cannot be read"})
    allow_outside_data_root: bool = _flag(False, "open media paths that leave data_root")
    feature_cache: Optional[str] = _flag(None, "dir written by scripts/cache_features.py")
    seed: int = _flag(0, "random seed")
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
    than in fp32 (docs/research/README.md); a CPU without them emulates bf16,
    slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
