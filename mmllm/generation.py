"""``generate``: prompt + media (+ history) -> text (and, with an output side, media).

Decoding runs through the LLM's own ``generate`` on ``inputs_embeds`` with left padding,
so every transformers decoding option (sampling, stopping, caches) is available.
"""

from __future__ import annotations

import atexit
import functools
import math
import numbers
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .modalities import NAMES, result_fields

MEDIA_KEYS = NAMES
RESULT_FIELD = result_fields()


def decoder_settings() -> tuple[str, ...]:
    """The generate() keywords that go to the diffusion decoders rather than to the LLM: every
    registered decoder's generation settings (``pipelines.generation_settings``)."""
    from pipelines import generation_settings  # on use: pipelines itself imports mmllm

    return generation_settings()


def __getattr__(name: str):
    if name == "DECODER_SETTINGS":  # read from the decoder registry on first use
        return decoder_settings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
ROLES = ("system", "user", "assistant")
# Bounds on the decoder settings a request may ask for (each output is allocated up front).
MAX_INFERENCE_STEPS = 1000
MAX_OUTPUT_SIDE = 8192  # height or width of a generated image or frame
MAX_OUTPUT_PIXELS = 4096 * 4096  # height * width
MAX_OUTPUT_FRAMES = 256
MAX_OUTPUT_AUDIO_SECONDS = 600.0
MAX_FPS = 240
# Seeds torch accepts (torch.manual_seed, torch.Generator.manual_seed).
SEED_RANGE = (-(2**63), 2**64 - 1)


# --------------------------------------------------------------------------- argument checks


def _check_text(text: Any, what: str) -> str:
    """A prompt or message content: a ``str`` that is valid Unicode."""
    if isinstance(text, (bytes, bytearray)):
        raise TypeError(f"{what} is bytes; decode it first, e.g. text.decode('utf-8')")
    if not isinstance(text, str):
        raise TypeError(f"{what} is a {type(text).__name__}; pass a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} holds a lone surrogate (U+{ord(text[err.start]):04X}) at character {err.start}, which is not "
            "valid Unicode; decode the text with errors='replace', or remove the character"
        ) from None
    return text


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high and value > high):
        bound = f"from {low} to {high}" if high else f">= {low}"
        raise ValueError(f"{name}={value!r}; pass an integer {bound}")
    return int(value)


def _check_number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    ok = _is_real(value) and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"in ({low:g}, {high:g}]" if low_open else f"from {low:g} to {high:g}"
        raise ValueError(f"{name}={value!r}; pass a finite number {bound}")
    return float(value)


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """``None`` or an int torch can seed with; anything else says the fix."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name}={seed!r} is not an integer; pass an int, or None for a fresh random draw")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"{name}={seed} is out of range; pass an int from -2**63 to 2**64 - 1")
    return int(seed)


def check_sampling(max_new_tokens: Any, temperature: Any, top_p: Any) -> None:
    """Refuse sampling settings that would be silently wrong (NaN, negative, out of range)."""
    _check_int(max_new_tokens, "max_new_tokens", 1)
    if temperature is not None and not (_is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}; pass a finite number >= 0 (0 is greedy decoding)")
    if top_p is not None:
        _check_number(top_p, "top_p", 0.0, 1.0, low_open=True)


def _check_decoder_settings(settings: dict) -> None:
    checks = {
        "num_inference_steps": lambda v, k: _check_int(v, k, 1, MAX_INFERENCE_STEPS),
        "guidance_scale": lambda v, k: _check_number(v, k, -1e3, 1e3),
        "guidance_rescale": lambda v, k: _check_number(v, k, 0.0, 1.0),
        "height": lambda v, k: _check_int(v, k, 1, MAX_OUTPUT_SIDE),
        "width": lambda v, k: _check_int(v, k, 1, MAX_OUTPUT_SIDE),
        "num_frames": lambda v, k: _check_int(v, k, 1, MAX_OUTPUT_FRAMES),
        "fps": lambda v, k: _check_number(v, k, 0.0, MAX_FPS, low_open=True),
        "audio_length_in_s": lambda v, k: _check_number(v, k, 0.0, MAX_OUTPUT_AUDIO_SECONDS, low_open=True),
    }
    for key, value in settings.items():
        if value is not None and key in checks:
            checks[key](value, key)
    height, width = settings.get("height"), settings.get("width")
    if height is not None and width is not None and height * width > MAX_OUTPUT_PIXELS:
        raise ValueError(f"height x width = {height} x {width} is over the {MAX_OUTPUT_PIXELS}-pixel limit; "
                         "ask for a smaller output")


@dataclass
class GenerateResult:
    """What one request produced: text plus any media."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    images: list = field(default_factory=list)
    audio: list = field(default_factory=list)
    videos: list = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, list) else [x]


def build_request(model, prompt: str | None, media: dict[str, Any], history: list[dict] | None = None):
    """-> (messages, media lists) for one conversation.

    ``history`` is a list of ``{"role", "content"}`` messages that may carry their own
    ``"image"`` / ``"audio"`` / ``"video"`` entries. Media passed with this turn but missing
    a placeholder in ``prompt`` get one inserted at the start of the prompt (LLaVA's
    convention), so ``generate(image=x, prompt="What is this?")`` just works.
    """
    if not model.processor:
        raise RuntimeError("this model was built without a tokenizer (meta device?); load it normally to generate")
    specs = model.processor.modalities
    unknown = sorted(k for k, v in media.items() if v is not None and k not in specs)
    if unknown:
        raise ValueError(f"this model takes {sorted(specs) or 'no media'}; it cannot read {unknown}")
    if prompt is not None:
        _check_text(prompt, "the prompt")
    if prompt is None or not prompt.strip():
        raise ValueError("the prompt is empty; pass prompt='...' (for media alone, ask e.g. 'Describe this.')")
    if history is not None and not isinstance(history, (list, tuple)):
        raise TypeError(f"history is a {type(history).__name__}; pass a list of {{'role': ..., 'content': ...}} dicts")
    messages, lists = [], {m: [] for m in specs}
    for i, msg in enumerate(history or []):
        if not isinstance(msg, dict):
            raise TypeError(f"history[{i}] is a {type(msg).__name__}; each entry is a dict like "
                            "{'role': 'user', 'content': '...'}")
        if "role" not in msg or "content" not in msg:
            raise ValueError(f"history[{i}] needs 'role' and 'content' keys, got {sorted(msg)}")
        if msg["role"] not in ROLES:
            raise ValueError(f"history[{i}] has role {msg['role']!r}; use one of {list(ROLES)}")
        if msg["content"] is None:
            raise ValueError(f"history[{i}]['content'] is None; give the message text as a string ('' for none)")
        _check_text(msg["content"], f"history[{i}]['content']")
        messages.append({"role": msg["role"], "content": msg["content"]})
        for m in specs:
            lists[m].extend(_as_list(msg.get(m)))
    prefix = ""
    for m, spec in specs.items():
        items = _as_list(media.get(m))
        missing = len(items) - prompt.count(spec.placeholder)
        if missing > 0:
            prefix += (spec.placeholder + "\n") * missing
        lists[m].extend(items)
    messages.append({"role": "user", "content": prefix + prompt})
    return messages, lists


@dataclass
class MediaOptions:
    """Output-side controls: which modalities may be produced, how many per turn, and
    the decoder settings (steps, guidance, size, frames, audio length, seed).

    ``seed`` (``media_seed=`` in ``generate``): ``None`` draws each output's initial noise from
    torch's global generator, so a call with ``seed=`` repeats exactly and outputs differ
    otherwise; an int renders every output from that one fixed noise. A fixed default made
    every call draw from the same noise, a poor draw for the toy image decoder
    (docs/research/README.md)."""

    allowed: set[str] | None = None
    max_per_turn: int | None = None
    seed: int | None = None
    settings: dict = field(default_factory=dict)

    @classmethod
    def pop_from(cls, model, kwargs: dict) -> "MediaOptions":
        allowed = kwargs.pop("output_modalities", None)
        if allowed is not None:
            allowed = {allowed} if isinstance(allowed, str) else set(allowed)
            unknown = sorted(allowed - set(model.output_modalities))
            if unknown:
                raise ValueError(f"output_modalities {unknown} not available; this model outputs {list(model.output_modalities)}")
        settings = {k: kwargs.pop(k) for k in decoder_settings() if k in kwargs}
        _check_decoder_settings(settings)
        max_media = kwargs.pop("max_media", None)
        if max_media is not None:
            _check_int(max_media, "max_media", 0)
        return cls(allowed, max_media, check_seed(kwargs.pop("media_seed", cls.seed), "media_seed"), settings)


def context_size(model) -> int | None:
    """Tokens the model can attend to: ``config.max_length`` and the LLM's position limit."""
    limits = [model.config.max_length, getattr(model.llm.config, "max_position_embeddings", None)]
    limits = [int(n) for n in limits if n]
    return min(limits) if limits else None


def _fit_new_tokens(model, max_new_tokens: int, prompt_tokens: int) -> int:
    """``max_new_tokens`` capped, with a warning, at the room the prompt leaves in the context."""
    context = context_size(model)
    if context is None:
        return max_new_tokens
    room = context - prompt_tokens
    if room < 1:
        raise ValueError(f"the prompt takes {prompt_tokens} of the model's {context} context tokens, leaving no room "
                         "for an answer; shorten the prompt or history")
    if max_new_tokens > room:
        warnings.warn(f"max_new_tokens={max_new_tokens} does not fit: the prompt takes {prompt_tokens} of the "
                      f"model's {context} context tokens, so at most {room} new tokens are generated", stacklevel=3)
        return room
    return max_new_tokens


def _generation_kwargs(model, max_new_tokens, temperature, top_p, extra, media: MediaOptions | None = None) -> dict:
    tok = model.tokenizer
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    eos = model.llm.generation_config.eos_token_id
    kwargs["eos_token_id"] = eos if eos is not None else tok.eos_token_id
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=1.0 if top_p is None else float(top_p))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if model.signal_groups:
        from transformers import LogitsProcessorList

        from .signal import ForceSignalTokens

        force = ForceSignalTokens(model.signal_groups, media.allowed if media else None,
                                  media.max_per_turn if media else None, max_new_tokens=max_new_tokens)
        kwargs["logits_processor"] = LogitsProcessorList([force, *extra.pop("logits_processor", [])])
    kwargs.update(extra)
    return kwargs


def _prepare(model, conversations, media):
    batch = model.processor(conversations, media, add_generation_prompt=True, padding_side="left").to(model.device)
    with torch.no_grad():
        embeds, prefix = model.embed(batch.input_ids, batch.media, batch.media_sample)
    return batch, embeds, prefix


def _decode(model, sequences: torch.Tensor) -> list[GenerateResult]:
    results = []
    for seq in sequences.tolist():
        ids = [t for t in seq if t != model.tokenizer.pad_token_id]
        text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append(GenerateResult(text=text, token_ids=ids))
    return results


@torch.no_grad()
def _finish(model, batch, embeds, prefix, new_tokens: torch.Tensor, media: MediaOptions) -> list[GenerateResult]:
    """Decode text; render every complete signal sequence through its decoder."""
    results = _decode(model, new_tokens)
    if not model.signal_groups or new_tokens.shape[1] == 0:
        return results
    from .signal import partial_signal_groups

    for result in results:
        for modality, pos, have in partial_signal_groups(result.token_ids, model.signal_groups):
            warnings.warn(
                f"the answer stopped inside a {modality} signal sequence (token {pos}, {have} of "
                f"{len(model.signal_groups[modality])} signal tokens), so no {modality} was produced; a stopping "
                "criterion ended generation there", stacklevel=3)
    # One more pass over prompt + answer gives the last-layer states at the signal tokens.
    full_embeds = torch.cat([embeds, model.llm.get_input_embeddings()(new_tokens)], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(new_tokens)], dim=1)
    with model.prefix_context(prefix):
        hidden = model.llm.get_decoder()(inputs_embeds=full_embeds, attention_mask=mask,
                                         position_ids=model.position_ids(mask), use_cache=False).last_hidden_state
    answer = hidden[:, batch.input_ids.shape[1]:]  # (B, T_new, D)
    for modality, cond in model.project_signals(new_tokens, answer).items():
        rows = model.signal_positions(new_tokens, modality)[:, 0].tolist()
        decoder = model.decoders[modality]
        allowed = {k: v for k, v in media.settings.items() if k in decoder.defaults}
        for row, one in zip(rows, cond):
            out = decoder.generate(one.unsqueeze(0).to(decoder.pipeline.text_encoder.dtype), seed=media.seed, **allowed)
            getattr(results[row], RESULT_FIELD[modality]).extend(out)
    return results


def generate(model, prompt: str | None = None, *, image=None, audio=None, video=None, history=None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, stream: bool = False,
             seed: int | None = None, **generate_kwargs):
    """One request. Returns a ``GenerateResult``, or with ``stream=True`` a ``TextStream``
    that yields text pieces as they are produced and holds the result once exhausted."""
    check_sampling(max_new_tokens, temperature, top_p)
    seed = check_seed(seed)
    messages, lists = build_request(model, prompt, {"image": image, "audio": audio, "video": video}, history)
    media = MediaOptions.pop_from(model, generate_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    batch, embeds, prefix = _prepare(model, [messages], [lists])
    max_new_tokens = _fit_new_tokens(model, max_new_tokens, batch.input_ids.shape[1])
    kwargs = _generation_kwargs(model, max_new_tokens, temperature, top_p, generate_kwargs, media)
    if stream:
        return TextStream(model, batch, embeds, prefix, kwargs, media)
    with torch.no_grad(), model.prefix_context(prefix):
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, **kwargs)
    return _finish(model, batch, embeds, prefix, out, media)[0]


def generate_batch(model, requests: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = None, **generate_kwargs) -> list[GenerateResult]:
    """Many requests (dicts with ``prompt`` and optional ``image``/``audio``/``video``/``history``)
    decoded together in one left-padded batch."""
    if not isinstance(requests, (list, tuple)):
        raise TypeError(f"requests is a {type(requests).__name__}; pass a list of dicts like {{'prompt': ...}}")
    if not requests:
        raise ValueError("no requests; pass a list of dicts like {'prompt': ...}")
    check_sampling(max_new_tokens, temperature, top_p)
    seed = check_seed(seed)
    convs, media = [], []
    for i, req in enumerate(requests):
        if not isinstance(req, dict):
            raise TypeError(f"request {i} is a {type(req).__name__}; each request is a dict like {{'prompt': ...}}")
        unknown = sorted(set(req) - {"prompt", "history", *MEDIA_KEYS})
        if unknown:
            raise ValueError(f"request {i} has unknown keys {unknown}; use prompt, history, image, audio, video")
        messages, lists = build_request(model, req.get("prompt"), {k: req.get(k) for k in MEDIA_KEYS},
                                        req.get("history"))
        convs.append(messages)
        media.append(lists)
    options = MediaOptions.pop_from(model, generate_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    batch, embeds, prefix = _prepare(model, convs, media)
    max_new_tokens = _fit_new_tokens(model, max_new_tokens, batch.input_ids.shape[1])
    kwargs = _generation_kwargs(model, max_new_tokens, temperature, top_p, generate_kwargs, options)
    with torch.no_grad(), model.prefix_context(prefix):
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, **kwargs)
    return _finish(model, batch, embeds, prefix, out, options)


def _halt(stop: threading.Event, thread: threading.Thread) -> None:
    """Ask a stream's worker to stop after its current step and wait for it (not from itself)."""
    stop.set()
    if thread is not threading.current_thread() and thread.is_alive():
        thread.join()


class TextStream:
    """Iterate for text pieces; ``.result`` is the full ``GenerateResult`` afterwards.

    Decoding runs in a worker thread; an error there is re-raised in the iterating thread.
    A stream that is closed, garbage-collected or still running when the interpreter exits
    stops its worker after the current token (a worker left running into interpreter
    shutdown aborts the process), so abandoning a stream is safe.
    """

    def __init__(self, model, batch, embeds, prefix, kwargs, media: MediaOptions):
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class StopWhenSet(StoppingCriteria):
            def __call__(self, input_ids, scores, **_):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        self.model = model
        self._finish = lambda out: _finish(model, batch, embeds, prefix, out, media)[0]
        self.result: GenerateResult | None = None
        stop = threading.Event()
        # The worker writes here, never to ``self``, so an abandoned stream can be collected.
        state: dict[str, Any] = {"out": None, "error": None}
        self._state = state
        self._streamer = streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        criteria = StoppingCriteriaList([StopWhenSet(), *kwargs.pop("stopping_criteria", [])])

        def work():
            try:
                with torch.no_grad(), model.prefix_context(prefix):
                    state["out"] = model.llm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                                      streamer=streamer, stopping_criteria=criteria, **kwargs)
            except BaseException as err:  # surfaced in __iter__
                state["error"] = err
                streamer.end()

        self._thread = threading.Thread(target=work, daemon=True)
        self._halt = functools.partial(_halt, stop, self._thread)
        atexit.register(self._halt)
        self._thread.start()

    def close(self) -> None:
        """Stop decoding (after the current token) and wait for the worker; iterating ends."""
        halt = getattr(self, "_halt", None)
        if halt is not None:
            halt()
            atexit.unregister(halt)

    def __del__(self):
        self.close()

    def __iter__(self) -> Iterator[str]:
        finished = False
        try:
            for piece in self._streamer:
                if piece:
                    yield piece
            finished = True
        finally:
            if not finished:  # the consumer stopped early (break, close(), garbage collection)
                self.close()
        self.close()
        if self._state["error"] is not None:
            raise self._state["error"]
        self.result = self._finish(self._state["out"])
