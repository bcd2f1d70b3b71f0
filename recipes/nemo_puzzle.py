"""One Puzzle task as a NeMo-Run job: prepare | bld | score | search | import_hf.

    python recipes/nemo_puzzle.py bld --yes preset=h100 "overrides=['cache_dir=/results/cache']" \
        run.executor=slurm_h100 run.executor.account=ACCOUNT run.executor.nodes=2 ... [--dryrun]

BLD and scoring split the block library over every process the executor starts (one per GPU).
Same as `nemo nemo_plugins puzzle_<task> ...` once the entry point is installed.
"""

import sys

from nemo_plugins.nemo import puzzle_tasks
from nemo_plugins.nemo.pipeline import cli_main

TASKS = {
    "prepare": puzzle_tasks.puzzle_prepare,
    "bld": puzzle_tasks.puzzle_bld,
    "score": puzzle_tasks.puzzle_score,
    "search": puzzle_tasks.puzzle_search,
    "import_hf": puzzle_tasks.import_hf,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        sys.exit(f"usage: python recipes/nemo_puzzle.py {{{'|'.join(TASKS)}}} [key=value ...] [--dryrun]")
    sys.exit(cli_main(TASKS[sys.argv.pop(1)]))
