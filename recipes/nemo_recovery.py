"""Recovery distillation of a Puzzle child from its parent (llm.distill, factory puzzle_recovery).

    python recipes/nemo_recovery.py --yes \
        --factory "puzzle_recovery(student='/checkpoints/child', teacher='/checkpoints/parent', data_paths=['/data/mix_text_document'])" \
        trainer.max_steps=1000 run.executor=slurm_h100 run.executor.account=ACCOUNT ... [--dryrun]

Same as `nemo llm distill --factory puzzle_recovery ...` once the nemo_run.cli entry point is
installed. Factory arguments (data_paths= is required, or mock=True) go in the factory call.
"""

import sys

from nemo.collections import llm

from nemo_plugins.nemo.pipeline import cli_main
from nemo_plugins.nemo.recipes import recovery_recipe

if __name__ == "__main__":
    sys.exit(cli_main(llm.distill, default_factory=recovery_recipe))
