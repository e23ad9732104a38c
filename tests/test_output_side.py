"""The generation side: signal tokens, output projectors, decoders inside generate."""

import contextlib

import numpy as np
import pytest
import torch

import mmllm
from mmllm import MMLLM, MMLLMConfig
from mmllm.signal import ForceSignalTokens
from pipelines import AudioOutput, ImageOutput, VideoOutput


@contextlib.contextmanager
def prefer(model, token_id, bonus=60.0):
    """Make the LM head strongly prefer one signal token (by nudging its trainable row)."""
    head = model.llm.get_output_embeddings()
    slot = head.token_ids.tolist().index(token_id)
    with torch.no_grad():
        hidden_dir = torch.ones(head.new_rows.shape[1])
        head.new_rows[slot] += bonus * hidden_dir / hidden_dir.norm()
    try:
        yield
    finally:
        with torch.no_grad():
            head.new_rows[slot] -= bonus * hidden_dir / hidden_dir.norm()


def test_signal_tokens_follow_config(tiny):
    counts = {m: len(ids) for m, ids in tiny.signal_groups.items()}
    assert counts == {"image": 4, "audio": 8, "video": 24}  # NExT-GPT's defaults
    names = tiny.tokenizer.convert_ids_to_tokens(tiny.signal_groups["image"])
    assert names == ["[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]"]
    # each is a single special token
    assert tiny.tokenizer("[AUD3]", add_special_tokens=False)["input_ids"] == [tiny.signal_groups["audio"][3]]


@pytest.mark.parametrize("modality,field,kind", [("image", "images", ImageOutput), ("audio", "audio", AudioOutput),
                                                  ("video", "videos", VideoOutput)])
def test_forced_partial_signal_completes_and_renders(tiny, modality, field, kind, force_first_signal):
    # Only the FIRST signal token is forced; the rest must be completed by ForceSignalTokens.
    result = tiny.generate("make something", max_new_tokens=30, logits_processor=[force_first_signal(tiny, modality)],
                           num_inference_steps=2, audio_length_in_s=0.25, num_frames=3)
    ids = result.token_ids
    group = tiny.signal_groups[modality]
    assert ids[: len(group)] == group
    media = getattr(result, field)
    assert len(media) >= 1 and all(isinstance(m, kind) for m in media)
    first = media[0]
    if modality == "image":
        assert first.image.size == (32, 32)
    elif modality == "audio":
        assert first.sample_rate > 0 and first.waveform.shape[-1] == int(0.25 * first.sample_rate)
    else:
        assert first.frames.shape[0] == 3 and first.frames.shape[-1] == 3 and first.frames.dtype == np.uint8


def test_force_processor_never_leaves_a_partial_sequence():
    groups = {"image": [10, 11, 12], "audio": [20, 21]}
    proc = ForceSignalTokens(groups)
    scores = torch.zeros(2, 30)
    scores[:, 5] = 10.0  # the model would rather say token 5
    out = proc(torch.tensor([[1, 10], [11, 1]]), scores)
    assert out[0].argmax() == 11  # after [IMG0] comes [IMG1]
    assert out[1].argmax() == 5  # not inside a sequence: untouched


def test_output_modalities_and_cap(tiny):
    groups = tiny.signal_groups
    proc = ForceSignalTokens(groups, allowed={"audio"}, max_per_turn=1)
    scores = torch.zeros(1, tiny.llm.get_output_embeddings().out_features)
    out = proc(torch.tensor([[1, 2]]), scores.clone())
    assert out[0, groups["image"][0]] == torch.finfo(out.dtype).min  # not allowed
    assert out[0, groups["audio"][0]] == 0.0
    used = torch.tensor([groups["audio"] + [5]])
    out = proc(used, scores.clone())
    assert out[0, groups["audio"][0]] == torch.finfo(out.dtype).min  # cap reached
    with pytest.raises(ValueError, match="this model outputs"):
        tiny.generate("hi", output_modalities=["smell"])
    # end to end: even a model that prefers [IMG0] makes no image when images are not allowed
    with prefer(tiny, groups["image"][0]):
        assert tiny.generate("draw", max_new_tokens=6).images
        assert not tiny.generate("draw", max_new_tokens=6, output_modalities=["audio"]).images


def test_media_noise_is_fresh_by_default_and_repeats_with_a_seed(tiny, force_first_signal):
    """Without seeds each call draws new noise; generate(seed=) repeats the media exactly, and
    media_seed= renders from one fixed noise whatever the global generator holds."""
    def draw(**kw):
        out = tiny.generate("draw", max_new_tokens=6, logits_processor=[force_first_signal(tiny, "image")],
                            num_inference_steps=2, **kw)
        return np.asarray(out.images[0].image)

    assert not np.array_equal(draw(), draw())
    assert np.array_equal(draw(seed=3), draw(seed=3))
    torch.manual_seed(1)
    fixed = draw(media_seed=7)
    torch.manual_seed(2)
    assert np.array_equal(fixed, draw(media_seed=7))


def test_only_new_token_rows_get_gradients(tiny):
    model = mmllm.load("tiny")
    model.requires_grad_(False)
    emb, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    emb.new_rows.requires_grad_(True)
    head.new_rows.requires_grad_(True)
    base_emb, base_head = emb.base.weight.clone(), head.base.weight.clone()
    rows_before = emb.new_rows.clone(), head.new_rows.clone()
    ids = torch.tensor([[1, 2, 3] + model.signal_groups["image"]])
    labels = ids.clone()
    opt = torch.optim.AdamW([emb.new_rows, head.new_rows], lr=1e-2, weight_decay=0.1)
    loss = model(ids, labels=labels).loss
    loss.backward()
    assert emb.base.weight.grad is None and head.base.weight.grad is None
    opt.step()
    assert torch.equal(emb.base.weight, base_emb) and torch.equal(head.base.weight, base_head)
    assert not torch.equal(emb.new_rows, rows_before[0]) and not torch.equal(head.new_rows, rows_before[1])
    # the SmolLM2-style tied matrix is still shared and untouched
    assert emb.base.weight.data_ptr() == head.base.weight.data_ptr()


def test_target_shape_is_read_from_the_decoder(tiny):
    # tiny image decoder: a 48-wide text encoder -> a 48-wide target; AudioLDM: pooled projection
    assert tiny.output_projectors["image"].target_shape == (77, 48)
    assert tiny.decoders["image"].conditioning_shape == (77, 48)
    assert tiny.output_projectors["audio"].target_shape == tiny.decoders["audio"].conditioning_shape
    assert len(tiny.output_projectors["audio"].target_shape) == 1
    wider = mmllm.load("tiny", outputs={"image": {"decoder": {"arch": {"text_width": 24}}}})
    assert wider.output_projectors["image"].target_shape == (77, 24)
    with pytest.raises(ValueError, match="decoder's text"):
        mmllm.load("tiny", outputs={"image": {"decoder": {"conditioning": [77, 999]}}})


def test_project_signals_uses_states_and_signal_embeddings(tiny):
    ids = torch.tensor([[5, 6] + tiny.signal_groups["image"] + [7] + tiny.signal_groups["audio"]])
    with torch.no_grad():
        hidden = tiny(ids, output_hidden_states=True).hidden_states
        out = tiny.project_signals(ids, hidden)
    assert out["image"].shape == (1, 77, 48)
    assert out["audio"].shape == (1,) + tiny.decoders["audio"].conditioning_shape
    proj = tiny.output_projectors["image"]
    emb = tiny.llm.get_input_embeddings()(ids[:, 2:6])
    with torch.no_grad():
        expected = proj(hidden[:, 2:6], emb)
    assert torch.allclose(out["image"], expected)


def test_nextgpt_output_projectors_match_the_paper_on_meta():
    model = MMLLM.from_config(MMLLMConfig.from_preset("nextgpt-7b"), device="meta")
    shapes = {m: p.target_shape for m, p in model.output_projectors.items()}
    assert shapes == {"image": (77, 768), "audio": (512,), "video": (77, 1024)}
    for modality in shapes:
        n = model.num_parameters(f"output_projectors.{modality}")
        assert 29e6 < n < 34e6, (modality, n)  # the paper's ~31M per mapper
    sd2 = MMLLM.from_config(MMLLMConfig.from_preset("nextgpt-7b-sd2"), device="meta")
    assert sd2.output_projectors["image"].target_shape == (77, 1024)
