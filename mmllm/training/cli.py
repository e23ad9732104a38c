"""Command-line flags shared by ``scripts/train_stage1.py`` and ``scripts/train_stage2.py``.

Precedence: TrainConfig defaults < ``--config file.json`` < explicit flags.
"""

from __future__ import annotations

import argparse
import json

from ..cliargs import add_dataclass_args, dataclass_overrides
from .config import TrainConfig

# TrainConfig fields with a flag of their own (--data-root for data_root), in --help order.
FLAG_FIELDS = ("model", "captions", "generation", "conversations", "data_root", "out", "steps", "epochs", "batch_size",
               "grad_accum", "lr", "projector_lr", "weight_decay", "warmup_ratio", "precision", "save_every",
               "eval_every", "log_every", "resume", "nan_policy", "mix", "shuffle_buffer", "group_by_length",
               "feature_cache", "seed")


def build_parser(description: str, stages: tuple[str, ...]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="TrainConfig JSON (e.g. configs/train/stage1.json); flags override it")
    if len(stages) > 1:
        p.add_argument("--stage", choices=stages, default=None, help="which side(s) to align (default from config: stage1)")
    add_dataclass_args(p, TrainConfig, FLAG_FIELDS)
    p.add_argument("--strict", action="store_true", default=None, help="fail at the first bad data row (with its row number)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute LLM activations in backward")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="hide the tqdm bar")
    p.add_argument("--file-passes", type=float, nargs="+", default=None, metavar="N",
                   help="passes per epoch over each data file, in the order captions, generation, conversations "
                        "(2: twice, 0.5: the first half; with --mix spread, each file's share of the batches)")
    p.add_argument("--l2-scale", type=str, default=None, help='per-modality L2 weight as JSON, e.g. \'{"video": 2}\'')
    return p


def config_from_args(args: argparse.Namespace, stage: str | None = None) -> TrainConfig:
    data = TrainConfig.from_json(args.config).to_dict() if args.config else {}
    data.update(dataclass_overrides(args, TrainConfig, FLAG_FIELDS))
    for name in ("strict", "gradient_checkpointing", "progress"):
        if getattr(args, name, None) is not None:
            data[name] = getattr(args, name)
    if args.file_passes is not None:
        data["file_passes"] = args.file_passes
    if args.l2_scale:
        data["l2_scale"] = {**data.get("l2_scale", TrainConfig().l2_scale), **json.loads(args.l2_scale)}
    if getattr(args, "stage", None):
        data["stage"] = args.stage
    if stage is not None:
        data["stage"] = stage
    data.setdefault("stage", "stage1")
    return TrainConfig.from_dict(data)
