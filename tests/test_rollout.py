"""The rollout engine (`model.rollout`): its own contract, and each of its four callers giving exactly
what a plain loop over `model.generate.generate` gives with the same prompts, batches and seeding
(the loop each caller ran before the engine existed)."""

import pytest
import torch

from nemo_plugins.arch import homogeneous
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data import tokenizer as T
from nemo_plugins.data.chat import EOS, render_example, render_prompt
from nemo_plugins.data.chat_tokenizer import as_chat
from nemo_plugins.data.curriculum import problems_by_id
from nemo_plugins.evaluate import task_accuracy
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model import rollout as engine
from nemo_plugins.model.generate import SamplingConfig, generate
from nemo_plugins.model.train import fit_lm
from nemo_plugins.rl import config as C
from nemo_plugins.rl import experience as X
from nemo_plugins.rl import grpo as G
from nemo_plugins.rl.pass_rates import estimate_pass_rates
from nemo_plugins.sft.toggle_eval import greedy_responses
from nemo_plugins.utils.training import OptimConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(rw.chat_texts(rw.generate_problems(300, seed=0)), vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    """Briefly trained on both modes, so some completions stop at EOS and others run to the limit."""
    torch.manual_seed(0)
    cfg = homogeneous(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=1, num_attention_heads=4,
                      num_kv_heads=2, intermediate_size=64, rope_theta=10000.0, max_position_embeddings=256)  # fmt: skip
    m = HeteroLlamaForCausalLM(cfg)
    examples = []
    for i, p in enumerate(rw.generate_problems(200, seed=1, difficulties=(1,))):
        thinking = i % 4 != 0
        examples.append(T.encode_example(tok, *render_example(p.question, rw.response_for(p, thinking), thinking)))
    fit_lm(m, examples, steps=40, batch_size=16, optim=OptimConfig(lr=1e-2, warmup_steps=5), progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def problems():
    return rw.generate_problems(9, seed=5, difficulties=(1, 2))


def plain_loop(model, tok, prompts, sampling, *, n=1, batch_size, seed=None):
    """The reference: each prompt n times in place, `batch_size` sequences per generate call, one
    generator seeded once; the tokenizer's stop tokens end every completion."""
    tok = as_chat(tok)
    sampling = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_p, tok.stop_ids)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    seqs = [p for p in prompts for _ in range(n)]
    out = []
    for start in range(0, len(seqs), batch_size):
        out += generate(model, seqs[start : start + batch_size], sampling, pad_id=tok.pad_id, generator=gen)
    return out


def prompts_of(tok, problems, thinking):
    modes = thinking if isinstance(thinking, list) else [thinking] * len(problems)
    return [as_chat(tok).prompt_ids(p.question, t) for p, t in zip(problems, modes)]


# ----------------------------------------------------------------------------- the engine itself


def test_completions_drop_the_stop_token_and_say_which_stopped(tok, monkeypatch):
    eos = T.token_id(tok, EOS)
    a, b, c = T.encode(tok, "The answer is")[:3]
    model = torch.nn.Linear(1, 1).train()
    seen = []

    def fake_generate(m, prompts, sampling, *, pad_id, generator):
        seen.append((len(prompts), m.training, sampling.stop_token_ids, generator))
        return [[a, b, eos], [a, b, c], [eos]][: len(prompts)]

    monkeypatch.setattr(engine, "generate", fake_generate)
    cfg = engine.RolloutConfig(SamplingConfig(max_new_tokens=3), n=3, batch_size=3)
    done = engine.sample(model, tok, [[a]], cfg)
    assert done.ids == [[a, b, eos], [a, b, c], [eos]] and done.prompt_ids == [[a]] * 3
    assert done.texts == [T.decode(tok, [a, b]), T.decode(tok, [a, b, c]), ""]
    assert done.lengths == [2, 3, 0] and done.stopped == [True, False, True]
    assert seen == [(3, False, as_chat(tok).stop_ids, None)]  # eval mode inside, EOS a stop, no generator
    assert model.training  # restored


def test_groups_are_contiguous_and_calls_hold_batch_size_sequences(tok, problems, monkeypatch):
    calls = []

    def fake_generate(m, prompts, sampling, *, pad_id, generator):
        calls.append([T.decode(tok, p) for p in prompts])
        return [[T.token_id(tok, EOS)] for _ in prompts]

    monkeypatch.setattr(engine, "generate", fake_generate)
    modes = [True, False, True]
    cfg = engine.RolloutConfig(SamplingConfig(temperature=1.0), n=3, batch_size=4)
    done = engine.sample_questions(torch.nn.Linear(1, 1), tok, [p.question for p in problems[:3]], modes, cfg)
    assert [len(c) for c in calls] == [4, 4, 1]
    assert [T.decode(tok, p) for p in done.prompt_ids] == [render_prompt(p.question, t)
                                                          for p, t in zip(problems[:3], modes) for _ in range(3)]  # fmt: skip


def test_the_seed_fixes_the_samples(tok, model, problems):
    cfg = engine.RolloutConfig(SamplingConfig(max_new_tokens=12, temperature=1.0), n=2, batch_size=5, seed=4)
    questions = [p.question for p in problems[:4]]
    first = engine.sample_questions(model, tok, questions, True, cfg)
    assert engine.sample_questions(model, tok, questions, True, cfg).ids == first.ids
    other = engine.RolloutConfig(cfg.sampling, n=2, batch_size=5, seed=5)
    assert engine.sample_questions(model, tok, questions, True, other).ids != first.ids


def test_stop_tokens_and_settings_are_checked(tok):
    s = engine.with_stop_tokens(SamplingConfig(stop_token_ids=(7,)), (3, 7))
    assert s.stop_token_ids == (7, 3)
    with pytest.raises(ValueError, match="n=0"):
        engine.RolloutConfig(n=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        engine.RolloutConfig(batch_size=0)
    with pytest.raises(ValueError, match="2 questions, 1 thinking modes"):
        engine.render_prompts(tok, ["a", "b"], [True])


# ----------------------------------------------------------------------------- the four callers


def both_kinds(done_stopped):
    """The comparison covers completions that stopped and completions cut at the limit."""
    return any(done_stopped) and not all(done_stopped)


@pytest.mark.parametrize("thinking", [True, False, None])
def test_task_accuracy_sees_the_plain_loop_texts(tok, model, problems, thinking):
    seen = []
    res = task_accuracy(model, tok, problems, thinking=thinking, batch_size=4, max_new_tokens=20,
                        verify=lambda text, p: seen.append(text) or rw.is_correct(text, p))  # fmt: skip
    outs = plain_loop(model, tok, prompts_of(tok, problems, thinking), SamplingConfig(20), batch_size=4)
    expected = [as_chat(tok).decode_response(o) for o in outs]
    assert seen == expected
    assert res["accuracy"] == sum(rw.is_correct(t, p) for t, p in zip(expected, problems)) / len(problems)


def test_greedy_responses_equal_the_plain_loop(tok, model, problems):
    every_stopped = []
    for thinking in (True, False):
        texts, lengths, stopped = greedy_responses(model, tok, problems, thinking, batch_size=4, max_new_tokens=12)
        outs = plain_loop(model, tok, prompts_of(tok, problems, thinking), SamplingConfig(12), batch_size=4)
        assert stopped == [o[-1] in as_chat(tok).stop_ids for o in outs]
        assert lengths == [len(o) - s for o, s in zip(outs, stopped)]
        assert texts == [as_chat(tok).decode_response(o) for o in outs]
        every_stopped += stopped
    assert both_kinds(every_stopped)


@pytest.mark.parametrize("seed", [0, 7])
def test_pass_rates_see_the_plain_loop_samples(tok, model, problems, seed):
    sampling, k = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9), 3
    seen = []
    rates = estimate_pass_rates(model, tok, problems, k, seed=seed, batch_size=4, sampling=sampling,
                                verify=lambda text, p: seen.append(text) or rw.is_correct(text, p))  # fmt: skip
    by_id = problems_by_id(problems)
    outs = plain_loop(model, tok, prompts_of(tok, list(by_id.values()), True), sampling, n=k, batch_size=4, seed=seed)
    expected = [as_chat(tok).decode_response(o) for o in outs]
    assert seen == expected
    flat = [rw.is_correct(t, p) for t, p in zip(expected, (p for p in by_id.values() for _ in range(k)))]
    assert list(rates.values()) == [sum(flat[j * k : (j + 1) * k]) / k for j in range(len(by_id))]


@pytest.mark.parametrize("step", [0, 3])
def test_grpo_rollout_equals_the_plain_loop(tok, model, problems, step):
    cfg = G.GRPOConfig(steps=2, prompts_per_step=4, group_size=3, max_new_tokens=14, generation_batch_size=5,
                       temperature=0.8, top_p=0.95, rewards=C.RewardSettings(workers=0), eval_problems=0)  # fmt: skip
    modes = X.choose_modes(5, 0.4, seed=1, step=step)
    seed = X.seed_for(1, "rollout", step)
    roll = X.rollout(model, tok, problems[:5], modes, cfg, seed)
    prompts = prompts_of(tok, problems[:5], modes)
    outs = plain_loop(model, tok, prompts, cfg.sampling, n=3, batch_size=5, seed=seed)
    assert roll.completions == outs and roll.prompt_ids == [p for p in prompts for _ in range(3)]
    assert roll.texts == [as_chat(tok).decode_response(o) for o in outs]
    assert roll.truncated == [o[-1] not in as_chat(tok).stop_ids for o in outs] and both_kinds(roll.truncated)
