import json

import pytest

from mmllm import MMLLMConfig, available_presets
from mmllm.registry import Registry


@pytest.mark.parametrize("name", available_presets())
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = MMLLMConfig.from_preset(name)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    again = MMLLMConfig.from_json(path)
    assert again == cfg
    assert json.loads(path.read_text()) == cfg.to_dict()


def test_required_presets_exist():
    assert {"tiny", "llava-1.5-7b", "nextgpt-7b", "nextgpt-7b-sd2"} <= set(available_presets())


def test_overrides_dotted_and_nested():
    cfg = MMLLMConfig.from_preset("tiny", seed=7, **{"llm.dtype": "bfloat16"},
                                  inputs={"image": {"projector": {"type": "linear"}}})
    assert cfg.seed == 7
    assert cfg.llm.dtype == "bfloat16"
    assert cfg.inputs["image"].projector.type == "linear"
    # untouched siblings survive a nested override
    assert cfg.inputs["image"].encoder.backend == "open_clip"
    assert cfg.replace(**{"inputs.audio.projector.type": "resampler"}).inputs["audio"].projector.type == "resampler"


def test_type_override_drops_the_old_types_options():
    flat = {"type": "flatten_mlp", "options": {"num_tokens": 4}}
    cfg = MMLLMConfig.from_preset("tiny", inputs={"image": {"projector": flat}})
    assert cfg.inputs["image"].projector.options == {"num_tokens": 4}
    linear = cfg.replace(**{"inputs.image.projector.type": "linear"}).inputs["image"].projector
    assert (linear.type, linear.options) == ("linear", {})  # the options belonged to flatten_mlp
    same = cfg.replace(**{"inputs.image.projector.type": "flatten_mlp"}).inputs["image"].projector
    assert same.options == {"num_tokens": 4}  # same type: options kept
    given = cfg.replace(**{"inputs.image.projector": {"type": "resampler", "options": {"num_queries": 2}}})
    assert given.inputs["image"].projector.options == {"num_queries": 2}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(KeyError, match="valid keys"):
        MMLLMConfig.from_preset("tiny", llm={"dtyp": "float32"})


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError, match="available presets"):
        MMLLMConfig.from_preset("llava-1.5-7")


def test_registry_is_exact_match_and_lazy():
    reg = Registry("widget")
    reg.register("json-dumps", "json:dumps")
    assert reg.get("json-dumps") is json.dumps
    with pytest.raises(KeyError, match=r"valid names: \['json-dumps'\]"):
        reg.get("json")  # a prefix is not a match


def test_sources_beside_the_model_dir_are_saved_relative(tmp_path):
    (tmp_path / "clip").mkdir()
    elsewhere = tmp_path.parent
    cfg = MMLLMConfig.from_preset("llava-1.5-7b", **{"inputs.image.encoder.source": str(tmp_path / "clip"),
                                                     "llm.tokenizer": str(elsewhere)})
    rel = cfg.relative_to(tmp_path / "model")
    assert rel.inputs["image"].encoder.source == "../clip"
    assert rel.llm.tokenizer == str(elsewhere)  # not under the model dir's parent: kept absolute
    assert rel.llm.source == cfg.llm.source  # a hub id is never touched
    moved = tmp_path / "new_home" / "model"
    assert rel.resolved(moved).inputs["image"].encoder.source == str(tmp_path / "new_home" / "clip")
    assert rel.resolved(tmp_path / "model") == cfg


def test_a_deeper_model_dir_names_components_relative_to_the_tree_it_is_in(tmp_path):
    (tmp_path / "clip").mkdir()
    cfg = MMLLMConfig.from_preset("llava-1.5-7b", **{"inputs.image.encoder.source": str(tmp_path / "clip")})
    stage = tmp_path / "runs" / "stage2" / "model"
    assert cfg.relative_to(stage).inputs["image"].encoder.source == str(tmp_path / "clip")  # parent only
    rel = cfg.relative_to(stage, tree=tmp_path)
    assert rel.inputs["image"].encoder.source == "../../../clip"
    moved = tmp_path / "moved" / "runs" / "stage2" / "model"
    assert rel.resolved(moved).inputs["image"].encoder.source == str(tmp_path / "moved" / "clip")
    with pytest.raises(ValueError, match="does not contain the model dir"):
        cfg.relative_to(stage, tree=tmp_path / "elsewhere")


def test_parse_setting_reads_json_values_and_keeps_other_text():
    from mmllm.config import parse_setting

    assert parse_setting('inputs.video.projector.options={"num_tokens": 4, "per_token": true}') == (
        "inputs.video.projector.options", {"num_tokens": 4, "per_token": True})
    assert parse_setting("lr=6e-3") == ("lr", 0.006)
    assert parse_setting("inputs.image.projector.type=linear") == ("inputs.image.projector.type", "linear")
    assert parse_setting("a.b=x=y") == ("a.b", "x=y")  # only the first '=' splits
    over = dict([parse_setting('inputs.image.projector.options={"num_tokens": 2}')])
    cfg = MMLLMConfig.from_preset("tiny", **over)
    assert cfg.inputs["image"].projector.options["num_tokens"] == 2
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_setting("per_token")
