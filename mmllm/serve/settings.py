"""Server settings: one dataclass, filled from ``mmllm serve`` flags or built directly in code.

This module imports nothing beyond the standard library, so ``mmllm --help`` stays fast and
works without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

API_KEY_ENV = "MMLLM_API_KEY"


@dataclass
class ServeSettings:
    """What the server accepts and how it batches. Sizes are in bytes, times in seconds."""

    model_name: str = "mmllm"  # the id /v1/models lists; requests must name it
    api_key: str | None = None  # None: no authentication
    max_batch_size: int = 8  # rows (choices) decoded together in one padded batch
    batch_wait_s: float = 0.005  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting for the model; one more gets 429
    max_body_bytes: int = 32 * 2**20  # request body; larger gets 413
    max_media_bytes: int = 16 * 2**20  # one encoded image, audio clip or video
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_n: int = 8  # choices per request, and images per images request
    max_image_side: int = 1024  # height / width a request may ask the decoders for
    max_inference_steps: int = 200
    allowed_local_media_path: str | None = None  # file:// URLs are read only under this folder
    allow_remote_media: bool = False  # http(s) URLs are fetched only when set
    remote_timeout_s: float = 10.0

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_media_bytes", "max_tokens",
                     "default_max_tokens", "max_n", "max_image_side", "max_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_s < 0 or self.remote_timeout_s <= 0:
            raise ValueError("batch_wait_s must be >= 0 and remote_timeout_s > 0")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = ServeSettings()
    parser.add_argument("--model", default=None,
                        help="preset name, shipped model or save_pretrained directory (default: mmllm's default model)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send (default: the --model value)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else no key)")
    g = parser.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="requests (choices) decoded together in one padded batch; 1 turns batching off")
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_s * 1000,
                   help="how long a request waits for others to batch with")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="requests allowed to wait; past that: 429")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help="largest request body; past that: 413")
    g.add_argument("--max-media-mb", type=float, default=d.max_media_bytes / 2**20,
                   help="largest image, audio clip or video in a request")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a request may ask for")
    g.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="max_tokens when a request does not say")
    g.add_argument("--max-n", type=int, default=d.max_n, help="largest n (choices or images) per request")
    m = parser.add_argument_group("media sources")
    m.add_argument("--allowed-local-media-path", default=None,
                   help="folder whose files requests may name as file:// URLs (default: none)")
    m.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) media URLs (size-limited, with a timeout); off by default")
    m.add_argument("--remote-timeout-s", type=float, default=d.remote_timeout_s,
                   help="timeout for fetching one remote media URL")
    return parser


def settings_from_args(args: argparse.Namespace, model_name: str) -> ServeSettings:
    values = dict(
        model_name=args.served_model_name or model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_media_bytes=int(args.max_media_mb * 2**20),
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_n=args.max_n,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_remote_media=args.allow_remote_media,
        remote_timeout_s=args.remote_timeout_s,
    )
    known = {f.name for f in fields(ServeSettings)}
    return ServeSettings(**{k: v for k, v in values.items() if k in known})
