"""Shipped models (``mmllm.shipped``) and how ``mmllm.load`` resolves a name: a directory, a
shipped model, a preset, then a hub id read from the local hub cache."""

import json
from pathlib import Path
import shutil

import pytest
import torch

import mmllm
from mmllm import MMLLM, MMLLMConfig, api, shipped
from mmllm.shipped import ShippedModelError, pack, verify

TINY_LLM = {"source": None, "tokenizer": "smollm2", "init": "random", "dtype": "float32",
            "arch": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
                     "max_position_embeddings": 256, "tie_word_embeddings": True, "bos_token_id": 1,
                     "eos_token_id": 2, "pad_token_id": 2}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """``root/{clip,image_decoder,model}``: a saved model whose image encoder and decoder are
    local directories beside it, as a toy build lays them out."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from pipelines.tiny import tiny_stable_diffusion

    root = tmp_path_factory.mktemp("tree")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=4, projection_dim=16)).save_pretrained(root / "clip")
    tiny_stable_diffusion(seed=0).save_pretrained(root / "image_decoder")
    config = MMLLMConfig.from_dict({
        "name": "packed", "max_length": 256, "llm": TINY_LLM,
        "inputs": {"image": {"placeholder": "<image>", "projector": {"type": "mlp2x_gelu"},
                             "encoder": {"backend": "hf_clip", "source": str(root / "clip"), "features": "patch"}}},
        "outputs": {"image": {"num_signal_tokens": 2, "signal_prefix": "IMG", "projector": {"type": "linear"},
                              "decoder": {"backend": "stable_diffusion", "source": str(root / "image_decoder"),
                                          "options": {"num_inference_steps": 2, "height": 32, "width": 32}}}},
    })
    model = MMLLM.from_config(config)
    with torch.no_grad():  # trained-looking values, some beyond float16's finest steps
        for p in model.input_projectors.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(root / "model")
    return root


@pytest.fixture
def shipped_dir(tree, tmp_path, monkeypatch):
    """A packed copy of ``tree`` as the shipped model ``toy``, in a shipped folder of its own."""
    folder = tmp_path / "shipped"
    pack(tree / "model", folder / "toy", dtype="float16", info={"build": {"command": "test"}})
    monkeypatch.setattr(shipped, "SHIPPED_DIR", folder)
    monkeypatch.delenv(shipped.DEFAULT_ENV, raising=False)
    return folder / "toy"


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()


def test_pack_stores_float16_names_components_relatively_and_lists_every_file(tree, shipped_dir):
    manifest = json.loads((shipped_dir / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(shipped_dir).as_posix() for p in shipped_dir.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert "clip/model.safetensors" in on_disk and "image_decoder/unet/diffusion_pytorch_model.safetensors" in on_disk
    assert manifest["build"] == {"command": "test"} and manifest["stored_dtype"] == "float16"
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"].values())
    config = json.loads((shipped_dir / "model" / "config.json").read_text())
    assert config["inputs"]["image"]["encoder"]["source"] == "../clip"
    assert config["outputs"]["image"]["decoder"]["source"] == "../image_decoder"
    from safetensors.torch import load_file

    for rel in ("model/trainable.safetensors", "clip/model.safetensors"):
        floats = [t for t in load_file(str(shipped_dir / rel)).values() if t.is_floating_point()]
        assert floats and all(t.dtype == torch.float16 for t in floats), rel


def test_a_packed_model_loads_in_float32_with_its_weights_rounded_once(tree, shipped_dir):
    original = MMLLM.from_pretrained(tree / "model")
    packed = mmllm.load()  # no name: the shipped "toy", here the packed tree
    assert next(packed.encoders.parameters()).dtype == torch.float32
    ours, theirs = dict(packed.named_parameters()), dict(original.named_parameters())
    for name in ("input_projectors.image.0.weight", "encoders.image.tower.vision_model.embeddings.patch_embedding.weight"):
        name = next(n for n in ours if n.startswith(name.rsplit(".", 2)[0]))
        assert torch.equal(ours[name], theirs[name].half().float()), name
    a = packed.generate("What is it?", image=_image(), max_new_tokens=4, seed=0)
    b = packed.generate("What is it?", image=_image(), max_new_tokens=4, seed=0)
    assert a.text == b.text


def test_a_damaged_or_missing_shipped_file_is_named_with_the_fix(shipped_dir):
    verify(shipped_dir)
    weights = shipped_dir / "model" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    shipped._verified.clear()
    with pytest.raises(ShippedModelError, match=r"trainable\.safetensors does not match its manifest.*reinstall"):
        mmllm.load()
    (shipped_dir / "clip" / "model.safetensors").unlink()
    with pytest.raises(ShippedModelError, match=r"clip/model\.safetensors is missing.*reinstall"):
        verify(shipped_dir)


def test_without_a_shipped_model_the_default_is_text_only_with_a_hint(tmp_path, monkeypatch, caplog):
    """An installation that carries no trained default falls back to the text-only SmolLM2
    with a warning saying how to build one; naming "toy" explicitly is an error with the fix."""
    import logging

    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "nothing")
    monkeypatch.delenv(shipped.DEFAULT_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="mmllm"):
        assert api.resolve() == "smollm2"
    assert "scripts/build_default.py" in caplog.text and "MMLLM_DEFAULT" in caplog.text
    with pytest.raises(ShippedModelError, match="no shipped model 'toy'.*build_default.py.*MMLLM_DEFAULT"):
        mmllm.load("toy")


def test_mmllm_default_names_another_default(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "nothing")  # never consulted
    monkeypatch.setenv(shipped.DEFAULT_ENV, str(tree / "model"))
    assert api.resolve() == tree / "model"
    monkeypatch.setenv(shipped.DEFAULT_ENV, "tiny")
    assert api.resolve() == "tiny"
    monkeypatch.setenv(shipped.DEFAULT_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"from \$MMLLM_DEFAULT"):
        api.resolve()


def test_names_resolve_directory_then_shipped_then_preset_then_hub(tree, shipped_dir, tmp_path, monkeypatch):
    assert api.resolve(tree / "model") == tree / "model"
    assert api.resolve("toy") == shipped_dir / "model"
    assert api.resolve("tiny") == "tiny"
    with pytest.raises(FileNotFoundError, match="directory without config.json"):
        api.resolve(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a directory with config.json, a shipped model.*hub id.*presets"):
        api.resolve("no-such-model")


def test_a_hub_id_loads_from_the_hub_cache_offline(tree, tmp_path, monkeypatch):
    """``org/name`` goes through huggingface_hub's snapshot_download, which reads a snapshot
    from the local cache when offline (the tests run with HF_HUB_OFFLINE=1). The repository
    is a model directory holding its components (``./clip``)."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-mmllm"
    snapshot = repo / "snapshots" / revision
    for name in ("clip", "image_decoder"):
        shutil.copytree(tree / name, snapshot / name)
    shutil.copy(tree / "model" / "trainable.safetensors", snapshot)
    config = MMLLMConfig.from_json(tree / "model" / "config.json").resolved(tree / "model")
    config.inputs["image"].encoder.source = str(snapshot / "clip")
    config.outputs["image"].decoder.source = str(snapshot / "image_decoder")
    config.relative_to(snapshot, tree=snapshot).to_json(snapshot / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert json.loads((snapshot / "config.json").read_text())["inputs"]["image"]["encoder"]["source"] == "./clip"
    assert api.resolve("acme/tiny-mmllm") == snapshot
    model = mmllm.load("acme/tiny-mmllm")
    original = MMLLM.from_pretrained(tree / "model")
    for (name, a), (_, b) in zip(model.trainable_state_dict().items(), original.trainable_state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="could not be read.*huggingface-cli download"):
        api.resolve("acme/absent")


def test_save_pretrained_pushes_to_the_hub_like_transformers(tree, tmp_path, monkeypatch):
    """``push_to_hub=True`` creates the repository and uploads the saved directory (the hub
    client is replaced by a recorder: no network); local components outside the directory
    are refused before anything is written."""
    import huggingface_hub

    calls = []

    class Recorder:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    model = MMLLM.from_pretrained(tree / "model")
    with pytest.raises(ValueError, match=r"inputs.image.encoder.source = .*outside.*hub id"):
        model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="acme/m")
    assert not (tmp_path / "out").exists() and calls == []
    model.config.inputs["image"].encoder.source = "acme/tiny-clip"
    model.config.outputs["image"].decoder.source = "acme/tiny-sd"
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="acme/m", private=True, token="t")
    assert calls == [("token", "t"), ("create", "acme/m", True, True),
                     ("upload", "acme/m", ["config.json", "trainable.safetensors"])]
    with pytest.raises(ValueError, match="needs repo_id"):
        model.save_pretrained(tmp_path / "out2", push_to_hub=True)
