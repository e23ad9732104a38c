"""Score a model on the toy world with the ground-truth oracles (``mmllm.toy.oracle``).

Understanding (image, audio, video in; text out):

- ``caption``: "Describe the image." -> ``analyse_text`` of the answer, every attribute
  compared with the true spec.
- ``qa``: one question per item, about each attribute in turn ("What colour is the
  shape?") -> ``analyse_text`` of the answer, only the asked attribute compared (so each
  attribute gets ``n / number of attributes`` questions).

Generation (text in; media out): a request ("Draw a small red circle on the left.") ->
the produced image / audio / video is read back with ``analyse_image`` /
``analyse_audio`` / ``analyse_video`` and compared per attribute; ``produced`` is the
share of requests that gave media of the requested modality at all (a missing one
scores wrong on every attribute); ``reply`` scores what the reply's text names ("Here is a
small red circle on the left.") the same way.

Brief requests (image and audio out): requests that leave attributes out ("Draw a blue
square."), scored like generation against the spec they ask for, the left-out attributes at
``world.BRIEF_DEFAULTS``; ``produced`` says whether the model chose the right modality.

Decoder (the ceiling of generation): the same requests' true captions, encoded by each
decoder's own text encoder and rendered with the same seed and settings, read back the same
way. Generation below it is lost on the LLM side (signal states, output projector).

Conditioning (the LLM side of generation, without rendering): each generation request with
its reference reply, teacher-forced; the output projector's conditioning at the signal tokens
is matched to the nearest of the decoder's conditionings of every spec's canonical caption,
and that spec's attributes are scored, with ``mse`` to the true caption's conditioning. What
generation loses against the decoder ceiling shows up here first, and it costs one LLM pass.

Dialogue (any-to-any, multi-turn): ``world.make_dialogues`` replayed with the model's own
replies as history; ``success`` is the share of dialogues with every turn right.

Both on held-in (``train``: attribute pairs seen in training, fresh renderings) and
held-out (``test``: attribute pairs never seen together) specs. The chance column is a
uniform guess, ``1 / number of values``, which is its expected accuracy on any split.

The model is anything with ``generate_batch(requests, **kwargs) -> [GenerateResult]``
(``MMLLM`` or a test double), so the metric itself is testable without a trained model.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..generation import RESULT_FIELD, MediaOptions
from . import oracle, world
from .components import IMAGE_SIZE, SAMPLE_RATE, VIDEO_FRAMES

DESCRIBE = {"image": "Describe the image.", "audio": "Describe the audio.", "video": "Describe the video."}
SPLIT_NAMES = {"train": "held-in", "test": "held-out"}
TASK_NAMES = {"decoder": "generation (true caption)", "brief": "generation (brief request)",
              "conditioning": "generation (nearest caption)"}
TASKS = ("understanding", "generation", "brief", "decoder", "conditioning", "dialogue")


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, 4243, *(sum(map(ord, n)) for n in names)])


def chance(modality: str, attribute: str) -> float:
    """Expected accuracy of a uniform random guess."""
    return 1.0 / len(world.attribute_values(modality)[attribute])


def render_input(spec, rng: np.random.Generator):
    """A jittered rendering of ``spec`` as the model's input (uint8 image / float audio / uint8 video)."""
    if spec.modality == "image":
        return world.render_image(spec, IMAGE_SIZE, rng=rng)
    if spec.modality == "audio":
        return world.render_audio(spec, SAMPLE_RATE, 1.0, rng=rng)
    return world.render_video(spec, IMAGE_SIZE, VIDEO_FRAMES, rng=rng)


def read_output(modality: str, out: Any) -> dict:
    """Oracle attributes of one produced item (``ImageOutput`` / ``AudioOutput`` / ``VideoOutput``)."""
    if modality == "image":
        return oracle.analyse_image(out.numpy() if hasattr(out, "numpy") else out)
    if modality == "audio":
        return oracle.analyse_audio(np.asarray(out.waveform, np.float32).reshape(-1), out.sample_rate)
    return oracle.analyse_video(out.frames)


def _batch_seed(seed: int, index: int, batch: int) -> int:
    """The seed of the batch holding request ``index``: ``seed + k`` for batch ``k``. Both the
    generation task (``generate_batch(seed=)``) and its decoder ceiling draw noise under it."""
    return seed + index // batch


def _ask(model, requests: list[dict], batch: int, max_new_tokens: int, seed: Optional[int] = None,
         **kwargs) -> list:
    """Greedy answers, ``batch`` requests at a time; with ``seed`` each batch runs under
    ``_batch_seed``, so drawn media noise repeats run to run."""
    results = []
    for i in range(0, len(requests), batch):
        if seed is not None:
            kwargs["seed"] = _batch_seed(seed, i, batch)
        results += model.generate_batch(requests[i:i + batch], max_new_tokens=max_new_tokens, temperature=0.0,
                                        **kwargs)
    return results


def _text_only(model) -> dict:
    """Generation kwargs that keep the model from drawing while it answers."""
    return {"output_modalities": []} if getattr(model, "output_modalities", ()) else {}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def evaluate_understanding(model, modality: str, split: str, n: int, seed: int = 0, batch: int = 16,
                           max_new_tokens: int = 20, keep_examples: int = 3) -> dict:
    """{"caption": {attr: acc, "all": ...}, "qa": {attr: acc}, "examples": [...]} for ``n`` specs."""
    rng = _rng(seed, "understand", modality, split)
    specs = [world.sample_spec(rng, modality, split) for _ in range(n)]
    inputs = [render_input(s, rng) for s in specs]
    attrs = list(world.attribute_values(modality))
    text_only = _text_only(model)
    captions = _ask(model, [{"prompt": DESCRIBE[modality], modality: x} for x in inputs], batch, max_new_tokens,
                    **text_only)
    cap_rows = [oracle.score(oracle.analyse_text(r.text, modality), s) for r, s in zip(captions, specs)]
    questions, truth = [], []
    for i, (s, x) in enumerate(zip(specs, inputs)):  # one question per item, attributes in turn
        a = attrs[i % len(attrs)]
        q, _, _ = world.question_answer(s, a, rng)
        questions.append({"prompt": q, modality: x})
        truth.append((s, a))
    answers = _ask(model, questions, batch, max_new_tokens, **text_only)
    qa: dict[str, list[float]] = {a: [] for a in attrs}
    for r, (s, a) in zip(answers, truth):
        qa[a].append(float(oracle.analyse_text(r.text, modality).get(a) == getattr(s, a)))
    examples = [{"spec": s.to_dict(), "caption": c.text} for s, c in zip(specs[:keep_examples], captions)]
    examples += [{"question": q["prompt"], "answer": r.text, "truth": getattr(s, a)}
                 for q, r, (s, a) in list(zip(questions, answers, truth))[:keep_examples]]
    return {"caption": {k: _mean([row[k] for row in cap_rows]) for k in (*attrs, "all")},
            "qa": {a: _mean(v) for a, v in qa.items()}, "examples": examples}


def _generation_requests(modality: str, split: str, n: int, seed: int, brief: bool = False) -> tuple[list, list[str]]:
    """(specs, request texts) of the generation tasks: the same for ``evaluate_generation``
    and ``evaluate_decoder``, so the ceiling is measured on the very requests. ``brief``:
    requests that leave attributes out, with the specs they ask for."""
    rng = _rng(seed, "brief" if brief else "generate", modality, split)
    specs = [world.sample_spec(rng, modality, split) for _ in range(n)]
    if not brief:
        return specs, [world.generation_request(s, rng) for s in specs]
    pairs = [world.brief_generation_request(s, rng) for s in specs]
    return [spec for spec, _ in pairs], [request for _, request in pairs]


def evaluate_generation(model, modality: str, split: str, n: int, seed: int = 0, batch: int = 8,
                        max_new_tokens: int = 40, keep_examples: int = 3, brief: bool = False,
                        **decoder_kwargs) -> dict:
    """{"produced": rate, attr: acc, ..., "all": exact match, "examples": [...]} for ``n`` requests
    (``brief``: requests that leave attributes out, see ``world.brief_generation_request``)."""
    specs, prompts = _generation_requests(modality, split, n, seed, brief)
    results = _ask(model, [{"prompt": p} for p in prompts], batch, max_new_tokens, seed=seed, **decoder_kwargs)
    attrs = list(world.attribute_values(modality))
    rows, said, produced, examples = [], [], [], []
    empty = {a: None for a in attrs}
    for p, s, r in zip(prompts, specs, results):
        items = getattr(r, RESULT_FIELD[modality])
        produced.append(float(bool(items)))
        pred = read_output(modality, items[0]) if items else empty
        rows.append(oracle.score(pred, s))
        said.append(oracle.score(oracle.analyse_text(r.text, modality), s))
        if len(examples) < keep_examples:
            examples.append({"request": p, "reply": r.text, "read_back": pred})
    out = {"produced": _mean(produced)}
    out.update({k: _mean([row[k] for row in rows]) for k in (*attrs, "all")})
    # What the reply's text names ("Here is a low beep ..."): the signal tokens follow it, so
    # an attribute named wrong here is lost before the output projector.
    out["reply"] = {k: _mean([row[k] for row in said]) for k in (*attrs, "all")}
    out["examples"] = examples
    return out


def evaluate_decoder(model, modality: str, split: str, n: int, seed: int = 0, batch: int = 8,
                     **decoder_kwargs) -> dict:
    """The model's own decoder fed its text encoder's conditioning of each request's true
    caption, with the requests, seeds and settings of ``evaluate_generation`` (same ``batch``:
    each batch's noise is drawn after ``torch.manual_seed(seed + k)``, as ``generate_batch``
    draws it when every request gives one output): what generation would score with a perfect
    LLM and output projector. The gap between the two is what the LLM side loses; this score
    is the decoder's ceiling."""
    decoders = getattr(model, "decoders", None)
    if not decoders or modality not in decoders:
        raise ValueError(f"the 'decoder' task needs model.decoders[{modality!r}]: a model that outputs {modality}")
    decoder = decoders[modality]
    specs, _ = _generation_requests(modality, split, n, seed)
    settings = {k: v for k, v in decoder_kwargs.items() if k in decoder.defaults}
    seed_media = decoder_kwargs.get("media_seed", MediaOptions.seed)  # what generate() renders with
    rows = []
    for i, s in enumerate(specs):  # one at a time, as generate() renders each signal sequence
        if i % batch == 0 and seed_media is None:
            torch.manual_seed(_batch_seed(seed, i, batch))
        out = decoder.generate(decoder.encode_text([world.canonical_caption(s)]), seed=seed_media, **settings)
        rows.append(oracle.score(read_output(modality, out[0]), s))
    attrs = list(world.attribute_values(modality))
    return {"produced": 1.0, **{k: _mean([row[k] for row in rows]) for k in (*attrs, "all")}}


def evaluate_conditioning(model, modality: str, split: str, n: int, seed: int = 0, batch: int = 16) -> dict:
    """{attr: acc, "all": exact match, "mse": ...} of the conditioning that the model's output
    projector makes for the generation task's requests (``_generation_requests``), each
    teacher-forced with a reference reply as in training: the spec whose canonical caption
    the decoder conditions nearest (mean squared distance) is read as what was asked for.
    ``mse`` is the mean squared distance to the true caption's conditioning (the align
    step's loss). No media is rendered."""
    from ..training import signal_states_of_rows

    decoders = getattr(model, "decoders", None)
    if not decoders or modality not in decoders:
        raise ValueError(f"the 'conditioning' task needs model.decoders[{modality!r}]: a model that outputs {modality}")
    specs, prompts = _generation_requests(modality, split, n, seed)
    rng = _rng(seed, "conditioning", modality, split)
    rows = [world.conversation_row(p, world.generation_reply(s, rng),  # as the stage-2 files' generation turns
                                   output={"modality": modality, "caption": world.canonical_caption(s)})
            for p, s in zip(prompts, specs)]
    cache = signal_states_of_rows(model, rows, batch_size=batch)
    projector = model.output_projectors[modality]
    device = next(model.parameters()).device
    with torch.no_grad():
        states = cache.states[modality].to(device)
        made = projector(states, cache.embeds[modality].to(device).expand(len(states), -1, -1)).float().cpu()
        candidates = world.all_specs(modality, "all")
        bank = decoders[modality].encode_text([world.canonical_caption(c) for c in candidates]).float().cpu()
        nearest = [int(((bank - x).pow(2).flatten(1).mean(1)).argmin()) for x in made]
    mse = float((made - cache.targets[modality]).pow(2).mean())
    scores = [oracle.score(candidates[i].to_dict(), s) for i, s in zip(nearest, specs)]
    attrs = list(world.attribute_values(modality))
    return {**{k: _mean([row[k] for row in scores]) for k in (*attrs, "all")}, "mse": mse}


def evaluate_dialogues(model, split: str, n: int, seed: int = 0, max_new_tokens: int = 40,
                       keep_examples: int = 2, **decoder_kwargs) -> dict:
    """Multi-turn any-to-any dialogues (``world.make_dialogues``), replayed turn by turn with
    the model's own replies as history.

    A text turn is right when every attribute the reference reply names (read with
    ``analyse_text``) is named the same way in the model's reply; a turn that should produce
    media is right when media of that modality came out and the oracle reads every attribute
    of the requested spec. ``success`` is the share of dialogues with every turn right;
    ``turns`` the share of turns right.
    """
    rng = _rng(seed, "dialogue", split)
    dialogues = world.make_dialogues(n, split, seed)
    successes, turns_ok, examples = [], [], []
    for d in dialogues:
        in_mod = next((m for m in world.MODALITIES if m in d), None)
        media = render_input(world.spec_from_dict(d[in_mod]), rng) if in_mod else None
        outputs = {o["turn"]: o for o in d.get("outputs", [])}
        conv, history, all_ok = d["conversations"], [], True
        for i in range(0, len(conv) - 1, 2):
            prompt, reference = conv[i]["value"], conv[i + 1]["value"]
            request = {"prompt": prompt, "history": list(history)}
            if i == 0 and in_mod:
                request[in_mod] = media
            reply = model.generate_batch([request], max_new_tokens=max_new_tokens, temperature=0.0,
                                         seed=seed + len(turns_ok), **decoder_kwargs)[0]
            if i + 1 in outputs:
                out = outputs[i + 1]
                items = getattr(reply, RESULT_FIELD[out["modality"]])
                ok = bool(items) and oracle.score(read_output(out["modality"], items[0]),
                                                  world.spec_from_dict(out["spec"]))["all"] == 1.0
            else:
                mod = in_mod or "image"
                wanted = {k: v for k, v in oracle.analyse_text(reference, mod).items() if v is not None}
                got = oracle.analyse_text(reply.text, mod)
                ok = all(got.get(k) == v for k, v in wanted.items())
            turns_ok.append(float(ok))
            all_ok = all_ok and ok
            user = {"role": "user", "content": prompt}
            if i == 0 and in_mod:
                user[in_mod] = [media]
            history += [user, {"role": "assistant", "content": reply.text}]
            if len(examples) < keep_examples:
                examples.append({"id": d["id"], "prompt": prompt, "reference": reference, "reply": reply.text,
                                 "right": ok})
        successes.append(float(all_ok))
    return {"success": _mean(successes), "turns": _mean(turns_ok), "examples": examples}


NEWCOMER_PROMPT = "What is in this picture?"


def newcomer_specs() -> list:
    """The newcomer check's images: one large, centred shape of every colour x shape pair,
    in canonical (un-jittered) rendering."""
    return [world.ImageSpec(colour=c, shape=s, size="large", position="center", count=1)
            for c in world.COLOURS for s in world.SHAPES]


def newcomer_check(model, prompt: str = NEWCOMER_PROMPT, batch: int = 8, max_new_tokens: int = 24) -> dict:
    """The README's newcomer check on ``newcomer_specs()``, asked ``prompt`` greedily; an
    answer is right when it names both the colour and the shape.
    ``{"right", "total", "rows": [...]}``."""
    specs = newcomer_specs()
    answers = _ask(model, [{"prompt": prompt, "image": world.render_image(s)} for s in specs], batch, max_new_tokens,
                   **_text_only(model))
    rows = []
    for s, r in zip(specs, answers):
        found = oracle.analyse_text(r.text, "image")
        rows.append({"colour": s.colour, "shape": s.shape, "held_out": world.is_held_out(s), "answer": r.text,
                     "named": [found.get("colour"), found.get("shape")],
                     "right": (found.get("colour"), found.get("shape")) == (s.colour, s.shape)})
    return {"right": sum(r["right"] for r in rows), "total": len(rows), "rows": rows}


def newcomer_table(result: dict) -> str:
    """A markdown grid of ``newcomer_check``: colours down, shapes across; "yes" where the
    answer was right, otherwise what it named ("-": nothing recognised); ``*`` a held-out pair."""
    lines = ["| | " + " | ".join(world.SHAPES) + " |", "|---|" + "---|" * len(world.SHAPES)]
    for colour in world.COLOURS:
        cells = []
        for r in (r for r in result["rows"] if r["colour"] == colour):
            named = "yes" if r["right"] else " ".join(v for v in r["named"] if v) or "-"
            cells.append(named + ("*" if r["held_out"] else ""))
        lines.append(f"| {colour} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(model, splits: Sequence[str] = ("train", "test"), n: int = 24, gen_n: Optional[int] = None,
             seed: int = 0, tasks: Sequence[str] = ("understanding", "generation"),
             modalities: Sequence[str] = world.MODALITIES, batch: int = 16,
             progress: Callable[[str], None] = lambda _: None, **decoder_kwargs) -> dict:
    """The full report: ``report[split][task][modality]`` (see the two functions above)."""
    report: dict = {"settings": {"n": n, "gen_n": gen_n or n, "seed": seed, "splits": list(splits)}}
    for split in splits:
        report[split] = {}
        for task in tasks:
            report[split][task] = {}
            for m in modalities:
                progress(f"{SPLIT_NAMES.get(split, split)} {task} {m}")
                if task == "understanding":
                    report[split][task][m] = evaluate_understanding(model, m, split, n, seed, batch)
                elif task in ("generation", "brief"):
                    brief = task == "brief"  # only image and audio requests have a brief form
                    if m in getattr(model, "output_modalities", world.MODALITIES) and \
                            (not brief or m in world.BRIEF_DEFAULTS):
                        report[split][task][m] = evaluate_generation(model, m, split, gen_n or n, seed,
                                                                     max(1, batch // 2), brief=brief,
                                                                     **decoder_kwargs)
                elif task == "conditioning":
                    if m in getattr(model, "output_modalities", world.MODALITIES):
                        report[split][task][m] = evaluate_conditioning(model, m, split, gen_n or n, seed, batch)
                elif task == "decoder":
                    if m in getattr(model, "output_modalities", world.MODALITIES):
                        report[split][task][m] = evaluate_decoder(model, m, split, gen_n or n, seed,
                                                                  max(1, batch // 2), **decoder_kwargs)
                elif task == "dialogue":
                    if m == modalities[0]:  # dialogues mix modalities: one block, filed under "any"
                        report[split][task]["any"] = evaluate_dialogues(model, split, gen_n or n, seed,
                                                                        **decoder_kwargs)
                else:
                    raise ValueError(f"unknown task {task!r}; use any of {list(TASKS)}")
    return report


def table(report: dict) -> str:
    """A markdown table: one row per (task, modality, attribute), one column per split, plus chance."""
    splits = report["settings"]["splits"]
    head = ["task", "modality", "attribute", *(SPLIT_NAMES.get(s, s) for s in splits), "chance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = report[splits[0]]

    def cell(split, task, m, key, attr):
        try:
            block = report[split][task][m]
            v = block[key][attr] if key else block[attr]
        except KeyError:
            return "-"
        return f"{v:.3f}" if attr == "mse" else f"{v:.2f}"

    for task in first:
        for m in first[task]:
            if task == "dialogue":
                for a in ("success", "turns"):
                    lines.append("| " + " | ".join([f"dialogue ({a})", "any-to-any", "all turns right" if a ==
                                                   "success" else "turn accuracy",
                                                   *(cell(s, task, m, None, a) for s in splits), "-"]) + " |")
                continue
            attrs = list(world.attribute_values(m))
            if task == "understanding":
                keyed = [("caption", a) for a in (*attrs, "all")] + [("qa", a) for a in attrs]
            elif task == "conditioning":
                keyed = [(None, a) for a in (*attrs, "all", "mse")]
            else:
                keyed = [(None, a) for a in ("produced", *attrs, "all")]
                if "reply" in first[task][m]:
                    keyed += [("reply", a) for a in (*attrs, "all")]
            for key, a in keyed:
                name = f"{task} ({key})" if task == "understanding" else TASK_NAMES.get(task, task)
                if key == "reply":
                    name += ": reply text"
                ch = "-" if a in ("all", "produced", "mse") else f"{chance(m, a):.2f}"
                if a == "all":
                    ch = f"{np.prod([chance(m, x) for x in attrs]):.3f}"
                lines.append("| " + " | ".join([name, m, a, *(cell(s, task, m, key, a) for s in splits), ch]) + " |")
    return "\n".join(lines)


__all__ = ["TASKS", "chance", "evaluate", "evaluate_conditioning", "evaluate_decoder", "evaluate_dialogues", "evaluate_generation",
           "evaluate_understanding", "newcomer_check", "newcomer_specs", "newcomer_table", "read_output", "table"]
