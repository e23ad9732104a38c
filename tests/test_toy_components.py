"""Toy frozen components: built from nothing, loaded through the real backends."""

import dataclasses

import numpy as np
import pytest
import torch

import mmllm  # noqa: F401  (import order: mmllm before pipelines)
from mmllm.config import DecoderConfig, EncoderConfig, MMLLMConfig
from mmllm.encoders import build_encoder
from mmllm.toy import world
from mmllm.toy.components import COMPONENTS, MARKER, BuildSettings, build_components, is_complete, shape_group
from mmllm.toy.preset import image_encoder_config, toy_config
from pipelines import AudioOutput, ImageOutput, VideoOutput, build_decoder
from pipelines.spectrogram import MelSpectrogramSpec, SpectrogramAudioOutput


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    build_components(root, fast=True, progress=False, log=lambda _: None)
    return root


def test_every_component_is_complete(root):
    assert all(is_complete(root, name) for name in COMPONENTS)
    assert not list(root.glob(".*.tmp-*"))  # atomic: no leftovers


def test_second_call_rebuilds_nothing(root):
    before = {n: (root / n / MARKER).stat().st_mtime_ns for n in COMPONENTS}
    build_components(root, fast=True, progress=False, log=lambda _: None)
    assert {n: (root / n / MARKER).stat().st_mtime_ns for n in COMPONENTS} == before


def test_rebuilt_dependency_invalidates_dependents(root, tmp_path):
    import shutil

    copy = tmp_path / "toy"
    shutil.copytree(root, copy)
    build_components(copy, fast=True, progress=False, only=["vae"], force=True, log=lambda _: None)
    assert is_complete(copy, "clip") and is_complete(copy, "vae")
    assert not is_complete(copy, "image_decoder") and not is_complete(copy, "video_decoder")


def test_changed_recipe_rebuilds_that_component_and_its_dependents(root, tmp_path):
    import shutil

    copy = tmp_path / "toy"
    shutil.copytree(root, copy)
    changed = BuildSettings.fast()
    changed.clip_shape_groups = 0
    assert not is_complete(copy, "clip", changed) and is_complete(copy, "vae", changed)
    old_vae = (copy / "vae" / MARKER).read_text()
    build_components(copy, settings=changed, progress=False, only=["image_decoder"], log=lambda _: None)
    assert is_complete(copy, "clip", changed) and is_complete(copy, "image_decoder", changed)
    assert (copy / "vae" / MARKER).read_text() == old_vae  # its recipe did not change
    assert not is_complete(copy, "video_decoder")  # built on the old CLIP


def test_a_decoder_alone_on_every_pair_rebuilds_only_that_decoder(root, tmp_path, monkeypatch):
    """``split={"image_decoder": "all"}``: the image decoder sees held-out pairs, as a
    web-pretrained Stable Diffusion would; CLIP and the VAE keep their train-split builds."""
    import shutil

    from mmllm.toy import components

    copy = tmp_path / "toy"
    shutil.copytree(root, copy)
    seen = []

    def pool(n, rng, split="train"):
        seen.append(split)
        return image_pool(n, rng, split)

    image_pool = components.image_pool
    monkeypatch.setattr(components, "image_pool", pool)
    settings = dataclasses.replace(BuildSettings.fast(), split={"image_decoder": "all"})
    before = {n: (copy / n / MARKER).read_text() for n in ("clip", "vae")}
    build_components(copy, settings=settings, progress=False, only=["image_decoder"], log=lambda _: None)
    assert seen == ["all"]  # only the image decoder was built, on every pair
    assert {n: (copy / n / MARKER).read_text() for n in ("clip", "vae")} == before
    assert is_complete(copy, "image_decoder", settings) and not is_complete(copy, "image_decoder", BuildSettings.fast())

def test_motion_video_unet_rebuilds_only_the_video_decoder_as_animatediff(root, tmp_path):
    import shutil

    from mmllm.toy.components import video_decoder_backend
    from mmllm.toy.preset import decoder_options, toy_config

    copy = tmp_path / "toy"
    shutil.copytree(root, copy)
    assert "video_unet" not in BuildSettings().recipe("video_decoder")  # built roots stay valid
    motion = BuildSettings.fast()
    motion.video_unet = "motion"
    assert not is_complete(copy, "video_decoder", motion) and is_complete(copy, "image_decoder", motion)
    old_image = (copy / "image_decoder" / MARKER).read_text()
    build_components(copy, settings=motion, progress=False, log=lambda _: None)
    assert (copy / "image_decoder" / MARKER).read_text() == old_image
    assert video_decoder_backend(copy / "video_decoder") == "animatediff"
    assert video_decoder_backend(root / "video_decoder") == "text_to_video_sd"
    assert toy_config(copy).outputs["video"].decoder.backend == "animatediff"
    decoder = build_decoder(DecoderConfig(backend="animatediff", source=str(copy / "video_decoder"),
                                          options={**decoder_options("video"), "num_inference_steps": 2}))
    assert type(decoder.pipeline.unet).__name__ == "UNetMotionModel"
    out = decoder.generate(decoder.encode_text(["a red circle moving up"]), seed=0)
    assert out[0].frames.shape == (4, 32, 32, 3) and out[0].frames.dtype == np.uint8
    motion.video_unet = "unet4d"
    with pytest.raises(ValueError, match=r"video_unet must be one of \['unet3d', 'motion'\]"):
        build_components(copy, settings=motion, only=["video_decoder"], progress=False, log=lambda _: None)


def test_text_tuning_trains_the_decoders_own_copy_and_makes_it_a_training_input(root, tmp_path):
    """The video decoder tunes its copy of CLIP's text tower by default ("all"); "embeddings"
    trains the word embeddings alone and "frozen" nothing. CLIP's own tower is never touched,
    and a tuned decoder joins the components the stages fingerprint."""
    import shutil

    from transformers import CLIPTextModel

    from mmllm.toy.components import clip_text_encoder, component_info, training_inputs

    def weights(text_model):  # names without the "text_model." prefix, which some loaders drop
        return {k.removeprefix("text_model."): v.clone() for k, v in text_model.state_dict().items()}

    def tuned_names(directory):
        video_text = weights(CLIPTextModel.from_pretrained(directory / "video_decoder" / "text_encoder"))
        assert video_text.keys() == clip_tower.keys()
        return {k for k, v in video_text.items() if not torch.equal(v, clip_tower[k])}

    clip_tower = weights(clip_text_encoder(root / "clip"))
    assert BuildSettings().recipe("video_decoder")["text_tuning"] == "all"
    assert "text_tuning" not in BuildSettings().recipe("image_decoder")  # frozen: built roots stay valid
    assert len(tuned_names(root)) > 1 and "embeddings.token_embedding.weight" in tuned_names(root)
    assert list(training_inputs(component_info(root))) == ["clip", "audio_encoder", "video_decoder"]
    built = {n: (root / n / MARKER).read_text() for n in COMPONENTS}
    cases = (("embeddings", {"embeddings.token_embedding.weight"}, ["clip", "audio_encoder", "video_decoder"]),
             ("frozen", set(), ["clip", "audio_encoder"]))
    for tuning, expected, inputs in cases:
        copy = tmp_path / tuning
        shutil.copytree(root, copy)
        settings = dataclasses.replace(BuildSettings.fast(), text_tuning={"video_decoder": tuning})
        assert not is_complete(copy, "video_decoder", settings) and is_complete(copy, "image_decoder", settings)
        build_components(copy, settings=settings, progress=False, log=lambda _: None)
        assert is_complete(copy, "video_decoder", settings)
        assert {n: (copy / n / MARKER).read_text() for n in COMPONENTS if n != "video_decoder"} == \
            {n: built[n] for n in COMPONENTS if n != "video_decoder"}
        assert tuned_names(copy) == expected
        assert weights(clip_text_encoder(copy / "clip")).keys() == clip_tower.keys()
        assert all(torch.equal(v, clip_tower[k]) for k, v in weights(clip_text_encoder(copy / "clip")).items())
        found = training_inputs(component_info(copy))
        assert list(found) == inputs
        assert {k: v for k, v in found.items() if k != "video_decoder"} == \
            {k: component_info(copy)[k]["build_id"] for k in ("clip", "audio_encoder")}
        if "video_decoder" in inputs:
            assert found["video_decoder"] == component_info(copy)["video_decoder"]["build_id"]
    words = BuildSettings(text_tuning={"video_decoder": "words"})
    with pytest.raises(ValueError, match=r"text_tuning\['video_decoder'\] must be one of \['frozen', 'embeddings', 'all'\]"):
        words.recipe("video_decoder")
    with pytest.raises(ValueError, match="has no text encoder to tune; name a decoder"):
        BuildSettings(text_tuning={"clip": "all"}).recipe("clip")


def test_text_lr_scale_sets_the_tuned_towers_rate_and_is_recorded_only_when_it_matters():
    """A tuned text tower trains at ``text_lr_scale`` times its decoder's rate, in its own
    parameter group that follows the same schedule; the recipe records the scale only for a
    decoder that tunes its text (so roots built before stay valid)."""
    from mmllm.toy.components import _optimizer

    unet, tower = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    opt, sched = _optimizer(unet.parameters(), 1e-3, 40, extra={"params": list(tower.parameters()), "lr": 1e-4})
    rates = []
    for _ in range(30):
        rates.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert all(unet_lr > 0 and tower_lr == pytest.approx(unet_lr / 10) for unet_lr, tower_lr in rates)
    assert len({unet_lr for unet_lr, _ in rates}) > 2  # both follow the warmup and cosine schedule
    assert [p for g in opt.param_groups for p in g["params"]] == [*unet.parameters(), *tower.parameters()]
    opt, _ = _optimizer(unet.parameters(), 1e-3, 40, extra={"params": [], "lr": 1e-4})  # frozen: one group
    assert len(opt.param_groups) == 1

    assert "text_lr_scale" not in BuildSettings().recipe("video_decoder")
    slow = BuildSettings(text_lr_scale=0.1)
    assert slow.recipe("video_decoder")["text_lr_scale"] == 0.1
    assert "text_lr_scale" not in slow.recipe("image_decoder")  # its tower is frozen
    with pytest.raises(ValueError, match="text_lr_scale must be positive"):
        BuildSettings(text_lr_scale=0.0).recipe("video_decoder")


def test_shape_groups_differ_only_in_shape_and_keep_out_held_out_pairs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        specs, images = shape_group(rng)
        assert images.shape == (len(specs), 32, 32, 3) and 2 <= len(specs) <= len(world.SHAPES)
        assert len({s.shape for s in specs}) == len(specs)
        assert len({(s.colour, s.size, s.position, s.count) for s in specs}) == 1
        assert not any(world.is_held_out(s) for s in specs)


def test_split_all_shows_components_held_out_pairs_and_train_recipes_stay_valid():
    from mmllm.toy.components import audio_pool, image_pool

    assert "split" not in BuildSettings().recipe("clip")  # train-split builds keep their recipes
    assert BuildSettings(split="all").recipe("image_decoder")["split"] == "all"
    decoders_only = BuildSettings(split={"image_decoder": "all", "video_decoder": "all"})
    assert [decoders_only.recipe(c).get("split") for c in ("clip", "vae", "image_decoder", "video_decoder")] == \
        [None, None, "all", "all"]  # the encoders and the VAE keep their train-split builds
    with pytest.raises(KeyError, match="image_decodr"):
        BuildSettings(split={"image_decodr": "all"}).recipe("clip")
    rng = np.random.default_rng(0)
    assert any(len(shape_group(rng, "all")[0]) == len(world.SHAPES) for _ in range(20))
    for pool in (image_pool, audio_pool):
        specs, _ = pool(200, rng, "all")
        assert any(world.is_held_out(s) for s in specs) and not all(world.is_held_out(s) for s in specs)
        assert not any(world.is_held_out(s) for s in pool(200, rng, "train")[0])


def test_image_encoder_loads_full_clip_checkpoint(root):
    from transformers import CLIPModel

    enc = build_encoder(image_encoder_config(root), "image")
    images = [world.render_image(world.ImageSpec("red", "circle")), world.render_image(world.ImageSpec("blue", "cross"))]
    x = enc.preprocess(images)
    out = enc(x)
    assert out.shape == (2, enc.num_tokens, enc.hidden_size) == (2, 17, 64)  # class token + 16 patches
    # The vision tower really carries CLIPModel's trained weights (no silently random keys).
    clip = CLIPModel.from_pretrained(root / "clip").eval()
    with torch.no_grad():
        ref = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        pooled = clip.get_image_features(pixel_values=x)
        pooled = pooled if isinstance(pooled, torch.Tensor) else pooled.pooler_output
        mine = enc.tower(pixel_values=x).image_embeds
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mine, pooled)


def test_clip_tower_loads_quietly_and_refuses_a_wrong_checkpoint(root, capsys, caplog):
    """The text tower's keys in a full CLIP checkpoint are expected: no load-report table.
    A checkpoint without the vision tower's weights is an error, not a random tower."""
    build_encoder(image_encoder_config(root), "image")
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err + caplog.text
    wrong = EncoderConfig(backend="hf_clip", source=str(root / "image_decoder" / "text_encoder"))
    with pytest.raises(ValueError, match="point the encoder's source at a checkpoint"):
        build_encoder(wrong, "image")


def test_audio_and_video_encoders(root):
    audio = build_encoder(EncoderConfig(backend="hf_audio", source=str(root / "audio_encoder")), "audio")
    wave = world.render_audio(world.AudioSpec("low", count=2))
    assert audio.sample_rate == 16000
    assert audio(audio.preprocess([wave, wave])).shape == (2, audio.num_tokens, audio.hidden_size) == (2, 22, 64)
    image = build_encoder(image_encoder_config(root), "image")
    video = build_encoder(EncoderConfig(backend="frames", share_with="image", num_frames=4, frame_pooling="none"),
                          "video", {"image": image})
    clip = world.render_video(world.VideoSpec("red", "square", "up"), frames=4)
    assert video(video.preprocess([clip])).shape == (1, 4 * 17, 64)


@pytest.mark.parametrize("modality,backend,folder,kind", [
    ("image", "stable_diffusion", "image_decoder", ImageOutput),
    ("audio", "spectrogram_sd", "audio_decoder", AudioOutput),
    ("video", "text_to_video_sd", "video_decoder", VideoOutput),
])
def test_decoders_load_and_render(root, modality, backend, folder, kind):
    from mmllm.toy.preset import decoder_options

    options = {**decoder_options(modality), "num_inference_steps": 2}
    decoder = build_decoder(DecoderConfig(backend=backend, source=str(root / folder), options=options))
    assert decoder.conditioning_shape == (32, 64)  # the toy CLIP text tower: 32 tokens of width 64
    # Zero terminal SNR: sampling starts from pure noise at the last training step, as training ends.
    scheduler = decoder.pipeline.scheduler
    assert scheduler.config.prediction_type == "v_prediction" and float(scheduler.alphas_cumprod[-1]) == 0.0
    scheduler.set_timesteps(options["num_inference_steps"])
    assert int(scheduler.timesteps[0]) == scheduler.config.num_train_timesteps - 1
    out = decoder.generate(decoder.encode_text(["a red circle"]), seed=0)
    assert len(out) == 1 and isinstance(out[0], kind)
    if modality == "image":
        assert out[0].size == (32, 32)
    elif modality == "audio":
        assert out[0].sample_rate == 16000 and out[0].waveform.shape == (16000,)  # the toy preset asks for audio_length_in_s=1.0
        assert out[0].spectrogram.shape == (16, 64, 3)
        short = decoder.generate(decoder.encode_text(["a red circle"]), seed=0, audio_length_in_s=0.5)
        assert short[0].waveform.shape == (8000,)
    else:
        assert out[0].frames.shape == (4, 32, 32, 3) and out[0].frames.dtype == np.uint8


def test_spectrogram_decoder_equals_stock_pipeline(root):
    from diffusers import StableDiffusionPipeline

    source = str(root / "audio_decoder")
    decoder = build_decoder(DecoderConfig(backend="spectrogram_sd", source=source,
                                          options={"num_inference_steps": 3, "guidance_scale": 2.0}))
    embeds = decoder.encode_text(["two low beeps with a pure tone"])
    ours = decoder.generate(embeds, seed=5)[0]
    assert isinstance(ours, SpectrogramAudioOutput)
    stock = StableDiffusionPipeline.from_pretrained(source)
    images = stock(prompt_embeds=embeds, negative_prompt_embeds=stock.encode_prompt([""], "cpu", 1, False)[0],
                   generator=torch.Generator("cpu").manual_seed(5), num_inference_steps=3, guidance_scale=2.0,
                   output_type="np").images
    np.testing.assert_allclose(ours.spectrogram, images[0], atol=1e-6)
    np.testing.assert_allclose(ours.waveform, decoder.to_waveform(images)[0], atol=1e-6)


def test_spectrogram_round_trip_keeps_pitch_and_count():
    from mmllm.toy import oracle

    mel = MelSpectrogramSpec()
    specs = [world.AudioSpec("low", "pure", 3), world.AudioSpec("high", "buzzy", 2), world.AudioSpec("medium", count=1)]
    waves = torch.from_numpy(np.stack([world.render_audio(s) for s in specs]))
    images = mel.to_image(waves)
    assert images.shape == (3, 16, 64) and 0 <= images.min() and images.max() <= 1
    back = mel.to_waveform(images, num_samples=16000)
    assert back.shape == (3, 16000)
    for spec, wave in zip(specs, back):
        got = oracle.analyse_audio(wave.numpy())
        assert (got["pitch"], got["count"]) == (spec.pitch, spec.count)
    assert torch.equal(back, mel.to_waveform(images, num_samples=16000))  # deterministic (no random phase)


def test_toy_config_builds_a_model_that_draws(root, force_first_signal):
    from mmllm import MMLLM

    tiny_llm = MMLLMConfig.from_preset("tiny").llm.to_dict()
    config = toy_config(root, llm=tiny_llm)  # the real toy preset uses SmolLM2 (too slow for this test)
    assert toy_config(root).llm.source == "smollm2"
    model = MMLLM.from_config(config)
    result = model.generate("draw a red circle", max_new_tokens=8,
                            logits_processor=[force_first_signal(model, "image")],
                            num_inference_steps=2)
    assert result.token_ids[:4] == model.signal_groups["image"]
    assert result.images and result.images[0].image.size == (32, 32)
    assert {m: len(ids) for m, ids in model.signal_groups.items()} == {"image": 4, "audio": 8, "video": 8}


def test_logistic_probe_reads_a_linearly_coded_label_and_not_noise():
    from mmllm.toy.quality import logistic_predict

    g = torch.Generator().manual_seed(0)
    labels = [["circle", "square", "cross"][i % 3] for i in range(90)]
    code = torch.nn.functional.one_hot(torch.arange(90) % 3, 3).float()
    x = torch.cat([code * 3, torch.randn(90, 20, generator=g)], 1)  # signal + noise columns
    (signal,) = logistic_predict(x[:60], labels[:60], x[60:])
    assert signal == labels[60:]
    (noise,) = logistic_predict(x[:60, 3:], labels[:60], x[60:, 3:])
    assert sum(p == v for p, v in zip(noise, labels[60:])) < 0.7 * 30


def test_vae_roundtrip_scores_what_the_autoencoder_keeps():
    """A lossless autoencoder keeps every attribute; one that blurs edges (a 3x3 box blur)
    keeps colour, position and count but loses shape."""
    from types import SimpleNamespace

    from mmllm.toy.quality import vae_roundtrip

    def autoencoder(decode):
        return SimpleNamespace(encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x)),
                               decode=lambda z: SimpleNamespace(sample=decode(z)))

    exact = vae_roundtrip(autoencoder(lambda z: z), n=16)
    assert exact["held_in"] == exact["held_out"] == {k: 1.0 for k in exact["held_in"]}
    blur = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    blurred = vae_roundtrip(autoencoder(blur), n=16)
    for split in ("held_in", "held_out"):
        assert blurred[split]["colour"] == blurred[split]["position"] == blurred[split]["count"] == 1.0
        assert blurred[split]["shape"] < 0.7


def test_image_feature_probes_report_every_feature_attribute_and_newcomer_image(root, capsys, load_script):
    from mmllm.toy.quality import IMAGE_FEATURES, image_feature_probes

    report = image_feature_probes(root, n_train=24, n_test=8)
    assert set(report["probes"]) == set(IMAGE_FEATURES) == set(report["newcomer"])
    for probes in report["probes"].values():
        assert set(probes) == {"colour", "shape", "size", "position", "count"}
        assert all(0.0 <= v <= 1.0 for p in probes.values() for v in p.values())
    held_out = sum(world.is_held_out(world.ImageSpec(c, s)) for c in world.COLOURS for s in world.SHAPES)
    for new in report["newcomer"].values():  # the mistakes account for every pair not read right
        wrong = round((1 - new["held_in"]) * (24 - held_out) + (1 - new["held_out"]) * held_out)
        assert len(new["mistakes"]) == wrong
    load_script("probe_clip").main(["--root", str(root), "--n-train", "24", "--n-test", "8"])
    out = capsys.readouterr().out
    assert "| class token |" in out and "| all tokens |" in out and "newcomer shape" in out


def test_build_toy_script_sets_text_tuning_and_rejects_bad_pairs(load_script, monkeypatch, tmp_path, capsys):
    script = load_script("build_toy")
    calls = []
    monkeypatch.setattr(script, "build_components", lambda root, **kw: calls.append(kw) or {"clip": tmp_path / "clip"})
    script.main(["--root", str(tmp_path), "--only", "video_decoder", "--text-tuning", "video_decoder=embeddings",
                 "image_decoder=all"])
    assert calls[0]["settings"].text_tuning == {"video_decoder": "embeddings", "image_decoder": "all"}
    assert calls[0]["only"] == ["video_decoder"]
    script.main(["--root", str(tmp_path)])
    assert calls[1]["settings"].text_tuning == BuildSettings().text_tuning  # the default: video "all"
    for bad in ("clip=all", "video_decoder=some", "video_decoder"):
        with pytest.raises(SystemExit):
            script.main(["--root", str(tmp_path), "--text-tuning", bad])
        assert "--text-tuning takes DECODER=WHAT" in capsys.readouterr().err
