"""Training throughput and peak memory: mmllm vs transformers' Llava, same shapes, random weights.

Stage 1 (frozen LLM and vision tower, trainable projector):

* ``mmllm``: ``MMLLM.forward(..., media=pixels, labels=)``: live encoder, logits only at supervised positions.
* ``mmllm-cached``: the same with ``features=`` precomputed once (a frozen-feature cache).
* ``mmllm-compiled``: ``mmllm-cached`` with each LLM decoder layer under ``torch.compile`` (optional).
* ``peer``: ``LlavaForConditionalGeneration(..., pixel_values=, labels=)``: the plain way (full logits).
* ``peer-compiled``: ``peer`` with each LLM decoder layer under ``torch.compile`` (optional), to show
  how much of ``mmllm-compiled``'s gain is the compiler's.

Stage 2 (``--stage 2``): the same with peft LoRA r=128, alpha=256 on q/k/v/o of the LLM, projector
trainable, for ``mmllm`` and ``peer``.

Each step is zero_grad + forward + backward + AdamW step; a few warm-up steps, then timed steps
with the device synchronised. Samples are ``<s>`` + 576 image tokens + ``--text-len`` supervised
caption tokens (LLaVA's stage-1 "plain" template).

    python -m benchmarks.train --scale llava-1.5-7b --batch 16 --text-len 96 --json out.json
    python -m benchmarks.train --scale tiny --threads 2 --batch 4 --text-len 32   # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from . import common
from .common import Shapes

STAGE1_VARIANTS = ("mmllm", "mmllm-cached", "peer")
STAGE2_VARIANTS = ("mmllm", "peer")
LORA = dict(r=128, alpha=256, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def make_batch(sh: Shapes, batch: int, text_len: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(input_ids, attention_mask, labels, pixel_values): ``<s>`` + image tokens + caption tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, sh.image_token_id, (batch, text_len), generator=g)
    image = torch.full((batch, sh.image_tokens), sh.image_token_id)
    bos = torch.ones(batch, 1, dtype=torch.long)
    input_ids = torch.cat([bos, image, text], dim=1)
    labels = torch.cat([torch.full((batch, 1 + sh.image_tokens), -100), text], dim=1)
    size = sh.vision["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return (input_ids.to(device), torch.ones_like(input_ids, device=device), labels.to(device),
            pixels.to(device=device, dtype=dtype))


def set_trainable(model: torch.nn.Module, names: tuple[str, ...]) -> int:
    """Only parameters whose name contains one of ``names`` learn; returns their count."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in names))
        n += p.numel() if p.requires_grad else 0
    return n


def add_peer_lora(peer) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                     target_modules=LORA["target_modules"])
    inject_adapter_in_model(cfg, peer.model.language_model)  # the LLM only, as mmllm's add_lora


def prepare(variant: str, stage: int, sh: Shapes, device, dtype, tokenizer_dir: str | None, compile_layers: bool):
    """-> (model, loss closure factory, trainable count, projector params, lora params)."""
    from mmllm.config import LoraConfig

    if variant.startswith("mmllm"):
        model = common.build_mmllm(sh, device, dtype, tokenizer_dir)
        if stage == 2:
            model.add_lora(LoraConfig(**LORA))
        trainable = set_trainable(model, ("input_projectors.", "lora_"))
        proj = common.count_params(model.input_projectors)
        if compile_layers:
            for layer in model.llm.model.layers:
                layer.compile()
    else:
        model = common.build_peer(sh, device, dtype)
        if stage == 2:
            add_peer_lora(model)
        trainable = set_trainable(model, ("multi_modal_projector.", "lora_"))
        proj = common.count_params(model.model.multi_modal_projector)
        if compile_layers:
            for layer in model.model.language_model.layers:
                layer.compile()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    model.train()
    return model, trainable, proj, lora


def loss_fn(variant: str, model, batch, features):
    input_ids, mask, labels, pixels = batch
    if variant.startswith("peer"):
        return lambda: model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    if variant == "mmllm":
        return lambda: model(input_ids, mask, media={"image": pixels}, labels=labels).loss
    return lambda: model(input_ids, mask, labels=labels, features=features).loss


def run_variant(variant: str, stage: int, sh: Shapes, device, dtype, batch_size: int, text_len: int,
                warmup: int, steps: int, tokenizer_dir: str | None = None) -> dict:
    compile_layers = variant.endswith("-compiled")
    row = {"variant": variant, "stage": stage, "batch": batch_size, "text_len": text_len,
           "seq_len": 1 + sh.image_tokens + text_len}
    model = opt = None
    try:
        common.reset_peak(device)
        model, trainable, proj, lora = prepare(variant, stage, sh, device, dtype, tokenizer_dir, compile_layers)
        batch = make_batch(sh, batch_size, text_len, device, dtype)
        features = None
        if variant in ("mmllm-cached", "mmllm-compiled"):
            with torch.no_grad():
                features = {"image": model.encoders["image"](batch[3])}  # (B, 576, 1024), computed once
        fn = loss_fn(variant, model, batch, features)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = fn()
            loss.backward()
            opt.step()
            losses.append(loss.detach())

        times = common.time_steps(step, device, warmup, steps)
        sec = common.median(times)
        flops = train_flops_per_sample_for(sh, row["seq_len"], text_len, features is None, proj, lora)
        row.update(trainable_params=trainable, step_s=sec, step_s_all=times, samples_s=batch_size / sec,
                   tokens_s=batch_size * row["seq_len"] / sec, tflop_per_sample=flops / 1e12,
                   achieved_tflops=flops * batch_size / sec / 1e12, peak_gib=common.peak_gib(device),
                   loss_first=float(losses[0]), loss_last=float(losses[-1]))
    except Exception as err:  # noqa: BLE001 - an OOM is a result; other errors are re-raised
        if not common.is_oom(err):
            raise
        row.update(error="out of memory", peak_gib=common.peak_gib(device))
    finally:
        del model, opt
        common.free()
    return row


def train_flops_per_sample_for(sh, seq_len, text_len, live, proj, lora):
    # The supervised positions are the caption tokens (the first caption token is predicted from
    # the last image token), so n = text_len.
    return common.train_flops_per_sample(sh, seq_len, text_len, live, proj, lora)


def add_mfu(rows: list[dict], info: dict) -> None:
    peak = info.get("peak_bf16_tflops")
    for r in rows:
        if peak and "achieved_tflops" in r:
            r["mfu"] = r["achieved_tflops"] / peak


def add_ratios(rows: list[dict]) -> None:
    for stage in (1, 2):
        peer = next((r for r in rows if r["stage"] == stage and r["variant"] == "peer" and "samples_s" in r), None)
        for r in rows:
            if peer and r["stage"] == stage and "samples_s" in r:
                r["vs_peer"] = r["samples_s"] / peer["samples_s"]


def run(scale: str = "llava-1.5-7b", device=None, dtype=None, batch: int = 16, text_len: int = 96,
        warmup: int = 3, steps: int = 8, stages=(1, 2), variants1=STAGE1_VARIANTS, variants2=STAGE2_VARIANTS,
        tokenizer_dir: str | None = None) -> dict:
    device = common.pick_device(device) if not isinstance(device, torch.device) else device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sh = common.shapes(scale)
    info = common.device_info(device)
    rows = []
    with contextlib.ExitStack() as stack:
        if tokenizer_dir is None:  # one tokenizer for every mmllm build
            tokenizer_dir = stack.enter_context(common.temporary_tokenizer(sh.image_token_id))
        for stage in stages:
            for variant in (variants1 if stage == 1 else variants2):
                rows.append(run_variant(variant, stage, sh, device, dtype, batch, text_len, warmup, steps,
                                        tokenizer_dir))
                print(f"  stage {stage} {variant}: {common.fmt(rows[-1].get('samples_s'))} samples/s",
                      file=sys.stderr)
    add_mfu(rows, info)
    add_ratios(rows)
    return {"benchmark": "train", "scale": scale, "dtype": str(dtype), "env": info, "rows": rows,
            "flops_formula": common.train_flops_per_sample.__doc__}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text-len", type=int, default=96, help="caption tokens after the 576 image tokens")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--stage", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--compile", action="store_true", help="add the mmllm-compiled stage-1 row")
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    v1 = STAGE1_VARIANTS + (("mmllm-compiled",) if args.compile else ())
    result = run(args.scale, device, dtype, args.batch, args.text_len, args.warmup, args.steps, tuple(args.stage), v1)
    print(f"device: {result['env']['name']} ({device}), {result['dtype']}, scale {args.scale}")
    common.print_table(result["rows"], ["stage", "variant", "batch", "seq_len", "samples_s", "tokens_s", "vs_peer",
                                        "mfu", "peak_gib", "step_s"])
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
