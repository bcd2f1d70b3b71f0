"""The Puzzle -> recovery -> toggle-SFT pipeline as one NeMo-Run experiment.

    python recipes/nemo_pipeline.py --dryrun --yes \
        run.executor=slurm_h100 run.executor.account=ACCOUNT run.executor.partition=batch \
        run.executor.container_image=IMAGE "run.executor.container_mounts=['/lustre/me:/results']" \
        work_dir=/results/puzzle parent_size=8b "recovery_data=['/results/data/mix_text_document']" \
        "sft_data=['/results/sft/train.jsonl']"

Drop --dryrun to submit. Every argument of `nemo_plugins.nemo.pipeline.pipeline` is a key=value
override; without `run.executor=...` the jobs run here with torchrun. recovery_data is required
unless recovery=none. A parent beyond the default layouts (e.g. parent_size=405b) needs the
training layout as tp=, pp= and nodes=. Every job runs in the executor's container image, or
container_image=IMAGE; "images={'recovery': IMAGE2, 'sft': IMAGE2}" gives stages their own
(stages: prepare, bld, score, search, import_parent, import_child, recovery, sft).
"""

import sys


from nemo_plugins.nemo.pipeline import cli_main, pipeline

if __name__ == "__main__":
    sys.exit(cli_main(pipeline))
