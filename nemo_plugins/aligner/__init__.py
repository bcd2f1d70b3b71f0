"""NeMo-Aligner 0.7.0 adapter: the core's rule rewards as a PyTriton reward server that Aligner's
own `RemoteGPTRMClient` talks to, the core's curriculum as a batch sampler for Aligner's
dataloader builder, and GRPO as subclasses of Aligner's REINFORCE actor and trainer
(`grpo_actor`, `grpo_trainer`, run by `train_grpo`).

Aligner needs NeMo 2.3.3, which conflicts with the main environment's NeMo 2.7.3, so it lives in
a venv of its own (README, "NeMo-Aligner plugins"). Modules that need Aligner, NeMo or PyTriton
import them through `deps.require`, which names the `aligner` extra when they are missing; the
rest (`prompt_set`, `prompt_index`, `verifier`, `curriculum_batches`, `grpo_config`,
`grpo_groups`) import only the core.
"""
