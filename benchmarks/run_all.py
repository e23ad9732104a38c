"""Run several benchmarks in one process (one device lease) and write one JSON per benchmark.

    python -m benchmarks.run_all --out results/ --only train scaling decoders
    python -m benchmarks.run_all --out results/ --only infer
    python -m benchmarks.run_all --scale tiny --threads 2 --out /tmp/bench   # CPU, all of them

A benchmark that fails is reported (traceback in its JSON) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

from . import common, decoders, infer, scaling, train

BENCHMARKS = ("train", "infer", "decoders", "scaling")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--only", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    p.add_argument("--batch", type=int, default=None, help="training batch (default 16 on GPU, 4 on CPU)")
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="add the compiled rows (train layers, decode)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="training stages")
    p.add_argument("--decoder-repeats", type=int, default=None)
    p.add_argument("--train-variants", nargs="+", default=None, help="stage-1 and stage-2 variants (default: all)")
    p.add_argument("--infer-impls", nargs="+", default=None, choices=infer.IMPLS, help="default: by --compile")
    p.add_argument("--peer-compiled", action="store_true", help="also time the peer's compiled decode")
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    gpu = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = args.batch or (16 if gpu else 4)
    text_len = args.text_len or (96 if gpu else 32)
    jobs = {
        "train": lambda: train.run(args.scale, device, dtype, batch, text_len, 3 if gpu else 1, 8 if gpu else 3,
                                   tuple(args.stages),
                                   args.train_variants or train.STAGE1_VARIANTS + (("mmllm-compiled",) if args.compile else ()),
                                   args.train_variants or train.STAGE2_VARIANTS + (("mmllm-compiled",) if args.compile else ())),
        "infer": lambda: infer.run(args.scale, device, dtype, (1, 8), 128 if gpu else 16, args.infer_impls or
                                   [i for i in infer.IMPLS if args.compile or not i.endswith("compiled")
                                    if args.peer_compiled or i != "peer-compiled"]),
        "decoders": lambda: decoders.run(args.scale, device, dtype, repeats=args.decoder_repeats or (9 if gpu else 3)),
        "scaling": lambda: scaling.run(args.scale, device, dtype, (64, 448, 1472) if gpu else (8, 32),
                                       (1, 4, 16) if gpu else (1, 4)),
    }
    summary = {}
    for name in args.only:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = jobs[name]()
        except Exception as err:  # noqa: BLE001 - keep going; the traceback is the result
            result = {"benchmark": name, "error": repr(err), "traceback": traceback.format_exc()}
            print(result["traceback"], flush=True)
        result["wall_s"] = time.perf_counter() - t0
        common.write_json(out / f"{name}.json", result)
        summary[name] = result
        for row in result.get("rows", []):
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if not isinstance(v, (list, dict))}), flush=True)
        print(f"== {name} done in {result['wall_s']:.1f} s", flush=True)
    return summary


if __name__ == "__main__":
    main()
