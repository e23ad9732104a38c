"""Where a toy CLIP keeps each image attribute: linear (ridge) probes on its class token,
mean patch token and all tokens, held-in and held-out, and shape on the newcomer check's 24
large centred images.

    python scripts/probe_clip.py                       # the CLIP under ~/.cache/mmllm/toy
    python scripts/probe_clip.py --root /tmp/v --json  # a variant built with scripts/build_toy.py

See mmllm.toy.quality.image_feature_probes and docs/research/README.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmllm.toy.quality import image_feature_probes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="toy root holding clip/ (default: the cache's)")
    parser.add_argument("--n-train", type=int, default=3000, help="jittered training renderings for the probes")
    parser.add_argument("--n-test", type=int, default=500, help="renderings per test split")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = image_feature_probes(args.root, n_train=args.n_train, n_test=args.n_test)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    attrs = list(next(iter(report["probes"].values())))
    print("| features | " + " | ".join(attrs) + " | newcomer shape |")
    print("|---|" + "---|" * (len(attrs) + 1))
    for feature, probes in report["probes"].items():
        cells = [f"{p['held_in']:.2f} / {p['held_out']:.2f}" for p in probes.values()]
        new = report["newcomer"][feature]
        print(f"| {feature} | " + " | ".join(cells) + f" | {new['held_in']:.2f} / {new['held_out']:.2f} |")
    for feature, new in report["newcomer"].items():
        if new["mistakes"]:
            print(f"{feature}, newcomer mistakes: " + ", ".join(new["mistakes"]))


if __name__ == "__main__":
    main()
