"""Reasoning-toggle SFT of a Puzzle child (llm.finetune, factory puzzle_toggle_sft).

    python recipes/nemo_toggle_sft.py --yes \
        --factory "puzzle_toggle_sft(start='/results/logs/recovery', data_paths=['/data/sft/math.jsonl'])" \
        trainer.max_steps=500 run.executor=slurm_h100 run.executor.account=ACCOUNT ... [--dryrun]

Same as `nemo llm finetune --factory puzzle_toggle_sft ...` once the entry point is installed.
"""

import sys

from nemo.collections import llm

from nemo_plugins.nemo.pipeline import cli_main
from nemo_plugins.nemo.recipes import toggle_sft_recipe

if __name__ == "__main__":
    sys.exit(cli_main(llm.finetune, default_factory=toggle_sft_recipe))
