"""Continued pretraining of a Puzzle child (llm.pretrain, factory puzzle_cpt).

    python recipes/nemo_cpt.py --yes --factory "puzzle_cpt(data_paths=['/data/mix_text_document'])" \
        trainer.max_steps=1000 [--dryrun]

Same as `nemo llm pretrain --factory puzzle_cpt ...` once the entry point is installed. Training
data is a factory argument (data_paths=, or mock=True for random tokens); without it the recipe
fails naming data_paths.
"""

import sys

from nemo.collections import llm

from nemo_plugins.nemo.pipeline import cli_main
from nemo_plugins.nemo.recipes import cpt_recipe

if __name__ == "__main__":
    sys.exit(cli_main(llm.pretrain, default_factory=cpt_recipe))
