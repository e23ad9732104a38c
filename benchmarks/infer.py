"""Inference: time to first token with one image and decode speed at batch 1 and 8,
mmllm ``generate`` vs transformers' ``LlavaForConditionalGeneration.generate``, same shapes, random weights.

Greedy decoding, ``max_new_tokens=min_new_tokens=N`` (EOS ignored). A logits processor stamps the
clock (after a device sync) at every step, so one call gives both numbers: TTFT is the time from the
call to the first step's logits (image encoding + prefill, and for mmllm its preprocessing and
tokenisation too), and the decode time per token is the mean gap between later steps.

Rows (``--impls``):

* ``mmllm``: ``model.generate(prompt, image=...)`` / ``generate_batch`` with the default dynamic cache.
* ``mmllm-static``: the same with ``cache_implementation="static", disable_compile=True``.
* ``mmllm-compiled``: ``cache_implementation="static"``: transformers then compiles the decode step
  (inductor, ``reduce-overhead``: CUDA graphs). GPU only.
* ``peer`` / ``peer-compiled``: the same two settings for Llava, fed the same token ids and pixels.

The bound is the fewest bytes a decode step must read (all LLM weights once plus the KV cache)
over the HBM bandwidth.

    python -m benchmarks.infer --scale llava-1.5-7b --batches 1 8 --new-tokens 128 --json out.json
    python -m benchmarks.infer --scale tiny --threads 2 --impls mmllm mmllm-static peer   # CPU
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from . import common

IMPLS = ("mmllm", "mmllm-static", "mmllm-compiled", "peer", "peer-compiled")
PROMPT = " ".join(f"w{i}" for i in range(10, 42))  # 32 words


class StepClock:
    """A logits processor that records the time each step's logits are ready."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        common.sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _settings(impl: str) -> dict:
    if impl.endswith("-static"):
        return {"cache_implementation": "static", "disable_compile": True}
    if impl.endswith("-compiled"):
        return {"cache_implementation": "static"}
    return {}


def mmllm_call(model, image, batch: int, new_tokens: int, impl: str, clock: StepClock):
    from transformers import LogitsProcessorList

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]),
                  **_settings(impl))
    if batch == 1:
        return [model.generate(PROMPT, image=image, **kwargs)]
    return model.generate_batch([{"prompt": PROMPT, "image": image}] * batch, **kwargs)


def peer_inputs(model, image, batch: int):
    """The exact ids, mask and pixels mmllm builds for the same request (left padded)."""
    from mmllm.generation import build_request

    messages, lists = build_request(model, PROMPT, {"image": image})
    b = model.processor([messages] * batch, [lists] * batch, add_generation_prompt=True, padding_side="left")
    return b.to(model.device)


def peer_call(peer, inputs, new_tokens: int, impl: str, clock: StepClock, dtype):
    from transformers import LogitsProcessorList

    with torch.no_grad():
        return peer.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                             pixel_values=inputs.media["image"].to(dtype), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=0, eos_token_id=2, logits_processor=LogitsProcessorList([clock]),
                             **_settings(impl))


def measure(call, device, new_tokens: int, warmup: int, repeats: int) -> dict:
    """Median TTFT and per-token decode time over ``repeats`` calls of ``call(clock)``."""
    for _ in range(warmup):
        call(StepClock(device))
    ttft, per_token, total, out = [], [], [], None
    for _ in range(repeats):
        clock = StepClock(device)
        common.sync(device)
        t0 = time.perf_counter()
        out = call(clock)
        common.sync(device)
        total.append(time.perf_counter() - t0)
        s = clock.stamps
        if len(s) != new_tokens:
            raise RuntimeError(f"expected {new_tokens} decoding steps, saw {len(s)}")
        ttft.append(s[0] - t0)
        per_token.append((s[-1] - s[0]) / max(1, len(s) - 1))
    return {"ttft_s": common.median(ttft), "decode_s_per_token": common.median(per_token),
            "call_s": common.median(total), "ttft_s_all": ttft, "decode_s_all": per_token, "out": out}


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    fractions = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        fractions.append(n / max(1, max(len(x), len(y))))
    return sum(fractions) / max(1, len(fractions))


def run(scale: str = "llava-1.5-7b", device=None, dtype=None, batches=(1, 8), new_tokens: int = 128,
        impls=IMPLS, warmup: int = 1, repeats: int = 3) -> dict:
    device = common.pick_device(device) if not isinstance(device, torch.device) else device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type != "cuda":
        impls = [i for i in impls if not i.endswith("-compiled")]  # transformers compiles on GPUs only
    sh = common.shapes(scale)
    info = common.device_info(device)
    size = sh.vision["image_size"]
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    rows, tokens = [], {}
    model = common.build_mmllm(sh, device, dtype)
    inputs = {b: peer_inputs(model, image, b) for b in batches}
    prompt_len = inputs[batches[0]].input_ids.shape[1]
    for impl in [i for i in impls if i.startswith("mmllm")]:
        for b in batches:
            common.reset_peak(device)
            m = measure(lambda c: mmllm_call(model, image, b, new_tokens, impl, c), device, new_tokens,
                        warmup + (1 if impl.endswith("compiled") else 0), repeats)
            tokens[(impl, b)] = [r.token_ids for r in m.pop("out")]
            rows.append({"impl": impl, "batch": b, **m, "peak_gib": common.peak_gib(device)})
            print(f"  {impl} b{b}: {1 / m['decode_s_per_token']:.1f} steps/s", file=sys.stderr)
    common.free(model)
    del model
    common.free()
    peer_impls = [i for i in impls if i.startswith("peer")]
    if peer_impls:
        peer = common.build_peer(sh, device, dtype)
        for impl in peer_impls:
            for b in batches:
                common.reset_peak(device)
                m = measure(lambda c: peer_call(peer, inputs[b], new_tokens, impl, c, dtype), device, new_tokens,
                            warmup + (1 if impl.endswith("compiled") else 0), repeats)
                m.pop("out")
                rows.append({"impl": impl, "batch": b, **m, "peak_gib": common.peak_gib(device)})
                print(f"  {impl} b{b}: {1 / m['decode_s_per_token']:.1f} steps/s", file=sys.stderr)
        del peer
        common.free()
    bw = info.get("hbm_tb_s")
    for r in rows:
        r["decode_tok_s"] = r["batch"] / r["decode_s_per_token"]  # all sequences together
        r["decode_tok_s_per_seq"] = 1 / r["decode_s_per_token"]
        if bw:
            step_bytes = common.decode_bytes_per_step(sh, r["batch"], prompt_len + new_tokens // 2)
            bound_s = step_bytes / (bw * 1e12)
            r["bound_tok_s"] = r["batch"] / bound_s
            r["frac_of_bound"] = bound_s / r["decode_s_per_token"]
        peer = next((p for p in rows if p["impl"] == "peer" and p["batch"] == r["batch"]), None)
        if peer:
            r["decode_vs_peer"] = peer["decode_s_per_token"] / r["decode_s_per_token"]
            r["ttft_vs_peer"] = peer["ttft_s"] / r["ttft_s"]
    same = {f"{impl}-b{b}": tokens[(impl, b)] == tokens[("mmllm", b)] for impl, b in tokens if impl != "mmllm"}
    # Greedy tokens agreeing with plain mmllm before the first difference, as a fraction (random
    # weights give near-flat logits, so a bf16 rounding difference can flip an argmax).
    agree = {f"{impl}-b{b}": _agreement(tokens[(impl, b)], tokens[("mmllm", b)])
             for impl, b in tokens if impl != "mmllm"}
    return {"same_prefix_fraction": agree, "benchmark": "infer", "scale": scale, "dtype": str(dtype), "env": info, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "rows": rows, "same_tokens_as_plain": same}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    result = run(args.scale, device, dtype, tuple(args.batches), args.new_tokens, args.impls, args.warmup,
                 args.repeats)
    print(f"device: {result['env']['name']} ({device}), {result['dtype']}, scale {args.scale}, "
          f"prompt {result['prompt_len']} tokens, {args.new_tokens} new")
    common.print_table(result["rows"], ["impl", "batch", "ttft_s", "decode_tok_s", "decode_vs_peer", "ttft_vs_peer",
                                        "bound_tok_s", "frac_of_bound", "peak_gib"])
    print("same tokens as plain mmllm:", result["same_tokens_as_plain"])
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
