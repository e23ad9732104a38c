"""Precompute frozen encoder outputs and decoder L2 targets into safetensors shards.

Training with --feature-cache DIR then reads them instead of running the frozen encoders
and the decoders' text encoders:

    python scripts/cache_features.py --model tiny --captions data/captions.jsonl \\
        --generation data/generation.jsonl --out cache/tiny
"""

import argparse

from mmllm.training import DataReport, ExampleBuilder, StreamingData, build_feature_cache, load_model, sources_from


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="preset, save_pretrained dir or training --out dir")
    p.add_argument("--captions", help="caption pairs file")
    p.add_argument("--generation", help="generation pairs file")
    p.add_argument("--conversations", help="LLaVA conversations file")
    p.add_argument("--data-root", default=None, help="media paths are relative to this")
    p.add_argument("--out", required=True, help="cache directory (written atomically)")
    p.add_argument("--shard-size", type=int, default=1024, help="tensors per safetensors shard")
    p.add_argument("--batch-size", type=int, default=32, help="items per encoder call")
    p.add_argument("--strict", action="store_true", help="fail at the first bad row")
    args = p.parse_args(argv)
    model = load_model(args.model).eval()
    report = DataReport(strict=args.strict)
    data = StreamingData(sources_from(args.captions, args.generation, args.conversations),
                         ExampleBuilder(model, args.data_root), 1, report)
    counts = build_feature_cache(model, (ex for batch in data for ex in batch), args.out, args.shard_size,
                                 args.batch_size)
    print(f"cached {counts['features']} encoder output(s) and {counts['targets']} target(s) in {args.out}")
    print(report.summary())


if __name__ == "__main__":
    main()
