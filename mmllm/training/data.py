"""Streaming training data: caption pairs, generation pairs and LLaVA conversations.

Files are read lazily, row by row (JSONL and CSV line by line, LLaVA ``.json`` arrays with an
incremental decoder), so a data set larger than RAM works. Rows become ``Example`` objects
holding token ids, labels, media *paths* and L2-target captions; media are decoded later, in
the collator, only for batches that are trained on. Bad rows are skipped and recorded in a
``DataReport`` (or, with ``strict``, raise ``DataError`` naming the file and row).

Row formats (media paths relative to the data root):

* captions (encoding side, LLaVA "plain"): ``{"modality": "image", "path": "img/1.png",
  "caption": "..."}`` (``path`` may also be given under the modality's name); CSV columns
  ``modality,path,caption``. Sequence: ``<image>`` + caption + EOS, CE on caption + EOS.
* generation (decoding side): ``{"modality": "image", "caption": "..."}`` (a ``request``
  column is ignored). Sequence: caption + signal tokens + EOS, CE on signal tokens + EOS,
  L2 between the projected signal states and the decoder's ``encode_text(caption)``.
* conversations (stage 2): LLaVA ``{"image": "x.png", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": "... <gen:audio>"}], "outputs":
  [{"modality": "audio", "caption": "..."}]}`` (``messages`` with ``role``/``content`` also
  works). ``<gen:MOD>`` markers become the modality's signal tokens; ``outputs`` gives, in
  marker order, the captions whose decoder embeddings are the L2 targets. Only assistant
  turns are supervised; the mask comes from the tokenizer's own chat template.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from torch.utils.data import IterableDataset

KINDS = ("caption", "generation", "conversation")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GEN_MARKER = re.compile(r"<gen:(\w+)>")


class DataError(ValueError):
    """A bad data row in strict mode; the message names the file and row."""


class RowError(ValueError):
    """Why one row cannot be used."""


@dataclass
class BadRow:
    source: str
    row: int
    reason: str


class DataReport:
    """Bad rows seen so far. ``strict`` turns the first one into a ``DataError``."""

    def __init__(self, strict: bool = False, keep: int = 10000):
        self.strict = strict
        self.keep = keep
        self.rows: list[BadRow] = []
        self.count = 0
        self._seen: set[tuple[str, int]] = set()

    def bad(self, source: str, row: int, reason: str) -> None:
        if self.strict:
            raise DataError(f"{source} row {row}: {reason} (run without --strict to skip and count bad rows)")
        if (source, row) in self._seen:
            return  # the same row again in a later epoch
        self._seen.add((source, row))
        self.count += 1
        if len(self.rows) < self.keep:
            self.rows.append(BadRow(source, row, reason))

    def summary(self) -> str:
        if not self.count:
            return "data: no bad rows"
        lines = [f"data: skipped {self.count} bad row(s):"]
        lines += [f"  {b.source} row {b.row}: {b.reason}" for b in self.rows]
        if self.count > len(self.rows):
            lines.append(f"  ... and {self.count - len(self.rows)} more")
        return "\n".join(lines)

    def to_json(self) -> list[dict]:
        return [vars(b) for b in self.rows]


# --------------------------------------------------------------------------- reading files


def iter_json_array(path: str | os.PathLike, chunk: int = 1 << 16) -> Iterator[tuple[int, object]]:
    """Stream the elements of a top-level JSON array: (1-based index, value or exception)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark, as spreadsheets write, is read
        buf, pos, index, started = "", 0, 0, False
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if not started and pos < len(buf):
                if buf[pos] != "[":
                    raise DataError(f"{path}: a .json data file must hold a JSON array of objects (use .jsonl otherwise)")
                started, pos = True, pos + 1
                continue
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise ValueError("need more")
                value, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:
                    raise ValueError("may be cut")  # a number at the chunk edge could continue
            except ValueError as err:
                if eof:
                    if pos >= len(buf):
                        return
                    index += 1
                    yield index, RowError(f"invalid JSON ({err})")
                    return
                more = f.read(chunk)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            index += 1
            yield index, value
            buf, pos = buf[end:], 0


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(row number, dict or RowError) for a .jsonl, .csv or .json file, streamed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    yield n, RowError(f"invalid JSON ({err.msg})")
    elif suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
    elif suffix == ".json":
        yield from iter_json_array(path)
    else:
        raise ValueError(f"data file {str(path)!r}: use .jsonl, .csv or .json (a LLaVA list)")


# --------------------------------------------------------------------------- rows -> examples


@dataclass
class Example:
    """One tokenised training sample. ``media``: modality -> file paths, in placeholder order;
    ``targets``: modality -> caption (or None) per signal sequence, in order of appearance."""

    kind: str
    source: str
    row: int
    ids: list[int]
    labels: list[int]
    media: dict[str, list[str]] = field(default_factory=dict)
    targets: dict[str, list] = field(default_factory=dict)


class ExampleBuilder:
    """Rows -> ``Example``; raises ``RowError`` with the reason for a bad row."""

    def __init__(self, model, data_root: str | os.PathLike | None = None, allow_outside_root: bool = False):
        self.model = model
        self.allow_outside_root = allow_outside_root
        self.processor = model.processor
        self.tok = model.tokenizer
        self.data_root = Path(data_root) if data_root is not None else None
        self.signal_text = {
            m: "".join(self.tok.convert_ids_to_tokens(ids)) for m, ids in model.signal_groups.items()
        }

    # -- helpers

    def _root(self, source: str) -> Path:
        return self.data_root if self.data_root is not None else Path(source).parent

    def _media_path(self, value, source: str) -> str:
        if not isinstance(value, str) or not value:
            raise RowError(f"media path must be a non-empty string, got {value!r}")
        p = Path(value)
        root = self._root(source)
        p = p if p.is_absolute() else root / p
        if not self.allow_outside_root:
            real, top = os.path.realpath(p), os.path.realpath(root)
            if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
                raise RowError(f"media path {value!r} leads out of the data root {str(root)!r}; keep media under "
                               "it, or set allow_outside_data_root=True if you trust this data")
        if not p.is_file():
            raise RowError(f"media file not found: {str(p)!r}")
        return str(p)

    def _text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _eos(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _finish(self, kind, source, row, ids, labels, media, targets) -> Example:
        proc = self.processor
        counts = proc.count_placeholders(ids)
        for m, n in counts.items():
            if n != len(media.get(m, [])):
                raise RowError(f"the text has {n} {proc.modalities[m].placeholder} placeholder(s) but "
                               f"{len(media.get(m, []))} {m} file(s)")
        by_id = {s.token_id: s for s in proc.modalities.values()}
        out_ids, out_labels = [], []
        for t, lab in zip(ids, labels):
            n = by_id[t].num_tokens if t in by_id else 1
            out_ids += [t] * n
            out_labels += [lab if t not in by_id else -100] * n
        if proc.max_length and len(out_ids) > proc.max_length:
            raise RowError(f"{len(out_ids)} tokens (media included) exceed max_length {proc.max_length}")
        if all(lab == -100 for lab in out_labels):
            raise RowError("no supervised tokens")
        return Example(kind, source, row, out_ids, out_labels, media, targets)

    def _modality(self, row: dict, side: str) -> str:
        m = row.get("modality")
        if m is None:
            found = [k for k in self.processor.modalities if row.get(k)]
            m = found[0] if len(found) == 1 else None
        valid = list(self.processor.modalities) if side == "input" else list(self.model.signal_groups)
        if m not in valid:
            raise RowError(f"modality {m!r} is not one this model {'reads' if side == 'input' else 'generates'}: {valid}")
        return m

    def _caption(self, row: dict) -> str:
        cap = row.get("caption")
        if not isinstance(cap, str) or not cap.strip():
            raise RowError("missing or empty 'caption'")
        return cap.strip()

    # -- kinds

    def build(self, kind: str, row, source: str, n: int) -> Example:
        if isinstance(row, Exception):
            raise RowError(str(row))
        if not isinstance(row, dict):
            raise RowError(f"expected an object, got {type(row).__name__}")
        return getattr(self, kind)(row, source, n)

    def caption(self, row: dict, source: str, n: int) -> Example:
        m = self._modality(row, "input")
        path = self._media_path(row.get("path") or row.get(m), source)
        cap = self._text(self._caption(row)) + self._eos()
        pid = self.processor.modalities[m].token_id
        return self._finish("caption", source, n, [pid] + cap, [-100] + cap, {m: [path]}, {})

    def generation(self, row: dict, source: str, n: int) -> Example:
        m = self._modality(row, "output")
        caption = self._caption(row)
        text = self._text(caption)
        sig = list(self.model.signal_groups[m]) + self._eos()
        return self._finish("generation", source, n, text + sig, [-100] * len(text) + sig, {}, {m: [caption]})

    def conversation(self, row: dict, source: str, n: int) -> Example:
        turns = row.get("conversations", row.get("messages"))
        if not isinstance(turns, list) or not turns:
            raise RowError("missing 'conversations' (or 'messages') list")
        messages = []
        for t in turns:
            if not isinstance(t, dict):
                raise RowError("a turn is not an object")
            role = ROLES.get(t.get("from", t.get("role")))
            content = t.get("value", t.get("content"))
            if role is None or not isinstance(content, str):
                raise RowError(f"turn {t!r} needs from/role in {sorted(ROLES)} and a string value/content")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("no assistant turn to supervise")
        media = {}
        for m, spec in self.processor.modalities.items():
            value = row.get(m)
            if not value:
                continue
            paths = [self._media_path(v, source) for v in (value if isinstance(value, list) else [value])]
            media[m] = paths
            if not any(spec.placeholder in x["content"] for x in messages):
                first = next(i for i, x in enumerate(messages) if x["role"] == "user")  # LLaVA: prepend
                messages[first] = {"role": "user", "content": (spec.placeholder + "\n") * len(paths) + messages[first]["content"]}
        # <gen:MOD> markers -> signal tokens; outputs give their captions in marker order.
        outputs = row.get("outputs") or []
        markers = []
        for i, x in enumerate(messages):
            for mm in GEN_MARKER.finditer(x["content"]):
                if x["role"] != "assistant":
                    raise RowError(f"{mm.group(0)} appears in a {x['role']} turn; only assistant turns produce media")
                if mm.group(1) not in self.signal_text:
                    raise RowError(f"{mm.group(0)}: this model generates only {sorted(self.signal_text)}")
                markers.append(mm.group(1))
            messages[i] = {"role": x["role"], "content": GEN_MARKER.sub(lambda g: self.signal_text[g.group(1)], x["content"])}
        if outputs and len(outputs) != len(markers):
            raise RowError(f"{len(markers)} <gen:...> marker(s) but {len(outputs)} 'outputs' entries")
        targets: dict[str, list] = {}
        for k, m in enumerate(markers):
            out = outputs[k] if outputs else {}
            if out and out.get("modality", m) != m:
                raise RowError(f"output {k} is {out.get('modality')!r} but marker {k} is <gen:{m}>")
            cap = out.get("caption") if isinstance(out, dict) else None
            targets.setdefault(m, []).append(cap.strip() if isinstance(cap, str) and cap.strip() else None)
        ids, labels = conversation_labels(self.processor, messages)
        return self._finish("conversation", source, n, ids, labels, media, targets)


def assistant_char_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans each assistant message adds.

    The template renders every prefix of the conversation: the span of assistant message
    ``i`` runs from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end
    of ``render(messages[:i+1])`` (its content plus the template's end-of-turn marker), so
    nothing about a particular template is written here. A template whose prefixes do not
    render as prefixes of the whole raises.
    """
    full = processor.render(messages, add_generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = processor.render(messages[:i], add_generation_prompt=True)
        upto = processor.render(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix by prefix (message "
                f"{i}), so assistant turns cannot be located; use a template where rendering the first k "
                "messages gives a prefix of rendering all of them"
            )
        end = len(upto.rstrip())  # trailing newlines after the end-of-turn marker stay unsupervised
        spans.append((len(before), end))
    return full, spans


def conversation_labels(processor, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and labels: the ids inside assistant spans, else -100."""
    full, spans = assistant_char_spans(processor, messages)
    enc = processor.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tid, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(tid if inside else -100)
    return ids, labels


# --------------------------------------------------------------------------- the stream


@dataclass
class Source:
    """One data file. ``passes``: how many times an epoch reads it (2: twice; 0.25: its first
    quarter; 0: not at all), which with ``mix="spread"`` also sets its share of the batches."""

    path: str
    kind: str
    passes: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"source kind {self.kind!r}; use one of {KINDS}")
        if not (self.passes >= 0 and math.isfinite(self.passes)):
            raise ValueError(f"data file {self.path!r}: passes={self.passes}; use a number >= 0 (1: once per epoch)")


def sources_from(captions=None, generation=None, conversations=None, passes=None) -> list[Source]:
    """The data files as sources, in the order captions, generation, conversations; ``passes``
    (one number per file, in that order) sets how often an epoch reads each (``Source``)."""
    files = []
    for kind, value in (("caption", captions), ("generation", generation), ("conversation", conversations)):
        files += [(str(p), kind) for p in ([value] if isinstance(value, (str, os.PathLike)) else (value or []))]
    if not files:
        raise ValueError("no training data: give captions, generation and/or conversations files")
    if passes is None:
        passes = [1.0] * len(files)
    if len(passes) != len(files):
        named = ", ".join(f"{kind} {Path(path).name}" for path, kind in files)
        raise ValueError(f"file_passes has {len(passes)} value(s) for {len(files)} data file(s) ({named}): "
                         "give one per file, in that order")
    return [Source(path, kind, float(n)) for (path, kind), n in zip(files, passes)]


class StreamingData(IterableDataset):
    """Batches (lists of ``Example``) for one process, streamed from the sources.

    ``mix="mixed"`` interleaves the sources row by row, ``"alternate"`` batch by batch in
    turn (a source that runs out drops out, so the largest one ends the epoch alone),
    ``"spread"`` batch by batch in proportion to each source's rows, so that every source is
    spread evenly over the epoch and all end together, and ``"sequential"`` runs each
    source's batches in turn, in the order given (a curriculum: the first file at the highest
    rates). A source's ``passes`` sets how much of it an epoch reads (``Source``), so with
    ``"spread"`` it weights the mix. With
    ``shuffle_buffer > 0`` examples pass through a seeded shuffle buffer (same order for the
    same seed and epoch). With ``group_by_length > 0`` each window of that many batches is
    sorted by token count before it is cut, and its batches run in a seeded random order
    (LLaVA's length grouping: less padding). Batch ``j`` goes to process ``j % world``; a last
    incomplete round is dropped so every process runs the same number of steps. ``skip``
    batches are passed over without decoding any media (exact resume).
    """

    def __init__(self, sources: list[Source], builder: ExampleBuilder, batch_size: int, report: DataReport,
                 mix: str = "mixed", shuffle_buffer: int = 0, seed: int = 0, rank: int = 0, world: int = 1,
                 group_by_length: int = 0):
        self.sources, self.builder, self.batch_size, self.report = sources, builder, batch_size, report
        self.mix, self.shuffle_buffer, self.seed, self.rank, self.world = mix, shuffle_buffer, seed, rank, world
        self.group_by_length = group_by_length
        self.epoch, self.skip = 0, 0
        self._rows = None  # rows per source (a list), counted once for mix="spread"

    def _row_counts(self) -> list[int]:
        if self._rows is None:  # counted once, not every epoch
            self._rows = [sum(1 for _ in iter_rows(s.path)) for s in self.sources]
        return self._rows

    def _examples(self, i: int) -> Iterator[Example]:
        """Source ``i``'s examples for one epoch: whole passes over its file, then the first
        rows of one more for a fractional ``passes``."""
        source = self.sources[i]
        rows = iter_rows(source.path)
        if source.passes != 1:
            quota = round(self._row_counts()[i] * source.passes)  # 0 for an empty file: no endless passes
            passes = itertools.chain.from_iterable(iter_rows(source.path) for _ in itertools.count())
            rows = itertools.islice(passes, quota)
        for n, row in rows:
            try:
                yield self.builder.build(source.kind, row, source.path, n)
            except RowError as err:
                self.report.bad(source.path, n, str(err))

    def _shuffled(self, it: Iterator[Example], rng: random.Random) -> Iterator[Example]:
        if self.shuffle_buffer <= 0:
            yield from it
            return
        buf: list[Example] = []
        for ex in it:
            buf.append(ex)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _batches(self) -> Iterator[list[Example]]:
        rng = random.Random(self.seed * 100003 + self.epoch)
        streams = [self._shuffled(self._examples(i), rng) for i in range(len(self.sources))]
        if self.mix == "mixed":
            yield from self._cut(_round_robin(streams), rng)
        elif self.mix == "spread":
            lengths = [n * s.passes / self.batch_size for n, s in zip(self._row_counts(), self.sources)]
            yield from _spread([self._cut(s, rng) for s in streams], lengths)
        elif self.mix == "sequential":
            for s in streams:
                yield from self._cut(s, rng)
        else:
            yield from _round_robin([self._cut(s, rng) for s in streams])

    def _cut(self, examples: Iterator[Example], rng: random.Random) -> Iterator[list[Example]]:
        if self.group_by_length <= 0:
            yield from _chunks(examples, self.batch_size)
            return
        for window in _chunks(examples, self.batch_size * self.group_by_length):
            window.sort(key=lambda ex: len(ex.ids))
            batches = list(_chunks(iter(window), self.batch_size))
            rng.shuffle(batches)
            yield from batches

    def global_batches(self) -> Iterator[list[Example]]:
        """All processes' batches, in order, complete rounds only."""
        group = []
        for b in self._batches():
            group.append(b)
            if len(group) == self.world:
                yield from group
                group = []

    def __iter__(self) -> Iterator[list[Example]]:
        for j, b in enumerate(self.global_batches()):
            if j % self.world == self.rank and j // self.world >= self.skip:
                yield b

    def num_batches(self) -> int:
        """Batches per process in one epoch (reads the whole stream once, no media)."""
        keep = self.report
        self.report = DataReport(strict=keep.strict)
        try:
            return sum(1 for _ in self.global_batches()) // self.world
        finally:
            self.report = keep


def _round_robin(iterators):
    its = list(iterators)
    while its:
        alive = []
        for it in its:
            try:
                yield next(it)
                alive.append(it)
            except StopIteration:
                pass
        its = alive


def _spread(iterators, lengths):
    """Merge ``iterators`` so the k-th item of one expected to yield ``lengths[i]`` items comes
    at about (k + 1/2) / lengths[i] of the way through: each is spread evenly and all end
    together (ties go to the earlier iterator). An iterator that yields more or fewer items
    than expected just runs on or drops out."""
    its = list(iterators)
    taken = [0] * len(its)
    alive = list(range(len(its)))
    while alive:
        i = min(alive, key=lambda j: ((taken[j] + 0.5) / lengths[j] if lengths[j] > 0 else float("inf"), j))
        try:
            item = next(its[i])
        except StopIteration:
            alive.remove(i)
            continue
        taken[i] += 1
        yield item


def _chunks(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
