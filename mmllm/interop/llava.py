"""transformers' Llava checkpoints, both ways.

``from_llava(path)`` opens a ``LlavaForConditionalGeneration`` directory as an ``MMLLM``.
The checkpoint is split once into standard component folders in an export directory
(``export_dir=``, default ``$MMLLM_CACHE/llava/<name>-<fingerprint>``)::

    llm/                    the text model + LM head as its own CausalLM class, with the tokenizer
                            (holding the image token and a chat template) and generation config
    vision/                 the vision tower as a CLIPVisionModelWithProjection (its projection head
                            is not part of Llava and is written as zeros; mmllm never reads it here)
    projector.safetensors   the multi-modal projector in mmllm's parameter names
    config.json             the MMLLMConfig whose LLM and encoder sources are the folders above

The model is then built by ``MMLLM.from_config`` from that config, like any other: frozen
parts come from their sources, the projector is the only trained part. So
``model.save_pretrained(d)`` writes an ordinary mmllm checkpoint that references ``llm/`` and
``vision/`` by absolute path and reloads with ``mmllm.load(d)``; keep the export directory.

``save_llava(model, path)`` writes the reverse: a directory that
``transformers.LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` open.

Differences that remain (image preprocessing above all) are listed in ``docs/interop.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..fileio import atomic_directory, work_directory
from ..config import EncoderConfig, InputConfig, LLMConfig, MMLLMConfig, ProjectorConfig
from ..llm import cache_dir
from ..model import CONFIG_NAME, MMLLM
from ..weights import load_state_dict

PROJECTOR_NAME = "projector.safetensors"
DONE_NAME = "mmllm_llava_export.json"  # written last: its presence marks a complete export
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Llava's feature-select strategies <-> mmllm encoder ``features``.
STRATEGY_TO_FEATURES = {"default": "patch", "full": "all"}
FEATURES_TO_STRATEGY = {v: k for k, v in STRATEGY_TO_FEATURES.items()}

_UNSUPPORTED = {
    "llava_next": "LLaVA-NeXT tiles each image at several resolutions (anyres) and adds newline embeddings",
    "llava_next_video": "LLaVA-NeXT-Video tiles images (anyres) and pools video frames",
    "llava_onevision": "LLaVA-OneVision tiles images (anyres) with a SigLIP tower",
    "vipllava": "VipLLaVA concatenates several vision layers through its own projector",
}
# Configs written by the original LLaVA repository (haotian-liu/LLaVA), not by transformers.
_ORIGINAL_REPO = ("llava_llama", "llava_mistral", "llava_mpt", "llava_qwen")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_model_type(path: Path) -> str | None:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError):  # not a Llava config; the mmllm loader says what is wrong
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def is_llava_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path/config.json`` names a LLaVA-family model (``from_llava`` opens or refuses it)."""
    model_type = _read_model_type(Path(path))
    return isinstance(model_type, str) and (model_type.startswith("llava") or model_type == "vipllava")


# --------------------------------------------------------------------------- reading a checkpoint


def read_llava_config(path: str | os.PathLike):
    """``path/config.json`` -> a validated ``LlavaConfig``; unsupported variants are refused."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; point to a LlavaForConditionalGeneration directory")
    raw = json.loads((path / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type in _UNSUPPORTED:
        raise ValueError(
            f"{str(path)!r} is a {model_type!r} checkpoint: {_UNSUPPORTED[model_type]}, which mmllm does not "
            "model. Only plain 'llava' (one CLIP tower, one fixed-size image, a 2-layer MLP projector) is supported."
        )
    if model_type in _ORIGINAL_REPO or "mm_projector_type" in raw or "mm_vision_tower" in raw:
        raise ValueError(
            f"{str(path)!r} is in the original LLaVA repository's format (model_type={model_type!r}); convert it to "
            "transformers' Llava format first with transformers' models/llava/convert_llava_weights_to_hf.py, "
            "then open the converted directory"
        )
    if model_type != "llava":
        raise ValueError(f"{str(path)!r} has model_type={model_type!r}; from_llava opens model_type 'llava' only")
    conf = AutoConfig.from_pretrained(path)
    vision_type = conf.vision_config.model_type
    if vision_type != "clip_vision_model":
        raise ValueError(
            f"the Llava vision tower in {str(path)!r} is {vision_type!r}; mmllm reads CLIP vision towers only "
            "(encoder backend 'hf_clip'). Use a checkpoint with a CLIP tower."
        )
    if not isinstance(conf.vision_feature_layer, int):
        raise ValueError(
            f"vision_feature_layer={conf.vision_feature_layer!r} concatenates several layers; mmllm's encoders read "
            "one layer. Use a checkpoint with a single integer vision_feature_layer."
        )
    if conf.vision_feature_select_strategy not in STRATEGY_TO_FEATURES:
        raise ValueError(
            f"vision_feature_select_strategy={conf.vision_feature_select_strategy!r}; "
            f"supported: {sorted(STRATEGY_TO_FEATURES)}"
        )
    return conf


def _checkpoint_keys(path: Path) -> set[str]:
    """Tensor names in the checkpoint's safetensors files (headers only; no weights are read)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no .safetensors weights in {str(path)!r}; mmllm refuses pickle-based files. Convert once, in a process "
            "you trust: LlavaForConditionalGeneration.from_pretrained(path).save_pretrained(path)"
        )
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _projector_type(path: Path, conf) -> str:
    """``mlp2x_gelu`` for transformers' linear_1 -> act -> linear_2; ``linear`` when only linear_1 exists."""
    keys = _checkpoint_keys(path)
    has_1 = any(k.endswith("multi_modal_projector.linear_1.weight") for k in keys)
    has_2 = any(k.endswith("multi_modal_projector.linear_2.weight") for k in keys)
    if has_1 and not has_2:
        return "linear"  # LLaVA v1 style: a single linear map
    if not (has_1 and has_2):
        raise ValueError(f"no multi_modal_projector.linear_1/linear_2 weights in {str(path)!r}; is it a Llava checkpoint?")
    if conf.projector_hidden_act != "gelu":
        raise ValueError(
            f"projector_hidden_act={conf.projector_hidden_act!r}; mmllm's mlp2x_gelu projector uses exact GELU "
            "('gelu') and would not reproduce this checkpoint. Only 'gelu' projectors are supported."
        )
    return "mlp2x_gelu"


def _processor_chat_template(path: Path) -> tuple[str | None, str | None]:
    """The chat template stored beside the processor, if any: (template, file name)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(), "chat_template.jinja"
    for name in ("chat_template.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if isinstance(template, str):
                return template, name
    return None, None


def _renders_plain_text(tok, template: str, placeholder: str) -> bool:
    """mmllm passes message content as a string with the placeholder inline; does the template render it?"""
    probe = "mmllm template probe"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": f"{placeholder}\n{probe}"}], chat_template=template,
                                       tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that indexes content as a list fails here in many ways
        return False
    return probe in text and placeholder in text


def llava_tokenizer(path: str | os.PathLike, conf):
    """The checkpoint's tokenizer with a string-content chat template; -> (tokenizer, image token)."""
    from transformers import AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path)
    image_id = conf.image_token_id
    token = tok.convert_ids_to_tokens(image_id)
    if not isinstance(token, str) or tok(token, add_special_tokens=False)["input_ids"] != [image_id]:
        raise ValueError(
            f"the tokenizer in {str(path)!r} does not encode the image token id {image_id} as one token "
            f"(it maps to {token!r}). Add it (tok.add_tokens(['<image>'], special_tokens=True)), save the tokenizer "
            "and set image_token_index in config.json to its id."
        )
    template, origin = tok.chat_template, "the tokenizer"
    if template is None:
        template, origin = _processor_chat_template(path)
    fix = (
        f"Give the tokenizer a template that takes plain-string message content with {token!r} inline: "
        f"tok = AutoTokenizer.from_pretrained(path); tok.chat_template = '...'; tok.save_pretrained(path)"
    )
    if template is None:
        raise ValueError(f"{str(path)!r} has no chat template (tokenizer or processor); mmllm formats chats only "
                         f"with the tokenizer's own template. {fix}")
    if not _renders_plain_text(tok, template, token):
        raise ValueError(f"the chat template from {origin} in {str(path)!r} does not render plain-string content "
                         f"(it expects lists of {{'type': ...}} parts, as processors do). {fix}")
    tok.chat_template = template
    return tok, token


def _image_norm(path: Path) -> tuple[list[float], list[float]]:
    """The checkpoint's image mean/std (from its image processor), else CLIP's."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):  # no image processor saved beside the model
        return list(CLIP_MEAN), list(CLIP_STD)
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    return [float(v) for v in (mean or CLIP_MEAN)], [float(v) for v in (std or CLIP_STD)]


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def default_export_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    return cache_dir() / "llava" / f"{path.resolve().name}-{_fingerprint(path)}"


# --------------------------------------------------------------------------- Llava -> mmllm


def _export(path: Path, export: Path) -> None:
    """Split the Llava checkpoint at ``path`` into the component folders of ``export`` (atomically)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CLIPVisionModelWithProjection, LlavaForConditionalGeneration

    conf = read_llava_config(path)
    projector_type = _projector_type(path, conf)
    tok, placeholder = llava_tokenizer(path, conf)
    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype="auto", use_safetensors=True)
    tmp = work_directory(export)
    try:
        # LLM: Llava's text model and LM head, re-homed in the CausalLM class of text_config.
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(conf.text_config)
        setattr(llm, llm.base_model_prefix, llava.model.language_model)
        llm.set_output_embeddings(llava.lm_head)
        llm.generation_config = llava.generation_config
        llm.save_pretrained(tmp / "llm")
        tok.save_pretrained(tmp / "llm")

        # Vision: the CLIP tower (a CLIPVisionModel); mmllm's hf_clip backend loads it inside a
        # CLIPVisionModelWithProjection, whose vision_model it becomes.
        tower = llava.model.vision_tower
        vconf = conf.vision_config
        with torch.device("meta"):
            vision = CLIPVisionModelWithProjection(vconf)
        vision.vision_model = tower
        dtype = next(tower.parameters()).dtype
        vision.visual_projection = nn.Linear(vconf.hidden_size, vconf.projection_dim, bias=False, dtype=dtype)
        nn.init.zeros_(vision.visual_projection.weight)  # not part of Llava; never read for patch features
        vision.save_pretrained(tmp / "vision")

        # Projector, in mmllm's names (missing biases are exact zeros).
        p = llava.model.multi_modal_projector
        layers = {"linear_1": p.linear_1, "linear_2": p.linear_2} if projector_type == "mlp2x_gelu" else {"proj": p.linear_1}
        state = {}
        for name, lin in layers.items():
            state[f"{name}.weight"] = lin.weight.detach().contiguous()
            state[f"{name}.bias"] = (lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)).contiguous()
        save_file(state, str(tmp / PROJECTOR_NAME), metadata={"format": "pt"})

        mean, std = _image_norm(path)
        text_conf = conf.text_config
        config = MMLLMConfig(
            name=f"llava:{path.resolve().name}",
            max_length=int(getattr(text_conf, "max_position_embeddings", None) or 2048),
            llm=LLMConfig(source=str(export / "llm"), dtype=_dtype_name(next(llm.parameters()).dtype)),
            inputs={"image": InputConfig(
                placeholder=placeholder,
                encoder=EncoderConfig(backend="hf_clip", source=str(export / "vision"),
                                      feature_layer=conf.vision_feature_layer,
                                      features=STRATEGY_TO_FEATURES[conf.vision_feature_select_strategy],
                                      options={"image_mean": mean, "image_std": std}),
                projector=ProjectorConfig(type=projector_type),
            )},
        )
        config.to_json(tmp / CONFIG_NAME)
        (tmp / DONE_NAME).write_text(json.dumps({"source": str(path.resolve()), "fingerprint": _fingerprint(path)}) + "\n")
        if export.exists():
            export.rmdir()  # an empty directory (checked by the caller)
        try:
            os.replace(tmp, export)
        except OSError:
            if not (export / DONE_NAME).is_file():  # a concurrent export won the race; otherwise re-raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def from_llava(path: str | os.PathLike, device=None, dtype=None, *, export_dir: str | os.PathLike | None = None,
               **overrides) -> MMLLM:
    """Open a transformers ``LlavaForConditionalGeneration`` directory as an ``MMLLM``.

    The first call splits the checkpoint into ``export_dir`` (default under ``$MMLLM_CACHE/llava``);
    later calls reuse it. ``overrides`` change the resulting config (e.g. add ``outputs``).
    Sequences match transformers': one ``<image>`` in the prompt expands to the tower's patch
    count (``'default'``) or patch count + 1 (``'full'``).
    """
    path = Path(path)
    read_llava_config(path)  # refuse unsupported variants before any work
    export = Path(export_dir) if export_dir is not None else default_export_dir(path)
    if not (export / DONE_NAME).is_file():
        if export.exists() and any(export.iterdir()):
            raise FileExistsError(
                f"export_dir {str(export)!r} exists and is not a finished Llava export; pass an empty or new directory"
            )
        _export(path, export)
    config = MMLLMConfig.from_json(export / CONFIG_NAME)
    if overrides:
        config = config.replace(**overrides)
    model = MMLLM.from_config(config, device=device, dtype=dtype)
    model.input_projectors["image"].load_state_dict(load_state_dict(export / PROJECTOR_NAME))
    return model


# --------------------------------------------------------------------------- mmllm -> Llava


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen matrix of an embedding or LM head, unwrapping signal-token wrappers (``.base``)."""
    base = getattr(module, "base", module)
    return base.weight.detach()


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """(V, D) -> (rows, D), new rows zero."""
    if rows == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def _merged_state(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's state dict with any peft LoRA adapters merged into their base weights
    (W + B A * scaling), under the plain names; the model itself is left untouched."""
    state = decoder.state_dict()
    if not any("lora_" in k for k in state):
        return state
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    for name, module in decoder.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            key = f"{name}.weight"
            with torch.no_grad():
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        out[key] = out[key] + module.get_delta_weight(adapter).to(out[key].dtype)
    return out


def save_llava(model: MMLLM, path: str | os.PathLike, *, drop_unsupported: bool = False) -> Path:
    """Write ``model``'s image -> text path as a transformers Llava directory (model, tokenizer, processor).

    Needs an ``image`` input with an ``hf_clip`` encoder (features ``patch`` or ``all``) and an
    ``mlp2x_gelu`` projector. LoRA adapters on the LLM are merged into the exported weights
    (the model is not changed). Other inputs and the output side
    have no Llava equivalent: they are refused unless ``drop_unsupported=True`` leaves them out.
    If the image token lies past the LLM's vocabulary, the embedding and LM head are padded with
    zero rows to cover it and the generation config suppresses the padded ids, so transformers
    generates exactly what mmllm does.
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    cfg = model.config
    if "image" not in cfg.inputs:
        raise ValueError(f"save_llava exports an image input; this model has inputs {sorted(cfg.inputs)}")
    extra = sorted(set(cfg.inputs) - {"image"}) + [f"outputs.{m}" for m in sorted(cfg.outputs)]
    if extra and not drop_unsupported:
        raise ValueError(
            f"Llava holds one image input and text output; this model also has {extra}. Pass "
            "drop_unsupported=True to export only the image -> text path (save_pretrained keeps everything)."
        )
    icfg = cfg.inputs["image"]
    enc, proj = model.encoders["image"], model.input_projectors["image"]
    if icfg.encoder.backend != "hf_clip":
        raise ValueError(f"Llava's vision tower is a transformers CLIP vision model; this image encoder is backend "
                         f"{icfg.encoder.backend!r}. Build the model with encoder backend 'hf_clip'.")
    if icfg.encoder.features not in FEATURES_TO_STRATEGY:
        raise ValueError(f"encoder features={icfg.encoder.features!r} has no Llava strategy; use 'patch' or 'all'")
    if icfg.projector.type != "mlp2x_gelu":
        raise ValueError(
            f"transformers' Llava projector is Linear -> GELU -> Linear; a {icfg.projector.type!r} projector has no "
            "Llava equivalent. Use projector type 'mlp2x_gelu', or keep this model in mmllm's format (save_pretrained)."
        )
    head = model.llm.get_output_embeddings()
    if hasattr(head, "base_layer") or hasattr(model.llm.get_input_embeddings(), "base_layer"):
        raise ValueError("LoRA on the embedding or LM head cannot be exported; target attention/MLP layers only")
    if getattr(getattr(head, "base", head), "bias", None) is not None:
        raise ValueError("Llava's LM head has no bias; this LLM's head has one, so it cannot be exported")

    tok = model.tokenizer
    image_id = tok.convert_tokens_to_ids(icfg.placeholder)
    emb_w, head_w = _base_weight(model.llm.get_input_embeddings()), _base_weight(head)  # (V, D)
    vocab = max(emb_w.shape[0], head_w.shape[0], image_id + 1)
    text_config = model.llm.config.__class__.from_dict(model.llm.config.to_dict())
    text_config.vocab_size = vocab

    # Llava state dict, in transformers 5 names.
    state = {f"model.language_model.{k}": v for k, v in _merged_state(model.llm.get_decoder()).items()
             if not k.startswith("embed_tokens.")}
    state["model.language_model.embed_tokens.weight"] = _pad_rows(emb_w, vocab)
    state["lm_head.weight"] = _pad_rows(head_w, vocab)
    state.update({f"model.vision_tower.{k}": v for k, v in enc.tower.vision_model.state_dict().items()})
    state.update({f"model.multi_modal_projector.{k}": v for k, v in proj.state_dict().items()})

    strategy = FEATURES_TO_STRATEGY[icfg.encoder.features]
    vconf = enc.tower.config
    llava_conf = LlavaConfig(
        vision_config=vconf.__class__.from_dict(vconf.to_dict()),
        text_config=text_config,
        image_token_index=image_id,
        image_seq_length=proj.num_output_tokens(enc.num_tokens),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=icfg.encoder.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_conf)
    result = llava.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and llava_conf.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"internal: Llava state dict mismatch, missing {missing[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]}")
    if llava_conf.tie_word_embeddings:
        llava.tie_weights()
    gen = model.llm.generation_config.__class__.from_dict(model.llm.generation_config.to_dict())
    padded = list(range(min(emb_w.shape[0], head_w.shape[0]), vocab))
    if padded:
        gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | set(padded))
    llava.generation_config = gen

    h, w = enc.image_size
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"height": h, "width": w}, resample=3, do_center_crop=False,
        crop_size={"height": h, "width": w}, do_normalize=True,
        image_mean=enc.mean.flatten().tolist(), image_std=enc.std.flatten().tolist(), do_convert_rgb=True,
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vconf.patch_size,
                               vision_feature_select_strategy=strategy, chat_template=tok.chat_template,
                               image_token=icfg.placeholder, num_additional_image_tokens=1)

    with atomic_directory(path) as tmp:
        llava.save_pretrained(tmp)
        processor.save_pretrained(tmp)  # tokenizer, image processor and processor files
    return Path(path)
