"""The curriculum sampler through NeMo-Aligner's dataloader path: Aligner's `RLHFDataset` over the
prompt file, `build_curriculum_dataloader` per data-parallel rank, Aligner's `DefaultBatchIterator`
and `collate_with_pad_to_max_batch`, as `ReinforceTrainer._run_inference` uses them.

Two ranks together must return exactly the core's curriculum batch of each step (the core's
`CurriculumSampler` over the pass rates below the threshold), each row once, under the thinking
mode GRPO's `choose_modes` gives it; a dataloader rebuilt at `consumed_samples` must continue
the sequence an uninterrupted run draws.
"""

import json
from collections import Counter

import pytest

pytestmark = pytest.mark.aligner

GBS, MBS, DP = 8, 2, 2


class _NemoStyleTokenizer:
    """The two members Aligner's RLHFDataset uses, over the project's ChatTokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_id

    def text_to_ids(self, text):
        return self.tok.encode(text)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from nemo_plugins.aligner.prompt_set import load_prompt_set, write_aligner_prompts
    from nemo_plugins.data.chat import render_example
    from nemo_plugins.data.chat_tokenizer import ChatTokenizer
    from nemo_plugins.data.curriculum import problem_id
    from nemo_plugins.data.problems import TaskProblem
    from nemo_plugins.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("cur")
    questions = [f"What is {a} + {b}?" for a in range(1, 6) for b in range(1, 5)]  # 20 problems
    tok = ChatTokenizer.tiny(train_tokenizer([render_example(q, "The answer is 3.", True)[0] for q in questions] * 5, 300))
    with open(d / "prompts.jsonl", "w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"prompt": q, "answer": 3, "task": "world", "id": i}) + "\n")
    prompt_set = load_prompt_set([d / "prompts.jsonl"], tok, (True, False))
    write_aligner_prompts(prompt_set, d / "aligner.jsonl")
    # pass rates spread over 5 levels; four problems at >= 0.75 are filtered out
    rates = {problem_id(TaskProblem(q, "3", str(i))): [0.0, 0.25, 0.5, 0.625, 0.875][i % 5] for i, q in enumerate(questions)}
    return d, tok, prompt_set, rates


def _aligner_dataset(path, tok):
    from omegaconf import OmegaConf
    from nemo_aligner.data.nlp.datasets import RLHFDataset

    rows = [json.loads(line) for line in open(path)]
    cfg = OmegaConf.create({"data": {"data_impl": "jsonl"}})
    return RLHFDataset(cfg, _NemoStyleTokenizer(tok), "train", None, list(range(len(rows))), rows, seq_length=512, seed=0)


def _rollout_step(dataset, plan, consumed, monkeypatch, rollouts_per_prompt=1):
    """One step's prompts as `ReinforceTrainer._run_inference` collects them, rank by rank."""
    from omegaconf import OmegaConf
    from nemo_aligner.data.nlp.builders import collate_with_pad_to_max_batch
    from nemo_aligner.utils import parallel_state
    from nemo_aligner.utils.batch_iterators import DefaultBatchIterator

    from nemo_plugins.aligner.curriculum_sampler import build_curriculum_dataloader

    cfg = OmegaConf.create({"model": {"data": {"num_workers": 0}}})
    collate = collate_with_pad_to_max_batch(64, dataset.tokenizer.eos_id, cfg, generate_masks_and_position_ids=False)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: DP)
    per_rank = []
    for rank in range(DP):
        monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda rank=rank: rank)
        loader = build_curriculum_dataloader(cfg=cfg, dataset=dataset, consumed_samples=consumed, mbs=MBS, gbs=GBS,
                                             collate_fn=collate, plan=plan, rollouts_per_prompt=rollouts_per_prompt)  # fmt: skip
        n_micro = loader.batch_sampler.global_batch_size // loader.batch_sampler.micro_batch_size // DP
        batches = list(DefaultBatchIterator(iter(loader.batch_sampler), n_micro, loader.dataset, collate))
        rows = []
        for b in batches:
            for ids, n in zip(b["text"].tolist(), b["length"].tolist()):
                rows.append(tuple(ids[:n]))
        per_rank.append(rows)
    return per_rank


def test_two_ranks_return_the_core_curriculum_and_resume(setup, monkeypatch):
    from nemo_plugins.aligner.curriculum_batches import CurriculumPlan, CurriculumSettings
    from nemo_plugins.aligner.prompt_index import PromptIndex
    from nemo_plugins.data.curriculum import CurriculumConfig, CurriculumSampler
    from nemo_plugins.rl.experience import choose_modes

    d, tok, prompt_set, rates = setup
    dataset = _aligner_dataset(d / "aligner.jsonl", tok)
    settings = CurriculumSettings(threshold=0.75, total_batches=6, seed=3, off_fraction=0.25)
    plan = CurriculumPlan(prompt_set, rates, GBS, settings)
    index = PromptIndex(prompt_set.rows, tok.encode)
    kept = {k: r for k, r in rates.items() if r < 0.75}
    core = CurriculumSampler(kept, CurriculumConfig(batch_size=GBS, total_batches=6, seed=3))

    steps = 6
    drawn = []
    consumed = 0
    for step in range(steps):
        per_rank = _rollout_step(dataset, plan, consumed, monkeypatch)
        assert [len(r) for r in per_rank] == [GBS // DP] * DP
        rows = [index.match(ids) for rank in per_rank for ids in rank]
        assert all(m is not None and m[1] == len(ids) for m, ids in zip(rows, [i for r in per_rank for i in r]))
        got = Counter((m[0].problem_id, m[0].thinking) for m in rows)
        want_ids = core.next_batch()
        modes = choose_modes(GBS, 0.25, 3, step)
        assert got == Counter(zip(want_ids, modes)), f"step {step}"
        assert all(rates[pid] < 0.75 for pid, _ in got)  # filtered prompts never drawn
        assert sum(not t for _, t in got) == 2  # round(0.25 x 8) thinking off
        drawn.append(got)
        consumed += GBS  # what the trainer adds per step: the prompts of the rollout

    # the curriculum moves from easy to hard: mean pass rate of the first batch above the last
    mean = [sum(rates[p] * c for (p, _), c in g.items()) / GBS for g in drawn]
    assert mean[0] > mean[-1]

    # a fresh plan (a restarted job) resumed at consumed_samples draws the same batches
    for step in (4, 2):
        fresh = CurriculumPlan(prompt_set, rates, GBS, settings)
        per_rank = _rollout_step(dataset, fresh, step * GBS, monkeypatch)
        got = Counter((index.match(ids)[0].problem_id, index.match(ids)[0].thinking) for r in per_rank for ids in r)
        assert got == drawn[step]

    # Aligner 0.7.0's ReinforceTrainer counts rollout rows (prompts x G) in consumed_samples
    per_rank = _rollout_step(dataset, CurriculumPlan(prompt_set, rates, GBS, settings), 3 * GBS * 4, monkeypatch, 4)
    assert Counter((index.match(ids)[0].problem_id, index.match(ids)[0].thinking) for r in per_rank for ids in r) == drawn[3]


def test_sampler_refuses_mismatched_settings(setup):
    from nemo_plugins.aligner.curriculum_batches import CurriculumPlan
    from nemo_plugins.aligner.curriculum_sampler import CurriculumBatchSampler

    _, _, prompt_set, rates = setup
    plan = CurriculumPlan(prompt_set, rates, GBS)
    common = dict(micro_batch_size=MBS, data_parallel_rank=0, data_parallel_size=DP, global_batch_size=GBS)
    with pytest.raises(ValueError, match="consumed_samples=3: expected a multiple of global_batch_size x rollouts_per_prompt"):
        CurriculumBatchSampler(plan, total_samples=len(prompt_set.rows), consumed_samples=3, **common)
    with pytest.raises(ValueError, match="dataset of 7 rows, prompt file of 40"):
        CurriculumBatchSampler(plan, total_samples=7, consumed_samples=0, **common)
    with pytest.raises(ValueError, match="ids are not problems of the prompt file"):
        CurriculumPlan(prompt_set, {**rates, "nope": 0.5}, GBS)
