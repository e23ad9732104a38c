"""mmllm <-> transformers' Llava: same logits and greedy tokens both ways, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

import mmllm
from mmllm import EncoderConfig, InputConfig, LLMConfig, LoraConfig, MMLLM, MMLLMConfig, ProjectorConfig
from mmllm.interop.llava import from_llava, save_llava
from mmllm.llm import load_tokenizer

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE = "<image>"
PROMPT = "What is in this picture?"
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.5)
VISION = dict(image_size=8, patch_size=2, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, projection_dim=16, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (chat template included) plus the ``<image>`` token, id 49152."""
    tok = load_tokenizer(LLMConfig(source="smollm2"))
    tok.add_tokens([IMAGE], special_tokens=True)
    return tok


def _image(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(20, 14, 3, generator=g) * 255).to(torch.uint8).numpy()


def make_llava(path, tokenizer, strategy="default", seed=0, **config):
    """A tiny random LlavaForConditionalGeneration saved with its tokenizer at ``path``."""
    conf = LlavaConfig(
        text_config=LlamaConfig(vocab_size=len(tokenizer), **TEXT),
        vision_config=CLIPVisionConfig(**VISION),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2,
        image_seq_length=16 + (strategy == "full"),
        **config,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(conf).eval()
    with torch.no_grad():  # spread the projector's output so greedy decoding has clear winners
        model.model.multi_modal_projector.linear_2.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def mm_inputs(model: MMLLM, seed: int = 0):
    """mmllm's own processing of one chat with one image: the ids and pixels both models get."""
    batch = model.processor([[{"role": "user", "content": f"{IMAGE}\n{PROMPT}"}]], [{"image": [_image(seed)]}])
    return batch.input_ids, batch.attention_mask, batch.media["image"]


def assert_same(mm: MMLLM, llava, seed=0, tol=1e-5):
    """Same logits (over mmllm's vocabulary) and the same greedy tokens."""
    ids, mask, pixels = mm_inputs(mm, seed)
    with torch.no_grad():
        ours = mm(ids, mask, media={"image": pixels}).logits  # (1, T, V)
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits  # (1, T, V')
    assert theirs.shape[-1] >= ours.shape[-1]
    torch.testing.assert_close(ours, theirs[..., : ours.shape[-1]], atol=tol, rtol=tol)

    result = mm.generate(PROMPT, image=_image(seed), max_new_tokens=8)
    with torch.no_grad():
        out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                             do_sample=False, pad_token_id=mm.tokenizer.pad_token_id)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != mm.tokenizer.pad_token_id]
    assert result.token_ids == new
    assert len(new) > 0
    return ids


# --------------------------------------------------------------------------- Llava -> mmllm


@pytest.mark.parametrize("strategy,features,tokens", [("default", "patch", 16), ("full", "all", 17)])
def test_from_llava_matches_transformers(tmp_path, tokenizer, strategy, features, tokens):
    llava = make_llava(tmp_path / "llava", tokenizer, strategy)
    mm = from_llava(tmp_path / "llava", export_dir=tmp_path / "export")

    icfg = mm.config.inputs["image"]
    assert (icfg.encoder.backend, icfg.encoder.features, icfg.encoder.feature_layer) == ("hf_clip", features, -2)
    assert icfg.projector.type == "mlp2x_gelu"
    ids = assert_same(mm, llava)
    # One <image> becomes the tower's token count, as transformers' processor expands it.
    assert int((ids == llava.config.image_token_id).sum()) == tokens
    # Frozen parts stay out of the trainable state; the projector is the trained part.
    assert all(k.startswith("input_projectors.") for k in mm.trainable_state_dict())


def test_from_llava_save_pretrained_reloads(tmp_path, tokenizer):
    llava = make_llava(tmp_path / "llava", tokenizer)
    mm = mmllm.load(str(tmp_path / "llava"), export_dir=tmp_path / "export")  # dispatches on model_type 'llava'
    mm.save_pretrained(tmp_path / "mm")
    again = mmllm.load(str(tmp_path / "mm"))
    assert again.config.to_dict() == mm.config.to_dict()
    assert_same(again, llava)
    # A second from_llava reuses the export without reading the Llava weights again.
    stamp = (tmp_path / "export" / "config.json").stat().st_mtime_ns
    from_llava(tmp_path / "llava", export_dir=tmp_path / "export")
    assert (tmp_path / "export" / "config.json").stat().st_mtime_ns == stamp


def test_from_llava_single_linear_projector(tmp_path, tokenizer):
    """A checkpoint whose projector has only linear_1 (LLaVA v1 style) maps to mmllm's ``linear``."""
    from safetensors.torch import load_file, save_file

    llava = make_llava(tmp_path / "llava", tokenizer)
    weights = tmp_path / "llava" / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if "linear_2" not in k}
    save_file(state, str(weights), metadata={"format": "pt"})
    mm = from_llava(tmp_path / "llava", export_dir=tmp_path / "export")
    assert mm.config.inputs["image"].projector.type == "linear"

    ids, mask, pixels = mm_inputs(mm)
    with torch.no_grad():
        feats = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, 16, 32)
        tokens = llava.model.multi_modal_projector.linear_1(feats)  # (1, 16, D)
        embeds = llava.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == llava.config.image_token_id).unsqueeze(-1), tokens)
        expected = llava.lm_head(llava.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state)
        ours = mm(ids, mask, media={"image": pixels}).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- refusals


def _write_config(path, data):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(data))


def test_refuses_unsupported_variants(tmp_path, tokenizer):
    _write_config(tmp_path / "next", {"model_type": "llava_next"})
    with pytest.raises(ValueError, match="anyres"):
        from_llava(tmp_path / "next")

    _write_config(tmp_path / "orig", {"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu"})
    with pytest.raises(ValueError, match="convert_llava_weights_to_hf"):
        from_llava(tmp_path / "orig")

    LlavaConfig(text_config=LlamaConfig(**TEXT), vision_config=CLIPVisionConfig(**VISION),
                vision_feature_layer=[-2, -1]).save_pretrained(tmp_path / "layers")
    with pytest.raises(ValueError, match="single integer vision_feature_layer"):
        from_llava(tmp_path / "layers")

    from transformers import SiglipVisionConfig

    LlavaConfig(text_config=LlamaConfig(**TEXT), vision_config=SiglipVisionConfig(hidden_size=32, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=37, image_size=8, patch_size=2)).save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match="CLIP vision towers only"):
        from_llava(tmp_path / "siglip")

    make_llava(tmp_path / "relu", tokenizer, projector_hidden_act="relu")
    with pytest.raises(ValueError, match="projector_hidden_act='relu'"):
        from_llava(tmp_path / "relu", export_dir=tmp_path / "e1")


def test_refuses_chat_template_it_cannot_use(tmp_path, tokenizer):
    make_llava(tmp_path / "llava", tokenizer)
    cfg = json.loads((tmp_path / "llava" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "llava" / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / "llava" / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template.*tok.chat_template"):
        from_llava(tmp_path / "llava", export_dir=tmp_path / "e1")

    # A processor-style template reads content as a list of parts: it would drop mmllm's string content.
    listy = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
             "{{ c['text'] }}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    (tmp_path / "llava" / "chat_template.jinja").write_text(listy)
    with pytest.raises(ValueError, match="does not render plain-string content"):
        from_llava(tmp_path / "llava", export_dir=tmp_path / "e2")

    # A string-content template beside the processor is used.
    plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}")
    (tmp_path / "llava" / "chat_template.jinja").write_text(plain)
    mm = from_llava(tmp_path / "llava", export_dir=tmp_path / "e3")
    assert mm.tokenizer.chat_template == plain


# --------------------------------------------------------------------------- mmllm -> Llava


def tiny_mmllm(features="patch", projector="mlp2x_gelu", lora=None) -> MMLLM:
    """A tiny random mmllm model with an hf_clip image encoder (tied embeddings, vocab 49152)."""
    arch = {"model_type": "llama", "vocab_size": 49152, "tie_word_embeddings": True, **TEXT}
    config = MMLLMConfig(
        max_length=512,
        llm=LLMConfig(tokenizer="smollm2", init="random", arch=arch, lora=lora),
        inputs={"image": InputConfig(
            encoder=EncoderConfig(backend="hf_clip", init="random", arch=VISION, feature_layer=-2, features=features,
                                  options={"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}),
            projector=ProjectorConfig(type=projector))},
    )
    model = MMLLM.from_config(config)
    torch.manual_seed(0)
    with torch.no_grad():  # spread the outputs, as in make_llava
        for name, p in model.named_parameters():
            if name.endswith("linear_2.weight") or "lora_B" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("features,strategy", [("patch", "default"), ("all", "full")])
def test_save_llava_opens_in_transformers(tmp_path, features, strategy):
    mm = tiny_mmllm(features)
    save_llava(mm, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    assert llava.config.vision_feature_select_strategy == strategy
    # <image> (id 49152) lies past the LLM's 49152 rows: Llava gets one zero row, suppressed in generation.
    assert llava.config.text_config.vocab_size == 49153
    ids = assert_same(mm, llava)

    # The saved processor expands <image> exactly as mmllm does.
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"{IMAGE}\n{PROMPT}"}],
                                                   tokenize=False, add_generation_prompt=True)
    theirs = processor(text=text, images=[_image()], return_tensors="pt", add_special_tokens=False)
    assert theirs["input_ids"].tolist() == ids.tolist()
    assert theirs["pixel_values"].shape == (1, 3, 8, 8)

    # And back: the exported checkpoint opens in mmllm with the same outputs.
    back = from_llava(tmp_path / "llava", export_dir=tmp_path / "export")
    assert back.encoders["image"].std.flatten().tolist() == [0.25, 0.25, 0.25]  # read from the saved processor
    ids, mask, pixels = mm_inputs(mm)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask, media={"image": pixels}).logits[..., :49152],
                                   mm(ids, mask, media={"image": pixels}).logits, atol=1e-5, rtol=1e-5)


def test_save_llava_refuses_linear_projector_which_roundtrips_in_mmllm(tmp_path):
    mm = tiny_mmllm(projector="linear")
    with pytest.raises(ValueError, match="no Llava equivalent.*save_pretrained"):
        save_llava(mm, tmp_path / "llava")
    mm.save_pretrained(tmp_path / "mm")
    again = mmllm.load(str(tmp_path / "mm"))
    ids, mask, pixels = mm_inputs(mm)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask, media={"image": pixels}).logits,
                                   mm(ids, mask, media={"image": pixels}).logits)


def test_save_llava_merges_lora(tmp_path):
    mm = tiny_mmllm(lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    assert any("lora_B" in n for n, _ in mm.llm.named_parameters())
    save_llava(mm, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    assert not any("lora" in k for k in llava.state_dict())
    # W x + B (A x) vs (W + B A) x: fp32 rounding, ~1e-4 on logits of size ~15 after 2 wide-init layers.
    assert_same(mm, llava, tol=5e-4)


def test_save_llava_refuses_other_encoders(tmp_path):
    tiny = MMLLMConfig.from_preset("tiny")  # open_clip image encoder
    mm = MMLLM.from_config(MMLLMConfig.from_dict({**tiny.to_dict(), "inputs": {"image": tiny.inputs["image"].to_dict()},
                                                  "outputs": {}}), device="meta")
    with pytest.raises(ValueError, match="backend 'hf_clip'"):
        save_llava(mm, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()


def test_save_llava_drops_the_output_side_on_request(tmp_path):
    """Other inputs and the output side are refused, or left out on request (base rows only)."""
    tiny = MMLLMConfig.from_preset("tiny")
    image_in = tiny_mmllm().config.inputs["image"].to_dict()
    video_in = tiny.inputs["video"].to_dict()
    config = MMLLMConfig.from_dict({**tiny.to_dict(), "inputs": {"image": image_in, "video": video_in},
                                    "outputs": {"image": tiny.outputs["image"].to_dict()}})
    mm = MMLLM.from_config(config)
    with pytest.raises(ValueError, match=r"also has \['video', 'outputs\.image'\].*drop_unsupported=True"):
        save_llava(mm, tmp_path / "llava")
    save_llava(mm, tmp_path / "llava", drop_unsupported=True)
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    assert llava.config.text_config.vocab_size == 49153  # base rows + the image token, no signal tokens
    ids, mask, pixels = mm_inputs(mm)
    with torch.no_grad():
        ours = mm(ids, mask, media={"image": pixels}).logits[..., :49152]
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[..., :49152]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
