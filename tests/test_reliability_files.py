"""Untrusted model directories and saving: writes that must never delete what they did not
write, loaders that must never run code or read files that a model directory names outside
itself, and config files that must be type-checked. See docs/RELIABILITY.md."""

import json
import logging
import math
import os
import threading
from pathlib import Path

import pytest
import torch

import mmllm
from mmllm.config import ConfigError, MMLLMConfig
from mmllm.fileio import ForeignFilesError, atomic_directory
from mmllm.model import CONFIG_NAME, WEIGHTS_NAME, MMLLM

# --------------------------------------------------------------------------- saving


def test_saving_into_a_folder_with_other_files_refuses_and_keeps_them(tiny, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "notes.txt").write_text("mine")
    (runs / "stage1").mkdir()
    (runs / "stage1" / "log.txt").write_text("also mine")
    with pytest.raises(ForeignFilesError, match=r"refusing to replace '.*runs': it holds files this write did not "
                                                r"make \(notes.txt, stage1/\)\. Write to a new or empty directory"):
        tiny.save_pretrained(runs)
    assert (runs / "notes.txt").read_text() == "mine"
    assert (runs / "stage1" / "log.txt").read_text() == "also mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"], "no work directory is left behind"


def test_saving_over_a_saved_model_replaces_it(tiny, tmp_path):
    out = tmp_path / "model"
    tiny.save_pretrained(out)
    (out / WEIGHTS_NAME).write_bytes(b"stale")
    tiny.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (out / WEIGHTS_NAME).read_bytes() != b"stale"
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny.save_pretrained(empty)  # an empty folder is fine
    assert sorted(p.name for p in empty.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_saving_onto_a_file_is_refused_and_leaves_nothing(tiny, tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"cannot write the directory '.*model': that path is a file\. "
                                                 r"Remove it or choose another path"):
        tiny.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert target.read_text() == "a file"


def test_concurrent_saves_to_one_path_are_safe(tiny, tmp_path):
    """Four writers, each saving twice, and a reader: no error, the last writer wins, every read
    finds a whole file (never a missing or half-written one), and nothing is left beside the
    target."""
    target = tmp_path / "model"
    errors, reads = [], []
    done = threading.Event()
    body = {k: str(k) * 100_000 for k in range(4)}

    def writer(k):
        try:
            for _ in range(2):
                with atomic_directory(target) as tmp:
                    (tmp / "weights").write_text(body[k])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def reader():
        while not done.is_set():
            if target.exists():
                try:
                    reads.append((target / "weights").read_text() in body.values())
                except FileNotFoundError:
                    reads.append(False)

    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text(body[0])
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    assert errors == []
    assert reads and all(reads), f"{reads.count(False)} of {len(reads)} reads saw a missing or partial file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "weights").read_text() in body.values()

    # The same through save_pretrained: four threads, one model dir, a loadable result.
    errors.clear()

    def save():
        try:
            tiny.save_pretrained(tmp_path / "saved")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "saved"]
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_feature_cache_replaces_its_own_shards_only(tmp_path):
    from mmllm.training.cache import INDEX, _cache_file

    out = tmp_path / "cache"
    with atomic_directory(out, owns=_cache_file) as tmp:
        for k in range(3):
            (tmp / f"shard-{k:05d}.safetensors").write_text("old")
        (tmp / INDEX).write_text("{}")
    with atomic_directory(out, owns=_cache_file) as tmp:  # fewer shards now: the old ones are its own
        (tmp / "shard-00000.safetensors").write_text("new")
        (tmp / INDEX).write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [INDEX, "shard-00000.safetensors"]
    (out / "README").write_text("user's")
    with pytest.raises(ForeignFilesError, match=r"\(README\)"):
        with atomic_directory(out, owns=_cache_file) as tmp:
            (tmp / INDEX).write_text("{}")
    assert (out / "README").read_text() == "user's"


# --------------------------------------------------------------------------- untrusted config files


def _saved(tiny, tmp_path, edit=None) -> Path:
    """``tiny`` saved to ``tmp_path/model``, its config.json changed by ``edit(dict)``."""
    out = tmp_path / "model"
    tiny.save_pretrained(out)
    if edit is not None:
        data = json.loads((out / CONFIG_NAME).read_text())
        edit(data)
        (out / CONFIG_NAME).write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("value", [True, "false", 1])
def test_trust_remote_code_in_a_config_file_is_ignored_with_a_warning(tiny, tmp_path, caplog, value):
    out = _saved(tiny, tmp_path, lambda d: d["llm"].update(trust_remote_code=value))
    with caplog.at_level(logging.WARNING, logger="mmllm"):
        config = MMLLMConfig.from_json(out / CONFIG_NAME)
    assert config.llm.trust_remote_code is False
    assert f"sets llm.trust_remote_code={json.dumps(value)}; ignored: a loaded file cannot turn it on" in caplog.text
    assert str(out / CONFIG_NAME) in caplog.text


def test_trust_remote_code_comes_from_the_caller(tiny, tmp_path, monkeypatch):
    """Only the caller's own argument reaches transformers."""
    import mmllm.llm as llm_mod

    seen = []
    real = llm_mod.load_tokenizer
    monkeypatch.setattr("mmllm.model.load_tokenizer", lambda cfg: seen.append(cfg.trust_remote_code) or real(cfg))
    out = _saved(tiny, tmp_path, lambda d: d["llm"].update(trust_remote_code=True))
    assert mmllm.load(str(out)).config.llm.trust_remote_code is False
    assert MMLLM.from_pretrained(out, trust_remote_code=True).config.llm.trust_remote_code is True
    assert seen == [False, True]


MALFORMED = [
    ("not json", "{nope", r"not valid JSON \(Expecting property name"),
    ("array", "[1, 2]", r"a MMLLMConfig file must hold a JSON object, got array"),
    ("deep", "[" * 100_000 + "]" * 100_000, r"JSON nested too deeply to be a config"),
    ("seed string", '{"seed": "0"}', r'seed: expected int, got string "0"'),
    ("seed bool", '{"seed": true}', r"seed: expected int, got boolean true"),
    ("bool string", '{"llm": {"arch": {}, "init": 1}}', r"llm.init: expected str, got integer 1"),
    ("signal tokens", '{"outputs": {"image": {"num_signal_tokens": 0}}}',
     r"outputs.image.num_signal_tokens: 0 is out of range; it must be >= 1"),
    ("nested type", '{"inputs": {"image": {"encoder": {"num_frames": 2.5}}}}',
     r"inputs.image.encoder.num_frames: expected int, got number 2.5"),
    ("object", '{"llm": "x"}', r"llm: expected an object \(LLMConfig\), got string \"x\""),
    ("unknown", '{"llm": {"dtyp": "x"}}', r"llm: unknown key\(s\) \['dtyp'\] for LLMConfig; valid keys are"),
    ("not utf-8", b"\xff\xfe{", r"not a UTF-8 text file"),
]


@pytest.mark.parametrize("name,text,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_config_files_name_the_file_and_field(tmp_path, name, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=rf"^{str(path)}: {message}"):
        MMLLMConfig.from_json(path)


def test_config_types_follow_the_annotations():
    config = MMLLMConfig.from_dict({"llm": {"lora": {"dropout": 0, "r": 4}}})
    assert config.llm.lora.dropout == 0.0 and isinstance(config.llm.lora.dropout, float)  # a float takes an int
    with pytest.raises(ConfigError, match=r"^llm.lora.dropout: 1.0 is out of range; it must be < 1$"):
        MMLLMConfig.from_dict({"llm": {"lora": {"dropout": 1}}})
    with pytest.raises(ConfigError, match=r"^llm.lora.r: expected int, got boolean true$"):
        MMLLMConfig.from_dict({"llm": {"lora": {"r": True}}})
    with pytest.raises(ConfigError, match=r"^max_length: 0 is out of range; it must be >= 1$"):
        MMLLMConfig.from_preset("tiny", max_length=0)
    with pytest.raises(ConfigError, match=r"^outputs.image.decoder.conditioning: expected list, got string"):
        MMLLMConfig.from_preset("tiny", **{"outputs.image.decoder.conditioning": "77x768"})
    # A saved tiny config round-trips unchanged.
    tiny = MMLLMConfig.from_preset("tiny")
    assert MMLLMConfig.from_dict(tiny.to_dict()) == tiny


CLI_CASES = [("not json", "{nope", "not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                                   "column 2 (char 1)); a config is a JSON object"),
             ("array", "[1]", "a MMLLMConfig file must hold a JSON object, got array"),
             ("deep", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply to be a config; a config is a JSON "
                                                     "object a few levels deep"),
             ("seed", '{"seed": "0"}', 'seed: expected int, got string "0"'),
             ("signal tokens", '{"outputs": {"image": {"num_signal_tokens": 0}}}',
              "outputs.image.num_signal_tokens: 0 is out of range; it must be >= 1")]


@pytest.mark.parametrize("name,text,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_reports_a_malformed_config_in_one_line(tmp_path, capsys, name, text, message):
    from mmllm.cli import main

    (tmp_path / CONFIG_NAME).write_text(text)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"mmllm: error: {tmp_path / CONFIG_NAME}: {message}"
    assert not any("Traceback" in line for line in err)


# --------------------------------------------------------------------------- paths a model dir names


def test_component_paths_outside_the_model_tree_are_refused(tiny, tmp_path):
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    cases = {"../../elsewhere": "inputs.image.encoder.source", str(secret): "inputs.image.encoder.source"}
    for value, field in cases.items():
        tree = tmp_path / "tree"
        out = _saved(tiny, tree, lambda d: d["inputs"]["image"]["encoder"].update(source=value))
        with pytest.raises(ConfigError, match=rf"names 1 path\(s\) outside the model's tree, e.g. {field} = "
                                              rf"'{secret}'; a model directory may name files only inside {tree} or .*"
                                              r"allow_outside_paths=True"):
            mmllm.load(str(out))
    with pytest.raises(ConfigError, match=r"llm.gguf_file = '../../x.gguf'"):
        mmllm.load(str(_saved(tiny, tmp_path / "g", lambda d: d["llm"].update(gguf_file="../../x.gguf"))))


def test_component_paths_inside_the_tree_and_hub_ids_load(tiny, tmp_path):
    """A sibling (``../x``), a path inside the model dir, a run's ``<tree>/runs/<run>/model``
    and a hub id are not escapes; ``allow_outside_paths=True`` lifts the check."""
    from mmllm.config import EncoderConfig

    config = MMLLMConfig.from_preset("tiny")
    assert config.paths_outside([tmp_path]) == {}  # hub ids and architecture names are not paths
    config.inputs["image"].encoder.source = str(tmp_path / "tree" / "clip")
    config.outputs["image"].decoder.source = "org/name"
    assert config.paths_outside([tmp_path / "tree"]) == {}
    assert config.paths_outside([tmp_path / "other"]) == {"inputs.image.encoder.source": str(tmp_path / "tree" / "clip")}
    link = tmp_path / "tree" / "link"
    (tmp_path / "tree").mkdir()
    link.symlink_to(tmp_path.parent)  # a link inside the tree that points out of it
    config.inputs["image"].encoder.source = str(link)
    assert list(config.paths_outside([tmp_path / "tree"])) == ["inputs.image.encoder.source"]
    assert isinstance(config.inputs["image"].encoder, EncoderConfig)

    from mmllm.model import model_tree

    assert model_tree(tmp_path / "root" / "runs" / "stage2" / "model")[0] == tmp_path / "root"
    assert model_tree(tmp_path / "root" / "model")[0] == tmp_path / "root"
    assert model_tree(tmp_path / "a" / "model", tree=tmp_path)[0] == tmp_path
    # A real load: a path outside the tree is refused unless the caller allows it.
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")  # named, never read: the tiny encoder is random
    out = _saved(tiny, tmp_path / "deep", lambda d: d["inputs"]["image"]["encoder"].update(pretrained=str(outside)))
    with pytest.raises(ConfigError, match=r"inputs.image.encoder.pretrained = '.*outside.safetensors'"):
        mmllm.load(str(out))
    assert mmllm.load(str(out), allow_outside_paths=True).config.inputs["image"].encoder.pretrained == str(outside)
    assert MMLLM.from_pretrained(out, tree=tmp_path).config.inputs["image"].encoder.pretrained == str(outside)


def test_llm_pickle_weights_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmllm.config import LLMConfig
    from mmllm.llm import build_llm

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    llm.config.save_pretrained(tmp_path)
    torch.save(llm.state_dict(), tmp_path / "pytorch_model.bin")  # what safe_serialization=False writes
    with pytest.raises(ValueError, match=rf"refusing to load the LLM from '{tmp_path}': it has no safetensors "
                                         r"weights, and pickle files \(.bin\) can run arbitrary code"):
        build_llm(LLMConfig(source=str(tmp_path)))
    llm.save_pretrained(tmp_path)  # safetensors: loads
    assert build_llm(LLMConfig(source=str(tmp_path))).config.hidden_size == 16


def test_open_clip_pickle_checkpoint_is_refused(tmp_path):
    from mmllm.config import EncoderConfig
    from mmllm.encoders import build_encoder

    ckpt = tmp_path / "clip.pt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"refusing to load '.*clip.pt': pickle-based weight files can run"):
        build_encoder(EncoderConfig(backend="open_clip", source="ViT-B-32", pretrained=str(ckpt)), "image", {})


# --------------------------------------------------------------------------- silent wrong weights


def test_a_weight_of_another_shape_is_refused_not_broadcast(tiny):
    state = tiny.trainable_state_dict()
    name = next(k for k, v in state.items() if k.endswith("bias") and v.numel() > 1)
    bad = dict(state)
    bad[name] = torch.zeros(1)
    before = dict(tiny.named_parameters())[name].detach().clone()
    with pytest.raises(ValueError, match=rf"{name} is \(1,\) torch.float32 in the file but "
                                         rf"\({state[name].shape[0]},\) torch.float32 in the model"):
        tiny.load_trainable(bad)
    assert torch.equal(dict(tiny.named_parameters())[name], before), "nothing was copied"
    bad[name] = state[name].to(torch.int64)
    with pytest.raises(ValueError, match=rf"{name} is .* torch.int64 in the file"):
        tiny.load_trainable(bad)


# --------------------------------------------------------------------------- training data


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from mmllm.toy.world import write_dataset

    paths = write_dataset(tmp_path_factory.mktemp("toy"), n=4, size=16, seconds=0.5, frames=4, n_dialogues=4)
    rows = [json.loads(line) for line in Path(paths["captions"]).read_text().splitlines() if line.strip()]
    return Path(paths["captions"]).parent, [r for r in rows if r.get("modality", "image") == "image"]


def _train_config(captions, out, **kw):
    from mmllm.training import TrainConfig

    return TrainConfig(**{**dict(stage="stage1_enc", out=str(out), captions=str(captions), epochs=1, batch_size=2,
                                 lr=1e-3, progress=False, log_every=0), **kw})


def _lfs_pointer(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1234\n")


def test_a_run_whose_rows_all_fail_to_decode_fails_and_saves_nothing(base_model, fresh, toy_data, tmp_path):
    from mmllm.training import train
    from mmllm.training.data import DataError

    root, rows = toy_data
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for k, row in enumerate(rows[:3]):
        _lfs_pointer(data / f"{k}.png")  # a git-lfs pointer checked out instead of the image
        lines.append(json.dumps({"modality": "image", "path": f"{k}.png", "caption": row["caption"]}))
    (data / "caps.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"^3 of 3 rows read were bad \(100%; max_bad_row_share=0.5\), so no model "
                                        r"was saved\. Files: .*caps.jsonl\. First errors:\n  .*caps.jsonl row 1: "
                                        r"cannot decode media \(cannot decode image"):
        train(_train_config(data / "caps.jsonl", out), model=fresh(base_model))
    assert not (out / "model").exists()
    assert json.loads((out / "bad_rows.json").read_text())["count"] == 3


def test_bad_rows_over_the_share_fail_and_under_it_train(base_model, fresh, toy_data, tmp_path):
    from mmllm.training import train
    from mmllm.training.data import DataError

    root, rows = toy_data
    lines = [json.dumps({"modality": "image", "path": str(root / rows[k]["path"]), "caption": rows[k]["caption"]})
             for k in range(2)]
    _lfs_pointer(root / "bad.png")
    lines.append(json.dumps({"modality": "image", "path": "bad.png", "caption": "last"}))  # the last batch, alone
    (root / "last_bad.jsonl").write_text("\n".join(lines) + "\n")
    result = train(_train_config(root / "last_bad.jsonl", tmp_path / "ok"), model=fresh(base_model))
    assert result.bad_rows == 1 and result.good_rows == 2 and result.steps == 2
    assert math.isnan(result.losses[-1]), "the last step had no usable row"
    assert result.final_loss == result.losses[0] and math.isfinite(result.final_loss)
    with pytest.raises(DataError, match=r"^1 of 3 rows read were bad \(33%; max_bad_row_share=0.25\)"):
        train(_train_config(root / "last_bad.jsonl", tmp_path / "strict", max_bad_row_share=0.25),
              model=fresh(base_model))
    assert not (tmp_path / "strict" / "model").exists()


def test_data_files_with_a_byte_order_mark_are_read(toy_data, tmp_path):
    from mmllm.training.data import iter_rows

    row = {"modality": "image", "path": "x.png", "caption": "a cat"}
    csv_file = tmp_path / "caps.csv"
    csv_file.write_bytes("\ufeffmodality,path,caption\nimage,x.png,a cat\n".encode())
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_bytes(("\ufeff" + json.dumps(row) + "\n").encode())
    array = tmp_path / "caps.json"
    array.write_bytes(("\ufeff" + json.dumps([row])).encode())
    for path in (csv_file, jsonl, array):
        assert [r for _, r in iter_rows(path)] == [row], path.suffix


def test_media_paths_out_of_the_data_root_are_refused(base_model, toy_data, tmp_path):
    from mmllm.training.data import ExampleBuilder, RowError

    root, rows = toy_data
    data = tmp_path / "data"
    data.mkdir()
    inside = data / "in.png"
    inside.write_bytes((root / rows[0]["path"]).read_bytes())
    source = str(data / "caps.jsonl")
    outside = str(root / rows[0]["path"])
    climb = os.path.relpath(outside, data)
    builder = ExampleBuilder(base_model)
    assert builder.caption({"modality": "image", "path": "in.png", "caption": "x"}, source, 1).media == \
        {"image": [str(inside)]}
    for value in (climb, outside):
        with pytest.raises(RowError, match=rf"media path '{value}' leads out of the data root '{data}'; keep media "
                                           r"under it, or set allow_outside_data_root=True"):
            builder.caption({"modality": "image", "path": value, "caption": "x"}, source, 1)
    trusting = ExampleBuilder(base_model, allow_outside_root=True)
    assert trusting.caption({"modality": "image", "path": climb, "caption": "x"}, source, 1).media["image"][0] \
        == str(data / climb)
