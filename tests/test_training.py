"""Training: freezing, data and label masks, the feature cache, both stages, resume, NaN handling.

Hermetic: the tiny preset (random LLM, encoders and decoders built from config) and a toy
data set written to a temporary directory.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch

import mmllm
from mmllm.toy.world import write_dataset
from mmllm.training import (Collator, DataError, DataReport, ExampleBuilder, StreamingData, TrainConfig,
                            TrainingModule, build_feature_cache, conversation_labels, parameter_counts,
                            set_trainable, sources_from, train, trainable_rule)
from mmllm.training.data import Example, iter_json_array

LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>' + message['content'] + '<</SYS>>' }}"
    "{% elif message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, base_model):
    root = tmp_path_factory.mktemp("toy")
    paths = write_dataset(root, n=4, size=16, seconds=0.5, frames=4, n_dialogues=4)
    caps = [json.loads(x) for x in paths["captions"].read_text().splitlines()]
    first = {m: next(c["path"] for c in caps if c["modality"] == m) for m in ("image", "audio", "video")}
    turn = lambda frm, text: {"from": frm, "value": text}  # noqa: E731
    dialogues = [
        {"id": "a", "image": first["image"], "conversations": [
            turn("human", "<image>\nWhat is this?"), turn("gpt", "A red circle."),
            turn("human", "Play two beeps."), turn("gpt", "Here you are. <gen:audio>")],
         "outputs": [{"modality": "audio", "caption": "two high beeps"}]},
        {"id": "b", "audio": first["audio"], "conversations": [
            turn("human", "<audio>\nMake a clip of it."), turn("gpt", "Sure. <gen:video>")],
         "outputs": [{"modality": "video", "caption": "a blue square moving up"}]},
        {"id": "c", "video": first["video"], "conversations": [
            turn("human", "<video>\nDraw the shape."), turn("gpt", "Done. <gen:image>"),
            turn("human", "Thanks!"), turn("gpt", "You are welcome.")],
         "outputs": [{"modality": "image", "caption": "a large green cross"}]},
    ]
    conv = root / "conv.json"
    conv.write_text(json.dumps(dialogues))
    return {"root": root, "captions": str(paths["captions"]), "generation": str(paths["generation"]),
            "conversations": str(conv), "toy_dialogues": str(paths["dialogues"])}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    after = model.state_dict()
    assert set(after) >= set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def batch_loss(model, cfg: TrainConfig, feature_cache=None):
    """Loss of the whole (small) data set as one batch, in eval mode."""
    report = DataReport(strict=True)
    stream = StreamingData(sources_from(cfg.captions, cfg.generation, cfg.conversations),
                           ExampleBuilder(model, cfg.data_root), 10_000, report)
    examples = next(iter(stream))
    batch = Collator(model, report, feature_cache)(examples)
    module = TrainingModule(model, cfg.lm_scale, cfg.l2_scale)
    was = model.training
    model.eval()
    with torch.no_grad():
        loss, parts = module(**batch.inputs())
    model.train(was)
    return loss.item(), parts


# --------------------------------------------------------------------------- freezing


def test_set_trainable_each_stage(base_model, fresh):
    model = fresh(base_model)
    emb, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    for stage, expect in (("stage1_enc", {"input_projectors"}), ("stage1_dec", {"output_projectors", "new_rows"}),
                          ("stage1", {"input_projectors", "output_projectors", "new_rows"})):
        set_trainable(model, stage)
        on = {n for n, p in model.named_parameters() if p.requires_grad}
        kinds = {("new_rows" if n.endswith("new_rows") else n.split(".")[0]) for n in on}
        assert kinds == expect, stage
        assert not emb.base.weight.requires_grad and not head.base.weight.requires_grad
    assert "llm (LoRA)" not in parameter_counts(model)
    set_trainable(model, "stage2")  # injects LoRA from the default LoraConfig
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in on) and any("lora_B" in n for n in on)
    assert all(trainable_rule("stage2")(n) for n in on)
    assert not emb.base.weight.requires_grad
    # The LLM keeps its class and accessors after LoRA, and LoRA weights are saved.
    assert model.llm.get_decoder() is not None and model.llm.get_input_embeddings() is emb
    assert any("lora_" in k for k in model.trainable_state_dict())
    counts = parameter_counts(model)
    assert counts["llm (base)"][0] == 0 and counts["llm (LoRA)"][0] > 0 and counts["encoders.image"][0] == 0


# --------------------------------------------------------------------------- data


def test_label_mask_two_chat_templates(base_model):
    proc = base_model.processor
    sig = "".join(base_model.tokenizer.convert_ids_to_tokens(base_model.signal_groups["image"]))
    messages = [
        {"role": "user", "content": "<image>\nWhat colour is it?"},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "Draw a blue one."},
        {"role": "assistant", "content": f"Here it is. {sig}"},
    ]
    llama = copy.copy(proc)
    llama.tokenizer = copy.deepcopy(proc.tokenizer)
    llama.tokenizer.chat_template = LLAMA2_TEMPLATE
    tok = proc.tokenizer
    eos = tok.eos_token
    for processor, expected in ((proc, ["It is red." + eos, f"Here it is. {sig}" + eos]),
                                (llama, [" It is red. " + eos, f" Here it is. {sig} " + eos])):
        ids, labels = conversation_labels(processor, messages)
        assert len(ids) == len(labels)
        spans, cur = [], []
        for t, lab in zip(ids, labels):
            if lab != -100:
                assert lab == t
                cur.append(t)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        got = [tok.decode(s) for s in spans]
        assert got == expected, (processor.tokenizer.chat_template[:30], got)
        # Every user token and the template's scaffolding stay unsupervised.
        assert "What colour" not in tok.decode([t for t, lab in zip(ids, labels) if lab != -100])


def test_examples_and_bad_rows(base_model, data, tmp_path):
    good = json.loads(open(data["captions"]).readline())
    rows = [good, {"modality": "image", "path": "missing.png", "caption": "x"}, "not json",
            {"modality": "smell", "path": good["path"], "caption": "x"}, {"modality": "image", "path": good["path"]}]
    f = tmp_path / "caps.jsonl"
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    builder = ExampleBuilder(base_model, data["root"])
    report = DataReport()
    stream = StreamingData(sources_from(captions=str(f)), builder, 8, report)
    batches = list(stream)
    assert sum(len(b) for b in batches) == 1
    assert report.count == 4 and [b.row for b in report.rows] == [2, 3, 4, 5]
    assert "missing.png" in report.rows[0].reason and "row 3" in report.summary()
    with pytest.raises(DataError, match="row 2"):
        list(StreamingData(sources_from(captions=str(f)), builder, 8, DataReport(strict=True)))
    ex = batches[0][0]
    n_img = base_model.processor.modalities["image"].num_tokens
    assert ex.ids[:n_img] == [base_model.processor.modalities["image"].token_id] * n_img
    assert ex.labels[:n_img] == [-100] * n_img and ex.labels[-1] == base_model.tokenizer.eos_token_id
    # Generation rows supervise exactly the signal tokens and EOS and carry their L2 caption.
    gen = next(iter(StreamingData(sources_from(generation=data["generation"]), builder, 1, DataReport())))[0]
    sup = [t for t in gen.labels if t != -100]
    m = next(iter(gen.targets))
    assert sup == base_model.signal_groups[m] + [base_model.tokenizer.eos_token_id]
    # Conversations: markers became signal tokens, targets follow marker order, media resolved.
    conv = [e for b in StreamingData(sources_from(conversations=data["conversations"]), builder, 8, DataReport())
            for e in b]
    assert [list(e.targets) for e in conv] == [["audio"], ["video"], ["image"]]
    assert conv[0].media["image"][0].startswith(str(data["root"]))


def test_streaming_json_array(tmp_path):
    items = [{"i": i, "text": "x" * (i * 37 % 101)} for i in range(50)]
    f = tmp_path / "a.json"
    f.write_text(json.dumps(items, indent=1))
    got = [v for _, v in iter_json_array(f, chunk=16)]
    assert got == items


class LengthOnly:
    """An ExampleBuilder stand-in: a row ``{"n": k}`` becomes an example of k tokens."""

    def build(self, kind, row, source, n):
        return Example(kind, source, n, ids=[1] * row["n"], labels=[1] * row["n"])


def test_group_by_length_pads_less_and_keeps_every_example(tmp_path):
    rng = random.Random(0)
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"n": rng.randint(1, 60)}) + "\n" for _ in range(70)))

    def batches(group, seed=0):
        stream = StreamingData(sources_from(captions=str(f)), LengthOnly(), 4, DataReport(), seed=seed,
                               group_by_length=group)
        return [[len(e.ids) for e in b] for b in stream], [[e.row for e in b] for b in stream]

    def padded(lengths):
        return sum(max(b) * len(b) for b in lengths)

    (plain, plain_rows), (grouped, grouped_rows) = batches(0), batches(5)
    assert sorted(r for b in grouped_rows for r in b) == sorted(r for b in plain_rows for r in b) == list(range(1, 71))
    assert sorted(map(len, grouped)) == sorted(map(len, plain))  # 17 full batches and one of 2
    assert padded(grouped) < 0.8 * padded(plain)
    for w in range(0, 20, 5):  # a window's batches are consecutive slices of its sorted lengths
        window = sorted(grouped[w:w + 5], key=min)
        assert all(max(a) <= min(b) for a, b in zip(window, window[1:]))
    assert batches(5) == (grouped, grouped_rows)  # seeded: the same order again
    assert batches(5, seed=1)[1] != grouped_rows
    with pytest.raises(ValueError, match="group_by_length"):
        TrainConfig(group_by_length=-1)


def test_spread_mix_spreads_every_source_over_the_epoch(tmp_path):
    files = []
    for name, rows in (("big", 40), ("mid", 12), ("small", 4)):  # 10, 3 and 1 batches of 4
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"n": 1 + i % 5}) + "\n" for i in range(rows)))

    def order(mix):
        stream = StreamingData(sources_from(captions=[str(f) for f in files]), LengthOnly(), 4, DataReport(), mix=mix)
        batches = list(stream)
        assert all(len({e.source for e in b}) == 1 for b in batches)  # whole batches from one file
        assert sorted((e.source, e.row) for b in batches for e in b) == sorted(
            (str(f), r) for f, n in zip(files, (40, 12, 4)) for r in range(1, n + 1))
        return [Path(b[0].source).stem for b in batches]

    alternate, spread = order("alternate"), order("spread")
    assert alternate[-7:] == ["big"] * 7  # the largest file ends the epoch alone
    assert spread == ["big", "big", "mid", "big", "big", "big", "mid", "small", "big", "big", "big", "mid", "big", "big"]
    for name in ("big", "mid", "small"):  # each file's batches sit around the middle of the epoch
        at = [i for i, s in enumerate(spread) if s == name]
        assert abs(sum(at) / len(at) - (len(spread) - 1) / 2) <= 1.0
    with pytest.raises(ValueError, match="mix"):
        TrainConfig(mix="shuffled")


def test_file_passes_weight_the_spread_mix(tmp_path):
    files = []
    for name, rows in (("hard", 8), ("easy", 16), ("gen", 12)):  # 2, 4 and 3 batches of 4 per pass
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"n": 1 + i % 5}) + "\n" for i in range(rows)))

    def rows(passes, mix="spread"):
        stream = StreamingData(sources_from(captions=[str(f) for f in files[:2]], generation=str(files[2]),
                                            passes=passes), LengthOnly(), 4, DataReport(), mix=mix)
        return [[(Path(e.source).stem, e.row) for e in b] for b in stream]

    assert rows(None) == rows([1, 1, 1])
    got = rows([3, 0.5, 0])  # the hard file three times, the first half of the easy one, no generation
    flat = [r for b in got for r in b]
    assert sorted(flat) == sorted([("hard", r) for r in range(1, 9)] * 3 + [("easy", r) for r in range(1, 9)])
    assert [r for r in flat if r[0] == "hard"] == [("hard", r) for r in range(1, 9)] * 3  # whole passes, in order
    names = [b[0][0] for b in got]
    assert names.count("hard") == 6 and names.count("easy") == 2
    assert names.index("easy") in (1, 2, 3) and names[::-1].index("easy") in (1, 2, 3)  # spread, not at one end
    assert sum(len(b) for b in rows([1.5, 1, 1], mix="alternate")) == 12 + 16 + 12
    assert [b[0][0] for b in rows([2, 0.25, 1], mix="sequential")] == ["hard"] * 4 + ["easy"] + ["gen"] * 3
    with pytest.raises(ValueError, match="2 value.*3 data file.*one per file"):
        sources_from(captions=[str(f) for f in files[:2]], generation=str(files[2]), passes=[1, 2])
    with pytest.raises(ValueError, match="passes=-1"):
        sources_from(captions=str(files[0]), passes=[-1])
    cfg = TrainConfig(captions=str(files[0]), file_passes=[2])
    assert TrainConfig.from_dict(cfg.to_dict()).file_passes == [2]


def test_steps_zero_trains_one_epoch_of_the_weighted_stream(base_model, data, tmp_path, fresh):
    """steps=0 trains ``epochs`` whole epochs (the quick build's stage 1 is one): a step per
    batch of the weighted stream, each file's partial last batch included."""
    rows = {k: len(Path(data[k]).read_text().splitlines()) for k in ("captions", "generation")}
    cfg = TrainConfig(stage="stage1", out=str(tmp_path / "s1"), captions=data["captions"],
                      generation=data["generation"], steps=0, batch_size=5, file_passes=[2, 0.5],
                      mix="sequential", progress=False, save_every=0)
    result = train(cfg, model=fresh(base_model))
    assert result.steps == math.ceil(2 * rows["captions"] / 5) + math.ceil(round(0.5 * rows["generation"]) / 5)
    assert len(result.losses) == result.steps


def test_feature_cache_matches_live_encoders(base_model, data, tmp_path, fresh):
    model = fresh(base_model)
    cfg = TrainConfig(captions=data["captions"], generation=data["generation"], conversations=data["conversations"])
    stream = StreamingData(sources_from(cfg.captions, cfg.generation, cfg.conversations),
                           ExampleBuilder(model, None), 1, DataReport(strict=True))
    counts = build_feature_cache(model, (e for b in stream for e in b), tmp_path / "cache", shard_size=5)
    assert counts["features"] > 0 and counts["targets"] > 0
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) > 1
    from mmllm.training import FeatureCache

    cache = FeatureCache(tmp_path / "cache", model)
    live, live_parts = batch_loss(model, cfg)
    cached, cached_parts = batch_loss(model, cfg, cache)
    assert set(live_parts) == set(cached_parts) and any(k.startswith("l2_") for k in live_parts)
    assert cached == pytest.approx(live, rel=1e-5, abs=1e-6)
    # A cache written for another encoder is refused.
    other = mmllm.MMLLMConfig.from_preset("tiny", seed=1)
    stale = type("M", (), {"config": other})()
    with pytest.raises(ValueError, match="rebuild"):
        FeatureCache(tmp_path / "cache", stale)


# --------------------------------------------------------------------------- stages


def test_stage1_lowers_loss_and_trains_only_projectors_and_signal_rows(base_model, data, tmp_path, fresh):
    model = fresh(base_model)
    cfg = TrainConfig(stage="stage1", out=str(tmp_path / "s1"), captions=data["captions"],
                      generation=data["generation"], steps=20, batch_size=8, lr=1e-2, warmup_ratio=0.0,
                      progress=False, save_every=0)
    before_loss, _ = batch_loss(model, cfg)
    before = snapshot(model)
    result = train(cfg, model=model)
    after_loss, _ = batch_loss(model, cfg)
    assert result.steps == 20 and len(result.losses) == 20
    assert after_loss < 0.8 * before_loss, (before_loss, after_loss)
    rule = trainable_rule("stage1")
    expected = {k for k in before if rule(k)}
    assert expected and changed(before, model) == expected
    assert "llm.model.embed_tokens.base.weight" not in changed(before, model)
    # The finished stage opens with mmllm.load and holds the trained weights.
    loaded = mmllm.load(str(tmp_path / "s1" / "model"))
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[k], v), k


def test_auto_precision_trains_in_bf16_only_where_it_is_native(base_model, data, tmp_path, fresh, monkeypatch):
    from mmllm.training import config as config_module

    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(config_module, "native_bf16", lambda native=native: native)
        assert TrainConfig(precision="auto").mixed_precision == expected
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="bf17")
    # A bf16 stage keeps fp32 weights and still learns.
    model = fresh(base_model)
    cfg = TrainConfig(stage="stage1", out=str(tmp_path / "s1"), captions=data["captions"],
                      generation=data["generation"], steps=20, batch_size=8, lr=1e-2, warmup_ratio=0.0,
                      progress=False, save_every=0, precision="auto")
    monkeypatch.setattr(config_module, "native_bf16", lambda: True)  # bf16 whatever this CPU has
    before_loss, _ = batch_loss(model, cfg)
    result = train(cfg, model=model)
    after_loss, _ = batch_loss(model, cfg)
    assert result.steps == 20 and after_loss < 0.8 * before_loss, (before_loss, after_loss)
    assert all(p.dtype == torch.float32 for p in model.input_projectors.parameters())


def test_stage2_from_stage1_output(base_model, data, tmp_path, fresh):
    s1 = fresh(base_model)
    s1.save_pretrained(tmp_path / "s1" / "model")
    model = mmllm.load(str(tmp_path / "s1" / "model"))
    set_trainable(model, "stage2")  # adds LoRA; snapshot after, so LoRA tensors are compared too
    cfg = TrainConfig(stage="stage2", model=str(tmp_path / "s1"), out=str(tmp_path / "s2"),
                      conversations=data["conversations"], steps=15, batch_size=3, lr=1e-2, projector_lr=5e-3,
                      warmup_ratio=0.0, progress=False)
    before_loss, parts = batch_loss(model, cfg)
    assert {"l2_image", "l2_audio", "l2_video"} <= set(parts)
    before = snapshot(model)
    train(cfg, model=model)
    after_loss, _ = batch_loss(model, cfg)
    assert after_loss < 0.8 * before_loss, (before_loss, after_loss)
    rule = trainable_rule("stage2")
    expected = {k for k in before if rule(k)}
    assert any("lora_" in k for k in expected)
    assert changed(before, model) == expected
    loaded = mmllm.load(str(tmp_path / "s2" / "model"))
    assert loaded.config.llm.lora is not None
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval()
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_resume_is_exact(base_model, data, tmp_path, fresh):
    def config(out, **kw):
        return TrainConfig(stage="stage1", out=str(out), captions=data["captions"], generation=data["generation"],
                           steps=6, batch_size=3, grad_accum=2, lr=5e-3, shuffle_buffer=5, save_every=3,
                           eval_every=1, progress=False, **kw)

    full_model = fresh(base_model)
    full = train(config(tmp_path / "full"), model=full_model, eval_fn=lambda m, s: {})

    def stop_at_4(model, step):
        if step == 4:
            raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")
        return {}

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut"), model=fresh(base_model), eval_fn=stop_at_4)
    assert (tmp_path / "cut" / "checkpoints" / "step-00000003").is_dir()
    assert not list((tmp_path / "cut" / "checkpoints").glob(".tmp-*"))
    ckpt = tmp_path / "cut" / "checkpoints" / "step-00000003"
    saved = sum(f.stat().st_size for f in ckpt.glob("model*.safetensors"))
    assert saved < 4 * sum(v.numel() for v in full_model.trainable_state_dict().values()) * 1.1  # no frozen weights
    resumed_model = fresh(base_model)
    resumed = train(config(tmp_path / "cut", resume="latest"), model=resumed_model, eval_fn=lambda m, s: {})
    assert resumed.losses == pytest.approx(full.losses, rel=0, abs=1e-6)
    a, b = full_model.trainable_state_dict(), resumed_model.trainable_state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7), k


def test_nan_loss_skip_and_stop(base_model, data, tmp_path, fresh):
    model = fresh(base_model)
    before = snapshot(model)
    cfg = TrainConfig(stage="stage1_enc", out=str(tmp_path / "nan"), captions=data["captions"], steps=2,
                      batch_size=4, lm_scale=float("nan"), progress=False)
    result = train(cfg, model=model)
    assert result.skipped_steps == [1, 2] and not changed(before, model)
    with pytest.raises(FloatingPointError, match="step 1"):
        train(cfg.replace(nan_policy="stop", out=str(tmp_path / "nan2")), model=fresh(base_model))


def test_cli_config_precedence(tmp_path):
    from mmllm.training.cli import build_parser, config_from_args

    f = tmp_path / "c.json"
    TrainConfig(steps=7, lr=1e-3, batch_size=2).to_json(f)
    parser = build_parser("x", ("stage1", "stage1_enc", "stage1_dec"))
    cfg = config_from_args(parser.parse_args(["--config", str(f), "--lr", "0.5", "--stage", "stage1_dec",
                                              "--l2-scale", '{"video": 2}', "--strict"]))
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.stage, cfg.strict) == (7, 0.5, 2, "stage1_dec", True)
    assert cfg.l2_scale["video"] == 2 and cfg.l2_scale["image"] == 1.0
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="stage3")


# --------------------------------------------------------------------------- decoding-side alignment on cached states


def test_align_outputs_stage_trains_only_output_projectors(base_model, fresh):
    model = fresh(base_model)
    set_trainable(model, "align_outputs")
    on = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert on == {"output_projectors"}


def test_cached_states_equal_the_training_forward(base_model, data, fresh):
    """The cache holds exactly what TrainingModule projects at the same signal tokens."""
    from mmllm.training import cache_signal_states

    model = fresh(base_model)
    model.eval()
    cache = cache_signal_states(model, generation=data["generation"], data_root=data["root"], batch_size=64,
                                progress=False)
    cfg = TrainConfig(stage="stage1_dec", generation=data["generation"], data_root=str(data["root"]))
    report = DataReport(strict=True)
    examples = next(iter(StreamingData(sources_from(generation=cfg.generation), ExampleBuilder(model, cfg.data_root),
                                       10_000, report)))
    batch = Collator(model, report)(examples)
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, labels=batch.labels, output_hidden_states=True)
        live = model.project_signals(batch.input_ids, out.hidden_states)
    for m, target in batch.targets.items():
        proj = model.output_projectors[m]
        with torch.no_grad():
            cached = proj(cache.states[m], cache.embeds[m].expand(len(cache.states[m]), -1, -1))
        torch.testing.assert_close(cached, live[m][batch.target_index[m]], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.targets[m], target.float())


def test_cached_states_under_bf16_autocast_stay_close_and_targets_exact(base_model, data, fresh):
    """precision="bf16" runs the LLM pass under autocast: fp32 states within bf16 rounding of
    the fp32 pass, the decoders' targets untouched; an unknown precision says the valid ones."""
    from mmllm.training import cache_signal_states

    model = fresh(base_model)
    model.eval()
    kw = dict(generation=data["generation"], data_root=data["root"], batch_size=64, progress=False)
    full = cache_signal_states(model, **kw)
    half = cache_signal_states(model, precision="bf16", **kw)
    assert half.counts() == full.counts()
    for m, states in full.states.items():
        assert half.states[m].dtype == torch.float32
        assert not torch.equal(half.states[m], states)  # the pass did run in bf16
        cos = torch.nn.functional.cosine_similarity(half.states[m].flatten(1), states.flatten(1))
        assert cos.min() > 0.99, (m, cos.min())
        torch.testing.assert_close(half.targets[m], full.targets[m], atol=0, rtol=0)
    with pytest.raises(ValueError, match="precision='bf17'; use one of"):
        cache_signal_states(model, precision="bf17", **kw)


def test_align_output_projectors_lowers_l2_and_touches_nothing_else(base_model, data, fresh):
    from mmllm.training import align_output_projectors, cache_signal_states

    model = fresh(base_model)
    cfg = TrainConfig(stage="stage1_dec", generation=data["generation"], data_root=str(data["root"]))
    before_loss, before_parts = batch_loss(model, cfg)
    before = snapshot(model)
    result = align_output_projectors(model, generation=data["generation"], data_root=data["root"], steps=60,
                                     batch_size=8, lr=3e-3, progress=False)
    after_loss, after_parts = batch_loss(model, cfg)
    assert result.final_loss < result.first_loss and set(result.examples) == {"image", "audio", "video"}
    l2 = [k for k in before_parts if k.startswith("l2_")]
    assert l2 and all(after_parts[k] < before_parts[k] for k in l2)
    assert {k.split(".")[0] for k in changed(before, model)} == {"output_projectors"}
    with pytest.raises(ValueError, match="no signal sequence"):
        cache_signal_states(model, conversations=_no_generation_file(data), data_root=data["root"], progress=False)


def _no_generation_file(data):
    """A conversations file with no <gen:...> turn."""
    path = data["root"] / "no_gen.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                   {"from": "gpt", "value": "Hello."}]}]))
    return str(path)


def test_align_reinit_starts_from_the_seeded_initialisation_and_caps_the_cache(base_model, data, fresh):
    """reinit=True replaces trained output projectors by freshly seeded ones before fitting
    (lr 0 keeps them there); max_examples stops the LLM pass early."""
    from mmllm.training import align_output_projectors, cache_signal_states

    model = fresh(base_model)
    with torch.no_grad():
        for p in model.output_projectors.parameters():
            p.add_(1.0)  # a "trained" state far from the initialisation
    align_output_projectors(model, generation=data["generation"], data_root=data["root"], steps=1, batch_size=4,
                            lr=0.0, progress=False, reinit=True, standardize=False)
    for m, proj in model.output_projectors.items():
        init = model.new_output_projector(m).state_dict()
        assert all(torch.equal(v, init[k]) for k, v in proj.state_dict().items())
        assert all(p.requires_grad for p in proj.parameters())
    full = cache_signal_states(model, generation=data["generation"], data_root=data["root"], batch_size=1,
                               progress=False)
    capped = cache_signal_states(model, generation=data["generation"], data_root=data["root"], batch_size=1,
                                 progress=False, max_examples=1)
    assert set(capped.counts()) == set(full.counts()) and min(capped.counts().values()) >= 1
    assert sum(capped.counts().values()) < sum(full.counts().values())  # stopped before the end


def test_align_projectors_refit_an_output_projector_of_another_form_and_the_config_records_it(
        base_model, data, fresh, tmp_path):
    """projectors=: the named modality's projector is replaced by a fresh one of the given
    type before the fit, the others keep theirs; the config records the new form, so the
    saved model reloads it with the fitted weights; a bad modality or type says the fix."""
    import mmllm
    from mmllm.training import align_output_projectors, cache_signal_states
    from projectors import OUTPUT_PROJECTORS

    model = fresh(base_model)
    cache = cache_signal_states(model, generation=data["generation"], data_root=data["root"], progress=False)
    m, other = sorted(cache.counts())[:2]
    was = model.config.outputs[m].projector.type
    new_type = next(t for t in ("linear", "transformer") if t != was)
    other_type = type(model.output_projectors[other])
    result = align_output_projectors(model, cache=cache, steps=40, batch_size=4, lr=1e-2, progress=False,
                                     projectors={m: {"type": new_type}})
    assert type(model.output_projectors[m]) is OUTPUT_PROJECTORS.get(new_type)
    assert type(model.output_projectors[other]) is other_type
    assert model.config.outputs[m].projector.type == new_type and result.final_loss < result.first_loss
    model.save_pretrained(tmp_path / "m")
    back = mmllm.load(tmp_path / "m")
    assert back.config.outputs[m].projector.type == new_type
    x, e = cache.states[m][:2], cache.embeds[m].expand(2, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(back.output_projectors[m](x, e), model.output_projectors[m](x, e))
    with pytest.raises(ValueError, match="does not output"):
        align_output_projectors(model, cache=cache, steps=1, progress=False, projectors={"smell": {"type": "linear"}})
    with pytest.raises(KeyError, match="transformer"):  # the registry lists the known names
        align_output_projectors(model, cache=cache, steps=1, progress=False, projectors={m: {"type": "lineer"}})


def test_align_val_examples_are_held_back_and_scored(base_model, data, fresh):
    """val_examples: the last cached sequences of each modality are not trained on, and
    val_loss is the final projectors' MSE on exactly them."""
    import torch.nn.functional as F

    from mmllm.training import align_output_projectors, cache_signal_states

    model = fresh(base_model)
    full = cache_signal_states(model, generation=data["generation"], data_root=data["root"], progress=False).counts()
    result = align_output_projectors(model, generation=data["generation"], data_root=data["root"], steps=4,
                                     batch_size=4, lr=1e-3, progress=False, val_examples=1)
    assert result.examples == {m: n - 1 for m, n in full.items()}
    cache = cache_signal_states(model, generation=data["generation"], data_root=data["root"], progress=False)
    assert set(result.val_loss) == set(full)
    for m, proj in model.output_projectors.items():
        with torch.no_grad():
            mse = F.mse_loss(proj(cache.states[m][-1:], cache.embeds[m].unsqueeze(0)), cache.targets[m][-1:]).item()
        assert result.val_loss[m] == pytest.approx(mse, rel=1e-4)
    with pytest.raises(ValueError, match="lower val_examples"):
        align_output_projectors(model, generation=data["generation"], data_root=data["root"], steps=1,
                                progress=False, val_examples=max(full.values()))


def test_align_weights_share_the_steps_and_only_the_weighted_projector_moves(base_model, data, fresh):
    """weights=: each modality trains its share of the steps, spread evenly; a modality left
    untrained keeps its initialisation; equal weights are plain turns; bad weights say the fix."""
    from mmllm.training import align_output_projectors, cache_signal_states, step_schedule

    assert step_schedule(["audio", "image", "video"], None, 6) == ["audio", "image", "video"] * 2
    order = step_schedule(["audio", "image", "video"], {"image": 2}, 8)
    assert {m: order.count(m) for m in set(order)} == {"image": 4, "audio": 2, "video": 2}
    assert all(order[i] != order[i + 1] or order[i] == "image" for i in range(7)) and "image" in order[:2]
    for bad in ({"smell": 1}, {"image": 0}, {"image": "2"}):
        with pytest.raises(ValueError, match="positive number"):
            step_schedule(["audio", "image", "video"], bad, 3)

    model = fresh(base_model)
    cache = cache_signal_states(model, generation=data["generation"], data_root=data["root"], progress=False)
    first, other = sorted(cache.counts())[:2]
    before = {m: {k: v.clone() for k, v in p.state_dict().items()} for m, p in model.output_projectors.items()}
    # A share so small that `other` never comes up in 4 steps: only `first` trains.
    result = align_output_projectors(model, cache=cache, steps=4, batch_size=2, lr=1e-2, progress=False,
                                     weights={m: (1.0 if m == first else 1e-3) for m in cache.counts()},
                                     standardize=False)
    assert result.modality_steps == {first: 4} and set(result.train_loss) == {first}
    changed = {m for m, p in model.output_projectors.items()
               if any(not torch.equal(v, before[m][k]) for k, v in p.state_dict().items())}
    assert changed == {first} and other not in changed


def test_align_standardize_fits_on_scaled_inputs_and_folds_the_scaling_back(base_model, data, fresh):
    """standardize=True: the projectors train on inputs with zero mean and unit spread per
    feature; the scaling is folded into their first linear layer both ways without changing
    what they compute, so the saved projectors read the raw states (val_loss is scored on them)."""
    import copy

    import torch.nn.functional as F

    from mmllm.training import align_output_projectors, cache_signal_states
    from mmllm.training.align import _fold_input_scaling, input_statistics, standardized

    model = fresh(base_model)
    cache = cache_signal_states(model, generation=data["generation"], data_root=data["root"], progress=False)
    stats = input_statistics(cache)
    scaled = standardized(cache, stats)
    for m, x in scaled.states.items():
        flat = x.reshape(-1, x.shape[-1]).double()
        spread = flat.std(0)
        assert flat.mean(0).abs().max() < 1e-4 and ((spread - 1).abs()[spread > 0.5]).max() < 1e-4
        assert not scaled.embeds[m].any()
        proj = model.output_projectors[m]
        raw_out = proj(cache.states[m], cache.embeds[m].expand(len(x), -1, -1))
        moved = copy.deepcopy(proj)
        _fold_input_scaling(moved, *stats[m], inverse=True)  # the same function, on scaled inputs
        torch.testing.assert_close(moved(x, scaled.embeds[m].expand(len(x), -1, -1)), raw_out, rtol=1e-4, atol=1e-4)
        _fold_input_scaling(moved, *stats[m])  # and back
        torch.testing.assert_close(moved(cache.states[m], cache.embeds[m].expand(len(x), -1, -1)), raw_out,
                                   rtol=1e-4, atol=1e-4)
    result = align_output_projectors(model, cache=cache, steps=6, batch_size=4, lr=1e-3, progress=False, reinit=True,
                                     val_examples=1)
    with torch.no_grad():
        for m, proj in model.output_projectors.items():
            mse = F.mse_loss(proj(cache.states[m][-1:], cache.embeds[m].unsqueeze(0)), cache.targets[m][-1:]).item()
            assert result.val_loss[m] == pytest.approx(mse, rel=1e-4)

    class Opaque(torch.nn.Module):  # a custom projector without input_linear
        def forward(self, hidden, embeds=None):
            return hidden

    with pytest.raises(TypeError, match="standardize=False"):
        _fold_input_scaling(Opaque(), *stats[m])


def test_align_on_a_given_cache_equals_caching_it_itself(base_model, data, fresh, tmp_path, load_script):
    """cache=: align_output_projectors skips the LLM pass and fits exactly as on its own cache;
    SignalCache.take keeps the last sequences as the shared held-back set; scripts/align_sweep.py
    runs variants on one saved cache and gives the same numbers when it reloads it."""
    import math

    from mmllm.training import align_output_projectors, cache_signal_states

    kw = dict(steps=5, batch_size=4, lr=1e-3, seed=3, progress=False, reinit=True, val_examples=1)
    own = fresh(base_model)
    r_own = align_output_projectors(own, generation=data["generation"], data_root=data["root"], **kw)
    given = fresh(base_model)
    cache = cache_signal_states(given, generation=data["generation"], data_root=data["root"], progress=False)
    r_given = align_output_projectors(given, cache=cache, **kw)
    assert r_given.val_loss == r_own.val_loss and r_given.examples == r_own.examples
    for m in own.output_projectors:
        a, b = own.output_projectors[m].state_dict(), given.output_projectors[m].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    part = cache.take(1, 1)
    assert part.counts() == {m: 2 for m in cache.counts()}
    for m, s in cache.states.items():
        assert torch.equal(part.states[m][0], s[0]) and torch.equal(part.states[m][-1], s[-1])
    with pytest.raises(ValueError, match="cache more requests"):
        cache.take(max(cache.counts().values()), 1)

    sweep = load_script("align_sweep")
    argv = ["--model", "tiny", "--generation", data["generation"], "--variants", "1:3:2", "2:3:2:1e-3", "--val", "1",
            "--cache-file", str(tmp_path / "cache.pt"), "--no-progress"]
    rows = sweep.main(argv)
    assert [(r["train"], r["lr"]) for r in rows] == [(1, 2e-3), (2, 1e-3)] and (tmp_path / "cache.pt").is_file()
    assert all(set(r["val_loss"]) == set(cache.counts()) and all(math.isfinite(v) for v in r["val_loss"].values())
               for r in rows)
    assert [r["val_loss"] for r in sweep.main(argv)] == [r["val_loss"] for r in rows]  # from the saved cache
    other = tmp_path / "other.jsonl"
    other.write_text(Path(data["generation"]).read_text())
    with pytest.raises(SystemExit, match="another model, data file or precision"):
        sweep.main([*argv[:3], str(other), *argv[4:]])  # the cache holds another data file's states
    with pytest.raises(SystemExit, match="another model, data file or precision"):
        sweep.main([*argv, "--precision", "bf16"])  # ... or fp32 states
    with pytest.raises(SystemExit):
        sweep.main(["--variants", "400"])
    regularised = sweep.main([*argv[:5], "2:3:2:1e-3:0.01:0.1", "2:3::::", *argv[7:]])  # empty fields: defaults
    assert [(r["wd"], r["dropout"], r["lr"]) for r in regularised] == [(0.01, 0.1, 1e-3), (0.0, None, 2e-3)]
    assert rows[0]["wd"] == 0.0 and all(set(r["train_loss"]) == set(cache.counts()) for r in rows)
    weighted = sweep.main([*argv[:5], f"2:3:::::{min(cache.counts())}=2", *argv[7:]])[0]
    assert weighted["weights"] == {min(cache.counts()): 2.0}
    assert all(math.isfinite(v) for v in regularised[0]["val_loss"].values())
    before = {m: dict(o.projector.options) for m, o in given.config.outputs.items()}
    with sweep.projector_dropout(given, 0.3) as changed:  # what DROPOUT does to the rebuilt projectors
        assert changed == [m for m, o in given.config.outputs.items() if o.projector.type == "transformer"] != []
        assert all(given.new_output_projector(m).transformer.encoder.layers[0].dropout.p == 0.3 for m in changed)
    assert {m: o.projector.options for m, o in given.config.outputs.items()} == before
