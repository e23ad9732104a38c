"""The training loop, on ``accelerate``: one device, DDP, FSDP or DeepSpeed from the launch config.

``train(config)`` loads the model named in ``config.model``, sets what learns for the stage
(``freeze.set_trainable``), streams the data, and writes under ``config.out``::

    checkpoints/step-00000100/   accelerate state (trainable weights only, optimiser, scheduler,
                                 RNG of every process) + trainer_state.json (step, data position)
    logs/                        TensorBoard (when tensorboard is installed)
    model/                       the finished stage, a save_pretrained directory (mmllm.load opens it)
    bad_rows.json                every skipped data row with its reason
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .cache import FeatureCache
from .collate import Collator
from .config import TrainConfig
from .data import DataError, DataReport, ExampleBuilder, StreamingData, sources_from
from .freeze import parameter_table, set_trainable
from .losses import TrainingModule

STATE_NAME = "trainer_state.json"
MODEL_DIR = "model"


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)  # mean loss per optimiser step (all processes)
    parts: list = field(default_factory=list)  # per step: {"lm": .., "l2_image": .., ...}
    steps: int = 0
    skipped_steps: list = field(default_factory=list)  # steps dropped for a NaN/Inf loss
    evals: list = field(default_factory=list)  # (step, metrics)
    bad_rows: int = 0
    good_rows: int = 0  # examples trained on (a row read in two epochs counts twice)
    model_dir: Optional[Path] = None

    @property
    def final_loss(self) -> Optional[float]:
        """The last finite step loss (a step whose rows were all bad has none), or None."""
        return next((x for x in reversed(self.losses) if math.isfinite(x)), None)

    def summary(self) -> str:
        """One line for the end of a run: steps, the last finite loss, bad rows, where the model is."""
        final = "none" if self.final_loss is None else f"{self.final_loss:.4f}"
        return f"done: {self.steps} steps, final loss {final}, {self.bad_rows} bad row(s), model in {self.model_dir}"


def resolve_model_path(name: str) -> str:
    """A preset, a save_pretrained dir, or a training output dir (its ``model/`` subdir)."""
    p = Path(name)
    if (p / MODEL_DIR / "config.json").is_file():
        return str(p / MODEL_DIR)
    return name


def load_model(name: str):
    import mmllm

    return mmllm.load(resolve_model_path(name))


def latest_checkpoint(out: str | os.PathLike) -> Optional[Path]:
    d = Path(out) / "checkpoints"
    found = sorted(p for p in d.glob("step-*") if (p / STATE_NAME).is_file()) if d.is_dir() else []
    return found[-1] if found else None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint dir; it is renamed out of ``step-*`` first, so a kill mid-delete
    never leaves a partial ``step-*`` dir behind (left-over ``.tmp-*`` dirs are ignored)."""
    trash = path.with_name(f".tmp-del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def disk_full_error(err: OSError, what: str, kept: Optional[Path]) -> OSError:
    """``err`` (no space left / quota) reworded to say what was kept and what to do."""
    kept_text = f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
    return OSError(err.errno, f"no space left on the disk while writing {what} ({err}); {kept_text}. Free disk "
                              "space, or point --out at a larger disk, or keep fewer checkpoints (keep_checkpoints), "
                              "then rerun with --resume latest")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA/MPS out of memory, or the CPU allocator failing."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    trackers = "tensorboard" if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else None
    precision = cfg.mixed_precision  # "auto" resolved once, for both uses
    _allow_new_precision(precision)
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=str(Path(cfg.out) / "logs")),
        # A batch without audio leaves the audio projector unused: DDP must allow that.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _allow_new_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    precision ("restart your runtime"). In a single process nothing else holds that state
    between our runs, so a stage in bf16 after one in fp32 (a notebook, a build) just resets it."""
    from accelerate.state import AcceleratorState, DistributedType

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision \
            and shared.get("distributed_type") == DistributedType.NO:
        AcceleratorState._reset_state()


class Trainer:
    """One stage of training. ``eval_fn(model, step) -> dict[str, float]`` runs every
    ``config.eval_every`` steps (on every process, in eval mode, without gradients)."""

    def __init__(self, model, config: TrainConfig, eval_fn: Callable | None = None, accelerator=None,
                 print_fn: Callable = print):
        self.model = model
        self.cfg = config
        self.eval_fn = eval_fn
        self.acc = accelerator or make_accelerator(config)
        self.print = print_fn if self.acc.is_main_process else (lambda *a, **k: None)
        self.report = DataReport(strict=config.strict)

    # ------------------------------------------------------------------ setup

    def _param_groups(self, module):
        proj, rest = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                (proj if "_projectors." in name else rest).append(p)
        lr = self.cfg.lr
        plr = self.cfg.projector_lr if self.cfg.projector_lr is not None else lr
        groups = [{"params": proj, "lr": plr, "name": "projectors"}, {"params": rest, "lr": lr, "name": "lora+signal"}]
        return [g for g in groups if g["params"]]

    def _data(self):
        cfg = self.cfg
        builder = ExampleBuilder(self.model, cfg.data_root, cfg.allow_outside_data_root)
        sources = sources_from(cfg.captions, cfg.generation, cfg.conversations, cfg.file_passes)
        data = StreamingData(sources, builder, cfg.batch_size, self.report, cfg.mix, cfg.shuffle_buffer, cfg.seed,
                             self.acc.process_index, self.acc.num_processes, group_by_length=cfg.group_by_length)
        cache = FeatureCache(cfg.feature_cache, self.model) if cfg.feature_cache else None
        return data, Collator(self.model, self.report, cache)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, step: int, epoch: int, batches: int, result: TrainResult) -> None:
        acc = self.acc
        ckdir = Path(self.cfg.out) / "checkpoints"
        final, tmp = ckdir / f"step-{step:08d}", ckdir / f".tmp-step-{step:08d}"
        if acc.is_main_process:
            for stale in ckdir.glob(".tmp-*"):  # left by a run killed while saving or deleting
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            if acc.is_main_process:
                state = {"step": step, "epoch": epoch, "batches_in_epoch": batches, "losses": result.losses,
                         "parts": result.parts, "skipped_steps": result.skipped_steps,
                         "config": self.cfg.to_dict()}
                (tmp / STATE_NAME).write_text(json.dumps(state))
        except OSError as err:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(err, f"checkpoint step {step} to {tmp}", latest_checkpoint(self.cfg.out)) from err
            raise
        if acc.is_main_process:
            if final.exists():
                remove_checkpoint(final)
            os.replace(tmp, final)  # atomic: a checkpoint dir is complete or absent
            if self.cfg.keep_checkpoints > 0:
                for old in sorted(ckdir.glob("step-*"))[: -self.cfg.keep_checkpoints]:
                    remove_checkpoint(old)
        acc.wait_for_everyone()

    def _register_hooks(self, module) -> None:
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}

        def save_hook(models, weights, output_dir):
            # Frozen components are referenced by source, never copied into checkpoints.
            for i, w in enumerate(weights):
                weights[i] = {k: v for k, v in w.items() if k in trainable}

        self.acc.register_save_state_pre_hook(save_hook)

    # ------------------------------------------------------------------ loop

    def train(self) -> TrainResult:
        try:
            return self._train()
        except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            cfg = self.cfg
            kept = latest_checkpoint(cfg.out)
            raise torch.OutOfMemoryError(
                f"out of memory while training ({err}). With batch_size={cfg.batch_size}, precision {cfg.precision}, "
                f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}: lower --batch-size (raise "
                "--grad-accum to keep the global batch), enable --gradient-checkpointing, train in --precision bf16, "
                "or precompute encoder features with --feature-cache. "
                + (f"The last checkpoint {kept} is intact; rerun with --resume latest." if kept
                   else "No checkpoint was written yet.")) from err

    def _train(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        torch.manual_seed(cfg.seed)
        counts = set_trainable(self.model, cfg.stage, cfg.lora)
        if not sum(counts.values()):
            raise ValueError(f"stage {cfg.stage!r} leaves nothing trainable in this model")
        self.print(f"stage {cfg.stage} on {acc.num_processes} process(es) ({acc.distributed_type}, "
                   f"precision {cfg.precision}, autocast {acc.mixed_precision}): trainable parameters\n{parameter_table(self.model)}")
        if cfg.gradient_checkpointing:
            self.model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.to(acc.device)
        self.model.train()
        module = TrainingModule(self.model, cfg.lm_scale, cfg.l2_scale)
        data, collate = self._data()

        per_epoch = None
        total = cfg.steps
        if total <= 0:
            per_epoch = data.num_batches()
            total = cfg.epochs * (per_epoch // cfg.grad_accum)
            if total <= 0:
                raise ValueError(f"the data gives {per_epoch} batch(es) per process, fewer than grad_accum={cfg.grad_accum}")
        optimizer = torch.optim.AdamW(self._param_groups(module), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, int(cfg.warmup_ratio * total)))
        module, optimizer = acc.prepare(module, optimizer)
        acc.register_for_checkpointing(scheduler)  # stepped here, once per optimiser step
        self._register_hooks(module)
        if acc.trackers == [] and acc.log_with:
            acc.init_trackers("mmllm", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))})

        result = TrainResult()
        step, epoch, batches = 0, 0, 0
        earlier = latest_checkpoint(cfg.out) if not cfg.resume else None
        if earlier is not None:  # a new run would mix its checkpoints with these, and prune them by name
            raise FileExistsError(
                f"{cfg.out!r} already holds checkpoints of an earlier run ({earlier.name}); continue that run with "
                f"--resume latest (TrainConfig.resume='latest'), or give this run a new --out")
        if cfg.resume:
            ckpt = latest_checkpoint(cfg.out) if cfg.resume == "latest" else Path(cfg.resume)
            if ckpt is None or not (ckpt / STATE_NAME).is_file():
                raise FileNotFoundError(f"no checkpoint to resume at {cfg.resume!r} (out={cfg.out!r})")
            acc.load_state(str(ckpt), strict=False)
            state = json.loads((ckpt / STATE_NAME).read_text())
            step, epoch, batches = state["step"], state["epoch"], state["batches_in_epoch"]
            result.losses, result.parts, result.skipped_steps = state["losses"], state["parts"], state["skipped_steps"]
            self.print(f"resumed from {ckpt} at step {step} (epoch {epoch}, batch {batches})")

        progress = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=total, initial=step, desc=cfg.stage, dynamic_ncols=True)
        params = [p for p in module.parameters() if p.requires_grad]
        window: list[dict] = []
        bad_window = False
        while step < total:
            data.epoch, data.skip = epoch, batches
            exhausted = True
            for examples in data:
                batches += 1
                tb = collate(examples)
                with acc.accumulate(module):
                    if tb is None:  # every example was bad: a zero loss keeps processes in step
                        loss, parts = sum(p.sum() * 0.0 for p in params), {}
                    else:
                        result.good_rows += tb.num_examples
                        loss, parts = module(**tb.to(acc.device).inputs())
                    finite = torch.isfinite(loss.detach()).float().reshape(1)
                    finite = acc.gather(finite).min().item() > 0
                    if not finite:
                        bad_window = True
                        if cfg.nan_policy == "stop":
                            raise FloatingPointError(
                                f"loss is {loss.item()} at step {step + 1} (epoch {epoch}, batch {batches}); lower "
                                "the lr, prefer bf16 to fp16, or set nan_policy='skip' to drop such steps")
                    acc.backward(loss)
                    window.append({k: v.float() for k, v in parts.items()})
                    if acc.sync_gradients:
                        if bad_window:
                            optimizer.zero_grad(set_to_none=True)  # NaN grads are dropped, weights untouched
                        else:
                            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                                acc.clip_grad_norm_(params, cfg.max_grad_norm)
                            optimizer.step()
                            scheduler.step()
                            optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                step += 1
                self._end_step(step, window, bad_window, result, optimizer, progress)
                window, bad_window = [], False
                if cfg.eval_every and step % cfg.eval_every == 0 and self.eval_fn is not None:
                    self._evaluate(step, result)
                if cfg.save_every and step % cfg.save_every == 0:
                    self._save_checkpoint(step, epoch, batches, result)
                if step >= total:
                    exhausted = False
                    break
            if exhausted:
                if batches == 0:
                    raise ValueError(f"no usable training data\n{self.report.summary()}")
                epoch, batches = epoch + 1, 0
                if cfg.steps <= 0 and epoch >= cfg.epochs:
                    break
        if progress is not None:
            progress.close()
        result.steps = step
        return self._finish(result)

    def _end_step(self, step, window, bad, result, optimizer, progress) -> None:
        acc = self.acc
        keys = sorted({k for w in window for k in w})
        means = {}
        for k in keys:
            vals = [w[k] for w in window if k in w]
            v = torch.stack(vals).mean().to(acc.device).reshape(1)
            means[k] = acc.reduce(v, "mean").item() if acc.num_processes > 1 else v.item()
        loss = means.get("loss", float("nan"))
        result.losses.append(loss)
        result.parts.append(means)
        if bad:
            result.skipped_steps.append(step)
            self.print(f"step {step}: NaN/Inf loss, step skipped (weights unchanged)")
        if self.cfg.log_every and step % self.cfg.log_every == 0:
            logs = {f"train/{k}": v for k, v in means.items() if math.isfinite(v)}
            for g in optimizer.param_groups:
                logs[f"lr/{g.get('name', 'group')}"] = g["lr"]
            if acc.log_with:
                acc.log(logs, step=step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")

    def _evaluate(self, step, result) -> None:
        self.model.eval()
        with torch.no_grad():
            metrics = dict(self.eval_fn(self.model, step) or {})
        self.model.train()
        result.evals.append((step, metrics))
        if self.acc.log_with:
            self.acc.log({f"eval/{k}": float(v) for k, v in metrics.items()}, step=step)
        self.print(f"step {step}: eval {metrics}")

    def _check_bad_share(self, result: TrainResult) -> None:
        """Fail, before anything is saved, when too many rows were bad (every process reads
        its own share of the rows; the counts are summed)."""
        acc, report = self.acc, self.report
        counts = torch.tensor([float(report.count), float(result.good_rows)], device=acc.device)
        bad, good = (acc.reduce(counts, "sum") if acc.num_processes > 1 else counts).tolist()
        total = bad + good
        limit = self.cfg.max_bad_row_share
        if bad and (good == 0 or bad / total > limit):
            files = sorted({b.source for b in report.rows})
            first = "\n".join(f"  {b.source} row {b.row}: {b.reason}" for b in report.rows[:5])
            if acc.is_main_process:
                out = Path(self.cfg.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "bad_rows.json").write_text(json.dumps({"count": report.count, "rows": report.to_json()}, indent=1))
            raise DataError(
                f"{int(bad)} of {int(total)} rows read were bad ({bad / total:.0%}; max_bad_row_share={limit}), so no "
                f"model was saved. Files: {', '.join(files)}. First errors:\n{first}\nFix the data (bad_rows.json "
                "lists every bad row), or raise max_bad_row_share to train on the rest")

    def _finish(self, result: TrainResult) -> TrainResult:
        acc = self.acc
        acc.wait_for_everyone()
        out = Path(self.cfg.out)
        result.bad_rows = self.report.count
        self._check_bad_share(result)
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            model.eval()
            try:
                result.model_dir = model.save_pretrained(out / MODEL_DIR)
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise disk_full_error(err, f"the finished model to {out / MODEL_DIR}", latest_checkpoint(out)) from err
            (out / "bad_rows.json").write_text(json.dumps({"count": self.report.count, "rows": self.report.to_json()}, indent=1))
            self.print(self.report.summary())
            final = result.final_loss
            self.print(f"saved {result.model_dir} (open it with mmllm.load); final loss "
                       f"{'none (no step had a usable row)' if final is None else f'{final:.4f}'}")
        acc.wait_for_everyone()
        for tracker in acc.trackers:  # not acc.end_training(): that also tears down the process group
            tracker.finish()
        return result


def train(config: TrainConfig, model=None, eval_fn: Callable | None = None, accelerator=None) -> TrainResult:
    """Run one stage from ``config`` (loading ``config.model`` unless ``model`` is given)."""
    model = model if model is not None else load_model(config.model)
    return Trainer(model, config, eval_fn, accelerator).train()
