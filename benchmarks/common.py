"""Shared pieces of the benchmarks: shapes, random builds of mmllm and its peers, timing, FLOPs, JSON.

Everything is built from configs with random weights (no hub). Two scales:

* ``llava-1.5-7b``: the ``llava-1.5-7b`` preset's shapes: CLIP ViT-L/14-336 (hf_clip, layer -2,
  576 patch tokens), ``mlp2x_gelu`` projector, Vicuna-7B LLaMA. The vocabulary is 32064 on both
  sides (llava-hf's size: 32000 + room for the ``<image>`` token), so the two models are identical.
* ``tiny``: the ``tiny`` preset's LLM (hidden 32, 2 layers, vocab 49152) and its image tower's
  sizes (16 px, patch 4, width 32, 2 layers) as an HF CLIP tower, so the peer can share it. For CPU
  checks in seconds.

A tokenizer is only needed by ``generate``: a word-level tokenizer with a chat template is made
locally (``synthetic_tokenizer``); training batches are token ids.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DATE = "2026-11-23"

# Dense bf16 tensor-core peak (no sparsity) and HBM bandwidth, from the vendors' datasheets.
GPU_PEAKS = {
    # name fragment: (bf16 TFLOP/s, memory TB/s)
    "H100 80GB HBM3": (989.4, 3.35),  # H100 SXM
    "H100 PCIe": (756.0, 2.0),
    "H100 NVL": (835.0, 3.9),
    "H200": (989.4, 4.8),
    "A100": (312.0, 2.0),
}


@dataclass(frozen=True)
class Shapes:
    """Architecture of one scale, as config dicts shared by mmllm and the peer."""

    name: str
    llm: dict  # transformers LlamaConfig fields (with model_type)
    vision: dict  # CLIPVisionConfig fields
    image_token_id: int  # id of <image> in the synthetic tokenizer; < llm vocab_size

    @property
    def image_tokens(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


def shapes(scale: str) -> Shapes:
    from mmllm.config import MMLLMConfig

    if scale == "llava-1.5-7b":
        cfg = MMLLMConfig.from_preset("llava-1.5-7b")
        llm = dict(cfg.llm.arch, vocab_size=32064, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        vision = dict(cfg.inputs["image"].encoder.arch)
        return Shapes(scale, llm, vision, image_token_id=32000)
    if scale == "tiny":
        cfg = MMLLMConfig.from_preset("tiny")
        llm = dict(cfg.llm.arch, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        v = cfg.inputs["image"].encoder.arch["vision_cfg"]
        vision = {"hidden_size": v["width"], "intermediate_size": 4 * v["width"], "num_hidden_layers": v["layers"],
                  "num_attention_heads": v["width"] // v["head_width"], "image_size": v["image_size"],
                  "patch_size": v["patch_size"], "projection_dim": cfg.inputs["image"].encoder.arch["embed_dim"]}
        return Shapes(scale, llm, vision, image_token_id=llm["vocab_size"] - 64)
    raise KeyError(f"unknown scale {scale!r}; use 'llava-1.5-7b' or 'tiny'")


# --------------------------------------------------------------------------- environment


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "date": DATE, "run_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    for pkg in ("transformers", "diffusers", "peft", "open_clip"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            info[pkg] = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info.update(name=name, cuda=torch.version.cuda,
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
        peak = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        info["peak_bf16_tflops"], info["hbm_tb_s"] = peak if peak else (None, None)
    else:
        info.update(name=platform.processor() or platform.machine(), peak_bf16_tflops=None, hbm_tb_s=None)
    return info


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def free(*objs) -> None:
    """Drop references and return cached GPU memory (between variants)."""
    import gc

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_steps(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Per-call wall seconds of ``fn`` after ``warmup`` calls, synchronising the device around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- builders


def synthetic_tokenizer(vocab_size: int, directory: str | os.PathLike) -> str:
    """A word-level tokenizer with ``vocab_size`` ids and a chat template, saved to ``directory``.

    ids: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>, then words ``w4``.. The ``<image>`` placeholder that
    mmllm adds lands at ``vocab_size`` (``Shapes.image_token_id``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    tok.save_pretrained(str(directory))
    return str(directory)


@contextlib.contextmanager
def temporary_tokenizer(vocab_size: int):
    """``synthetic_tokenizer`` in a temporary directory, removed on exit (the model reads it
    when it is built)."""
    with tempfile.TemporaryDirectory(prefix="mmllm-bench-tok-") as directory:
        yield synthetic_tokenizer(vocab_size, directory)


@contextlib.contextmanager
def build_on(device: torch.device):
    """Allocate (and randomly initialise) new modules directly on ``device``: a 7B random init on
    the GPU takes seconds, on the CPU minutes."""
    if device.type == "cuda":
        with torch.device(device):
            yield
    else:
        yield


def build_mmllm(sh: Shapes, device: torch.device, dtype: torch.dtype, tokenizer_dir: str | None = None):
    """mmllm's ``MMLLM`` at ``sh``'s shapes, random weights, SDPA attention."""
    from mmllm import MMLLM
    from mmllm.config import MMLLMConfig

    if tokenizer_dir is None:
        with temporary_tokenizer(sh.image_token_id) as directory:
            return build_mmllm(sh, device, dtype, directory)
    cfg = MMLLMConfig.from_preset("llava-1.5-7b", **{
        "llm": {"source": None, "tokenizer": tokenizer_dir, "init": "random", "arch": sh.llm,
                "attn_implementation": "sdpa", "dtype": str(dtype).removeprefix("torch.")},
        "inputs.image.encoder": {"source": None, "init": "random", "arch": sh.vision},
    }).replace(name=f"bench-{sh.name}")
    with build_on(device):
        model = MMLLM.from_config(cfg, device=device, dtype=dtype)
    if model.processor.modalities["image"].token_id != sh.image_token_id:
        raise RuntimeError("the synthetic tokenizer put <image> at an unexpected id")
    return model


def build_peer(sh: Shapes, device: torch.device, dtype: torch.dtype):
    """transformers' ``LlavaForConditionalGeneration`` at the same shapes, random weights, SDPA."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = dict(sh.llm)
    text.pop("model_type")
    conf = LlavaConfig(vision_config=CLIPVisionConfig(**sh.vision), text_config=LlamaConfig(**text),
                       image_token_id=sh.image_token_id, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=sh.image_tokens)
    with build_on(device):
        model = LlavaForConditionalGeneration._from_config(conf, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- FLOPs


def llm_block_params(llm: dict) -> int:
    """Parameters of the decoder layers (no embeddings, no LM head) from a LLaMA config dict."""
    d, ff, n = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"]
    heads, kv = llm["num_attention_heads"], llm.get("num_key_value_heads") or llm["num_attention_heads"]
    head_dim = d // heads
    attn = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    return n * (attn + 3 * d * ff + 2 * d)


def vision_params(vision: dict) -> int:
    d, ff, n = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    return n * (4 * d * d + 2 * d * ff)


def train_flops_per_sample(sh: Shapes, seq_len: int, supervised: int, live_encoder: bool,
                           projector_params: int, lora_params: int = 0) -> float:
    """Model FLOPs one frozen-LLM training sample needs (the work, not what an implementation wastes).

    * LLM forward: ``2 * N_blocks * T`` plus causal attention ``2 * L * d * T^2`` (QK^T and AV, half
      the square); backward with frozen weights computes activation gradients only: one matmul per
      forward matmul (``2 * N_blocks * T``) and twice the attention forward (dQ, dK, dV, dP).
    * LM head at supervised positions only: ``2 * V * d * n`` forward + the same backward.
    * Vision tower (live encoder only): ``2 * N_vis * (P + 1)`` forward, no backward.
    * Projector ``6 * N_proj * P``; LoRA ``6 * N_lora * T``.
    """
    llm = sh.llm
    d, n_layers, vocab = llm["hidden_size"], llm["num_hidden_layers"], llm["vocab_size"]
    n_blocks = llm_block_params(llm)
    attn_fwd = 2 * n_layers * d * seq_len ** 2
    flops = 4 * n_blocks * seq_len + 3 * attn_fwd + 4 * vocab * d * supervised
    flops += 6 * projector_params * sh.image_tokens + 6 * lora_params * seq_len
    if live_encoder:
        flops += 2 * vision_params(sh.vision) * (sh.image_tokens + 1)
    return float(flops)


def decode_bytes_per_step(sh: Shapes, batch: int, context: int, bytes_per_param: int = 2) -> float:
    """Fewest bytes one decode step reads: every LLM weight once (blocks + LM head; the embedding
    table only a row per sequence) plus each sequence's KV cache at ``context`` tokens."""
    llm = sh.llm
    d, n_layers = llm["hidden_size"], llm["num_hidden_layers"]
    kv = llm.get("num_key_value_heads") or llm["num_attention_heads"]
    kv_width = kv * d // llm["num_attention_heads"]
    weights = (llm_block_params(llm) + llm["vocab_size"] * d) * bytes_per_param
    cache = batch * context * n_layers * 2 * kv_width * bytes_per_param
    return float(weights + cache)


def add_common_args(parser, default_scale: str = "llava-1.5-7b") -> None:
    parser.add_argument("--scale", default=default_scale, choices=["llava-1.5-7b", "tiny"],
                        help="model shapes (see benchmarks/common.py)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (e.g. 2)")
    parser.add_argument("--json", default=None, help="write the result dict here")


def setup(args) -> tuple[torch.device, torch.dtype]:
    from mmllm.llm import resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return device, dtype


def fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))
