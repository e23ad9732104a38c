"""Stage 1: align the projectors (LLaVA pre-training + NExT-GPT decoding alignment).

Encoding side (--captions): X -> caption, CE on caption tokens, only input projectors learn.
Decoding side (--generation): caption -> signal tokens, CE + L2 to the decoder's text
conditioning, only output projectors and signal-token rows learn. Give both for one run
(--stage stage1), or pick a side with --stage stage1_enc / stage1_dec.

    python scripts/train_stage1.py --model tiny --captions data/captions.jsonl \\
        --generation data/generation.jsonl --out runs/s1 --steps 1000
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_stage1.py ...
"""

from mmllm.training import train
from mmllm.training.cli import build_parser, config_from_args


def main(argv=None):
    parser = build_parser(__doc__.splitlines()[0], ("stage1", "stage1_enc", "stage1_dec"))
    cfg = config_from_args(parser.parse_args(argv))
    if not cfg.stage.startswith("stage1"):
        parser.error(f"stage {cfg.stage!r} is not a stage-1 stage; use scripts/train_stage2.py")
    print(train(cfg).summary())


if __name__ == "__main__":
    main()
