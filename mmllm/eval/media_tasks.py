"""Generation tasks: text -> image (CLIPScore, FID) and text -> audio (CLAP score, FAD).

Models and feature extractors come from local paths (nothing is downloaded): ``clip`` a
Hugging Face CLIP directory, ``inception`` the weights file of torchmetrics' FID Inception (or,
from Python, ``fid_feature=`` any ``nn.Module`` mapping uint8 images ``(N, 3, 299, 299)`` to
``(N, D)`` features, which torchmetrics' ``FrechetInceptionDistance`` accepts), ``clap`` a Hugging
Face CLAP directory. Metrics whose inputs were not given are listed under ``settings.skipped``.

- ``CLIPScore``: torchmetrics' ``100 * max(cos(image, prompt), 0)``, averaged.
- ``FID``: torchmetrics' ``FrechetInceptionDistance`` between the generated and the reference
  images, all resized to 299x299 (bicubic).
- ``CLAP``: the mean cosine similarity of the CLAP audio embedding of each clip and the CLAP text
  embedding of its prompt.
- ``FAD``: the Fréchet distance (``frechet_distance``, the same formula as FID) between the CLAP
  audio embeddings of the generated and the reference clips. The published FAD numbers
  (AudioLDM's, NExT-GPT's 1.68) use VGGish embeddings, so this FAD ranks systems on the same
  scorer but is not the published scale.
"""

from __future__ import annotations

from pathlib import Path

from .core import generate_all, read_jsonl
from .tasks import Task

FID_SIZE = 299
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``x`` (N, D) and ``y`` (M, D):
    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))``, unbiased covariances, in float64
    (torchmetrics' FID formula, with the square-root trace from the eigenvalues of ``S_x S_y``)."""
    import torch

    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 items per set, got {x.shape[0]} and {y.shape[0]}")
    sx, sy = torch.atleast_2d(torch.cov(x.T)), torch.atleast_2d(torch.cov(y.T))
    a = (x.mean(0) - y.mean(0)).square().sum()
    c = torch.linalg.eigvals(sx @ sy).sqrt().real.sum()
    return float(a + sx.trace() + sy.trace() - 2 * c)


def read_prompts(path: str) -> list[str]:
    """JSON lines with a ``prompt`` (or ``caption`` / ``text``) field, or plain text, one prompt a line."""
    if Path(path).suffix in (".jsonl", ".json"):
        rows = read_jsonl(path, "prompts")
        return [str(r.get("prompt", r.get("caption", r.get("text", "")))) if isinstance(r, dict) else str(r)
                for r in rows]
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompts file {path!r} does not exist; check the path")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _files(folder: str, suffixes: tuple[str, ...], what: str) -> list[Path]:
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{what} folder {folder!r} does not exist; check the path")
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes)


class _Generation(Task):
    modality = ""
    suffix = ""
    prediction_lines = True
    needs_for_model = ("prompts",)
    default_prompt = "{prompt}"
    default_max_new_tokens = 48

    def load(self, opts, limit):
        prompts = read_prompts(opts["prompts"]) if opts.get("prompts") else []
        return {"prompts": prompts[:limit] if limit else prompts}

    def predict(self, model, data, gen, bad, progress, out):
        if out is None:
            raise ValueError(f"{self.name} writes the generated {self.modality} beside the result: pass --out")
        folder = out.with_name(out.stem + f".{self.modality}")
        folder.mkdir(parents=True, exist_ok=True)
        template = gen.pop("prompt")
        gen["output_modalities"] = [self.modality]
        requests = [{"prompt": template.format(prompt=p, question=p)} for p in data["prompts"]]
        results = generate_all(model, requests, gen, progress, self.name)
        preds = []
        field = {"image": "images", "audio": "audio"}[self.modality]
        for i, (prompt, result) in enumerate(zip(data["prompts"], results)):
            items = getattr(result, field) if result is not None else []
            if not items:
                bad.add(f"no_{self.modality}_produced", i)
                continue
            path = items[0].save(folder / f"{i:05d}{self.suffix}")
            preds.append({"prompt": prompt, self.modality: str(Path(path).relative_to(out.parent))})
        return preds

    def _pairs(self, predictions, opts, bad) -> list[tuple[str, Path]]:
        base = Path(opts.get("_predictions_dir") or ".")
        pairs = []
        for i, p in enumerate(predictions):
            if not p.get(self.modality):
                bad.add(f"no_{self.modality}_in_prediction", i)
                continue
            path = Path(p[self.modality])
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                bad.add(f"missing_{self.modality}", i)
                continue
            pairs.append((str(p.get("prompt", "")), path))
        if not pairs:
            raise ValueError(f"no readable generated {self.modality} in the predictions; nothing to score")
        return pairs


class TextToImage(_Generation):
    name = "text_to_image"
    modality = "image"
    suffix = ".png"
    options = {"prompts": "", "clip": "", "inception": "", "reference_images": "", "fid_feature": ""}
    extra_versions = ("torchmetrics",)

    def score(self, predictions, data, bad, opts):
        import numpy as np
        import torch
        from PIL import Image

        def load(path):
            with Image.open(path) as im:
                return im.convert("RGB")

        pairs = self._pairs(predictions, opts, bad)
        images = [load(p) for _, p in pairs]
        metrics, skipped = {}, {}
        if opts.get("clip"):
            from torchmetrics.multimodal.clip_score import CLIPScore
            from transformers import CLIPModel, CLIPProcessor

            clip = opts["clip"]
            metric = CLIPScore(model_name_or_path=lambda: (CLIPModel.from_pretrained(clip),
                                                           CLIPProcessor.from_pretrained(clip)))
            with torch.no_grad():
                metric.update([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images],
                              [t for t, _ in pairs])
                metrics["CLIPScore"] = float(metric.compute())
        else:
            skipped["CLIPScore"] = "pass --clip (a local CLIP directory)"
        feature = opts.get("fid_feature")
        if opts.get("reference_images") and (feature is not None or opts.get("inception")):
            from torchmetrics.image.fid import FrechetInceptionDistance

            def batch(ims):  # uint8 (N, 3, 299, 299)
                ims = [np.asarray(im.resize((FID_SIZE, FID_SIZE), Image.BICUBIC)) for im in ims]
                return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()

            refs = [load(p) for p in _files(opts["reference_images"], IMAGE_SUFFIXES, "reference images")]
            fid = (FrechetInceptionDistance(feature=feature) if feature is not None else
                   FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=opts["inception"]))
            with torch.no_grad():
                fid.update(batch(refs), real=True)
                fid.update(batch(images), real=False)
                metrics["FID"] = float(fid.compute())
            metrics["FID_reference_n"] = len(refs)
        else:
            skipped["FID"] = "pass --reference-images and --inception (or fid_feature= from Python)"
        return metrics, ({"skipped": skipped} if skipped else {}), len(pairs)


class TextToAudio(_Generation):
    name = "text_to_audio"
    modality = "audio"
    suffix = ".wav"
    options = {"prompts": "", "clap": "", "reference_audio": ""}

    def check(self, opts, with_model):
        super().check(opts, with_model)
        if not opts.get("clap"):
            raise ValueError("text_to_audio needs --clap (a local CLAP directory) for its CLAP score and FAD")

    def score(self, predictions, data, bad, opts):
        import numpy as np
        import torch
        from transformers import ClapModel, ClapProcessor

        from ..media import load_audio

        model = ClapModel.from_pretrained(opts["clap"]).eval()
        processor = ClapProcessor.from_pretrained(opts["clap"])
        rate = processor.feature_extractor.sampling_rate

        def embed(paths):  # (N, D), L2-normalised
            waves = [load_audio(str(p), rate) for p in paths]
            feats = processor.feature_extractor(waves, sampling_rate=rate, return_tensors="pt")
            with torch.no_grad():
                out = model.get_audio_features(**feats)
            out = out if torch.is_tensor(out) else out.pooler_output
            return torch.nn.functional.normalize(out, dim=-1)

        pairs = self._pairs(predictions, opts, bad)
        audio = embed([p for _, p in pairs])
        tokens = processor.tokenizer([t for t, _ in pairs], padding=True, return_tensors="pt")
        with torch.no_grad():
            text = model.get_text_features(**tokens)
        text = torch.nn.functional.normalize(text if torch.is_tensor(text) else text.pooler_output, dim=-1)
        metrics = {"CLAP": float((audio * text).sum(-1).mean())}
        notes = {}
        if opts.get("reference_audio"):
            refs = embed(_files(opts["reference_audio"], AUDIO_SUFFIXES, "reference audio"))
            metrics["FAD"] = frechet_distance(np.asarray(audio), np.asarray(refs))
            metrics["FAD_reference_n"] = int(refs.shape[0])
            notes["fad_embeddings"] = "CLAP audio embeddings (not VGGish)"
        else:
            notes["skipped"] = {"FAD": "pass --reference-audio"}
        return metrics, notes, len(pairs)
