"""An lmms-eval model: ``lmms-eval --model mmllm --model_args pretrained=NAME_OR_PATH --tasks ...``.

Registered through the ``lmms_eval.models`` entry point (``MANIFEST``, read by lmms-eval's
``ModelRegistryV2``), so any lmms-eval task runs on any mmllm model. Images come as PIL images,
audio as ``{"array", "sampling_rate"}`` dicts, video as file paths, as lmms-eval's tasks give
them. ``generate_until`` answers through ``MMLLM.generate_batch`` (greedy unless the task sets
``temperature``; output cut at the task's ``until`` strings); ``loglikelihood`` scores the
continuation after the chat-templated context with the media. Multi-round tasks are not
supported yet.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm.auto import tqdm

MANIFEST = ModelManifest(model_id="mmllm", simple_class_path="mmllm.eval.lmms.MMLLMEval")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a")


def _flatten(items) -> list:
    out = []
    for x in items or []:
        out.extend(_flatten(x) if isinstance(x, (list, tuple)) else [x])
    return out


def split_media(visuals) -> dict:
    """lmms-eval's visuals -> ``{"image": [...], "audio": [...], "video": [...]}`` (empty lists dropped)."""
    from PIL import Image

    media: dict[str, list] = {"image": [], "audio": [], "video": []}
    for v in _flatten(visuals):
        if v is None:
            continue
        if isinstance(v, Image.Image):
            media["image"].append(v.convert("RGB"))
        elif isinstance(v, dict) and "array" in v:
            media["audio"].append((v["array"], v["sampling_rate"]))
        elif isinstance(v, (str, Path)):
            media["audio" if str(v).lower().endswith(AUDIO_SUFFIXES) else "video"].append(str(v))
        else:
            raise ValueError(f"mmllm cannot read an lmms-eval visual of type {type(v).__name__}")
    return {k: v for k, v in media.items() if v}


class MMLLMEval(lmms):
    """lmms-eval's model interface over an ``MMLLM``."""

    def __init__(self, pretrained: str = "tiny", device: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int = 128, model=None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"mmllm's lmms-eval model takes pretrained, device, batch_size, max_new_tokens; "
                             f"not {sorted(kwargs)}")
        import mmllm

        self.model = model if model is not None else mmllm.load(pretrained, device=device)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def _visuals(self, doc_to_visual, doc_id, task, split):
        if doc_to_visual is None:
            return {}
        return split_media(doc_to_visual(self.task_dict[task][split][doc_id]))

    def generate_until(self, requests) -> list[str]:
        out: list[str] = []
        for start in tqdm(range(0, len(requests), self.batch_size_per_gpu), desc="mmllm", disable=self.rank != 0):
            chunk = [r.args for r in requests[start:start + self.batch_size_per_gpu]]
            gen = dict(chunk[0][1] or {})
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            batch = [{"prompt": ctx, **self._visuals(dtv, doc_id, task, split)}
                     for ctx, _, dtv, doc_id, task, split in chunk]
            results = self.model.generate_batch(
                batch, max_new_tokens=int(gen.get("max_new_tokens") or self.max_new_tokens),
                temperature=float(gen.get("temperature") or 0.0), top_p=float(gen.get("top_p") or 1.0))
            for r in results:
                text = r.text
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", None, text)
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from mmllm.generation import build_request

        model = self.model
        out = []
        for ctx, target, dtv, doc_id, task, split in tqdm([r.args for r in requests], desc="mmllm",
                                                          disable=self.rank != 0):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            messages, lists = build_request(model, ctx, self._visuals(dtv, doc_id, task, split))
            batch = model.processor([messages], [lists], add_generation_prompt=True).to(model.device)
            cont = model.tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids
            ids = torch.cat([batch.input_ids, cont.to(model.device)], dim=1)  # (1, T + C)
            logits = model(ids, torch.ones_like(ids), batch.media, batch.media_sample).logits  # (1, T + C, V)
            logp = torch.log_softmax(logits[0, batch.input_ids.shape[1] - 1:-1].float(), dim=-1)  # (C, V)
            target_ids = cont[0].to(logp.device)
            out.append((float(logp.gather(1, target_ids[:, None]).sum()),
                        bool((logp.argmax(-1) == target_ids).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmllm's lmms-eval model runs single-round tasks (generate_until, loglikelihood); "
                                  "multi-round tasks are not supported yet")
