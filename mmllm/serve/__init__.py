"""``mmllm serve``: an OpenAI-compatible HTTP server that also returns the media it generates.

    mmllm serve --model tiny --port 8000        # then: OpenAI(base_url="http://127.0.0.1:8000/v1")

``create_app(model, settings)`` builds the FastAPI app (for tests and for mounting in your own
server); ``serve(args)`` loads the model and runs it under uvicorn. FastAPI, uvicorn and
prometheus-client come with ``pip install 'mmllm[serve]'`` and are imported only here, when
needed. docs/serving.md describes the API.
"""

from __future__ import annotations

import argparse
import sys
import time

from .settings import API_KEY_ENV, ServeSettings, add_arguments, settings_from_args

__all__ = ["API_KEY_ENV", "ServeSettings", "add_arguments", "create_app", "main", "serve", "settings_from_args"]


def create_app(model, settings: ServeSettings | None = None):
    """The FastAPI app serving ``model`` (see ``mmllm.serve.app.create_app``)."""
    from .app import create_app as build

    return build(model, settings)


def serve(args: argparse.Namespace) -> int:
    """Load ``args.model`` and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("mmllm serve needs uvicorn: pip install 'mmllm[serve]'") from None
    import mmllm

    name = args.model or mmllm.api.default_model_name()
    settings = settings_from_args(args, name)  # flag errors before the slow load
    print(f"Loading model {name!r}…", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model = mmllm.load(name)
    print(f"Model ready ({time.perf_counter() - start:.1f} s); serving {settings.model_name!r} at "
          f"http://{args.host}:{args.port}/v1" + (" (API key required)" if settings.api_key else ""),
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(model, settings), host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="mmllm serve", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"mmllm serve: error: {err}", file=sys.stderr)
        return 2
