"""The toy default: build pipeline end to end (fast components, tiny LLM), the oracle
metric of scripts/evaluate.py on scripted models."""

import json
import math

import pytest

import mmllm  # noqa: F401  (import order: mmllm before pipelines)
from mmllm.generation import DECODER_SETTINGS, GenerateResult
from mmllm.toy import oracle, world
from mmllm.toy.evaluate import chance, evaluate, newcomer_check, newcomer_table, table
from mmllm.toy.mmllm_build import BUILD_INFO, DefaultSettings, build_default, is_built, model_dir
from pipelines import AudioOutput, ImageOutput, VideoOutput

TINY_LLM = {"llm": {"source": None, "tokenizer": "smollm2", "init": "random", "dtype": "float32",
                    "arch": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 37,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": 49152, "max_position_embeddings": 1024, "tie_word_embeddings": True,
                             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}}}


BUILD_LOG: list[str] = []  # what the module's build (``built``) logged


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_default")
    settings = DefaultSettings.fast()
    path = build_default(root, fast=True, settings=settings, progress=False, config_overrides=TINY_LLM,
                         log=BUILD_LOG.append)
    return root, path


# --------------------------------------------------------------------------- build pipeline


def test_build_log_names_how_to_open_the_model_and_make_it_the_default(built):
    """A build never becomes the default by itself: the log says how to open it and how to
    make it the default in place of the shipped one."""
    root, path = built
    assert f"mmllm.load({str(path)!r}) opens it" in BUILD_LOG[-1]
    assert f"MMLLM_DEFAULT={path}" in BUILD_LOG[-1]


def test_build_runs_both_stages_into_a_loadable_model(built):
    root, path = built
    assert path == model_dir(root) and is_built(root)
    info = json.loads((path / BUILD_INFO).read_text())
    assert info["stage1_run"]["steps"] == 2 and info["stage2_run"]["steps"] == 2
    for stage in ("stage1", "stage2"):
        assert (root / "runs" / stage / "model" / "config.json").is_file()
    # The stage files: one per input modality, every row usable.
    data = root / "data"
    assert {p.name for p in data.glob("stage2_*.json")} == {f"stage2_{m}.json" for m in ("image", "audio", "video", "text")}
    for stage in ("stage1", "stage2"):
        assert json.loads((root / "runs" / stage / "bad_rows.json").read_text())["count"] == 0
    model = mmllm.load(str(path))
    assert model.config.llm.lora is not None  # stage 2's adapters come back
    assert set(model.output_modalities) == {"image", "audio", "video"}
    out = model.generate("Draw a red circle.", max_new_tokens=4)
    assert isinstance(out.text, str)


def test_built_tree_can_move(built, tmp_path):
    """The model and stage dirs name the components relatively, so the whole root can be moved."""
    import shutil

    root, path = built
    saved = json.loads((path / "config.json").read_text())
    assert saved["inputs"]["image"]["encoder"]["source"] == "../clip"
    assert saved["outputs"]["audio"]["decoder"]["source"] == "../audio_decoder"
    moved = tmp_path / "moved"
    shutil.copytree(root, moved, ignore=shutil.ignore_patterns("runs", "data"))
    model = mmllm.load(str(moved / "model"))
    assert model.config.inputs["image"].encoder.source == str(moved / "clip")
    assert model.config.outputs["video"].decoder.source == str(moved / "video_decoder")
    assert isinstance(model.generate("Draw a red circle.", max_new_tokens=2).text, str)
    # The stage dirs name the components relative to the root too, so a moved root can
    # rerun align from its stage-2 model.
    for stage in ("stage1", "stage2", "align"):
        saved = json.loads((root / "runs" / stage / "model" / "config.json").read_text())
        assert saved["inputs"]["image"]["encoder"]["source"] == "../../../clip"
    shutil.copytree(root / "runs" / "stage2" / "model", moved / "runs" / "stage2" / "model")
    stage2 = mmllm.load(str(moved / "runs" / "stage2" / "model"))
    assert stage2.config.outputs["image"].decoder.source == str(moved / "image_decoder")


def test_model_dir_moved_without_its_components_says_how_to_fix_it(built, tmp_path):
    import shutil

    root, path = built
    alone = tmp_path / "alone" / "model"
    shutil.copytree(path, alone)
    with pytest.raises(FileNotFoundError, match=r"copy or move the whole tree.*inputs\.image\.encoder\.source"):
        mmllm.load(str(alone))
    overrides = {f"inputs.{m}.encoder.source": str(root / d)
                 for m, d in (("image", "clip"), ("audio", "audio_encoder"))}
    overrides.update({f"outputs.{m}.decoder.source": str(root / f"{m}_decoder") for m in ("image", "audio", "video")})
    model = mmllm.load(str(alone), **overrides)  # the fix the message names
    assert model.config.inputs["image"].encoder.source == str(root / "clip")


def test_second_build_reuses_everything(built):
    root, path = built
    before = (path / BUILD_INFO).stat().st_mtime_ns
    stamps = {s: (root / "runs" / s / "done.json").stat().st_mtime_ns for s in ("stage1", "stage2")}
    logs = []
    build_default(root, fast=True, settings=DefaultSettings.fast(), progress=False, config_overrides=TINY_LLM,
                  log=logs.append)
    assert (path / BUILD_INFO).stat().st_mtime_ns == before
    assert {s: (root / "runs" / s / "done.json").stat().st_mtime_ns for s in ("stage1", "stage2")} == stamps
    assert any("reusing" in line for line in logs)


def test_a_one_epoch_image_first_stage1_builds(built, tmp_path):
    """The quick build's kind of stage 1 (``stage1_steps=0``: one epoch; files in turn, image
    captions twice, generation pairs left out) runs through build_default on the built
    components: a step per batch of the weighted files, and the log says the loss's two ends
    read different files."""
    import dataclasses
    import shutil

    from mmllm.toy.components import COMPONENTS

    root, _ = built
    for name in COMPONENTS:
        shutil.copytree(root / name, tmp_path / name)
    settings = dataclasses.replace(DefaultSettings.fast(), stage1_steps=0, stage1_mix="sequential",
                                   stage1_passes={"image": 2, "audio": 0.5, "generation": 0})
    logs = []
    build_default(tmp_path, fast=True, settings=settings, progress=False, config_overrides=TINY_LLM, log=logs.append)
    assert not any(line.startswith("building toy") for line in logs)  # the copied components were reused
    rows = {m: len((tmp_path / "data" / f"stage1_captions_{m}.jsonl").read_text().splitlines())
            for m in world.MODALITIES}
    weighted = (2 * rows["image"], round(0.5 * rows["audio"]), rows["video"])  # rows each file gives the epoch
    batches = [math.ceil(n / settings.stage1_batch) for n in weighted]
    assert json.loads((tmp_path / "runs" / "stage1" / "done.json").read_text())["steps"] == sum(batches)
    done = [line for line in logs if line.startswith("stage 1: done")]
    assert len(done) == 1 and "sequential" in done[0]


def test_changed_settings_fingerprint_differs():
    a, b = DefaultSettings(), DefaultSettings(stage2_steps=7)
    comps = {"clip": {"build_id": "x"}}
    assert a.stage_fingerprint("stage1", comps) == b.stage_fingerprint("stage1", comps)
    assert a.stage_fingerprint("stage2", comps) != b.stage_fingerprint("stage2", comps)
    assert a.stage_fingerprint("stage1", comps) != a.stage_fingerprint("stage1", {"clip": {"build_id": "y"}})
    assert a.stage_fingerprint("stage1", comps) != a.stage_fingerprint("stage1", comps, TINY_LLM)
    # The stages read the encoders (and the decoders' copies of their text towers), not the UNets.
    for stage in ("stage1", "stage2", "align"):
        assert a.stage_fingerprint(stage, comps) == a.stage_fingerprint(stage, {**comps, "image_decoder": {"build_id": "z"}})
        assert a.stage_fingerprint(stage, comps) != a.stage_fingerprint(stage, {**comps, "audio_encoder": {"build_id": "z"}})
        # A decoder that tuned its text encoder holds its own conditioning: the stages' L2 targets.
        tuned = {"build_id": "z", "recipe": {"text_tuning": "embeddings"}}
        assert a.stage_fingerprint(stage, comps) != a.stage_fingerprint(stage, {**comps, "video_decoder": tuned})


def test_generation_settings_stay_out_of_the_stage_fingerprints(built):
    """The decoders' generation settings (guidance, steps, sizes) are rendering-only, so
    changing them keeps every stage; what the stages read (a decoder's backend, its text
    tower's source, the projectors) still retrains them."""
    from mmllm.toy.mmllm_build import generation_settings, training_view
    from mmllm.toy.preset import toy_config

    root, _ = built
    base = toy_config(root).to_dict()
    comps = {"clip": {"build_id": "x"}}
    fp = lambda cfg, **kw: [DefaultSettings().stage_fingerprint(s, comps, cfg, **kw)  # noqa: E731
                            for s in ("stage1", "stage2", "align")]
    guided = toy_config(root, **{"outputs.video.decoder.options.guidance_scale": 7.5,
                                   "outputs.image.decoder.options.num_inference_steps": 50}).to_dict()
    assert generation_settings(guided)["video"]["guidance_scale"] == 7.5
    assert generation_settings(base)["video"]["guidance_scale"] != 7.5
    assert "guidance_scale" not in training_view(base)["outputs"]["video"]["decoder"]["options"]
    assert fp(guided) == fp(base)
    assert fp(guided, whole_config=True) != fp(base, whole_config=True)  # the old way retrained them
    for changed in ({"outputs.video.decoder.backend": "animatediff"},
                    {"outputs.image.decoder.source": "/elsewhere"},
                    {"outputs.image.num_signal_tokens": 2},
                    {"outputs.audio.decoder.options.dtype": "bfloat16"}):
        assert all(a != b for a, b in zip(fp(toy_config(root, **changed).to_dict()), fp(base))), changed


def test_a_stage_recorded_the_old_way_is_reused_and_rewritten(tmp_path):
    """A stage whose done.json holds its whole-config fingerprint (builds before generation
    settings left the fingerprint) counts as done, and its marker is rewritten."""
    from mmllm.toy.mmllm_build import DONE, _stage_done

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / DONE).write_text(json.dumps({"fingerprint": "old", "steps": 3}))
    assert not _stage_done(tmp_path, "new")
    assert not _stage_done(tmp_path, "new", legacy="other")
    assert _stage_done(tmp_path, "new", legacy="old")
    assert json.loads((tmp_path / DONE).read_text()) == {"fingerprint": "new", "steps": 3}
    assert _stage_done(tmp_path, "new")


def test_new_generation_settings_keep_the_stages_and_reach_the_model(built, tmp_path):
    """Rebuilding with another video guidance retrains nothing, and the model renders with it."""
    import shutil

    root, path = built
    shutil.copytree(root, tmp_path / "root")
    stamps = lambda: {s: (tmp_path / "root" / "runs" / s / "done.json").stat().st_mtime_ns  # noqa: E731
                      for s in ("stage1", "stage2", "align")}
    before, logs = stamps(), []
    path = build_default(tmp_path / "root", fast=True, settings=DefaultSettings.fast(), progress=False,
                         config_overrides={**TINY_LLM, "outputs.video.decoder.options.guidance_scale": 7.5},
                         log=logs.append)
    assert stamps() == before and sum("reusing" in line for line in logs) == 3
    info = json.loads((path / BUILD_INFO).read_text())
    assert info["generation_settings"]["video"]["guidance_scale"] == 7.5
    model = mmllm.load(str(path))
    assert model.config.outputs["video"].decoder.options["guidance_scale"] == 7.5
    assert model.config.outputs["image"].decoder.options["guidance_scale"] == 6.0  # the preset's, untouched


def test_stage_settings_change_the_fingerprints_of_the_stages_that_read_them():
    """Each stage's fingerprint covers every setting it reads, so a changed setting retrains
    that stage and the ones after it, and no earlier one."""
    comps = {"clip": {"build_id": "x"}}
    base = DefaultSettings()
    # Pinned: a change here invalidates every cached default (70 minutes of stage 2 on a CPU).
    # If a recipe change means it, update the values.
    assert [base.stage_fingerprint(s, comps) for s in ("stage1", "stage2", "align")] == \
        ["e2f7fb72bafff717", "f8376d07f353bb91", "68cb93459cc9ea04"]
    for changed in (DefaultSettings(brief_requests={"image": 0.5}), DefaultSettings(stage2_group_by_length=8),
                    DefaultSettings(stage2_mix="spread")):
        assert changed.stage_fingerprint("stage1", comps) == base.stage_fingerprint("stage1", comps)
        for stage in ("stage2", "align"):
            assert changed.stage_fingerprint(stage, comps) != base.stage_fingerprint(stage, comps)
    for changed in (DefaultSettings(stage1_mix="spread"), DefaultSettings(stage1_passes={"image": 2})):
        assert all(changed.stage_fingerprint(s, comps) != base.stage_fingerprint(s, comps)
                   for s in ("stage1", "stage2", "align"))
    for changed in (DefaultSettings(align_weight_decay=0.01), DefaultSettings(align_weights={"image": 2}),
                    DefaultSettings(align_standardize=False), DefaultSettings(align_projectors={})):
        # the align step alone reruns
        assert [changed.stage_fingerprint(s, comps) == base.stage_fingerprint(s, comps)
                for s in ("stage1", "stage2", "align")] == [True, True, False]


def test_recipes_are_data_files_that_fill_the_settings():
    """Each recipe is one JSON file holding every setting; the classes' defaults are ``default``'s."""
    import dataclasses

    from mmllm.toy import configs
    from mmllm.toy.components import BuildSettings
    from mmllm.toy.recipes import load_recipe, recipe_names

    assert recipe_names() == ["default", "fast", "quick", "smoke"]
    for name in recipe_names():
        data = configs.read(name)
        components, stages = load_recipe(name)
        assert dataclasses.asdict(components) == data["components"] and dataclasses.asdict(stages) == data["stages"]
    assert load_recipe("default") == (BuildSettings(), DefaultSettings())
    assert load_recipe("quick") == (BuildSettings.quick(), DefaultSettings.quick())
    first, second = DefaultSettings(), DefaultSettings()
    first.lora["r"] = 2  # every instance gets its own copy
    assert second.lora["r"] == 16
    with pytest.raises(KeyError, match="valid names"):
        load_recipe("nope")


def test_recipe_fingerprint_needs_no_build_and_follows_the_recipe(monkeypatch):
    """The fingerprint is computed from the recipe alone (nothing built); another recipe, or a
    changed value, gives another."""
    from mmllm.toy import configs
    from mmllm.toy.recipes import recipe_fingerprint

    first = recipe_fingerprint("default")
    assert len(first) == 16 and int(first, 16) >= 0
    assert recipe_fingerprint("default") == first
    assert recipe_fingerprint("quick") != first
    changed = configs.read("default")
    changed["stages"]["stage2_steps"] += 1
    monkeypatch.setattr(configs, "read", lambda name: changed)
    assert recipe_fingerprint("default") != first


def test_stage1_passes_name_the_build_files():
    """``stage1_passes`` becomes one ``file_passes`` entry per stage-1 file (the caption files
    in world.MODALITIES order, then generation); an unknown name is refused."""
    from mmllm.toy.mmllm_build import _stage1_passes

    assert _stage1_passes(DefaultSettings()) is None
    assert _stage1_passes(DefaultSettings(stage1_passes={"image": 2, "generation": 0.1})) == [2.0, 1.0, 1.0, 0.1]
    assert world.MODALITIES == ("image", "audio", "video")
    with pytest.raises(ValueError, match=r"unknown file\(s\) \['images'\]"):
        _stage1_passes(DefaultSettings(stage1_passes={"images": 2}))


def test_a_retrained_decoder_keeps_the_stages_and_is_recorded(tmp_path):
    """A decoder on a frozen text tower rebuilt with another recipe (here more steps)
    retrains no stage; the model dir, which names it relatively, is re-recorded with its new
    build id and loads it. A rebuilt decoder that tunes its text tower (the video decoder by
    default) changed the stages' L2 targets, so it retrains them."""
    import dataclasses

    from mmllm.toy.components import BuildSettings

    def build(components):
        return build_default(tmp_path, fast=True, settings=DefaultSettings.fast(), component_settings=components,
                             progress=False, config_overrides=TINY_LLM, log=lambda _: None)

    frozen = dataclasses.replace(BuildSettings.fast(), text_tuning={})
    path = build(frozen)
    stamps = lambda: {s: (tmp_path / "runs" / s / "done.json").stat().st_mtime_ns  # noqa: E731
                      for s in ("stage1", "stage2", "align")}
    before, old = stamps(), json.loads((path / BUILD_INFO).read_text())["components"]
    build(frozen.override({"image_decoder": 3}))
    new = json.loads((path / BUILD_INFO).read_text())["components"]
    assert stamps() == before
    assert new["image_decoder"] != old["image_decoder"] and new["video_decoder"] != old["video_decoder"]
    assert {k: new[k] for k in ("clip", "audio_encoder", "vae", "audio_decoder")} == \
        {k: old[k] for k in ("clip", "audio_encoder", "vae", "audio_decoder")}
    model = mmllm.load(str(path))
    assert model.config.outputs["image"].decoder.source == str(tmp_path / "image_decoder")
    tuned = dataclasses.replace(frozen, text_tuning={"video_decoder": "all"}).override({"image_decoder": 3})
    build(tuned)
    retrained = stamps()
    assert all(retrained[s] > before[s] for s in before)
    assert json.loads((path / BUILD_INFO).read_text())["components"]["image_decoder"] == new["image_decoder"]
    build(tuned)
    assert stamps() == retrained  # and a second run rebuilds nothing


def test_stage2_mix_gives_the_focus_attribute_its_own_conversations(tmp_path):
    from mmllm.toy.mmllm_build import write_data

    def image_rows(settings, name):
        files = write_data(tmp_path / name, settings)
        path = next(f for f in files["conversations"] if f.endswith("stage2_image.json"))
        return json.loads(open(path).read())

    plain = image_rows(DefaultSettings(items=12, dialogues=0, describe_share={}, focus_questions={}), "plain")
    rows = image_rows(DefaultSettings(items=12, dialogues=0, describe_share={"image": 1.0},
                                      focus_questions={"image": "shape"}), "focus")
    opening = [r["conversations"][0]["value"].split("\n", 1)[1] for r in rows]
    shape_questions = set(next(q for m, a, q in world._QUESTIONS if (m, a) == ("image", "shape")))
    assert sum(q in shape_questions for q in opening) >= 12  # one per QA item, plus any drawn at random
    assert sum(q.startswith("Describe") or q.startswith("What is in") for q in opening) == 12  # every caption
    assert len(rows) == 36 and len(plain) < 24
    for r in rows:  # every row still has its image and alternating turns
        assert r["image"] and [t["from"] for t in r["conversations"]][:2] == ["human", "gpt"]


def test_stage2_generation_turns_include_brief_requests(tmp_path):
    """A share of the image and audio generation pairs also come as brief requests, whose
    reply and decoder target are the spec with the left-out attributes at their defaults."""
    from mmllm.toy.mmllm_build import write_data

    def text_rows(brief, name):
        files = write_data(tmp_path / name, DefaultSettings(items=20, dialogues=0, brief_requests=brief))
        return json.loads(open(files["requests"][0]).read())

    full = text_rows({}, "full")
    rows = text_rows({"image": 1.0, "audio": 0.5}, "brief")
    by_modality = {m: [r for r in rows if r["outputs"][0]["modality"] == m] for m in world.MODALITIES}
    assert len(full) == 60 and len(by_modality["image"]) == 40 and len(by_modality["video"]) == 20
    assert 20 < len(by_modality["audio"]) < 40
    asked = {r["conversations"][0]["value"] for r in full}  # every full request is still there
    brief = [r for r in rows if r["conversations"][0]["value"] not in asked]
    assert len(brief) == len(rows) - 60
    for r in brief:
        request, reply = (t["value"] for t in r["conversations"])
        m, target = r["outputs"][0]["modality"], r["outputs"][0]["caption"]
        named = {k: v for k, v in oracle.analyse_text(request, m).items() if v is not None}
        filled = world.spec_from_dict({**world.BRIEF_DEFAULTS[m], **named})
        assert target == world.canonical_caption(filled), (request, target)
        assert target in reply and reply.endswith(world.gen_marker(m))


# --------------------------------------------------------------------------- the metric


class ScriptedModel:
    """A stand-in for MMLLM.generate_batch. ``perfect`` reads the input (or the request) with
    the oracles and answers with the true canonical caption / renders the requested spec;
    otherwise it always answers "a green square" and never produces media."""

    output_modalities = ("image", "audio", "video")

    def __init__(self, perfect: bool):
        self.perfect = perfect

    def _spec_of_input(self, req):
        m = next(k for k in ("image", "audio", "video") if k in req)
        return world.spec_from_dict(oracle.analyse(req[m], m))

    def generate_batch(self, requests, **kwargs):
        out = []
        for req in requests:
            if any(k in req for k in ("image", "audio", "video")):
                text = world.canonical_caption(self._spec_of_input(req)) if self.perfect else "a green square"
                out.append(GenerateResult(text=text))
                continue
            words = {"image": ("draw", "picture", "image"), "audio": ("play", "sound", "audio", "hear"),
                     "video": ("video", "animate", "clip")}
            m = next(m for m in world.MODALITIES if any(w in req["prompt"].lower() for w in words[m]))
            if not self.perfect:
                out.append(GenerateResult(text="Sorry."))
                continue
            named = {k: v for k, v in oracle.analyse_text(req["prompt"], m).items() if v is not None}
            spec = world.spec_from_dict({**world.BRIEF_DEFAULTS.get(m, {}), **named})  # brief: defaults fill in
            text = f"Here is {world.canonical_caption(spec)}."
            if m == "image":
                res = GenerateResult(text=text, images=[ImageOutput(_pil(world.render_image(spec)))])
            elif m == "audio":
                res = GenerateResult(text=text, audio=[AudioOutput(world.render_audio(spec), 16000)])
            else:
                res = GenerateResult(text=text, videos=[VideoOutput(world.render_video(spec, 32, 4), 4)])
            out.append(res)
        return out


def _pil(arr):
    from PIL import Image

    return Image.fromarray(arr)


def _values(report, split):
    for task, mods in report[split].items():
        for m, block in mods.items():
            if task == "understanding":
                yield from ((f"{task}/{m}/{k}/{a}", v) for k in ("caption", "qa") for a, v in block[k].items())
            else:
                for a, v in block.items():
                    if isinstance(v, dict):  # generation's "reply" block
                        yield from ((f"{task}/{m}/{a}/{k}", x) for k, x in v.items())
                    elif a != "examples":
                        yield f"{task}/{m}/{a}", v


def test_metric_gives_one_to_the_truth_and_little_to_a_wrong_model():
    good = evaluate(ScriptedModel(True), splits=("train", "test"), n=5, gen_n=2)
    for split in ("train", "test"):
        vals = dict(_values(good, split))
        assert vals and all(v == 1.0 for v in vals.values()), {k: v for k, v in vals.items() if v != 1.0}
    bad = evaluate(ScriptedModel(False), splits=("test",), n=5, gen_n=2)
    vals = dict(_values(bad, "test"))
    gen = {k: v for k, v in vals.items() if k.startswith("generation")}
    assert gen and all(v == 0.0 for k, v in gen.items() if "/reply/" not in k)  # no media: produced 0, all wrong
    # "Sorry." names nothing; only a count of one is read from a text without a number.
    assert all(v == 0.0 for k, v in gen.items() if "/reply/" in k and not k.endswith("/count"))
    # "a green square" is right only by accident (a green or square truth, a lone shape).
    und = [v for k, v in vals.items() if k.startswith("understanding") and k.endswith("/all")]
    assert max(und) <= 0.25
    text = table(good)
    assert "| understanding (qa) | image | colour | 1.00 | 1.00 | 0.17 |" in text
    assert "| generation: reply text | audio | pitch | 1.00 | 1.00 | 0.33 |" in text
    assert "| generation | audio | pitch | 1.00 | 1.00 | 0.33 |" in text


class CaptionDecoder:
    """A stand-in image decoder: ``encode_text`` remembers the caption, ``generate`` renders
    what it names (``broken``: always a small green square in the centre)."""

    defaults = {"guidance_scale": 6.0, "height": 32}

    def __init__(self, broken: bool):
        self.broken, self.calls = broken, []

    def encode_text(self, captions):
        import torch

        self.caption = captions[0]
        return torch.zeros(len(captions), 2, 4)

    def generate(self, embeds, seed=None, **settings):
        self.calls.append((seed, settings))
        spec = world.ImageSpec(colour="green", shape="square", size="small", position="center", count=1) \
            if self.broken else world.spec_from_dict(oracle.analyse_text(self.caption, "image"))
        return [ImageOutput(_pil(world.render_image(spec)))]


def test_decoder_ceiling_renders_each_requests_true_caption():
    """The 'decoder' task scores the model's own decoder on the generation requests' true
    captions, with generate()'s seed and only the settings the decoder takes."""

    class WithDecoder(ScriptedModel):
        def __init__(self, broken):
            super().__init__(perfect=False)  # its own generation makes nothing: the ceiling must not use it
            self.decoders = {"image": CaptionDecoder(broken)}

    good, bad = WithDecoder(False), WithDecoder(True)
    report = evaluate(good, splits=("train", "test"), gen_n=4, tasks=("decoder", "generation"),
                      modalities=("image",), guidance_scale=3.0, num_frames=8)
    for split in ("train", "test"):
        assert all(v == 1.0 for k, v in report[split]["decoder"]["image"].items())
        assert report[split]["generation"]["image"]["produced"] == 0.0
    assert good.decoders["image"].calls == [(None, {"guidance_scale": 3.0})] * 8  # num_frames is not an image setting
    evaluate(good, splits=("test",), gen_n=1, tasks=("decoder",), modalities=("image",), media_seed=5)
    assert good.decoders["image"].calls[-1] == (5, {})  # generate()'s media_seed, when the caller sets one
    worse = evaluate(bad, splits=("test",), gen_n=4, tasks=("decoder",), modalities=("image",))
    assert worse["test"]["decoder"]["image"]["all"] < 1.0 and worse["test"]["decoder"]["image"]["colour"] < 1.0
    assert "| generation (true caption) | image | colour | 1.00 | 1.00 | 0.17 |" in table(report)
    with pytest.raises(ValueError, match="needs model.decoders"):
        evaluate(ScriptedModel(True), splits=("test",), gen_n=1, tasks=("decoder",), modalities=("image",))


def test_evaluate_script_passes_decoder_settings_and_names_the_valid_ones(monkeypatch, load_script, tmp_path, capsys):
    """``evaluate.py --decoder-setting guidance_rescale=0.7`` renders the ceiling with it and
    records it in the report; a key that is no decoder setting stops with the valid ones."""
    class WithDecoder(ScriptedModel):
        def __init__(self):
            super().__init__(perfect=False)
            self.decoders = {"image": CaptionDecoder(False)}
            self.decoders["image"].defaults = {"guidance_scale": 6.0, "guidance_rescale": 0.0}

    model = WithDecoder()
    monkeypatch.setattr(mmllm, "load", lambda *a, **k: model)
    script = load_script("evaluate")
    out = tmp_path / "report.json"
    script.main(["--tasks", "decoder", "--modalities", "image", "--split", "test", "--gen-n", "2",
                 "--decoder-setting", "guidance_rescale=0.7", "--out", str(out)])
    assert model.decoders["image"].calls == [(None, {"guidance_rescale": 0.7})] * 2
    assert json.loads(out.read_text())["settings"]["decoder_settings"] == {"guidance_rescale": 0.7}
    with pytest.raises(SystemExit):
        script.main(["--tasks", "decoder", "--decoder-setting", "guidance=0.7"])
    assert "use one of" in capsys.readouterr().err and "guidance_rescale" in DECODER_SETTINGS


def test_conditioning_task_reads_what_the_output_projector_asks_for(built):
    """The 'conditioning' task runs each generation request teacher-forced, and reads the
    output projector's conditioning by the nearest canonical caption: a projector that always
    asks for one spec scores exactly the share of requests that agree with it on each
    attribute, and its mse is the distance to the requests' own captions."""
    import torch

    from mmllm.toy.evaluate import _generation_requests, evaluate_conditioning
    from mmllm.training import signal_states_of_rows

    _, path = built
    model = mmllm.load(str(path))
    decoder = model.decoders["image"]
    specs, prompts = _generation_requests("image", "test", 6, 0)
    # The states come back in row order, with the decoder's conditioning of each caption.
    rows = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": world.generation_reply(s)}],
             "outputs": [{"modality": "image", "caption": world.canonical_caption(s)}]} for p, s in zip(prompts, specs)]
    cache = signal_states_of_rows(model, rows, batch_size=4)
    truth = decoder.encode_text([world.canonical_caption(s) for s in specs])
    assert torch.allclose(cache.targets["image"], truth)
    assert cache.states["image"].shape[:2] == (6, len(model.signal_groups["image"]))
    with pytest.raises(ValueError, match="row 1 is not a valid conversation row"):
        signal_states_of_rows(model, [rows[0], {"outputs": []}])

    asked = world.ImageSpec(colour="red", shape="circle", size="small", position="left", count=2)
    wanted = decoder.encode_text([world.canonical_caption(asked)])

    class Constant(torch.nn.Module):
        def forward(self, states, embeds):
            return wanted.expand(len(states), -1, -1)

    model.output_projectors["image"] = Constant()
    got = evaluate_conditioning(model, "image", "test", 6, 0)
    for attribute in world.attribute_values("image"):
        agree = sum(getattr(s, attribute) == getattr(asked, attribute) for s in specs) / len(specs)
        assert got[attribute] == pytest.approx(agree), attribute
    assert got["mse"] == pytest.approx(float((wanted - truth).pow(2).mean()), rel=1e-5)
    report = evaluate(model, splits=("test",), gen_n=6, tasks=("conditioning",), modalities=("image",))
    assert report["test"]["conditioning"]["image"] == got
    assert f"| generation (nearest caption) | image | mse | {got['mse']:.3f} | - |" in table(report)
    with pytest.raises(ValueError, match="needs model.decoders"):
        evaluate(ScriptedModel(True), splits=("test",), gen_n=1, tasks=("conditioning",), modalities=("image",))


def test_brief_task_scores_image_and_audio_against_the_defaults():
    """The 'brief' task asks for media with attributes left out and scores them against
    the spec with the defaults filled in; a model that answers every request with a video
    scores 0 produced."""
    good = evaluate(ScriptedModel(True), splits=("train", "test"), gen_n=4, tasks=("brief",))
    assert set(good["test"]["brief"]) == {"image", "audio"}  # videos have no brief form
    for split in ("train", "test"):
        assert all(v == 1.0 for m in ("image", "audio") for k, v in good[split]["brief"][m].items()
                   if k not in ("examples", "reply"))
        assert all(v == 1.0 for m in ("image", "audio") for v in good[split]["brief"][m]["reply"].values())
    assert "| generation (brief request) | image | size | 1.00 | 1.00 | 0.50 |" in table(good)

    class AlwaysVideo(ScriptedModel):
        def generate_batch(self, requests, **kwargs):
            return [GenerateResult(text="Here.", videos=[VideoOutput(world.render_video(
                world.VideoSpec("red", "square", "up"), 32, 4), 4)]) for _ in requests]

    wrong = evaluate(AlwaysVideo(True), splits=("test",), gen_n=4, tasks=("brief",))
    assert wrong["test"]["brief"]["image"]["produced"] == wrong["test"]["brief"]["audio"]["produced"] == 0.0


def test_newcomer_check_scores_every_colour_and_shape():
    good = newcomer_check(ScriptedModel(True))
    assert good["right"] == good["total"] == len(world.COLOURS) * len(world.SHAPES)
    bad = newcomer_check(ScriptedModel(False))  # always "a green square": right once, on a held-out pair
    assert bad["right"] == 1 and [r for r in bad["rows"] if r["right"]][0]["held_out"]
    grid = newcomer_table(bad).splitlines()
    assert len(grid) == 2 + len(world.COLOURS)
    assert grid[3] == "| green | green square | yes* | green square | green square |"


def test_chance_is_one_over_the_number_of_values():
    assert chance("image", "colour") == pytest.approx(1 / 6)
    assert chance("audio", "pitch") == pytest.approx(1 / 3)
    assert chance("video", "direction") == pytest.approx(1 / 4)


class DialogueReplayModel:
    """Answers each turn of known dialogues with the reference reply (rendering the reference
    output spec for media turns), or, when ``wrong``, always "a green square" with no media."""

    output_modalities = ("image", "audio", "video")

    def __init__(self, dialogues, wrong=False):
        self.wrong = wrong
        self.replies = {}
        for d in dialogues:
            outs = {o["turn"]: o for o in d.get("outputs", [])}
            conv = d["conversations"]
            for i in range(0, len(conv) - 1, 2):
                self.replies[(d["id"], i)] = (conv[i + 1]["value"], outs.get(i + 1))
        self.ids = [d["id"] for d in dialogues]
        self.calls = 0

    def generate_batch(self, requests, **kwargs):
        (req,) = requests
        turn = len(req.get("history", []))  # 0, 2, 4 ...: the human turn's index
        if turn == 0:
            self.current = self.ids[self.calls]
            self.calls += 1
        text, out = self.replies[(self.current, turn)]
        if self.wrong:
            return [GenerateResult(text="a green square")]
        res = GenerateResult(text=text.replace(f"<gen:{out['modality']}>", "") if out else text)
        if out:
            spec = world.spec_from_dict(out["spec"])
            if out["modality"] == "image":
                res.images.append(ImageOutput(_pil(world.render_image(spec))))
            elif out["modality"] == "audio":
                res.audio.append(AudioOutput(world.render_audio(spec), 16000))
            else:
                res.videos.append(VideoOutput(world.render_video(spec, 32, 4), 4))
        return [res]


def test_dialogue_metric_replays_turns_with_history():
    from mmllm.toy.evaluate import evaluate_dialogues

    dialogues = world.make_dialogues(6, "test", 0)
    good = evaluate_dialogues(DialogueReplayModel(dialogues), "test", 6, seed=0)
    assert good["success"] == 1.0 and good["turns"] == 1.0
    bad = evaluate_dialogues(DialogueReplayModel(dialogues, wrong=True), "test", 6, seed=0)
    assert bad["success"] < 0.5 and bad["turns"] < 0.5


# --------------------------------------------------------------------------- the whole chain, for real


def test_whole_chain_smoke_every_loss_falls(tmp_path):
    """Every toy component and both MMLLM stages (the real SmolLM2, the real training code)
    train for a few steps, and each one's loss falls; the result loads and answers."""
    from mmllm.toy.components import COMPONENTS, BuildSettings, component_info

    path = build_default(tmp_path, settings=DefaultSettings.smoke(), component_settings=BuildSettings.smoke(),
                         progress=False, log=lambda _: None)
    for name, info in component_info(tmp_path).items():
        assert info["steps"] == 30, name
        assert info["final_loss"] < info["first_loss"], (name, info["first_loss"], info["final_loss"])
    assert set(component_info(tmp_path)) == set(COMPONENTS)
    build = json.loads((path / BUILD_INFO).read_text())
    for stage in ("stage1_run", "stage2_run"):
        run = build[stage]
        assert run["steps"] == 16 and run["bad_rows"] == 0
        assert run["final_loss"] < run["first_loss"], (stage, run["first_loss"], run["final_loss"])
    align = build["align_run"]
    assert align["steps"] == 40 and align["final_loss"] < align["first_loss"]
    assert set(align["val_loss"]) == {"image", "audio", "video"}  # held-back sequences scored
    model = mmllm.load(str(path))
    assert model.config.llm.source == "smollm2" and model.config.llm.lora is not None
    spec = world.ImageSpec(colour="red", shape="circle", size="large", position="center", count=1)
    # A 16-step model may put EOS first: greedy, it answered "" once in a full run (and "A blue
    # square." alone). A few forced text tokens still check that it loads and answers.
    out = model.generate("What is in this picture?", image=world.render_image(spec), max_new_tokens=8,
                         min_new_tokens=4, output_modalities=[])
    assert isinstance(out.text, str) and out.text.strip()


# --------------------------------------------------------------------------- recipe comparison


def test_recipe_variants_train_what_they_name(built, tmp_path, load_script):
    """Each variant is a real short run with its own TrainConfig fields and model overrides,
    scored held-in and held-out; scripts/compare_recipes.py parses the same variants."""
    from mmllm.toy.mmllm_build import write_data
    from mmllm.toy.recipes import compare, split_variant, table

    script = load_script("compare_recipes")
    name, linear = script.parse_variant("linear: lr=6e-3 inputs.image.projector.type=linear")
    assert (name, linear) == ("linear", {"lr": 0.006, "inputs.image.projector.type": "linear"})
    assert split_variant(linear) == ({"lr": 0.006}, {"inputs.image.projector.type": "linear"})
    assert split_variant({"stage": "stage2"})[0]["lora"]["r"] == 16  # stage 2 gets adapters

    root, _ = built
    files = write_data(root / "data", DefaultSettings.fast())
    rows = compare({"linear": linear, "lora": {"stage": "stage2", "lr": 1e-3}}, tmp_path, log=lambda _: None,
                   modality="image", steps=2, batch_size=2, n=4, root=root, data=files, config_overrides=TINY_LLM)
    assert [r["variant"] for r in rows] == ["linear", "lora"]
    for r in rows:
        assert set(r["held_out"]) == {"colour", "shape", "size", "position", "count", "all"}
        assert all(0.0 <= v <= 1.0 for v in (*r["held_in"].values(), *r["held_out"].values()))
    saved = [json.loads((tmp_path / n / "model" / "config.json").read_text()) for n in ("linear", "lora")]
    assert saved[0]["inputs"]["image"]["projector"]["type"] == "linear" and saved[0]["llm"]["lora"] is None
    assert saved[1]["inputs"]["image"]["projector"]["type"] == "flatten_mlp" and saved[1]["llm"]["lora"]["r"] == 16
    assert table(rows).count("\n") == 3


def test_build_script_sets_the_stage_mixes(monkeypatch, tmp_path, load_script):
    """The recipe experiments in docs/research/README.md (the quick build) are flags of
    build_default.py: each lands in the DefaultSettings the build gets."""
    script = load_script("build_default")
    calls = []
    monkeypatch.setattr(script, "build_default", lambda root, **kw: calls.append(kw) or root)
    script.main(["--quick", "--root", str(tmp_path), "--stage1-mix", "spread", "--stage1-passes",
                 '{"image": 2, "generation": 0.1}', "--stage1-steps", "176", "--stage2-group-by-length", "8"])
    settings = calls[0]["settings"]
    assert (settings.stage1_mix, settings.stage1_passes) == ("spread", {"image": 2, "generation": 0.1})
    assert (settings.stage1_steps, settings.stage2_group_by_length) == (176, 8)
    assert settings.stage2_steps == DefaultSettings.quick().stage2_steps  # the rest stays --quick's
    script.main(["--quick", "--root", str(tmp_path), "--align-weights", '{"image": 2}', "--align-weight-decay",
                 "0.01", "--no-align-standardize", "--align-projectors", "{}"])  # the align step's settings
    settings = calls[1]["settings"]
    assert (settings.align_weights, settings.align_weight_decay, settings.align_standardize) == \
        ({"image": 2}, 0.01, False)
    assert settings.align_projectors == {} and DefaultSettings.quick().align_projectors == {"audio": {"type": "linear"}}
    assert DefaultSettings.quick().align_standardize and isinstance(DefaultSettings().align_weight_decay, float)


def test_quick_build_is_the_default_recipe_shorter_with_images_first(monkeypatch, tmp_path, load_script):
    """`build_default.py --quick` (the under-30-minute CPU build) trains the default recipe
    with fewer stage-2 and align steps and align examples, bf16 where the machine has it
    natively, and one epoch of stage 1 that reads the image captions twice and first and the
    other files in part (docs/research/README.md, the image-first stage 1)."""
    import dataclasses

    from mmllm.toy.components import BuildSettings
    from mmllm.toy.mmllm_build import _stage1_passes

    script = load_script("build_default")
    calls = []
    monkeypatch.setattr(script, "build_default", lambda root, **kw: calls.append((root, kw)) or root)
    script.main(["--quick", "--root", str(tmp_path), "--no-progress"])
    (root, kw), = calls
    assert root == tmp_path and kw["settings"] == DefaultSettings.quick()
    assert kw["component_settings"] == BuildSettings.quick()

    quick, full = dataclasses.asdict(DefaultSettings.quick()), dataclasses.asdict(DefaultSettings())
    changed = {k for k in full if quick[k] != full[k]} - {"precision"}
    stage1 = {"stage1_steps", "stage1_mix", "stage1_passes"}
    assert changed == {"stage2_steps", "align_steps", "align_examples"} | stage1
    assert (quick["precision"], full["precision"]) == ("auto", "fp32")
    assert all(quick[k] < full[k] for k in ("stage2_steps", "align_steps")) and quick["align_examples"] > 0
    assert (quick["stage1_steps"], quick["stage1_mix"]) == (0, "sequential")  # one epoch, file by file
    image, *rest = _stage1_passes(DefaultSettings.quick())  # image captions first
    assert image == 2 and all(p < 1 for p in rest)
    quick, full = BuildSettings.quick(), BuildSettings()
    # Fewer steps, and a frozen text tower for the video decoder (tuned for 200 steps it drew
    # direction worse than frozen).
    assert dataclasses.replace(quick, steps=full.steps, text_tuning=full.text_tuning) == full
    assert quick.text_tuning_of("video_decoder") == "frozen" and full.text_tuning_of("video_decoder") == "all"
    assert all(0 < quick.steps[k] < full.steps[k] for k in full.steps)
    with pytest.raises(SystemExit):
        script.main(["--quick", "--smoke", "--root", str(tmp_path)])
