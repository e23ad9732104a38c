"""What every task shares: bad-row accounting, images, batched generation with a progress
bar, settings with package versions, and the result file."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

EXAMPLES_KEPT = 5


class BadRows:
    """Rows that could not be run or scored, by reason, with the first few ids of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list] = defaultdict(list)

    def add(self, reason: str, row_id: Any) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_KEPT:
            self.examples[reason].append(row_id)

    def report(self) -> dict:
        return {r: {"count": self.counts[r], "examples": self.examples[r]} for r in sorted(self.counts)}


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist; check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {str(path)!r} is not valid JSON: {err}") from err


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """JSON lines; a file that is one JSON list is read as well."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist; check the path")
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{what} file {str(path)!r}, line {i}, is not valid JSON: {err}") from err
    return rows


def open_image(path: Path, bad: BadRows, row_id: Any):
    """-> an RGB PIL image, or None with the row counted as ``missing_image`` / ``undecodable_image``."""
    from PIL import Image

    if not path.is_file():
        bad.add("missing_image", row_id)
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception:  # any decoder failure is the file's fault, and is counted
        bad.add("undecodable_image", row_id)
        return None


def generate_all(model, requests: list[dict], gen: dict, progress: bool, desc: str,
                 load: Callable[[dict], dict | None] | None = None) -> list:
    """Run ``requests`` through ``model.generate_batch`` in batches of ``gen["batch_size"]``
    under a tqdm bar. ``load(request)`` may turn a request into the model's request (opening its
    media) or return None for a bad row, whose result is None. Batch ``k`` runs with seed
    ``seed + k``, so a rerun repeats."""
    from tqdm.auto import tqdm

    size = max(1, int(gen.get("batch_size", 8)))
    kwargs = {k: v for k, v in gen.items() if k not in ("batch_size", "seed") and v is not None}
    results: list = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, disable=not progress, unit="item") as bar:
        for k, start in enumerate(range(0, len(requests), size)):
            chunk = []
            for i in range(start, min(start + size, len(requests))):
                req = load(requests[i]) if load else requests[i]
                if req is not None:
                    chunk.append((i, req))
            if chunk:
                seed = None if gen.get("seed") is None else int(gen["seed"]) + k
                outs = model.generate_batch([r for _, r in chunk], seed=seed, **kwargs)
                for (i, _), out in zip(chunk, outs):
                    results[i] = out
            bar.update(min(start + size, len(requests)) - start)
    return results


def versions(extra: Iterable[str] = ()) -> dict:
    names = ["mmllm", "torch", "transformers", "diffusers", *extra]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_json(path: str | Path, data: Any, lines: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        path.write_text("".join(json.dumps(row) + "\n" for row in data))
    else:
        path.write_text(json.dumps(data, indent=1) + "\n")
    return path
