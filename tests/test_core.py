"""The understanding side: encoders, projectors, splicing, padding, saving, generation."""

import numpy as np
import pytest
import torch
from PIL import Image

import mmllm
from mmllm import MMLLM, MMLLMConfig
from mmllm.weights import load_state_dict


def _image(seed=0, size=20):
    return np.random.RandomState(seed).randint(0, 255, (size, size + 3, 3), dtype=np.uint8)


def _audio(seed=0):
    return (np.random.RandomState(seed).randn(16000) * 0.1).astype(np.float32)


def _video(seed=0):
    return np.random.RandomState(seed).randint(0, 255, (6, 16, 16, 3), dtype=np.uint8)


def _logits(model, conversations, media):
    batch = model.processor(conversations, media)
    with torch.no_grad():
        out = model.forward_batch(batch)
    return batch, out.logits


def _user(text):
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- presets on the meta device


def test_llava_preset_shapes_on_meta():
    model = MMLLM.from_config(MMLLMConfig.from_preset("llava-1.5-7b"), device="meta")
    assert model.processor is None  # nothing downloaded, nothing allocated
    enc = model.encoders["image"]
    assert (enc.hidden_size, enc.num_tokens) == (1024, 576)  # CLIP-L/14-336, patch tokens, CLS dropped
    # mlp2x_gelu 1024 -> 4096 -> 4096
    assert model.num_parameters("input_projectors.image") == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert 6.7e9 < model.num_parameters("llm") < 6.8e9  # Vicuna-7B
    assert 3.0e8 < model.num_parameters("encoders.image") < 3.1e8  # CLIP ViT-L/14-336 vision tower
    assert next(model.parameters()).device.type == "meta"


def test_nextgpt_preset_shapes_on_meta():
    model = MMLLM.from_config(MMLLMConfig.from_preset("nextgpt-7b"), device="meta")
    for modality in ("image", "audio", "video"):
        assert model.encoders[modality].num_tokens == 1  # pooled
        # a 1024 -> 4096 linear projector: about 4M parameters
        assert model.num_parameters(f"input_projectors.{modality}") == 1024 * 4096 + 4096
    assert model.input_projectors["image"].proj.in_features == 1024


# --------------------------------------------------------------------------- projectors


def test_resampler_gives_fixed_token_count():
    model = mmllm.load("tiny", inputs={"image": {"projector": {"type": "resampler", "options": {"num_queries": 3}}}},
                       outputs={})
    assert model.processor.modalities["image"].num_tokens == 3
    batch, logits = _logits(model, [_user("<image>\nhi")], [{"image": [_image()]}])
    assert int((batch.input_ids == model.processor.modalities["image"].token_id).sum()) == 3
    assert torch.isfinite(logits).all()


def test_flatten_mlp_reads_all_tokens_and_gives_fixed_count():
    model = mmllm.load("tiny", inputs={"image": {"projector": {"type": "flatten_mlp", "options": {"num_tokens": 2}}}},
                       outputs={})
    assert model.processor.modalities["image"].num_tokens == 2
    batch, logits = _logits(model, [_user("<image>\nhi")], [{"image": [_image()]}])
    assert int((batch.input_ids == model.processor.modalities["image"].token_id).sum()) == 2
    assert torch.isfinite(logits).all()
    proj = model.input_projectors["image"]
    n, d = proj.num_in_tokens, model.encoders["image"].hidden_size
    x = torch.randn(1, n, d)
    y = x.clone()
    y[0, n - 1] += 1.0  # change only the last encoder token...
    with torch.no_grad():
        delta = (proj(x) - proj(y)).abs().amax(-1)
    assert (delta > 0).all()  # ...and every output token sees it (a per-token map would not)
    with pytest.raises(ValueError, match="fixed token count"):
        proj(torch.randn(1, n + 1, d))
    from projectors import build_input_projector

    with pytest.raises(ValueError, match="does not take option"):
        build_input_projector("linear", d, 12, n, num_tokens=3)  # a type changed, its old options kept
    linear = build_input_projector("flatten_mlp", d, 12, n, num_tokens=3, hidden=0)
    assert isinstance(linear.mlp, torch.nn.Linear)  # hidden=0: one linear map
    assert linear(x).shape == (1, 3, 12)


def test_flatten_mlp_summary_token_is_position_invariant():
    over = {"inputs": {"image": {"projector": {"type": "flatten_mlp",
                                               "options": {"num_tokens": 2, "summary_token": True}}}}, "outputs": {}}
    model = mmllm.load("tiny", **over)
    assert model.processor.modalities["image"].num_tokens == 3  # the summary token first, then the flat ones
    proj = model.input_projectors["image"]
    x = torch.randn(1, proj.num_in_tokens, model.encoders["image"].hidden_size)
    shuffled = x[:, torch.randperm(x.shape[1])]
    with torch.no_grad():
        a, b = proj(x), proj(shuffled)
    torch.testing.assert_close(a[:, 0], b[:, 0])  # the summary ignores where things are...
    assert not torch.allclose(a[:, 1:], b[:, 1:])  # ...the flat tokens do not


def test_flatten_mlp_per_token_appends_every_encoder_token_through_one_shared_map():
    over = {"inputs": {"image": {"projector": {"type": "flatten_mlp",
                                               "options": {"num_tokens": 2, "summary_token": True,
                                                           "per_token": True}}}}, "outputs": {}}
    model = mmllm.load("tiny", **over)
    proj = model.input_projectors["image"]
    n = proj.num_in_tokens
    assert model.processor.modalities["image"].num_tokens == 1 + 2 + n  # summary, flat, then one per token
    x = torch.randn(1, n, model.encoders["image"].hidden_size)
    perm = torch.randperm(n)
    with torch.no_grad():
        a, b = proj(x), proj(x[:, perm])
        assert a.shape[:2] == (1, 1 + 2 + n)
        torch.testing.assert_close(a[:, 3:][:, perm], b[:, 3:])  # the same map at every position
        torch.testing.assert_close(a[:, 3:], proj.per_token(x))
    batch = model.processor([_user("<image>\nWhat is this?")], [{"image": [_image()]}])
    with torch.no_grad():
        assert torch.isfinite(model.forward_batch(batch).logits).all()  # the placeholder expands to all of them


def test_gated_prefix_is_identity_at_init():
    over = {"inputs": {"image": {"projector": {"type": "gated_prefix", "options": {"prompt_len": 3, "num_layers": 2}}}},
            "outputs": {}}
    model = mmllm.load("tiny", **over)
    assert model.processor.modalities["image"].num_tokens == 0  # the placeholder takes no positions
    conv, media = [_user("<image>\nWhat is this?")], [{"image": [_image()]}]
    batch = model.processor(conv, media)
    with torch.no_grad():
        with_prefix = model.forward_batch(batch).logits
        base = model.llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(with_prefix, base)  # bit-identical to the base LLM
    with torch.no_grad():
        model.input_projectors["image"].gates.fill_(0.5)
        gated = model.forward_batch(batch).logits
    assert not torch.allclose(gated, base)  # ...and the prefix does act once the gates open
    # a different image gives a different answer once gated
    with torch.no_grad():
        other = model.forward_batch(model.processor(conv, [{"image": [_image(5)]}])).logits
    assert not torch.allclose(gated, other)


# --------------------------------------------------------------------------- splicing and batching


def test_feature_count_mismatch_says_what_went_wrong(tiny):
    batch = tiny.processor([_user("<image>\nhi")], [{"image": [_image()]}])
    spec = tiny.processor.modalities["image"]
    ids = batch.input_ids.clone()
    ids[0, (ids[0] == spec.token_id).nonzero()[0, 0]] = 100  # one position fewer than the features
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        tiny(ids, batch.attention_mask, batch.media, batch.media_sample)


def test_placeholder_count_mismatch_in_processor(tiny):
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        tiny.processor([_user("<image> and <image>")], [{"image": [_image()]}])
    with pytest.raises(ValueError, match="no image was given|0 image input"):
        tiny.processor([_user("<image>")], [{}])


def test_padded_batch_matches_each_sample_alone(tiny):
    convs = [
        _user("<image>\nWhat colour is this?"),
        _user("Just text, a little longer than the others, with no media at all."),
        _user("<image> then <image>, plus <audio> and <video>"),
        _user("<video>"),
    ]
    media = [
        {"image": [_image(1)]},
        {},
        {"image": [_image(2), _image(3)], "audio": [_audio(4)], "video": [_video(5)]},
        {"video": [_video(6)]},
    ]
    batch, logits = _logits(tiny, convs, media)
    assert (batch.attention_mask[:, 0] == 0).any()  # left padding happened
    for i in range(len(convs)):
        one_batch, one = _logits(tiny, [convs[i]], [media[i]])
        n = one.shape[1]
        assert torch.allclose(logits[i, -n:], one[0], atol=1e-5), f"sample {i} differs when padded"


def test_media_inputs_accept_paths_pil_arrays_and_tensors(tiny, tmp_path):
    arr = _image(7)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    variants = [str(path), Image.fromarray(arr), arr, torch.from_numpy(arr), torch.from_numpy(arr).permute(2, 0, 1)]
    answers = {tuple(tiny.generate("What is this?", image=v, max_new_tokens=4).token_ids) for v in variants}
    assert len(answers) == 1


def test_generate_streams_the_same_text(tiny):
    result = tiny.generate("Describe it.", image=_image(), max_new_tokens=6, output_modalities=[])
    stream = tiny.generate("Describe it.", image=_image(), max_new_tokens=6, output_modalities=[], stream=True)
    pieces = list(stream)
    assert "".join(pieces).strip() == result.text
    assert stream.result.token_ids == result.token_ids


def test_generate_batch_equals_single_requests(tiny):
    reqs = [{"prompt": "What is this?", "image": _image(1)}, {"prompt": "Hello there, how are you today?"},
            {"prompt": "Listen.", "audio": _audio(2)}]
    batched = tiny.generate_batch(reqs, max_new_tokens=5, output_modalities=[])
    for req, res in zip(reqs, batched):
        single = tiny.generate(req["prompt"], image=req.get("image"), audio=req.get("audio"), max_new_tokens=5,
                               output_modalities=[])
        assert res.token_ids == single.token_ids


def test_history_keeps_earlier_media(tiny):
    from mmllm.generation import build_request

    first, second = _image(1), _image(9)
    history = [{"role": "user", "content": "<image>\nLook at this.", "image": [first]},
               {"role": "assistant", "content": "I see it."}]
    messages, media = build_request(tiny, "And this one?", {"image": second}, history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[-1]["content"].startswith("<image>\n")  # placeholder inserted for the new image
    assert media["image"][0] is first and media["image"][1] is second  # history media first, in order
    # the earlier image really reaches the model: changing it changes the logits
    _, a = _logits(tiny, [messages], [media])
    _, b = _logits(tiny, [messages], [{**media, "image": [_image(2), second]}])
    assert not torch.allclose(a, b)


def test_bad_requests_say_the_fix(tiny):
    from mmllm.generation import build_request

    with pytest.raises(ValueError, match="prompt is empty"):
        tiny.generate("  ", image=_image())
    with pytest.raises(ValueError, match="cannot read"):
        build_request(tiny, "hi", {"smell": 1})
    with pytest.raises(ValueError, match="role"):
        build_request(tiny, "hi", {}, history=[{"content": "x"}])


# --------------------------------------------------------------------------- saving


def test_save_load_round_trip_gives_identical_logits(tiny, tmp_path):
    model = mmllm.load("tiny", seed=3)
    with torch.no_grad():  # make the trained parts differ from a fresh build
        for p in model.input_projectors.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for p in model.output_projectors.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    conv, media = [_user("<image> <audio> <video> hi")], [{"image": [_image()], "audio": [_audio()], "video": [_video()]}]
    _, before = _logits(model, conv, media)
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_state_dict(tmp_path / "ckpt" / "trainable.safetensors")
    assert not any(k.startswith(("encoders.", "llm.model.layers")) for k in saved)  # frozen parts not copied
    assert any(".new_rows" in k for k in saved)  # signal-token rows are
    again = mmllm.load(str(tmp_path / "ckpt"))
    _, after = _logits(again, conv, media)
    assert torch.equal(before, after)


def test_checkpoint_that_does_not_fit_is_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "a")
    other = mmllm.load("tiny", inputs={"image": {"projector": {"type": "linear"}}})
    with pytest.raises(ValueError, match="does not fit this config"):
        other.load_trainable(load_state_dict(tmp_path / "a" / "trainable.safetensors"))


def test_pickle_weights_are_refused(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="pickle"):
        load_state_dict(path)


def test_unknown_model_name_lists_presets():
    with pytest.raises(FileNotFoundError, match="presets"):
        mmllm.load("no-such-model")


def test_media_positions_are_never_targets(tiny):
    batch = tiny.processor([_user("<image>\nred")], [{"image": [_image()]}])
    with torch.no_grad():
        all_labels = tiny(batch.input_ids, batch.attention_mask, batch.media, labels=batch.input_ids.clone()).loss
        text_only = batch.input_ids.masked_fill(batch.input_ids == tiny.processor.modalities["image"].token_id, -100)
        masked = tiny(batch.input_ids, batch.attention_mask, batch.media, labels=text_only).loss
    assert torch.isfinite(all_labels) and torch.equal(all_labels, masked)
