"""Command line for the web demo: ``python -m demo`` and ``mmllm demo``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None,
                        help="preset name or save_pretrained directory (default: mmllm's default model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload, in MB")
    parser.add_argument("--concurrency", type=int, default=1, help="requests generated at the same time")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests allowed to wait; past that the page says the queue is full")
    parser.add_argument("--temperature", type=float, default=None,
                        help="the settings panel's starting temperature (0: greedy; default 0.7)")
    parser.add_argument("--seed", type=int, default=None, help="the settings panel's starting seed (default: random)")
    return parser


def serve(args: argparse.Namespace) -> int:
    """Load the model, build the page and serve it until interrupted."""
    if args.max_upload_mb <= 0 or args.concurrency < 1 or args.max_queue < 1:
        raise ValueError("--max-upload-mb must be > 0, --concurrency and --max-queue >= 1")
    import mmllm

    with tempfile.TemporaryDirectory(prefix="mmllm-demo-") as root:
        # Uploads land in this session's own temp dir: Gradio reads the variable when it is imported.
        os.environ["GRADIO_TEMP_DIR"] = os.path.join(root, "uploads")
        name = args.model or mmllm.api.default_model_name()  # $MMLLM_DEFAULT, else the shipped toy model
        print(f"Loading model {name!r}…", file=sys.stderr, flush=True)
        start = time.perf_counter()
        model = mmllm.load(name)
        print(f"Loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        from .app import build_demo
        from mmllm.chat import Settings

        sampling = Settings()
        if args.temperature is not None:
            sampling.temperature = args.temperature
        sampling.seed = args.seed
        app = build_demo(model, model_name=name, max_upload_mb=args.max_upload_mb, concurrency=args.concurrency,
                         max_queue=args.max_queue, workdir=root, sampling=sampling)
        app.launch(server_name=args.host, server_port=args.port, share=args.share,
                   max_file_size=f"{int(args.max_upload_mb * 1e6)}b", allowed_paths=[root], show_error=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m demo", description=__doc__))
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except (ValueError, FileNotFoundError) as err:  # MediaError is a ValueError
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
