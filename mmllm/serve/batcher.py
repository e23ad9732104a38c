"""One worker thread owns the model; requests wait in a bounded queue and are batched.

* Requests that arrive within ``batch_wait_s`` of each other and share their sampling and
  decoder settings go to the model as one left-padded ``generate_batch`` call, up to
  ``max_batch_size`` rows (a request with ``n`` choices is ``n`` rows). Rows may differ in
  ``max_tokens``: each row stops at its own limit.
* A request with a ``seed`` runs in a batch of its own, after ``torch.manual_seed(seed)``, so its
  answer is the same whether it arrives alone or among others (padding with other rows changes
  floating-point sums, so a shared batch could not promise bit-identical results). It runs on a
  forked RNG, so torch's global RNG is as it was afterwards.
* A streamed request also runs alone, through ``generate(stream=True)``.
* A request whose client went away is dropped from the queue, or stopped at its next token.

Only the worker thread touches the model and torch's global RNG.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

log = logging.getLogger("mmllm.serve")


class QueueFull(Exception):
    pass


@dataclass(eq=False)  # jobs are compared by identity in the queue
class Job:
    """One request: its rows (``generate_batch`` dicts, one per choice) and settings."""

    rows: list[dict]
    max_tokens: int
    sampling: dict  # temperature, top_p, output_modalities, decoder settings: rows batch only when equal
    seed: int | None = None
    required: frozenset = frozenset()  # modalities every row's answer must carry
    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    pieces: asyncio.Queue | None = None  # streamed text pieces, then the result (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in self.sampling.items()))

    @property
    def alone(self) -> bool:
        return self.seed is not None or self.stream

    def cancel(self) -> None:
        self.cancelled.set()

    # Results cross from the worker thread to the event loop.
    def _call(self, fn: Callable, *args) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def resolve(self, value: Any) -> None:
        if self.stream:
            self._call(self.pieces.put_nowait, value)
        else:
            self._call(lambda: self.future.done() or self.future.set_result(value))

    def drop(self) -> None:
        """Forget a cancelled job: its client has gone."""
        if not self.stream:
            self._call(self.future.cancel)

    def fail(self, err: BaseException) -> None:
        if self.stream:
            self._call(self.pieces.put_nowait, err)
        else:
            self._call(lambda: self.future.done() or self.future.set_exception(err))


class RowLimits(StoppingCriteria):
    """A transformers ``StoppingCriteria``: row ``i`` stops after ``limits[i]`` tokens, or when its
    request is cancelled."""

    def __init__(self, limits: list[int], cancelled: list[threading.Event]):
        self.limits, self.cancelled = limits, cancelled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[1]  # generated so far (decoding starts from embeddings alone)
        done = [n >= lim or ev.is_set() for lim, ev in zip(self.limits, self.cancelled)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class RequireSignals(LogitsProcessor):
    """A transformers ``LogitsProcessor``: each row's answer carries every modality in
    ``required[i]``. The row may not end before it has them, and the first signal token of a
    missing one is forced once the tokens left are just enough for its signal sequence.

    It runs after mmllm's ``ForceSignalTokens``, which completes a started sequence.
    """

    def __init__(self, groups: dict[str, list[int]], required: list[frozenset], limits: list[int],
                 end_ids: list[int]):
        self.groups, self.required, self.limits, self.end_ids = groups, required, limits, end_ids
        self.inside = {ids[i] for ids in groups.values() for i in range(len(ids) - 1)}  # not the last of a group

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        low = torch.finfo(scores.dtype).min
        step = input_ids.shape[1]
        for row, need in enumerate(self.required):
            seq = input_ids[row].tolist()
            if not need or (seq and seq[-1] in self.inside):
                continue
            missing = [m for m in sorted(need) if self.groups[m][0] not in seq]
            if not missing:
                continue
            scores[row, self.end_ids] = low
            if self.limits[row] - step <= sum(len(self.groups[m]) for m in missing):
                start = self.groups[missing[0]][0]
                scores[row] = low
                scores[row, start] = 0.0
        return scores


def _end_ids(model) -> list[int]:
    ids = model.llm.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids.append(model.tokenizer.eos_token_id)
    return sorted({i for i in ids if i is not None})


class Batcher:
    """The bounded queue and the worker thread that feeds the model."""

    def __init__(self, model, max_batch_size: int = 8, batch_wait_s: float = 0.005, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None):
        self.model = model
        self.max_batch_size, self.batch_wait_s, self.max_queue = max_batch_size, batch_wait_s, max_queue
        self.on_batch = on_batch
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0  # jobs being decoded now
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ outside the worker

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._work, name="mmllm-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            for job in self._pending:
                job.fail(RuntimeError("the server is shutting down"))
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (from the event loop); raises ``QueueFull`` when ``max_queue`` wait already."""
        job.loop = asyncio.get_running_loop()
        if job.stream:
            job.pieces = asyncio.Queue()
        else:
            job.future = job.loop.create_future()
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: take ``job`` off the queue, or stop it at its next token."""
        job.cancel()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                job.drop()

    # ------------------------------------------------------------------ the worker

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest live job, plus later compatible ones that arrive in time."""
        with self._cond:
            while True:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return None
                first = self._pending.popleft()
                if not first.cancelled.is_set():
                    break
                first.drop()
            batch, rows = [first], len(first.rows)
            if first.alone:
                self._running = 1
                return batch
            deadline = time.perf_counter() + self.batch_wait_s
            while rows < self.max_batch_size:
                for job in list(self._pending):
                    if job.cancelled.is_set():
                        self._pending.remove(job)
                        job.drop()
                    elif not job.alone and job.key == first.key and rows + len(job.rows) <= self.max_batch_size:
                        self._pending.remove(job)
                        batch.append(job)
                        rows += len(job.rows)
                left = deadline - time.perf_counter()
                if rows >= self.max_batch_size or left <= 0 or self._stop:
                    break
                self._cond.wait(left)
            self._running = len(batch)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                if batch[0].stream:
                    self._stream(batch[0])
                else:
                    self._run(batch)
            except BaseException as err:  # never let the worker die; the error goes to the requests
                log.exception("generation failed")
                for job in batch:
                    job.fail(err)
            finally:
                self._running = 0

    def _kwargs(self, jobs: list[Job]) -> dict:
        first = jobs[0]
        limits = [job.max_tokens for job in jobs for _ in job.rows]
        kwargs = dict(first.sampling, max_new_tokens=max(limits), seed=first.seed,
                      stopping_criteria=StoppingCriteriaList(
                          [RowLimits(limits, [job.cancelled for job in jobs for _ in job.rows])]))
        required = [job.required for job in jobs for _ in job.rows]
        if any(required):
            kwargs["logits_processor"] = LogitsProcessorList(
                [RequireSignals(self.model.signal_groups, required, limits, _end_ids(self.model))])
        return kwargs

    def _rng(self, job: Job):
        """A seeded job runs on a forked RNG: torch's global state is restored afterwards, so the
        seed neither leaks into later unseeded requests nor disturbs other users of torch."""
        if job.seed is None:
            return contextlib.nullcontext()
        device = self.model.device
        return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def _run(self, batch: list[Job]) -> None:
        rows = [row for job in batch for row in job.rows]
        if self.on_batch:
            self.on_batch(len(rows))
        try:
            with self._rng(batch[0]):
                results = self.model.generate_batch(rows, **self._kwargs(batch))
        except Exception:
            if len(batch) == 1:
                raise
            for job in batch:  # one bad request must not fail the others: retry each alone
                try:
                    job.resolve(self.model.generate_batch(job.rows, **self._kwargs([job])))
                except Exception as err:
                    job.fail(err)
            return
        start = 0
        for job in batch:
            job.resolve(results[start:start + len(job.rows)])
            start += len(job.rows)

    def _stream(self, job: Job) -> None:
        if self.on_batch:
            self.on_batch(1)
        row = job.rows[0]
        with self._rng(job):
            stream = self.model.generate(row["prompt"], history=row.get("history"), image=row.get("image"),
                                         audio=row.get("audio"), video=row.get("video"), stream=True,
                                         **self._kwargs([job]))
            for piece in stream:  # after a cancel, RowLimits ends the stream at its next token
                if not job.cancelled.is_set():
                    job.resolve(piece)
        if not job.cancelled.is_set():
            job.resolve([stream.result])
