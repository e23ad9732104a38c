"""Stage-1 training throughput vs sequence length and batch size (mmllm, live encoder).

One model is built and a grid of (caption length, batch) is timed on it; a point that does not fit
is recorded as out of memory.

    python -m benchmarks.scaling --text-lens 64 448 1472 --batches 1 4 16 --json out.json
    python -m benchmarks.scaling --scale tiny --threads 2 --text-lens 8 32 --batches 1 4
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import common
from .train import add_mfu, make_batch, set_trainable


def run(scale: str = "llava-1.5-7b", device=None, dtype=None, text_lens=(64, 448, 1472), batches=(1, 4, 16),
        warmup: int = 2, steps: int = 4, variant: str = "mmllm") -> dict:
    device = common.pick_device(device) if not isinstance(device, torch.device) else device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sh = common.shapes(scale)
    info = common.device_info(device)
    model = common.build_mmllm(sh, device, dtype)
    set_trainable(model, ("input_projectors.",))
    model.train()
    proj = common.count_params(model.input_projectors)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")
    rows = []
    for text_len in text_lens:
        for b in batches:
            row = {"variant": variant, "stage": 1, "batch": b, "text_len": text_len,
                   "seq_len": 1 + sh.image_tokens + text_len}
            try:
                common.reset_peak(device)
                input_ids, mask, labels, pixels = make_batch(sh, b, text_len, device, dtype)
                features = None
                if variant == "mmllm-cached":
                    with torch.no_grad():
                        features = {"image": model.encoders["image"](pixels)}

                def step():
                    opt.zero_grad(set_to_none=True)
                    if features is None:
                        loss = model(input_ids, mask, media={"image": pixels}, labels=labels).loss
                    else:
                        loss = model(input_ids, mask, labels=labels, features=features).loss
                    loss.backward()
                    opt.step()

                sec = common.median(common.time_steps(step, device, warmup, steps))
                flops = common.train_flops_per_sample(sh, row["seq_len"], text_len, features is None, proj)
                row.update(step_s=sec, samples_s=b / sec, tokens_s=b * row["seq_len"] / sec,
                           achieved_tflops=flops * b / sec / 1e12, peak_gib=common.peak_gib(device))
            except Exception as err:  # noqa: BLE001
                if not common.is_oom(err):
                    raise
                row.update(error="out of memory")
            finally:
                common.free()
            rows.append(row)
            print(f"  T={row['seq_len']} B={b}: {common.fmt(row.get('tokens_s'), 0)} tokens/s", file=sys.stderr)
    add_mfu(rows, info)
    del model, opt
    common.free()
    return {"benchmark": "scaling", "scale": scale, "dtype": str(dtype), "env": info, "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--text-lens", type=int, nargs="+", default=[64, 448, 1472])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variant", default="mmllm", choices=["mmllm", "mmllm-cached"])
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    result = run(args.scale, device, dtype, tuple(args.text_lens), tuple(args.batches), args.warmup, args.steps,
                 args.variant)
    print(f"device: {result['env']['name']} ({device}), {result['dtype']}, scale {args.scale}")
    common.print_table(result["rows"], ["seq_len", "batch", "samples_s", "tokens_s", "mfu", "peak_gib", "error"])
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
