"""The Gradio page: ``build_demo(model) -> gr.Blocks``. The chat logic lives in ``mmllm.chat``."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from mmllm.chat import (SUFFIXES, Limits, Settings, decoder_settings, input_modalities, output_modalities, respond,
                   retry, to_messages, undo)
from .examples import example_messages, write_example_media

DEFAULTS = Settings()


def _settings_reader(shown: dict):
    """Slider values -> ``Settings``. A decoder slider still at the value it was shown with
    is passed as None, so every decoder keeps its own setting (they can differ by modality)."""

    def read(max_new_tokens, temperature, top_p, seed, guidance_scale, num_inference_steps, num_frames,
             audio_length_in_s) -> Settings:
        seed = None if seed is None or seed < 0 else int(seed)

        def changed(key, value, kind):
            return None if value is None or value == shown[key] else kind(value)

        return Settings(int(max_new_tokens), float(temperature), float(top_p), seed,
                        changed("guidance_scale", guidance_scale, float),
                        changed("num_inference_steps", num_inference_steps, int),
                        changed("num_frames", num_frames, int),
                        changed("audio_length_in_s", audio_length_in_s, float))

    return read


def _describe(model_name: str, reads, writes) -> str:
    reads = ", ".join(["text", *reads])
    writes = ", ".join(["text", *writes])
    return (f"### mmllm · `{model_name}`\nReads {reads}; writes {writes}. Attach files with the paper clip"
            f" (or record), type a message and press Enter. Earlier files stay in the conversation.")


def build_demo(model, *, model_name: str = "model", max_upload_mb: float = 20.0, concurrency: int = 1,
               max_queue: int = 16, workdir: str | Path | None = None, sampling: Settings | None = None
               ) -> gr.Blocks:
    """The chat page for ``model`` (anything with ``mmllm``'s ``generate`` interface).

    ``workdir`` holds the example media and generated outputs (if None, a new temp dir that
    is removed with the page, or at exit); uploads must come from there or from Gradio's
    upload folder. ``sampling`` sets the panel's starting max new tokens, temperature, top-p
    and seed. At most ``concurrency``
    requests run at once and ``max_queue`` wait; beyond that Gradio answers that the queue is full.
    """
    own_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mmllm-demo-"))
    out_dir = workdir / "outputs"
    reads, writes = input_modalities(model), output_modalities(model)
    limits = Limits(max_upload_mb=max_upload_mb, roots=(str(workdir), get_upload_folder()))
    examples = example_messages(write_example_media(workdir / "examples"), reads)
    suffixes = sorted({s for m, group in SUFFIXES if m in reads for s in group})
    shown = decoder_settings(model)
    start = sampling or DEFAULTS
    _settings = _settings_reader(shown)

    with gr.Blocks(title=f"mmllm · {model_name}", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(_describe(model_name, reads, writes))
        turns = gr.State([])
        # Generated pictures and clips are small (the toy decoders draw 32 x 32): shown at least
        # 256 pixels wide with square pixels, while the files keep what was generated.
        gr.HTML("<style>#chat .bot img, #chat .bot video {min-width: 256px; image-rendering: pixelated;}</style>",
                padding=False)
        chatbot = gr.Chatbot(label="Conversation", height=480, elem_id="chat")
        box = gr.MultimodalTextbox(
            placeholder="Ask something, or attach an image, a sound or a clip…" if reads else "Ask something…",
            file_types=suffixes or None, file_count="multiple", show_label=False, autofocus=True,
            sources=["upload", "microphone"] if "audio" in reads else ["upload"], elem_id="message")
        with gr.Row():
            retry_btn = gr.Button("Retry", size="sm", elem_id="retry")
            undo_btn = gr.Button("Undo", size="sm", elem_id="undo")
            clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
        with gr.Accordion("Webcam", open=False, visible="image" in reads or "video" in reads):
            with gr.Row():
                cam_image = gr.Image(sources=["webcam"], type="filepath", label="Photo",
                                     visible="image" in reads)
                cam_video = gr.Video(sources=["webcam"], label="Clip", visible="video" in reads)
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(1, 1024, start.max_new_tokens, step=1, label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, start.temperature, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1.0, start.top_p, step=0.05, label="Top-p")
                seed = gr.Number(-1 if start.seed is None else start.seed, precision=0, label="Seed (-1: random)")
            with gr.Row(visible=bool(writes)):
                guidance = gr.Slider(1.0, 15.0, shown["guidance_scale"], step=0.5, label="Guidance")
                steps = gr.Slider(1, 100, shown["num_inference_steps"], step=1, label="Steps")
                frames = gr.Slider(2, 64, shown["num_frames"], step=1, label="Frames", visible="video" in writes)
                audio_len = gr.Slider(0.5, 20.0, shown["audio_length_in_s"], step=0.5, label="Audio length (s)",
                                      visible="audio" in writes)
        gr.Examples(examples=examples, inputs=[box], label="Examples from the toy world")
        settings = [max_new_tokens, temperature, top_p, seed, guidance, steps, frames, audio_len]

        def on_submit(message, history, photo, clip, *values):
            message = dict(message or {})
            message["files"] = [*(message.get("files") or []), *(p for p in (photo, clip) if p)]
            locked = gr.MultimodalTextbox(value=None, interactive=False)
            messages, history = to_messages(history), list(history)
            for messages, history in respond(model, message, history, _settings(*values), limits, out_dir):
                yield messages, history, locked, None, None
            last = history[-1]
            if last.error is not None:
                gr.Warning(last.error)
            # A rejected message goes back into the box to be fixed; an answered one is cleared.
            rejected = last.error is not None and not last.media
            yield messages, history, gr.MultimodalTextbox(value=message if rejected else None, interactive=True), \
                None, None

        def on_retry(history, *values):
            for messages, history in retry(model, history, _settings(*values), out_dir):
                yield messages, history
            if history and history[-1].error is not None:
                gr.Warning(history[-1].error)

        def on_undo(history):
            history, message = undo(history)
            return to_messages(history), history, message

        def on_clear():
            return [], [], None

        run = dict(concurrency_limit=concurrency, concurrency_id="generate")
        box.submit(on_submit, [box, turns, cam_image, cam_video, *settings],
                   [chatbot, turns, box, cam_image, cam_video], **run)
        for trigger in (retry_btn.click, chatbot.retry):
            trigger(on_retry, [turns, *settings], [chatbot, turns], **run)
        for trigger in (undo_btn.click, chatbot.undo):
            trigger(on_undo, [turns], [chatbot, turns, box])
        for trigger in (clear_btn.click, chatbot.clear):
            trigger(on_clear, None, [chatbot, turns, box])

    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    if own_workdir:
        weakref.finalize(demo, shutil.rmtree, workdir, True)
    return demo
