"""Rank training recipes on the toy world: short caption runs, scored held-in and held-out.

    python scripts/compare_recipes.py --modality image --steps 120 \\
        --variant "proj-2e-3: lr=2e-3" \\
        --variant "proj-6e-3: lr=6e-3" \\
        --variant "lora: stage=stage2 lr=1e-3 projector_lr=6e-3" \\
        --variant "linear: lr=6e-3 inputs.image.projector.type=linear"

Each variant trains from the toy MMLLM's initial state (the toy components must be built:
scripts/build_toy.py) on the modality's caption pairs, then captions 48 held-in and 48
held-out renderings. ``key=value`` pairs are TrainConfig fields (stage, lr, projector_lr,
batch_size, lora ...) or dotted model-config overrides; values are read as JSON when they
parse (numbers, true, lists), else as strings. See mmllm.toy.recipes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmllm.config import parse_setting
from mmllm.toy.recipes import compare, table


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name: a=1 b.c=x"`` -> ``("name", {"a": 1, "b.c": "x"})``."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"variant {text!r} needs a name: 'NAME: key=value ...'")
    settings = {}
    for pair in rest.split():
        try:
            key, value = parse_setting(pair)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"in variant {name!r}: {e}") from None
        settings[key] = value
    return name.strip(), settings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        help="'NAME: key=value ...' (repeat for each variant)")
    parser.add_argument("--modality", choices=("image", "audio", "video"), default="image")
    parser.add_argument("--steps", type=int, default=120, help="optimiser steps per variant")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n", type=int, default=48, help="items scored per split")
    parser.add_argument("--root", type=Path, default=None, help="toy components root (default: the cache's)")
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"), help="one training dir per variant")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = compare(dict(args.variant), args.out, modality=args.modality, steps=args.steps,
                   batch_size=args.batch_size, n=args.n, root=args.root)
    print(table(rows, args.modality))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
