"""``mmllm``: command line for chatting, one-shot generation, the web demo and presets.

    mmllm chat --model tiny                 terminal chat (/image PATH, /audio PATH, /video PATH, /reset, /quit)
    mmllm generate --image x.png --prompt "Describe this." [--json]
    mmllm demo --model tiny --port 7860     the Gradio page: runs ``python -m demo`` (see its --help)
    mmllm serve --model tiny --port 8000    an OpenAI-compatible HTTP API (docs/serving.md)
    mmllm presets                           list preset names
    mmllm eval TASK --model M ... --out r.json   score a model on a standard task (docs/evaluation.md)

Bad input ends with a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .modalities import MODALITIES, NAMES

MEDIA_FLAGS = NAMES
CHAT_HELP = ("commands: " + ", ".join(f"/{m} PATH" for m in MEDIA_FLAGS) + " (attach to the next message), "
             "/reset (forget the conversation), /quit")


class UsageError(ValueError):
    """Input the user can fix; printed as one line, exit status 2."""


def _load(name: str | None):
    import mmllm

    name = name or mmllm.api.default_model_name()  # $MMLLM_DEFAULT, else the shipped toy model
    print(f"Loading model {name!r}…", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model = mmllm.load(name)
    print(f"Model ready ({time.perf_counter() - start:.1f} s).", file=sys.stderr, flush=True)
    return model


def _settings(args):
    from .chat import Settings

    return Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
                    num_frames=args.num_frames, audio_length_in_s=args.audio_length)


def _check_attachment(model, modality: str, path: str) -> str:
    """Decode ``path`` as ``modality`` now, so a bad file is reported when it is attached."""
    from .chat import input_modalities
    from .media import check_media

    reads = input_modalities(model)
    if modality not in reads:
        raise UsageError(f"this model cannot read {modality}; it reads {', '.join(reads) or 'text only'}")
    check_media(path, modality)
    return path


def _check_paths(args) -> None:
    """Fail before the (slow) model load when a named file is missing."""
    for modality in MEDIA_FLAGS:
        path = getattr(args, modality, None)
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{modality} file {path!r} does not exist; check the path")


# --------------------------------------------------------------------------- subcommands


def cmd_generate(args) -> int:
    from .chat import Turn, run_turn

    _check_paths(args)
    if not args.prompt or not args.prompt.strip():
        raise UsageError("--prompt is empty; pass e.g. --prompt 'Describe this.'")
    model = _load(args.model)
    media = {m: [_check_attachment(model, m, getattr(args, m))] for m in MEDIA_FLAGS if getattr(args, m)}
    turn = Turn(text=args.prompt, media=media)
    shown = 0
    for turn in run_turn(model, turn, [], _settings(args), args.out, previews=True):
        if not args.json and not turn.done:
            print(turn.reply[shown:], end="", flush=True)
            shown = len(turn.reply)
    paths = [path for _, path in turn.outputs]
    if args.json:
        print(json.dumps({"text": turn.reply, "media": paths}))
    else:
        print()
        for modality, path in turn.outputs:
            print(f"[{modality}] {path}" + _preview_note(modality, path))
    return 0


def _preview_note(modality: str, path: str) -> str:
    """A second line naming the enlarged copy of a small picture or clip, when there is one."""
    from .chat import shown_path

    shown = shown_path(path)
    return f"\n[{modality} enlarged to view] {shown}" if shown != path else ""


def cmd_chat(args) -> int:
    from .chat import Turn, model_history, run_turn

    model = _load(args.model)
    settings = _settings(args)
    print(CHAT_HELP, file=sys.stderr)
    turns: list = []
    pending: dict[str, list[str]] = {}
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                turns, pending = [], {}
                print("(conversation cleared)")
            elif command == "/help":
                print(CHAT_HELP)
            elif command[1:] in MEDIA_FLAGS:
                modality = command[1:]
                if not rest:
                    print(f"error: usage: {command} PATH", file=sys.stderr)
                    continue
                try:
                    pending.setdefault(modality, []).append(_check_attachment(model, modality, rest))
                except ValueError as err:  # MediaError is a ValueError
                    print(f"error: {_one_line(err)}", file=sys.stderr)
                    continue
                print(f"(attached {modality} {rest}; it goes with your next message)")
            else:
                print(f"error: unknown command {command}; {CHAT_HELP}", file=sys.stderr)
            continue
        turn = Turn(text=line, media=pending)
        pending = {}
        print("bot> ", end="", flush=True)
        shown = 0
        try:
            for turn in run_turn(model, turn, model_history(model, turns), settings, args.out, previews=True):
                print(turn.reply[shown:] if not turn.done else "", end="", flush=True)
                shown = len(turn.reply)
        except ValueError as err:
            print(f"\nerror: {_one_line(err)}", file=sys.stderr)
            continue
        print()
        for modality, path in turn.outputs:
            print(f"[{modality} saved] {path}" + _preview_note(modality, path))
        turns.append(turn)


def cmd_demo(args) -> int:
    """``python -m demo`` with the remaining arguments, in this interpreter; its exit status."""
    return subprocess.call([sys.executable, "-m", "demo", *args.demo_args])


def cmd_serve(args) -> int:
    from mmllm.serve import serve

    return serve(args)


def cmd_presets(args) -> int:
    from mmllm.config import available_presets

    for name in available_presets():
        print(name)
    return 0


# --------------------------------------------------------------------------- parser


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="preset name or save_pretrained directory (default: mmllm's default model)")


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--out", default="mmllm-outputs", help="folder for generated media (made when needed)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=temperature, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")
    g = p.add_argument_group("decoders (models with an output side)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: each decoder's own setting)")
    g.add_argument("--steps", type=int, default=None, help="diffusion steps (default: each decoder's own)")
    g.add_argument("--num-frames", type=int, default=None, help="video frames (default: the video decoder's own)")
    g.add_argument("--audio-length", type=float, default=None,
                   help="audio length in seconds (default: the audio decoder's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="chat in the terminal", description=CHAT_HELP)
    _add_model(chat)
    _add_sampling(chat, temperature=0.7)
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="answer one prompt (with media) and exit")
    _add_model(gen)
    gen.add_argument("--prompt", required=True, help="the request, e.g. 'Describe this image.'")
    for modality in MODALITIES.values():
        gen.add_argument(modality.cli_flag, help=modality.cli_help)
    gen.add_argument("--json", action="store_true", help='print {"text": ..., "media": [paths]} only')
    _add_sampling(gen, temperature=0.0)
    gen.set_defaults(func=cmd_generate)

    # Its flags belong to the demo (``python -m demo --help``), which runs as its own process.
    demo = sub.add_parser("demo", help="serve the web demo (flags: mmllm demo --help)", add_help=False)
    demo.set_defaults(func=cmd_demo)

    from mmllm.serve.settings import add_arguments as add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")).set_defaults(
        func=cmd_serve)

    presets = sub.add_parser("presets", help="list preset names")
    presets.set_defaults(func=cmd_presets)

    from mmllm.eval import cli as eval_cli  # imports no scorer until a task runs

    evaluate = sub.add_parser("eval", help="score a model or a predictions file on a standard task",
                              description=eval_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_cli.add_arguments(evaluate)
    evaluate.set_defaults(func=eval_cli.main)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # usage errors exit 2 with argparse's message
    if args.command == "demo":
        args.demo_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # MediaError and UsageError are ValueErrors
        print(f"mmllm: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
