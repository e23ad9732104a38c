"""``MMLLM``: frozen encoders -> input projectors -> a causal LLM -> signal tokens -> output projectors -> frozen decoders."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from projectors import build_input_projector, build_output_projector

from .config import ConfigError, LoraConfig, MMLLMConfig
from .encoders import build_encoder
from .fileio import atomic_directory
from .meta import meta_device
from .llm import build_llm, load_tokenizer, resolve_dtype
from .prefix import PrefixAttention
from .processor import Batch, MMLLMProcessor, ModalitySpec
from .signal import SignalEmbedding, SignalHead, signal_token_names

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "trainable.safetensors"
# Parameters under these prefixes are frozen components, referenced by source and never saved.
FROZEN_PREFIXES = ("llm.", "encoders.", "decoders.")


@dataclass
class MMLLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V), or (n, V) at supervised positions when labels are given
    hidden_states: torch.Tensor | None = None  # (B, T, D) last layer
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


def _output_options(output_modalities, max_media, media_seed, guidance_scale, guidance_rescale,
                    num_inference_steps, height, width, num_frames, fps, audio_length_in_s) -> dict[str, Any]:
    """The output-side keywords of ``generate`` that were set (None means "not given")."""
    given = dict(output_modalities=output_modalities, max_media=max_media, media_seed=media_seed,
                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                 num_inference_steps=num_inference_steps, height=height, width=width, num_frames=num_frames, fps=fps,
                 audio_length_in_s=audio_length_in_s)
    return {k: v for k, v in given.items() if v is not None}


def _component_seed(seed: int, name: str) -> int:
    # Stable per-component seeds so a random preset rebuilds bit-identically from its config.
    return seed * 1000 + sum(ord(c) for c in name)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "integer"


def model_tree(path: str | os.PathLike, tree: str | os.PathLike | None = None) -> list[Path]:
    """Where a model directory's config may name local files: ``tree`` when given, else the
    model dir's parent (its siblings, ``../clip``), or ``<tree>`` for a training run's model
    ``<tree>/runs/<run>/model`` (``../../../clip``); and mmllm's cache, where mmllm builds its
    own components."""
    from .llm import cache_dir

    model = Path(os.path.abspath(path))
    if tree is not None:
        top = Path(os.path.abspath(tree))
    elif model.name == "model" and model.parent.parent.name == "runs":
        top = model.parent.parent.parent
    else:
        top = model.parent
    return [top, Path(os.path.abspath(cache_dir()))]


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _refuse_paths(path: Path, found: dict, error: type, what: str, fix) -> None:
    """Raise ``error`` naming how many of ``found`` ({dotted field: path}) ``path``'s config has,
    the first of them, and ``fix(field)``; nothing when ``found`` is empty."""
    if found:
        field, where = next(iter(found.items()))
        raise error(f"{path / CONFIG_NAME} names {len(found)} {what}, e.g. {field} = {where!r}{fix(field)}")


class MMLLM(nn.Module):
    def __init__(self, config: MMLLMConfig, llm: nn.Module, tokenizer=None, encoders: dict | None = None,
                 decoders: dict | None = None):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.encoders = nn.ModuleDict(encoders or {})
        # Frozen diffusion decoders: plain objects around stock pipelines, loaded lazily, never saved.
        self.decoders = dict(decoders or {})
        width = llm.get_input_embeddings().embedding_dim
        self.input_projectors = nn.ModuleDict()
        self.prefix_attention: PrefixAttention | None = None
        for modality, icfg in config.inputs.items():
            enc = self.encoders[modality]
            options = dict(icfg.projector.options)
            if icfg.projector.type == "gated_prefix":
                options["num_heads"] = llm.config.num_attention_heads
            with _seeded(_component_seed(config.seed, "proj." + modality)):
                proj = build_input_projector(icfg.projector.type, enc.hidden_size, width, enc.num_tokens, **options)
            self.input_projectors[modality] = proj.to(dtype=next(llm.parameters()).dtype)
            if proj.kind == "prefix":
                if self.prefix_attention is not None:
                    raise ValueError("only one modality can use a gated_prefix projector")
                self.prefix_attention = PrefixAttention(llm, proj.gates)
        self.output_projectors = nn.ModuleDict()
        for modality in config.outputs:
            self.output_projectors[modality] = self.new_output_projector(modality)
        self.processor = self._make_processor() if tokenizer is not None else None
        self.signal_groups: dict[str, list[int]] = {}  # modality -> its signal-token ids, in order
        if tokenizer is not None and config.outputs:
            self._add_signal_tokens()

    def new_output_projector(self, modality: str) -> nn.Module:
        """A freshly initialised output projector for ``modality`` (seeded by the config), on
        the LLM's device and dtype."""
        ocfg = self.config.outputs[modality]
        width = self.llm.get_input_embeddings().embedding_dim
        shape = self._target_shape(modality)  # outside the seeded block: it may build the decoder
        with _seeded(_component_seed(self.config.seed, "out." + modality)):
            proj = build_output_projector(ocfg.projector.type, width, shape, ocfg.num_signal_tokens,
                                          **ocfg.projector.options)
        ref = next(self.llm.parameters())
        return proj.to(device=ref.device if ref.device.type != "meta" else None, dtype=ref.dtype)

    def _target_shape(self, modality: str) -> tuple:
        """The decoder's conditioning shape, read from the decoder (or, on meta, from config)."""
        dcfg = self.config.outputs[modality].decoder
        if next(self.llm.parameters()).device.type == "meta":
            if not dcfg.conditioning:
                raise ValueError(
                    f"building on the meta device does not open decoders; set outputs.{modality}.decoder.conditioning "
                    "to the decoder's conditioning shape (e.g. [77, 768])"
                )
            return tuple(dcfg.conditioning)
        shape = tuple(self.decoders[modality].conditioning_shape)
        if dcfg.conditioning and tuple(dcfg.conditioning) != shape:
            raise ValueError(
                f"outputs.{modality}.decoder.conditioning says {tuple(dcfg.conditioning)} but the decoder's text "
                f"encoder gives {shape}; fix or remove the config value"
            )
        return shape

    def _add_signal_tokens(self) -> None:
        tok = self.tokenizer
        for modality, ocfg in self.config.outputs.items():
            names = signal_token_names(ocfg.signal_prefix, ocfg.num_signal_tokens)
            tok.add_tokens([n for n in names if n not in tok.get_vocab()], special_tokens=True)
            self.signal_groups[modality] = tok.convert_tokens_to_ids(names)
        ids = [t for group in self.signal_groups.values() for t in group]
        with _seeded(_component_seed(self.config.seed, "signal")):
            self.llm.set_input_embeddings(SignalEmbedding(self.llm.get_input_embeddings(), ids))
            self.llm.set_output_embeddings(SignalHead(self.llm.get_output_embeddings(), ids))

    # ------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, config: MMLLMConfig, device=None, dtype=None) -> "MMLLM":
        """Build every component from config. On ``device="meta"`` nothing is allocated or
        downloaded (random architecture builds, no tokenizer): use it to inspect shapes."""
        on_meta = str(device) == "meta"
        ctx = meta_device() if on_meta else contextlib.nullcontext()
        with ctx:
            llm = build_llm(config.llm, seed=_component_seed(config.seed, "llm"), dtype=dtype)
            encoders: dict[str, nn.Module] = {}
            # Image-like encoders first, so a video 'frames' encoder can share one.
            order = sorted(config.inputs, key=lambda m: config.inputs[m].encoder.backend == "frames")
            for modality in order:
                with _seeded(_component_seed(config.seed, "enc." + modality)):
                    encoders[modality] = build_encoder(config.inputs[modality].encoder, modality, encoders)
            tokenizer = None if on_meta else load_tokenizer(config.llm)
            from pipelines import build_decoder  # pipelines imports mmllm.config: import it late, no cycle

            decoders = {} if on_meta else {m: build_decoder(o.decoder) for m, o in config.outputs.items()}
            model = cls(config, llm, tokenizer, {m: encoders[m] for m in config.inputs}, decoders)
            if config.llm.lora is not None:
                model.add_lora(config.llm.lora)
        if dtype is not None and not on_meta:
            model.to(dtype=resolve_dtype(dtype))
        if device is not None and not on_meta:
            model.to(device)
        return model

    def add_lora(self, lora: LoraConfig) -> None:
        """Inject peft LoRA adapters into the LLM in place (no wrapper class, so ``get_decoder``
        and the embedding accessors keep working) and record them in ``config.llm.lora``.

        Adapter weights (names holding ``lora_``) are saved by ``trainable_state_dict``; LoRA B
        starts at zero, so the model is unchanged until trained. Trainability is left exactly
        as it was: freezing belongs to ``mmllm.training.freeze.set_trainable``.
        """
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        if any("lora_" in n for n, _ in self.llm.named_parameters()):
            raise ValueError("the LLM already has LoRA adapters; add_lora is called once per model")
        flags = {n: p.requires_grad for n, p in self.named_parameters()}
        peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=list(lora.target_modules))
        with _seeded(_component_seed(self.config.seed, "lora")):
            inject_adapter_in_model(peft_cfg, self.llm)
        self.llm.train(self.llm.training)  # new adapter modules (their dropout) follow the LLM's mode
        for n, p in self.named_parameters():
            p.requires_grad_(flags.get(n, True))
        self.config.llm.lora = lora

    def _make_processor(self) -> MMLLMProcessor:
        tok = self.tokenizer
        placeholders = [c.placeholder for c in self.config.inputs.values()]
        new = [p for p in placeholders if p not in tok.get_vocab()]
        if new:
            tok.add_tokens(new, special_tokens=True)
        specs = {}
        for modality, icfg in self.config.inputs.items():
            enc = self.encoders[modality]
            specs[modality] = ModalitySpec(
                placeholder=icfg.placeholder,
                token_id=tok.convert_tokens_to_ids(icfg.placeholder),
                num_tokens=self.input_projectors[modality].num_output_tokens(enc.num_tokens),
                encoder=enc,
            )
        return MMLLMProcessor(tok, specs, self.config.system_prompt, self.config.max_length)

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def output_modalities(self) -> tuple[str, ...]:
        return tuple(self.config.outputs)

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        device = next(self.llm.parameters()).device
        for decoder in self.decoders.values():
            decoder.to(device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor] | None = None,
              media_sample: dict[str, torch.Tensor] | None = None,
              features: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids and media -> (inputs_embeds (B, T, D), gated prefix (B, L, P, D) or None).

        Each modality's placeholder positions are filled, in order, with its projected features
        via ``masked_scatter``; their count must match exactly. ``features`` holds precomputed
        frozen-encoder outputs (modality -> (M, N, D_enc), e.g. from a training feature cache);
        a modality given there skips its encoder.
        """
        features = features or {}
        media = {**(media or {}), **features}
        media_sample = media_sample or {}
        spec = self.processor.modalities if self.processor else {}
        placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for s in spec.values():
            placeholder |= input_ids == s.token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))  # (B, T, D)
        prefix = None
        for modality, s in spec.items():
            mask = input_ids == s.token_id  # (B, T)
            x = media.get(modality)
            proj = self.input_projectors[modality]
            if x is None:
                if mask.any():
                    raise ValueError(
                        f"the text has {int(mask.sum())} {s.placeholder} token(s) but no {modality} was given; "
                        f"pass the {modality} or remove the placeholder"
                    )
                continue
            feats = x if modality in features else self.encoders[modality](x)  # (M, N, D_enc), frozen
            feats = feats.to(next(proj.parameters()).dtype)
            if proj.kind == "prefix":
                owner = media_sample.get(modality)
                if owner is None:
                    owner = torch.arange(feats.shape[0], device=feats.device)
                prefix = self._sample_prefix(proj, feats, owner, input_ids.shape[0])
                continue
            tokens = proj(feats)  # (M, N', D)
            if int(mask.sum()) != tokens.shape[0] * tokens.shape[1]:
                raise ValueError(
                    f"{modality.capitalize()} features and {modality} tokens do not match: the text holds "
                    f"{int(mask.sum())} {s.placeholder} positions, but {tokens.shape[0]} {modality}(s) give "
                    f"{tokens.shape[0]} x {tokens.shape[1]} = {tokens.shape[0] * tokens.shape[1]} features. "
                    f"Use one {s.placeholder} per {modality} and let the processor expand it."
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), tokens.to(embeds.dtype))
        if prefix is None and self.prefix_attention is not None:
            modality = next(m for m, p in self.input_projectors.items() if p.kind == "prefix")
            prefix = self.input_projectors[modality].empty_prefix(input_ids.shape[0])
        return embeds, prefix

    @staticmethod
    def _sample_prefix(proj, feats, owner, batch_size):
        """Per-item prefixes (M, L, P, D) -> per-sample (B, L, P, D): mean over a sample's items."""
        per_item = proj(feats) - proj.prompts.unsqueeze(0)  # media part only, (M, L, P, D)
        total = per_item.new_zeros((batch_size,) + per_item.shape[1:]).index_add(0, owner, per_item)
        count = torch.bincount(owner, minlength=batch_size).clamp(min=1).to(per_item.dtype)
        return proj.prompts.unsqueeze(0) + total / count.view(-1, 1, 1, 1)

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that skip left padding, so padded and unpadded samples match."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def prefix_context(self, prefix):
        return self.prefix_attention.use(prefix) if self.prefix_attention is not None else contextlib.nullcontext()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                media: dict | None = None, media_sample: dict | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, features: dict | None = None) -> MMLLMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, prefix = self.embed(input_ids, media, media_sample, features)
        with self.prefix_context(prefix):
            hidden = self.llm.get_decoder()(
                inputs_embeds=embeds, attention_mask=attention_mask,
                position_ids=self.position_ids(attention_mask), use_cache=False,
            ).last_hidden_state  # (B, T, D)
        head = self.llm.get_output_embeddings()
        if labels is None:
            return MMLLMOutput(logits=head(hidden), hidden_states=hidden if output_hidden_states else None)
        # Next-token loss, with logits only where a label exists (the LM head is the costly part).
        if self.processor is not None:  # media positions are inputs, never targets
            for spec in self.processor.modalities.values():
                labels = labels.masked_fill(input_ids == spec.token_id, -100)
        shift_labels = labels[:, 1:]
        sel = shift_labels != -100
        logits = head(hidden[:, :-1][sel])  # (n, V)
        loss = F.cross_entropy(logits.float(), shift_labels[sel]) if sel.any() else hidden.sum() * 0.0
        return MMLLMOutput(loss=loss, logits=logits, hidden_states=hidden if output_hidden_states else None,
                           losses={"lm": loss.detach()})

    def forward_batch(self, batch: Batch, **kwargs) -> MMLLMOutput:
        return self(batch.input_ids, batch.attention_mask, batch.media, batch.media_sample, batch.labels, **kwargs)

    # ------------------------------------------------------------------ output side

    def signal_positions(self, input_ids: torch.Tensor, modality: str) -> torch.Tensor:
        """(n, 2) [row, start] of every complete ``modality`` signal sequence, in order."""
        group = torch.tensor(self.signal_groups[modality], device=input_ids.device)
        k = group.numel()
        if input_ids.shape[1] < k:
            return input_ids.new_zeros((0, 2))
        windows = input_ids.unfold(1, k, 1)  # (B, T-k+1, k)
        return (windows == group).all(-1).nonzero()

    def signal_states(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> dict[str, tuple]:
        """What the output projectors read: modality -> (states (n, k, D), signal-row
        embeddings (n, k, D)) at each complete signal sequence, row-major order.

        ``hidden`` is ``(B, T, D)`` last-layer states aligned with ``input_ids``.
        """
        out = {}
        embed = self.llm.get_input_embeddings()
        for modality in self.output_projectors:
            pos = self.signal_positions(input_ids, modality)
            if pos.shape[0] == 0:
                continue
            k = len(self.signal_groups[modality])
            idx = pos[:, 1:2] + torch.arange(k, device=pos.device)  # (n, k)
            out[modality] = (hidden[pos[:, :1], idx], embed(input_ids[pos[:, :1], idx]))
        return out

    def project_signals(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Last-layer states at each complete signal sequence -> the decoder's conditioning.

        ``hidden`` is ``(B, T, D)`` aligned with ``input_ids``. Returns modality ->
        ``(n, *target_shape)`` in order of appearance (row-major).
        """
        out = {}
        for modality, (states, embeds) in self.signal_states(input_ids, hidden).items():
            proj = self.output_projectors[modality]
            dtype = next(proj.parameters()).dtype
            out[modality] = proj(states.to(dtype), embeds.to(dtype))
        return out

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str | None = None, *, image: Any = None, audio: Any = None, video: Any = None,
                 history: list[dict] | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stream: bool = False, seed: int | None = None,
                 output_modalities: str | Sequence[str] | None = None, max_media: int | None = None,
                 media_seed: int | None = None, guidance_scale: float | None = None,
                 guidance_rescale: float | None = None, num_inference_steps: int | None = None,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 fps: int | None = None, audio_length_in_s: float | None = None, **generate_kwargs: Any):
        """Answer one prompt with optional media (``mmllm.generation.generate``).

        Args:
            prompt: the request; media passed without a placeholder in it get one at its start.
            image, audio, video: one item or a list each: paths, PIL images, arrays or tensors.
            history: earlier ``{"role", "content"}`` messages, which may carry their own media.
            max_new_tokens: the longest answer, in tokens.
            temperature: 0 decodes greedily; above 0 samples, with nucleus mass ``top_p``.
            top_p: nucleus sampling mass when sampling.
            stream: return a ``TextStream`` that yields text pieces and holds the result at the end.
            seed: seeds torch's generator before decoding (None: unseeded).
            output_modalities: the media the answer may produce (default: every output).
            max_media: at most this many media per answer.
            media_seed: one fixed noise seed for every rendered output (None: a fresh draw each).
            guidance_scale, guidance_rescale, num_inference_steps, height, width, num_frames, fps,
                audio_length_in_s: decoder settings, each passed to the decoders that take it
                (None: the decoder's configured value).
            generate_kwargs: further options of transformers' ``generate`` (e.g. ``logits_processor``).

        Returns:
            a ``GenerateResult`` (text, token ids, rendered media), or a ``TextStream`` with ``stream=True``.
        """
        from .generation import generate

        return generate(self, prompt, image=image, audio=audio, video=video, history=history,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stream=stream, seed=seed,
                        **_output_options(output_modalities, max_media, media_seed, guidance_scale, guidance_rescale,
                                          num_inference_steps, height, width, num_frames, fps, audio_length_in_s),
                        **generate_kwargs)

    def generate_batch(self, requests: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None,
                       output_modalities: str | Sequence[str] | None = None, max_media: int | None = None,
                       media_seed: int | None = None, guidance_scale: float | None = None,
                       guidance_rescale: float | None = None, num_inference_steps: int | None = None,
                       height: int | None = None, width: int | None = None, num_frames: int | None = None,
                       fps: int | None = None, audio_length_in_s: float | None = None, **generate_kwargs: Any):
        """Several independent requests decoded together in one left-padded batch
        (``mmllm.generation.generate_batch``).

        Args:
            requests: dicts with ``prompt`` and optional ``image``, ``audio``, ``video`` and ``history``.
            max_new_tokens, temperature, top_p, seed, output_modalities, max_media, media_seed and
                the decoder settings: as in ``generate``, for every request.
            generate_kwargs: further options of transformers' ``generate``.

        Returns:
            one ``GenerateResult`` per request, in order.
        """
        from .generation import generate_batch

        return generate_batch(self, requests, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed,
                              **_output_options(output_modalities, max_media, media_seed, guidance_scale,
                                                guidance_rescale, num_inference_steps, height, width, num_frames, fps,
                                                audio_length_in_s),
                              **generate_kwargs)

    # ------------------------------------------------------------------ saving

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not a frozen component: projectors, new token rows, LoRA."""
        out = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if not name.startswith(FROZEN_PREFIXES) or "lora_" in name or ".new_rows" in name:
                out[name] = p.detach().cpu().contiguous()
        return out

    def save_pretrained(self, path: str | os.PathLike, *, push_to_hub: bool = False, repo_id: str | None = None,
                        private: bool | None = None, token: str | None = None,
                        commit_message: str = "Upload mmllm model") -> Path:
        """Write ``config.json`` and the trained parts as safetensors, atomically.

        ``push_to_hub=True`` then uploads the directory to the hub repository ``repo_id``
        (created if missing; ``private`` and ``token`` as in ``huggingface_hub``), the way
        transformers models are shared; ``mmllm.load(repo_id)`` opens it. A model whose config
        names local components outside ``path`` cannot be pushed: the hub copy would lack them.
        """
        from safetensors.torch import save_file

        if push_to_hub:
            if not repo_id:
                raise ValueError("push_to_hub=True needs repo_id='org/name'")
            self._check_pushable(path)
        with atomic_directory(path) as tmp:
            # Components beside the model dir are referenced relatively, so the tree can move.
            self.config.relative_to(path).to_json(tmp / CONFIG_NAME)
            save_file(self.trainable_state_dict(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message=commit_message)
        return Path(path)

    def _check_pushable(self, path: str | os.PathLike) -> None:
        inside = Path(os.path.abspath(path))
        for field_name, obj, attr in self.config._sources():
            value = getattr(obj, attr)
            if value and os.path.isabs(value) and os.path.exists(value) and inside not in Path(value).parents:
                raise ValueError(
                    f"{field_name} = {value!r} is a local path outside {str(path)!r}, so a hub copy would not have "
                    f"it; point it at a hub id (mmllm.load(..., **{{{field_name!r}: 'org/name'}})) or copy the "
                    "component into the model directory before pushing")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, *, trust_remote_code: bool = False,
                        allow_outside_paths: bool = False, tree: str | os.PathLike | None = None,
                        **overrides) -> "MMLLM":
        """Open a ``save_pretrained`` directory.

        The directory is treated as untrusted: ``trust_remote_code`` is off unless given here
        (a ``true`` in its ``config.json`` is ignored with a warning), weights load only from
        safetensors, and every local component path it names must lie inside its tree: the
        model dir's parent (so ``../clip`` beside it), ``tree`` when given, ``<tree>`` for a
        training run's ``<tree>/runs/<run>/model``, or mmllm's cache. ``allow_outside_paths``
        lifts that check for a directory you trust. ``overrides`` change config fields.
        """
        from .weights import load_state_dict

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}; point to a directory written by save_pretrained")
        config = MMLLMConfig.from_json(path / CONFIG_NAME).resolved(path)
        if not allow_outside_paths:
            roots = model_tree(path, tree)
            _refuse_paths(path, config.paths_outside(roots), ConfigError, "path(s) outside the model's tree", lambda _: (
                f"; a model directory may name files only inside {' or '.join(map(str, roots))}. If you trust it, "
                f"load it with allow_outside_paths=True (mmllm.load({str(path)!r}, allow_outside_paths=True)), or "
                "give the component as an override"))
        if trust_remote_code:
            overrides = {**overrides, "llm.trust_remote_code": True}
        if overrides:
            config = config.replace(**overrides)
        _refuse_paths(path, config.missing_paths(), FileNotFoundError, "component(s) that are not there", lambda field: (
            ". A saved model refers to the components beside it relative to itself (../clip), so copy or move the "
            "whole tree, not the model directory alone, or give the new place as an override: "
            f"mmllm.load({str(path)!r}, **{{{field!r}: '/new/path'}})"))
        model = cls.from_config(config, dtype=dtype)
        model.load_trainable(load_state_dict(path / WEIGHTS_NAME))
        if device is not None:
            model.to(device)
        return model

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Copy trained weights in; every key must be there with this model's exact shape and
        a dtype of the same kind (floating point / integer / bool): no broadcasting."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not fit this config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Load it with the "
                "config.json saved beside it."
            )
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, value in state.items():
            want = params[name]
            if tuple(value.shape) != tuple(want.shape) or _dtype_kind(value.dtype) != _dtype_kind(want.dtype):
                raise ValueError(
                    f"checkpoint does not fit this config: {name} is {tuple(value.shape)} {value.dtype} in the file "
                    f"but {tuple(want.shape)} {want.dtype} in the model. Load it with the config.json saved beside it.")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].dtype))

    def num_parameters(self, part: str | None = None) -> int:
        mod: Any = self if part is None else self.get_submodule(part)
        return sum(p.numel() for p in mod.parameters())
