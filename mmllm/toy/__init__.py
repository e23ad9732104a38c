"""The toy world: procedural images, sounds, videos and text with ground-truth oracles.

``mmllm.toy.world`` renders media from specs and builds caption / QA / generation /
dialogue data sets with held-out attribute combinations; ``mmllm.toy.oracle`` reads
attributes back from (possibly noisy, generated) media and scores them.
"""

from .world import (
    AudioSpec,
    ImageSpec,
    VideoSpec,
    all_specs,
    caption,
    canonical_caption,
    gen_marker,
    generation_request,
    in_split,
    is_held_out,
    make_caption_pairs,
    make_dialogues,
    make_generation_pairs,
    make_qa,
    question_answer,
    render,
    render_audio,
    render_image,
    render_video,
    sample_audio_spec,
    sample_image_spec,
    sample_spec,
    sample_video_spec,
    spec_from_dict,
    write_dataset,
)
from .oracle import analyse, analyse_audio, analyse_image, analyse_text, analyse_video, score, score_batch

__all__ = [
    "AudioSpec", "ImageSpec", "VideoSpec", "all_specs", "caption", "canonical_caption", "gen_marker",
    "generation_request", "in_split", "is_held_out", "make_caption_pairs", "make_dialogues",
    "make_generation_pairs", "make_qa", "question_answer", "render", "render_audio", "render_image",
    "render_video", "sample_audio_spec", "sample_image_spec", "sample_spec", "sample_video_spec",
    "spec_from_dict", "write_dataset", "analyse", "analyse_audio", "analyse_image", "analyse_text",
    "analyse_video", "score", "score_batch",
]
