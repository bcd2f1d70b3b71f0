"""The optional `model.reinforce.curriculum` block of an Aligner RL config: the core's curriculum
(`curriculum_batches.CurriculumPlan`) in place of Aligner's random prompt order.

    curriculum:
      prompts: [train.jsonl]      # the project's prompt JSONL the train prompt file was written from
      tokenizer: MODEL_DIR        # the chat tokenizer prompt_set rendered them with
      modes: [true, false]        # thinking modes, as given to prompt_set
      pass_rates: pass_rates.json # {problem_id: rate} from a prior model (the GRPO stage's file)
      threshold: 0.75             # prompts solved at >= this rate are never drawn
      total_batches: null         # steps the schedule spans; null: trainer.reinforce.max_steps
      seed: 0
      off_fraction: 0.0           # share of each batch under "detailed thinking off"
      sampler: {}                 # rl.config.SamplerSettings: kind (curriculum | random), std, centre_start, ...

Imports only the core; `curriculum_sampler` (NeMo) is imported by the caller that builds the loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from ..data.chat_tokenizer import ChatTokenizer
from ..rl.config import SamplerSettings
from .curriculum_batches import CurriculumPlan, CurriculumSettings, load_pass_rates
from .prompt_set import load_prompt_set

CONFIG_PATH = "model.reinforce.curriculum"
REQUIRED = ("prompts", "tokenizer", "pass_rates")
OPTIONAL = ("modes", "threshold", "total_batches", "seed", "off_fraction", "sampler")


def curriculum_plan(block: Mapping, global_batch_size: int, max_steps: int, where: str = CONFIG_PATH) -> CurriculumPlan:
    """The plan the curriculum block describes, for prompt batches of `global_batch_size`
    (`model.reinforce.num_rollout_samples`); `max_steps` (`trainer.reinforce.max_steps`) is the
    schedule's length unless `total_batches` is given. Bad keys and values fail naming `where.<key>`."""
    block = dict(block)
    unknown = sorted(set(block) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; expected some of {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if block.get(k) is None]
    if missing:
        raise ValueError(f"{where}.{missing[0]}: missing; expected {', '.join(REQUIRED)} (see curriculum_config)")
    total = block.get("total_batches")
    if total is None:
        if max_steps is None or max_steps < 1:
            raise ValueError(f"{where}.total_batches: missing, and trainer.reinforce.max_steps={max_steps} does not "
                             "say how many steps the schedule spans; set one of them")  # fmt: skip
        total = max_steps
    sampler = dict(block.get("sampler") or {})
    known = {f.name for f in fields(SamplerSettings)}
    if set(sampler) - known:
        raise ValueError(f"{where}.sampler.{sorted(set(sampler) - known)[0]}: unknown key; expected some of {', '.join(sorted(known))}")
    prompts = block["prompts"]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    try:
        settings = CurriculumSettings(sampler=SamplerSettings(**sampler), threshold=float(block.get("threshold", 0.75)),
                                      total_batches=int(total), seed=int(block.get("seed", 0)),
                                      off_fraction=float(block.get("off_fraction", 0.0)))  # fmt: skip
        prompt_set = load_prompt_set(prompts, ChatTokenizer.from_dir(block["tokenizer"]), tuple(block.get("modes", (True, False))))
        return CurriculumPlan(prompt_set, load_pass_rates(block["pass_rates"]), global_batch_size, settings)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
