"""Decoding-side alignment on cached LLM states: NExT-GPT's L2 objective, made cheap.

When only the output projectors learn (stage ``align_outputs``: the LLM, its LoRA and the
signal-token rows frozen), the states a projector reads never change. So the LLM runs once
over the data, without gradients, and the states at every complete signal sequence are kept
with the decoder's own conditioning of the output's caption. The projectors then train for
many steps on that cache, each step costing a small projector forward and backward instead
of a pass through the LLM.

The data are the same files and rows the trainer reads (conversations with ``<gen:MOD>``
markers and ``outputs`` captions, or generation pairs), through the same ``ExampleBuilder``
and ``Collator``, so the states are exactly those the model has at those positions when it
generates in that format. With ``precision`` "bf16" (or "auto" where bf16 is native) the LLM
pass runs under bf16 autocast, about 1.7-1.8x faster on a CPU with AVX512-BF16; its states then
differ from the fp32 ones by about 1.5 % (cosine 0.9998 on the toy model). The conditioning
targets and the projectors' training stay fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmllm.llm import resolve_dtype

from projectors import OUTPUT_PROJECTORS

from .collate import Collator
from .config import mixed_precision
from .data import DataReport, ExampleBuilder, RowError, StreamingData, sources_from
from .freeze import set_trainable


@dataclass
class SignalCache:
    """modality -> (states (n, k, D), signal-row embeddings (k, D), targets (n, *shape)), on the CPU."""

    states: dict = field(default_factory=dict)
    embeds: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {m: len(t) for m, t in self.targets.items()}

    def take(self, first: int, last: int = 0) -> "SignalCache":
        """The first ``first`` sequences of every modality followed by its last ``last``: with
        ``val_examples=last``, runs on growing ``first`` share one held-back set."""
        if any(n < first + last for n in self.counts().values()):
            raise ValueError(f"take({first}, {last}) needs {first + last} cached sequences per modality; "
                             f"the cache has {self.counts()}: cache more requests or take fewer")

        def cut(t):
            return torch.cat([t[:first], t[len(t) - last:]])

        return SignalCache({m: cut(s) for m, s in self.states.items()}, dict(self.embeds),
                           {m: cut(t) for m, t in self.targets.items()})


@dataclass
class AlignResult:
    steps: int
    first_loss: float
    final_loss: float
    examples: dict
    seconds: float
    bad_rows: int
    # modality -> MSE of the final projectors on the held-back cached sequences (``val_examples``)
    val_loss: dict = field(default_factory=dict)
    # modality -> mean training loss over its last tenth of steps (against val_loss: fit or generalisation)
    train_loss: dict = field(default_factory=dict)
    # modality -> how many steps trained its projector (``weights``)
    modality_steps: dict = field(default_factory=dict)


def cache_signal_states(model, generation=None, conversations=None, data_root=None, batch_size: int = 16,
                        progress: bool = True, report: DataReport | None = None,
                        max_examples: int | None = None, precision: str = "fp32") -> SignalCache:
    """Run the (frozen) model over the rows and keep, for every signal sequence that has a
    caption, its last-layer states and the decoder's conditioning of that caption.

    ``max_examples``: stop reading once every output modality has that many sequences (the
    LLM pass is the costly part; the projectors then train on the cache for many steps).
    ``precision``: one of ``TrainConfig``'s; "bf16", "fp16" or "auto" run the LLM pass under
    that autocast (see the module docstring)."""
    report = report or DataReport()
    builder = ExampleBuilder(model, data_root)
    data = StreamingData(sources_from(generation=generation, conversations=conversations), builder, batch_size,
                         report, mix="mixed")
    return _collect(model, data, report, progress, max_examples, precision)


def signal_states_of_rows(model, rows: list[dict], kind: str = "conversation", batch_size: int = 16,
                          data_root=None, progress: bool = False) -> SignalCache:
    """``cache_signal_states`` for rows in memory (``kind``: "conversation" or "generation",
    the training file formats), kept in row order; a row the trainer would reject raises.

    The evaluation's conditioning task reads the states of its own requests this way."""
    report = DataReport()
    builder = ExampleBuilder(model, data_root)
    examples = []
    for n, row in enumerate(rows):
        try:
            examples.append(builder.build(kind, row, "<rows>", n))
        except RowError as err:
            raise ValueError(f"row {n} is not a valid {kind} row: {err}") from err
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    cache = _collect(model, batches, report, progress)
    if report.count:
        raise ValueError(f"{report.count} of {len(rows)} rows could not be collated: {report.summary()}")
    return cache


@torch.no_grad()
def _collect(model, batches, report: DataReport, progress: bool, max_examples: int | None = None,
             precision: str = "fp32") -> SignalCache:
    """States and targets of every captioned signal sequence in ``batches`` (lists of
    ``Example``), in order."""
    from tqdm.auto import tqdm

    collate = Collator(model, report)
    device = next(p for p in model.parameters()).device
    autocast = mixed_precision(precision)
    dtype = None if autocast == "no" else resolve_dtype(autocast)
    was_training = model.training
    model.eval()
    states: dict[str, list] = {}
    targets: dict[str, list] = {}
    embeds: dict[str, torch.Tensor] = {}
    for examples in tqdm(batches, desc="caching signal states", disable=not progress, unit="batch"):
        tb = collate(examples)
        if tb is None or not tb.targets:
            continue
        tb = tb.to(device)
        no_labels = torch.full_like(tb.input_ids, -100)  # states only: no logits over the vocabulary
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(tb.input_ids, tb.attention_mask, tb.media, tb.media_sample, no_labels,
                        output_hidden_states=True, features=tb.features)
        found = model.signal_states(tb.input_ids, out.hidden_states)
        for m, index in tb.target_index.items():
            s, e = found[m]  # (n, k, D) each
            states.setdefault(m, []).append(s[index].float().cpu())
            targets.setdefault(m, []).append(tb.targets[m].float().cpu())
            if m not in embeds:
                embeds[m] = e[0].float().cpu()  # (k, D): the same signal rows in every sequence
        if max_examples and all(sum(len(x) for x in targets.get(m, [])) >= max_examples for m in model.signal_groups):
            break
    model.train(was_training)
    if not states:
        raise ValueError("no signal sequence with a caption in the data: align_outputs needs generation pairs or "
                         "conversations with <gen:MOD> markers and 'outputs' captions")
    return SignalCache({m: torch.cat(v) for m, v in states.items()}, embeds,
                       {m: torch.cat(v) for m, v in targets.items()})


def align_output_projectors(model, generation=None, conversations=None, data_root=None, steps: int = 1000,
                            batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.0,
                            warmup_ratio: float = 0.03, seed: int = 0, cache_batch_size: int = 16,
                            progress: bool = True, max_examples: int | None = None,
                            reinit: bool = False, val_examples: int = 0,
                            cache: SignalCache | None = None, precision: str = "fp32",
                            weights: dict | None = None, standardize: bool = True,
                            projectors: dict | None = None) -> AlignResult:
    """Train the output projectors alone, on cached states (see the module docstring).

    Each step takes ``batch_size`` cached sequences of one modality (modalities in turn)
    and minimises the MSE to the decoder's conditioning, as ``TrainingModule`` does.
    ``reinit`` starts the projectors from a fresh (seeded) initialisation instead of their
    trained state. ``val_examples`` holds back the last that many cached sequences of every
    modality from training and scores the final projectors on them (``val_loss``): the
    cache is small, and a projector that fits it can still miss new requests. ``cache``: a
    ``SignalCache`` of this model from ``cache_signal_states``, used instead of a new LLM pass
    (the data arguments and ``max_examples`` are then not read), so that runs with other
    settings share one cache (``scripts/align_sweep.py``). ``precision``: the LLM pass's, as in
    ``cache_signal_states``. ``weights``: modality -> its share of the steps (default 1 each;
    ``{"image": 2}`` gives the image projector half of them, interleaved evenly).
    ``projectors``: modality -> a projector config (``{"type": "linear"}``, the
    ``ProjectorConfig`` fields) that replaces that output projector, freshly initialised,
    before the fit, and is recorded in ``model.config`` (so a saved model reloads it). The
    stages' projector is discarded by ``reinit`` anyway; this chooses its successor's form
    without retraining the LLM. On the toy world's audio, whose 27 specs leave 18 for
    training, the ``transformer`` projector maps held-out pitch x count requests onto trained
    ones and a ``linear`` one composes them (docs/research/README.md).
    ``standardize``: train the projectors on inputs scaled to zero mean and unit spread per
    feature (``input_statistics``), then fold that scaling into their first linear layer, so
    the saved projectors read the raw states as before. The LLM's states at signal tokens sit
    far from zero with a small spread between requests, which slows the fit; on the quick toy
    model the held-back L2 after 4000 steps falls from 0.32 / 0.10 / 0.06 (image / video /
    audio) to 0.09 / 0.03 / 0.03 (docs/research/README.md).

    Returns the losses (first and last tenth of the run, and per modality; with
    ``standardize`` they are of the standardised fit, the same function), counts and timing.
    """
    from tqdm.auto import tqdm

    start = time.time()
    report = DataReport()
    if reinit:  # fit the projectors to the cache from a fresh start, whatever earlier stages left
        for m in list(model.output_projectors):
            model.output_projectors[m] = model.new_output_projector(m)
    for m, spec in (projectors or {}).items():
        replace_output_projector(model, m, spec)
    set_trainable(model, "align_outputs")
    if cache is None:
        cache = cache_signal_states(model, generation, conversations, data_root, cache_batch_size, progress, report,
                                    None if max_examples is None else max_examples + val_examples, precision)
    short = {m: n for m, n in cache.counts().items() if n <= val_examples}
    if short:
        raise ValueError(f"val_examples={val_examples} leaves nothing to train on for {short} cached sequences; "
                         f"lower val_examples or add generation data for those modalities")
    held = {m: (cache.states[m][-val_examples:], cache.targets[m][-val_examples:]) for m in cache.targets} \
        if val_examples else {}
    train_n = {m: n - val_examples for m, n in cache.counts().items()}
    if standardize:
        stats = input_statistics(cache, train_n)
        if not reinit:  # the trained projectors, re-expressed on standardised inputs (the same function)
            for m, (mean, gain) in stats.items():
                _fold_input_scaling(model.output_projectors[m], mean, gain, inverse=True)
        fit_cache = standardized(cache, stats)
    else:
        fit_cache = cache
    params = [p for p in model.output_projectors.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(steps * warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    gen = torch.Generator().manual_seed(seed)
    order = step_schedule(sorted(cache.targets), weights, steps)
    device = next(model.output_projectors.parameters()).device
    losses, by_modality = [], {}
    model.output_projectors.train()
    for step in (bar := tqdm(range(steps), desc="align_outputs", disable=not progress)):
        m = order[step]
        n = train_n[m]
        pick = torch.randint(n, (min(batch_size, n),), generator=gen)
        proj = model.output_projectors[m]
        states = fit_cache.states[m][pick].to(device)
        embeds = fit_cache.embeds[m].to(device).expand(len(pick), -1, -1)
        loss = F.mse_loss(proj(states, embeds).float(), fit_cache.targets[m][pick].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        by_modality.setdefault(m, []).append(losses[-1])
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    if standardize:  # back to projectors of the raw states
        for m, (mean, gain) in stats.items():
            _fold_input_scaling(model.output_projectors[m], mean, gain)
    model.output_projectors.eval()
    val_loss = {}
    with torch.no_grad():
        for m, (states, targets) in held.items():
            embeds = cache.embeds[m].to(device).expand(len(states), -1, -1)
            val_loss[m] = F.mse_loss(model.output_projectors[m](states.to(device), embeds).float(),
                                     targets.to(device)).item()
    k = max(1, min(100, len(losses) // 10))
    tail = {m: v[-max(1, len(v) // 10):] for m, v in by_modality.items()}
    return AlignResult(steps=steps, first_loss=sum(losses[:k]) / k, final_loss=sum(losses[-k:]) / k,
                       examples=train_n, seconds=round(time.time() - start, 1), bad_rows=report.count,
                       val_loss=val_loss, train_loss={m: sum(v) / len(v) for m, v in tail.items()},
                       modality_steps={m: len(v) for m, v in by_modality.items()})


def replace_output_projector(model, modality: str, spec: dict) -> None:
    """Give ``model`` a freshly initialised output projector for ``modality`` of the form
    ``spec`` (``ProjectorConfig`` fields: ``{"type": "linear"}``), recorded in its config."""
    from mmllm.config import ProjectorConfig

    outputs = model.config.outputs
    if modality not in outputs:
        raise ValueError(f"projectors names {modality!r}, which this model does not output; "
                         f"its outputs are {sorted(outputs)}")
    config = ProjectorConfig.from_dict(dict(spec))
    OUTPUT_PROJECTORS.get(config.type)  # an unknown name fails here, listing the known ones
    outputs[modality].projector = config
    model.output_projectors[modality] = model.new_output_projector(modality)


def input_statistics(cache: SignalCache, first: dict | None = None, eps: float = 1e-3) -> dict[str, tuple]:
    """modality -> (mean (D,), gain (D,)) of what its projector reads (states + signal-row
    embeddings), per feature over the first ``first[m]`` cached sequences (default all) and
    their signal positions; ``gain`` is 1 / standard deviation (at least ``eps``)."""
    out = {}
    for m, states in cache.states.items():
        n = len(states) if first is None else first[m]
        x = (states[:n] + cache.embeds[m]).reshape(-1, states.shape[-1]).double()
        out[m] = (x.mean(0).float(), 1.0 / x.std(0).clamp_min(eps).float())
    return out


def standardized(cache: SignalCache, stats: dict) -> SignalCache:
    """The cache with every input scaled by ``stats`` (``input_statistics``): the states hold
    ``(states + embeds - mean) * gain`` and the embeddings are zero, so a projector that adds
    the two reads the scaled input."""
    states = {m: (s + cache.embeds[m] - stats[m][0]) * stats[m][1] for m, s in cache.states.items()}
    return SignalCache(states, {m: torch.zeros_like(e) for m, e in cache.embeds.items()}, dict(cache.targets))


@torch.no_grad()
def _fold_input_scaling(proj, mean: torch.Tensor, gain: torch.Tensor, inverse: bool = False) -> None:
    """Make ``proj`` on raw inputs x compute what it computed on ``(x - mean) * gain``
    (``inverse``: the other way round), by rewriting its first linear layer
    (``proj.input_linear``, which reads hidden + embeds)."""
    linear = getattr(proj, "input_linear", None)
    if not isinstance(linear, torch.nn.Linear) or linear.bias is None:
        raise TypeError(f"{type(proj).__name__} has no input_linear (an nn.Linear with a bias reading the signal "
                        f"states) to fold the input scaling into; pass standardize=False")
    w, b = linear.weight, linear.bias
    mean, gain = mean.to(w), gain.to(w)
    if inverse:  # W x + b = (W / g)(x - m) g + (b + W m)
        b.add_(w @ mean)
        w.div_(gain)
    else:  # W' ((x - m) g) + b' = (W' g) x + (b' - W' g m)
        w.mul_(gain)
        b.sub_(w @ mean)


def step_schedule(modalities: list[str], weights: dict | None, steps: int) -> list[str]:
    """The modality each align step trains: each in proportion to its weight (default 1),
    spread evenly (smooth weighted round robin). Equal weights give plain turns in
    ``modalities`` order."""
    weights = dict(weights or {})
    bad = {m: w for m, w in weights.items() if m not in modalities or not (isinstance(w, (int, float)) and w > 0)}
    if bad:
        raise ValueError(f"align weights {bad}: give a positive number for some of {modalities}")
    share = {m: float(weights.get(m, 1.0)) for m in modalities}
    total = sum(share.values())
    credit = dict.fromkeys(modalities, 0.0)
    order = []
    for _ in range(steps):
        for m in modalities:
            credit[m] += share[m]
        pick = max(modalities, key=credit.__getitem__)  # the first of equals
        credit[pick] -= total
        order.append(pick)
    return order


__all__ = ["AlignResult", "SignalCache", "align_output_projectors", "cache_signal_states",
           "input_statistics", "signal_states_of_rows", "standardized", "step_schedule"]
