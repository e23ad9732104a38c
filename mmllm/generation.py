"""``generate``: prompt + media (+ history) -> text (and, with an output side, media).

Decoding runs through the LLM's own ``generate`` on ``inputs_embeds`` with left padding,
so every transformers decoding option (sampling, stopping, caches) is available.
"""

from __future__ import annotations

import threading
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
    if prompt is None or not str(prompt).strip():
        raise ValueError("the prompt is empty; pass prompt='...' (for media alone, ask e.g. 'Describe this.')")
    messages, lists = [], {m: [] for m in specs}
    for i, msg in enumerate(history or []):
        if "role" not in msg or "content" not in msg:
            raise ValueError(f"history[{i}] needs 'role' and 'content' keys, got {sorted(msg)}")
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
    (docs/RESULTS.md)."""

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
        return cls(allowed, kwargs.pop("max_media", None), kwargs.pop("media_seed", cls.seed), settings)


def _generation_kwargs(model, max_new_tokens, temperature, top_p, extra, media: MediaOptions | None = None) -> dict:
    tok = model.tokenizer
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    eos = model.llm.generation_config.eos_token_id
    kwargs["eos_token_id"] = eos if eos is not None else tok.eos_token_id
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if model.signal_groups:
        from transformers import LogitsProcessorList

        from .signal import ForceSignalTokens

        force = ForceSignalTokens(model.signal_groups, media.allowed if media else None,
                                  media.max_per_turn if media else None)
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
    messages, lists = build_request(model, prompt, {"image": image, "audio": audio, "video": video}, history)
    media = MediaOptions.pop_from(model, generate_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    batch, embeds, prefix = _prepare(model, [messages], [lists])
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
    convs, media = [], []
    for i, req in enumerate(requests):
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
    kwargs = _generation_kwargs(model, max_new_tokens, temperature, top_p, generate_kwargs, options)
    with torch.no_grad(), model.prefix_context(prefix):
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, **kwargs)
    return _finish(model, batch, embeds, prefix, out, options)


class TextStream:
    """Iterate for text pieces; ``.result`` is the full ``GenerateResult`` afterwards.

    Decoding runs in a worker thread; an error there is re-raised in the iterating thread.
    """

    def __init__(self, model, batch, embeds, prefix, kwargs, media: MediaOptions):
        from transformers import TextIteratorStreamer

        self.model = model
        self._finish = lambda out: _finish(model, batch, embeds, prefix, out, media)[0]
        self.result: GenerateResult | None = None
        self._error: BaseException | None = None
        self._out: torch.Tensor | None = None
        self._streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def work():
            try:
                with torch.no_grad(), model.prefix_context(prefix):
                    self._out = model.llm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                                   streamer=self._streamer, **kwargs)
            except BaseException as err:  # surfaced in __iter__
                self._error = err
                self._streamer.end()

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            if piece:
                yield piece
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.result = self._finish(self._out)
