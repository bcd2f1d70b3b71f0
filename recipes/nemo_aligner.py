"""The NeMo-Aligner RL stages (GRPO, RLOO, online RPO) as one NeMo-Run experiment on Slurm.

    python recipes/nemo_aligner.py --dryrun --yes \
        run.executor=slurm_h100 run.executor.account=ACCOUNT run.executor.partition=batch \
        run.executor.container_image=IMAGE "run.executor.container_mounts=['/lustre/me:/results']" \
        aligner_image=ALIGNER_IMAGE start=/results/p/logs/sft work_dir=/results/rl \
        "rl_prompts=['/results/data/aligner_prompts.jsonl']" "reward_prompts=['/results/data/rl_prompts.jsonl']" \
        rpo_prompts=/results/data/chat_prompts.jsonl

Drop --dryrun to submit. Every argument of `nemo_plugins.nemo.pipeline.aligner_rl` is a key=value
override: "stages=['rloo']" runs one stage, start_is_hf=true starts from a HF directory (e.g. the
parent: RL before compression), reward_model=RM.nemo scores online RPO with Aligner's
serve_reward_model.py, "aligner_overrides={'rloo': ['trainer.reinforce.max_steps=50']}" passes Hydra
overrides to a stage. Each stage is a heterogeneous Slurm job: the reward server and the trainer.
"""

import sys

from nemo_plugins.nemo.pipeline import aligner_rl, cli_main

if __name__ == "__main__":
    sys.exit(cli_main(aligner_rl))
