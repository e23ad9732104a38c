"""Stage 2: instruction tuning on multi-turn conversations (LoRA + projectors + signal rows).

Only assistant turns are supervised (mask from the tokenizer's chat template); assistant
turns with a <gen:MOD> marker also get the L2 loss to their caption's decoder embedding.
Start from stage 1's output directory:

    python scripts/train_stage2.py --model runs/s1 --conversations data/dialogues.json \\
        --out runs/s2 --steps 1000 --lr 2e-4 --projector-lr 2e-5
"""

from mmllm.training import train
from mmllm.training.cli import build_parser, config_from_args


def main(argv=None):
    parser = build_parser(__doc__.splitlines()[0], ("stage2",))
    cfg = config_from_args(parser.parse_args(argv), stage="stage2")
    print(train(cfg).summary())


if __name__ == "__main__":
    main()
