"""Reasoning-toggle SFT: loss on response tokens only, packed step equal to the unpacked one, real
gradient accumulation, crash-and-resume equal to an uninterrupted run, SFT teaching a tiny model the
toggle, the toggle evaluation's counts on crafted answers, and the stage's files and resume."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nemo_plugins.arch.config import homogeneous
from nemo_plugins.config import CONF_DIR, load_config
from nemo_plugins.data import sft_data as S
from nemo_plugins.data.chat import EOS, THINKING_ON, render_prompt
from nemo_plugins.data.reasoning_world import Problem
from nemo_plugins.data.tiny_world import WorldConfig, build_world
from nemo_plugins.data.tokenizer import decode, encode, token_id
from nemo_plugins.model import rollout as engine
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.model.llama import HeteroLlamaForCausalLM
from nemo_plugins.sft import SFTConfig, SFTStageConfig, evaluate_toggle, run_sft, run_sft_stage
from nemo_plugins.sft import stage as sft_stage
from nemo_plugins.sft import toggle_eval
from nemo_plugins.sft import train as sft_train
from nemo_plugins.sft.train import build_rows, response_starts, sequence_marks, step_loss, step_micro_batches
from nemo_plugins.utils.resume import latest

from training_callbacks import Crash, Steps




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world of one-operation problems with its own tokenizer (trained in well under a second)."""
    cfg = WorldConfig(n_train=300, n_eval=16, difficulties=[1], vocab_size=300)
    return build_world(cfg, root=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def data(world):
    """(train, val) tokenized on/off pairs of the world's problems."""
    train, _ = S.tokenize_examples(world.tokenizer, S.world_paired_examples(world.train))
    val, _ = S.tokenize_examples(world.tokenizer, S.world_paired_examples(world.eval))
    return train, val


def tiny(world, seed=0, hidden=32):
    torch.manual_seed(seed)
    cfg = homogeneous(
        vocab_size=world.tokenizer.get_vocab_size(), hidden_size=hidden, num_layers=2,
        num_attention_heads=4, num_kv_heads=2, intermediate_size=2 * hidden,
    )  # fmt: skip
    return HeteroLlamaForCausalLM(cfg)


def small_cfg(**kw):
    base = dict(steps=6, batch_size=2, max_len=96, lr=5e-3, warmup_steps=1, val_every=2, ckpt_every=3, val_batches=1)
    return SFTConfig(**{**base, **kw})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [(SFTConfig, {"steps": 0}, "sft.steps=0"), (SFTConfig, {"grad_accum": -1}, "sft.grad_accum=-1"),
     (SFTConfig, {"lr": 0.0}, "sft.lr=0.0"), (SFTConfig, {"precision": "fp8"}, "sft.precision='fp8'"),
     (SFTConfig, {"max_len": 1}, "sft.max_len=1"), (SFTConfig, {"val_batches": -1}, "sft.val_batches=-1"),
     (SFTStageConfig, {"jsonl_format": "csv"}, "sft.jsonl_format='csv'"),
     (SFTStageConfig, {"eval_problems": 0}, "sft.eval_problems=0"),
     (SFTStageConfig, {"world_problems": 0}, "no training data")],
)  # fmt: skip
def test_config_errors_name_the_field(cls, kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        cls(**kwargs)


def test_tiny_yaml_matches_the_stage_config():
    @dataclass
    class Root:
        sft: SFTStageConfig = field(default_factory=SFTStageConfig)

    cfg = load_config(Root, CONF_DIR / "sft" / "tiny.yaml", ["sft.steps=7"]).sft
    assert isinstance(cfg, SFTStageConfig) and cfg.steps == 7 and cfg.pack and cfg.eval_problems == 250


# ----------------------------------------------------------------------------- the loss


class FixedLogits(torch.nn.Module):
    """Logits that ignore the input: only the targets (the tokens) can change the loss."""

    def __init__(self, B, T, V, seed=0):
        super().__init__()
        self.logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed))

    def forward(self, ids, positions=None, attn_mask=None):
        return self.logits[: ids.shape[0], : ids.shape[1]]


@pytest.mark.parametrize("pack", [False, True])
def test_loss_counts_response_tokens_only(pack):
    # two examples, both with a 3-token prompt; the second starts with a counted token, which
    # packing must not turn into a target of the first example's last token
    examples = [([5, 6, 7, 8, 9, 10], [0, 0, 0, 1, 1, 1]), ([11, 12, 13, 14, 15], [1, 0, 0, 1, 1])]
    cfg = SFTConfig(batch_size=2, max_len=16, pack=pack)
    model = FixedLogits(2, 16, 20)

    def loss(exs):
        rows = build_rows(exs, cfg.max_len, cfg.pack, cfg.seed)
        return step_loss(model, step_micro_batches(exs, rows, list(range(len(rows))), cfg))

    base = loss(examples)
    for e, t in [(0, 1), (0, 2), (1, 0), (1, 2)]:  # prompt tokens (and example 2's first token)
        changed = [(list(ids), m) for ids, m in examples]
        changed[e][0][t] = 19
        assert loss(changed) == base, (e, t)
    for e, t in [(0, 3), (0, 5), (1, 4)]:  # response tokens
        changed = [(list(ids), m) for ids, m in examples]
        changed[e][0][t] = 19
        assert loss(changed) != base, (e, t)


@pytest.mark.parametrize("pack", [False, True])
def test_example_average_weighs_every_example_alike(pack):
    """loss_average=example: the mean over examples of each example's mean token loss, computed
    here example by example with torch's cross-entropy (a long and a short response)."""
    examples = [([5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 0, 1, 1, 1, 1, 1, 1, 1]), ([14, 15, 16, 17], [0, 0, 0, 1])]
    model = FixedLogits(2, 16, 20, seed=3)
    cfg = SFTConfig(batch_size=2, max_len=16, pack=pack, loss_average="example")
    rows = build_rows(examples, cfg.max_len, cfg.pack, cfg.seed)
    got = step_loss(model, step_micro_batches(examples, rows, list(range(len(rows))), cfg), loss_average="example")

    if not pack:  # one example a row: row r's logits score example r
        want = (float(_row_mean(model, examples[0], row=0)) + float(_row_mean(model, examples[1], row=1))) / 2
        assert got == pytest.approx(want, rel=1e-6)
    token = step_loss(model, step_micro_batches(examples, rows, list(range(len(rows))), cfg), loss_average="token")
    assert got != pytest.approx(token)  # 7 vs 1 counted tokens: the averages differ
    with pytest.raises(ValueError, match="sft.loss_average='mean'"):
        SFTConfig(loss_average="mean")


def _row_mean(model, example, row):
    ids, mask = example
    logits = model.logits[row, : len(ids)]
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return nll[torch.tensor(mask[1:]).bool()].mean()


def test_packed_step_equals_unpacked_step(world, data, tmp_path):
    train = data[0][:24]
    model = tiny(world)
    results = {}
    for pack in (True, False):
        cfg = SFTConfig(batch_size=4, max_len=96, pack=pack)
        rows = build_rows(train, cfg.max_len, pack, cfg.seed)
        model.zero_grad()
        batch = step_micro_batches(train, rows, list(range(len(rows))), cfg)
        loss = step_loss(model, batch, lambda x: x.backward())
        results[pack] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()}, len(rows), batch)
    (lp, gp, rows_p, batch_p), (lu, gu, rows_u, _) = results[True], results[False]
    assert rows_p < rows_u == 24 and batch_p[0][0].shape[1] > max(len(x) for x, _ in train)  # rows hold several
    assert lp == pytest.approx(lu, abs=1e-5)
    for n in gp:
        torch.testing.assert_close(gp[n], gu[n], rtol=1e-4, atol=1e-6, msg=n)
    # the same through run_sft: one step over every example, packed rows vs one example a row
    losses = {}
    for pack, bs in ((True, rows_p), (False, rows_u)):
        cfg = small_cfg(steps=1, batch_size=bs, pack=pack, val_every=1, ckpt_every=1)
        losses[pack] = run_sft(tiny(world), train, data[1], cfg, tmp_path / str(pack))["final_train_loss"]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


# ----------------------------------------------------------------------------- the loop


def test_grad_accumulation_equals_one_large_batch(world, data, tmp_path):
    train, val = data
    results = {}
    for name, (bs, accum) in {"accum": (2, 2), "large": (4, 1)}.items():
        model = tiny(world, seed=1)
        sizes = []  # rows of every training forward: accumulation must run real micro-batches
        model.model.embed_tokens.register_forward_hook(lambda m, a, o: sizes.append(len(a[0])) if m.training else None)
        summary = run_sft(model, train, val, small_cfg(steps=3, batch_size=bs, grad_accum=accum), tmp_path / name)
        results[name] = (weights(model), summary)
        assert sizes == [bs] * (3 * accum)
    (wa, sa), (wl, sl) = results["accum"], results["large"]
    assert sa["final_train_loss"] == pytest.approx(sl["final_train_loss"], rel=1e-5)
    start = tiny(world, seed=1).state_dict()
    # 3 Adam steps at lr 5e-3 move weights by ~1e-2; fp32 summation order differs between the
    # two runs and Adam amplifies it on near-zero gradients (1.02e-5 measured on one CPU), so 5e-5
    # is noise; dropping the second micro-batch moves them by 2.5e-2 (measured).
    for k in wa:
        torch.testing.assert_close(wa[k], wl[k], rtol=0, atol=5e-5, msg=k)
    assert not all(torch.equal(wa[k], start[k]) for k in wa)  # it did train


def test_crash_then_resume_equals_uninterrupted_run(world, data, tmp_path, monkeypatch):
    train, val = data[0][:24], data[1]
    cfg = small_cfg(steps=8, batch_size=2, grad_accum=2, ckpt_every=3, val_every=2, max_len=96)
    rows = build_rows(train, cfg.max_len, True, cfg.seed)
    assert len(rows) < len(train) and len(rows) // cfg.rows_per_step < cfg.steps  # packed; crosses an epoch

    clean = tiny(world, seed=1)
    ref = run_sft(clean, train, val, cfg, tmp_path / "clean")

    with pytest.raises(RuntimeError, match="simulated crash after step 5"):
        run_sft(tiny(world, seed=1), train, val, cfg, tmp_path / "crashed", callbacks=[Crash(5)])
    assert latest(tmp_path / "crashed" / "checkpoints").name == "step-00000003"

    resumed, steps = tiny(world, seed=7), Steps()  # another init: the weights must come from the checkpoint
    out = run_sft(resumed, train, val, cfg, tmp_path / "crashed", callbacks=[steps])
    assert steps.seen == [4, 5, 6, 7, 8] and out["start_step"] == 3 and out["steps"] == 8
    final = weights(resumed)
    for k, v in weights(clean).items():
        assert torch.equal(final[k], v), k
    assert [r["step"] for r in out["val_history"]] == [0, 2, 4, 6, 8]  # no rows duplicated by the crash
    for a, b in zip(out["val_history"], ref["val_history"]):
        assert a["val_lm_loss"] == pytest.approx(b["val_lm_loss"], abs=1e-6)
    assert (tmp_path / "crashed" / "metrics.csv").read_text().splitlines()[0] == "step,train_loss,val_lm_loss,lr"
    assert (tmp_path / "crashed" / "metrics.csv").read_text().count("\n") == 6

    monkeypatch.setattr(sft_train, "_fit", lambda *a, **k: pytest.fail("trained again"))
    again = tiny(world, seed=9)
    done = run_sft(again, train, val, cfg, tmp_path / "crashed")
    assert done["start_step"] == done["steps"] == 8
    assert all(torch.equal(v, final[k]) for k, v in weights(again).items())


def test_sft_teaches_the_toggle(world, data, tmp_path):
    train, val = data
    model = tiny(world, hidden=64)
    kw = dict(batch_size=16, max_new_tokens=24)
    before = evaluate_toggle(model, world.tokenizer, world.eval, **kw)
    cfg = small_cfg(steps=60, batch_size=4, lr=1e-2, warmup_steps=3, val_every=20, ckpt_every=60, val_batches=2)
    out = run_sft(model, train, val, cfg, tmp_path)
    after = evaluate_toggle(model, world.tokenizer, world.eval, **kw)
    assert before["on"]["adherence"] == 0.0  # a random model never writes a think block
    assert after["on"]["adherence"] >= 0.9 and after["off"]["adherence"] >= 0.9
    assert after["on"]["mean_response_tokens"] > after["off"]["mean_response_tokens"] + 5  # the trace
    history = out["val_history"]
    assert history[-1]["val_lm_loss"] < 0.25 * history[0]["val_lm_loss"]
    png = Path(out["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert out["data"]["rows"] < out["data"]["examples"] == 600 and 0.5 < out["data"]["pack_fill"] <= 1


# ----------------------------------------------------------------------------- toggle evaluation


def test_toggle_eval_counts_crafted_answers(world, monkeypatch):
    problems = [Problem(f"What is 1 + {i}?", (f"1 + {i} = {i + 1}",), i + 1, 1) for i in range(6)]
    on = [
        "<think>1 + 0 = 1</think>The answer is 1.",  # adherent, correct, well formatted
        "<think>x</think>The answer is 9.",  # adherent, wrong
        "The answer is 3.",  # no think block: not adherent; correct
        "<think>a</think><think>b</think>The answer is 4.",  # two blocks: not adherent; correct
        "The answer is 5.<think>x</think>",  # misplaced block: not adherent; no answer after it
        "<think>1 + 5 = 6",  # cut off at max_new_tokens (no EOS): not adherent, wrong
    ]
    off = [
        "The answer is 1.",  # adherent, correct, formatted
        "<think>1</think>The answer is 2.",  # think tags: not adherent; correct
        "The answer is 4.",  # adherent, wrong, formatted
        "</think>The answer is 4.",  # a stray tag: not adherent; correct
        "The answer is 5. I think",  # adherent, correct, not formatted
        "",  # adherent (no tag), wrong
    ]
    tok = world.tokenizer
    eos = token_id(tok, EOS)
    truncated = {on[5]}
    responses = {render_prompt(p.question, True): r for p, r in zip(problems, on)}
    responses |= {render_prompt(p.question, False): r for p, r in zip(problems, off)}
    seen = []

    def fake_generate(model, prompts, sampling, pad_id=0, generator=None):
        assert sampling.temperature == 0 and sampling.stop_token_ids == (eos,) and sampling.max_new_tokens == 7
        out = []
        for ids in prompts:
            text = decode(tok, ids)
            seen.append(text)
            r = encode(tok, responses[text])
            out.append(r if responses[text] in truncated else r + [eos])
        return out

    monkeypatch.setattr(engine, "generate", fake_generate)
    res = evaluate_toggle(torch.nn.Linear(1, 1), tok, problems, batch_size=4, max_new_tokens=7)
    assert sorted(seen) == sorted(responses)  # every problem in both modes, as the chat prompt
    assert json.loads(json.dumps(res)) == res
    assert res["on"]["n"] == res["off"]["n"] == 6
    assert res["on"]["adherence"] == pytest.approx(2 / 6) and res["off"]["adherence"] == pytest.approx(4 / 6)
    assert res["on"]["accuracy"] == pytest.approx(3 / 6) and res["off"]["accuracy"] == pytest.approx(4 / 6)
    assert res["on"]["format_ok"] == pytest.approx(2 / 6) and res["off"]["format_ok"] == pytest.approx(2 / 6)
    # entering the mode: on, opening with <think> (the two adherent ones, the two-block one, the cut one)
    assert res["on"]["enters_mode"] == pytest.approx(4 / 6) and res["off"]["enters_mode"] == res["off"]["adherence"]
    assert res["on"]["truncated"] == pytest.approx(1 / 6) and res["off"]["truncated"] == 0
    for mode, texts in (("on", on), ("off", off)):  # tokens without the stop token
        assert res[mode]["mean_response_tokens"] == pytest.approx(sum(len(encode(tok, t)) for t in texts) / 6)


# ----------------------------------------------------------------------------- the stage


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_stage_writes_report_and_model_and_resumes_without_retraining(world, tmp_path, monkeypatch):
    jsonl = write_jsonl(tmp_path / "extra.jsonl", [
        {"messages": [{"role": "system", "content": THINKING_ON}, {"role": "user", "content": "What is 2 + 2?"},
                      {"role": "assistant", "content": "The answer is 4."}], "reasoning": "2 + 2 = 4"},
        {"messages": [{"role": "user", "content": "What is 3 + 3?"},
                      {"role": "assistant", "content": "The answer is 6."}], "thinking": False},
        "not json",
    ])  # fmt: skip
    cfg = SFTStageConfig(
        steps=4, batch_size=2, max_len=96, lr=5e-3, warmup_steps=1, val_every=2, ckpt_every=2, val_batches=1,
        world_problems=20, val_problems=4, train_jsonl=[jsonl], eval_problems=4, eval_batch_size=4, max_new_tokens=6,
    )  # fmt: skip
    out = tmp_path / "sft"
    start = tiny(world, seed=3)
    report, model = run_sft_stage(start, world, cfg, out)
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(report["before"]) == set(report["after"]) == {"on", "off"} and report["after"]["on"]["n"] == 4
    d = report["data"]
    assert (d["world_problems"], d["world_examples"], d["by_mode"]) == (20, 40, {"on": 21, "off": 21})
    jl = d["jsonl"]
    assert (jl["read"], jl["kept"], jl["skipped"], jl["reasons"]) == (3, 2, 1, {"bad_json": 1})
    assert d["tokenized"]["kept"] == 42 and d["val_examples"] == 8
    assert report["train"]["steps"] == 4 and report["train"]["start_step"] == 0
    run_dir = Path(report["run_dir"])
    assert run_dir.parent == out and (run_dir / "metrics.csv").is_file() and (run_dir / "sft.png").is_file()
    loaded = load_checkpoint(out / "model")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert (out / "model" / "tokenizer.json").read_text() == world.tokenizer.to_str()

    # again, from the same starting weights: the finished run and its evaluations are reused
    monkeypatch.setattr(sft_train, "_fit", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(sft_stage, "evaluate_toggle", lambda *a, **k: pytest.fail("evaluated again"))
    again, model2 = run_sft_stage(tiny(world, seed=3), world, cfg, out)
    assert again["after"] == report["after"] and again["run_dir"] == report["run_dir"]
    assert again["train"]["start_step"] == 4
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in model.state_dict().items())
    # other starting weights are another run, not a resume of this one
    monkeypatch.undo()
    other, _ = run_sft_stage(tiny(world, seed=4), world, cfg, out)
    assert other["run_dir"] != report["run_dir"] and other["train"]["start_step"] == 0


STAGE_KW = dict(steps=1, batch_size=2, max_len=96, warmup_steps=0, val_every=1, ckpt_every=1, val_batches=1,
                world_problems=4, val_problems=2, eval_problems=3, eval_batch_size=3, max_new_tokens=4)  # fmt: skip


def record_toggle_calls(monkeypatch) -> list:
    """Replace the stage's evaluate_toggle by one that records each call's (on, off) penalties and
    scores adherence as the off penalty (on answers: the on penalty), so tests see which ran."""
    calls = []

    def fake_toggle(model, tok, problems, **kw):
        calls.append((kw["repetition_penalty"], kw["repetition_penalty_off"]))
        score = {"accuracy": 0.0, "mean_response_tokens": 1.0, "n": len(problems)}
        return {"on": {**score, "adherence": kw["repetition_penalty"]},
                "off": {**score, "adherence": kw["repetition_penalty_off"]}}  # fmt: skip

    monkeypatch.setattr(sft_stage, "evaluate_toggle", fake_toggle)
    return calls


def test_a_repetition_penalty_decodes_the_toggle_eval_and_the_report_keeps_plain_greedy(world, tmp_path, monkeypatch):
    """sft.repetition_penalty=1.3: before and after are decoded with it, the SFT model is also
    scored under plain greedy (`after_without_penalty`), and a cached evaluation made without the
    penalty is not reused for one with it."""
    calls, kw = record_toggle_calls(monkeypatch), STAGE_KW
    out = tmp_path / "sft"
    plain, _ = run_sft_stage(tiny(world, seed=3), world, SFTStageConfig(**kw), out)
    assert calls == [(1.0, 1.0)] * 2 and "after_without_penalty" not in plain and plain["repetition_penalty"] == 1.0
    calls.clear()
    report, _ = run_sft_stage(tiny(world, seed=3), world, SFTStageConfig(**kw, repetition_penalty=1.3), tmp_path / "fresh")
    assert calls == [(1.3, 1.3), (1.3, 1.3), (1.0, 1.0)]  # before and after with the penalty; after again without it
    calls.clear()  # beside the plain run, its plain evaluation is reused, not redone
    again, _ = run_sft_stage(tiny(world, seed=3), world, SFTStageConfig(**kw, repetition_penalty=1.3), out)
    assert calls == [(1.3, 1.3)] * 2 and again["after_without_penalty"] == plain["after"]
    calls.clear()  # and the plain run's own files were not replaced by the penalized ones
    assert run_sft_stage(tiny(world, seed=3), world, SFTStageConfig(**kw), out)[0]["after"] == plain["after"]
    assert calls == []
    assert report["before"]["on"]["adherence"] == report["after"]["on"]["adherence"] == 1.3
    assert report["after_without_penalty"]["on"]["adherence"] == 1.0 and report["repetition_penalty"] == 1.3
    calls.clear()  # sft.eval_without_penalty=false: no third evaluation, and no plain scores reported
    cfg = SFTStageConfig(**kw, repetition_penalty=1.2, eval_without_penalty=False)
    skipped, _ = run_sft_stage(tiny(world, seed=3), world, cfg, tmp_path / "skip")
    assert calls == [(1.2, 1.2)] * 2 and "after_without_penalty" not in skipped
    with pytest.raises(ValueError, match="sft.repetition_penalty"):
        SFTStageConfig(**kw, repetition_penalty=0.5)
    with pytest.raises(ValueError, match="sft.eval_without_penalty"):
        SFTStageConfig(**kw, eval_without_penalty="no")


def test_thinking_off_answers_decode_with_their_own_penalty(world, tmp_path, monkeypatch):
    """sft.repetition_penalty_off: evaluate_toggle decodes each mode with its penalty; the stage
    keys its cached evaluations and names its files by both, reports the off penalty in effect,
    and its plain-greedy evaluation drops both penalties."""
    asked = []

    def fake_greedy(model, tok, problems, thinking, **kw):
        asked.append((thinking, kw["repetition_penalty"]))
        return ["x"] * len(problems), [1] * len(problems), [True] * len(problems)

    monkeypatch.setattr(toggle_eval, "greedy_responses", fake_greedy)
    probs = world.eval[:2]
    evaluate_toggle(None, world.tokenizer, probs, batch_size=2, repetition_penalty=1.2, repetition_penalty_off=1.0)
    evaluate_toggle(None, world.tokenizer, probs, batch_size=2, repetition_penalty=1.3)
    assert asked == [(True, 1.2), (False, 1.0), (True, 1.3), (False, 1.3)]

    calls, kw = record_toggle_calls(monkeypatch), STAGE_KW
    out = tmp_path / "sft"
    same, _ = run_sft_stage(tiny(world, seed=3), world, SFTStageConfig(**kw, repetition_penalty=1.2), out)
    assert calls == [(1.2, 1.2), (1.2, 1.2), (1.0, 1.0)] and same["repetition_penalty_off"] == 1.2
    calls.clear()  # another off penalty is another evaluation, in files of its own beside the first
    cfg = SFTStageConfig(**kw, repetition_penalty=1.2, repetition_penalty_off=1.0)
    report, _ = run_sft_stage(tiny(world, seed=3), world, cfg, out)
    assert calls == [(1.2, 1.0), (1.2, 1.0)]  # before and after; the plain evaluation is reused
    assert report["repetition_penalty"] == 1.2 and report["repetition_penalty_off"] == 1.0
    assert report["after"]["off"]["adherence"] == 1.0 and report["after_without_penalty"] == same["after_without_penalty"]
    run_dir = Path(report["run_dir"])
    assert (run_dir / "toggle_after-penalty1.2-off1.json").is_file() and (run_dir / "toggle_after-penalty1.2.json").is_file()
    calls.clear()  # both cached now: nothing is evaluated again, and each keeps its own result
    assert run_sft_stage(tiny(world, seed=3), world, SFTStageConfig(**kw, repetition_penalty=1.2), out)[0]["after"] == same["after"]
    assert run_sft_stage(tiny(world, seed=3), world, cfg, out)[0]["after"] == report["after"] and calls == []
    # only an off penalty still counts as penalized decoding
    only_off = SFTStageConfig(**kw, repetition_penalty_off=1.3)
    assert only_off.penalized and sft_stage._decoding_suffix(only_off) == "-penalty1-off1.3"
    assert sft_stage._decoding_suffix(SFTStageConfig(**kw)) == ""
    for bad in (0.5, True, "high"):
        with pytest.raises(ValueError, match="sft.repetition_penalty_off"):
            SFTStageConfig(**kw, repetition_penalty_off=bad)


def hand_weighted_loss(model, examples, loss_average, extra) -> float:
    """The weighted mean target loss written out from torch's cross-entropy, one example a row:
    base weight 1 ("token") or 1/targets ("example"), plus `extra(row, t, targets)` on target t
    (token t is the target of position t-1)."""
    num, den = 0.0, 0.0
    for row, (ids, mask) in enumerate(examples):
        nll = F.cross_entropy(model.logits[row, : len(ids) - 1], torch.tensor(ids[1:]), reduction="none")
        targets = [t for t in range(1, len(ids)) if mask[t]]
        base = 1.0 if loss_average == "token" else 1.0 / len(targets)
        for t in targets:
            w = base + extra(row, t, targets)
            num, den = num + w * float(nll[t - 1]), den + w
    return num / den


@pytest.mark.parametrize("loss_average", ["token", "example"])
@pytest.mark.parametrize("n", [1, 2])
def test_decision_weight_adds_weight_to_each_response_first_targets(loss_average, n):
    """sft.decision_weight=w, decision_tokens=n: each response's first n targets (the tokens that
    pick the mode) weigh w more, checked against the loss written out by hand from torch's
    cross-entropy (one example a row)."""
    examples = [([5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 1, 1]), ([11, 12, 13, 14], [0, 0, 0, 1])]
    model = FixedLogits(2, 16, 20, seed=5)
    cfg = SFTConfig(batch_size=2, max_len=16, pack=False, loss_average=loss_average, decision_weight=3.0,
                    decision_tokens=n)  # fmt: skip
    rows = build_rows(examples, cfg.max_len, cfg.pack, cfg.seed)
    got = step_loss(model, step_micro_batches(examples, rows, [0, 1], cfg), **cfg.weighting())

    extra = lambda row, t, targets: 3.0 if t in targets[:n] else 0.0  # noqa: E731
    assert got == pytest.approx(hand_weighted_loss(model, examples, loss_average, extra), rel=1e-6)
    plain = step_loss(model, step_micro_batches(examples, rows, [0, 1], cfg), loss_average=loss_average)
    assert got != pytest.approx(plain)
    with pytest.raises(ValueError, match="sft.decision_weight=-1"):
        SFTConfig(decision_weight=-1)


@pytest.mark.parametrize("loss_average", ["token", "example"])
def test_close_weight_adds_weight_to_the_counted_close_sequence(loss_average):
    """sft.close_weight=w, close_tokens=[7, 8]: every counted target inside an occurrence of 7, 8
    weighs w more; a lone 7 or 8 and an occurrence in the prompt (not counted) do not. Checked
    against the loss written out by hand from torch's cross-entropy (one example a row)."""
    examples = [([7, 8, 5, 6, 7, 8, 9, 8], [0, 0, 0, 1, 1, 1, 1, 1]), ([11, 7, 12, 7, 8], [0, 0, 1, 1, 1])]
    model = FixedLogits(2, 16, 20, seed=6)
    cfg = SFTConfig(batch_size=2, max_len=16, pack=False, loss_average=loss_average, close_weight=4.0,
                    close_tokens=[7, 8])  # fmt: skip
    rows = build_rows(examples, cfg.max_len, cfg.pack, cfg.seed)
    got = step_loss(model, step_micro_batches(examples, rows, [0, 1], cfg), **cfg.weighting())

    closing = [{4, 5}, {3, 4}]  # positions of the counted 7, 8 pairs
    extra = lambda row, t, targets: 4.0 if t in closing[row] else 0.0  # noqa: E731
    assert got == pytest.approx(hand_weighted_loss(model, examples, loss_average, extra), rel=1e-6)
    plain = step_loss(model, step_micro_batches(examples, rows, [0, 1], cfg), loss_average=loss_average)
    assert got != pytest.approx(plain)
    with pytest.raises(ValueError, match="sft.close_weight=-1"):
        SFTConfig(close_weight=-1)
    with pytest.raises(ValueError, match="sft.close_tokens"):
        SFTConfig(close_tokens=[1, "x"])
    with pytest.raises(ValueError, match="sft.close_tokens=7: expected a list"):
        SFTConfig(close_tokens=7)


def test_sequence_marks_and_close_weight_needs_its_tokens(tmp_path):
    targets = torch.tensor([[1, 2, 3, 1, 2, 1, 2]])
    counted = torch.tensor([[1.0, 1, 1, 1, 1, 0, 0]])
    assert sequence_marks(targets, counted, [1, 2]).tolist() == [[1, 1, 0, 1, 1, 0, 0]]
    assert sequence_marks(targets, counted, [2, 1, 2]).tolist() == [[0, 0, 0, 0, 1, 0, 0]]
    assert sequence_marks(targets, counted, [9] * 8).sum() == 0  # longer than the row
    examples = [([5, 6, 7, 8], [0, 1, 1, 1])] * 2
    with pytest.raises(ValueError, match="sft.close_weight=2.*close_tokens"):
        run_sft(tiny(build_world(WorldConfig()), seed=0), examples, examples, SFTConfig(close_weight=2.0), tmp_path)


def test_sft_stage_weights_its_tokenizers_close_tag(tmp_path, monkeypatch):
    """With sft.close_weight and no close_tokens, the stage trains with the tokenizer's `</think>`;
    the run key is unchanged while the weight is off (runs made before the setting keep theirs)."""
    seen = {}

    class StopAtTraining(Exception):
        pass

    def stop_at_training(model, train, val, cfg, run_dir, **kw):
        seen["cfg"] = cfg
        raise StopAtTraining  # nothing after training matters here

    monkeypatch.setattr(sft_stage, "run_sft", stop_at_training)
    monkeypatch.setattr(sft_stage, "_cached_toggle", lambda *a, **k: {})
    world = build_world(WorldConfig())
    kw = dict(world_problems=8, val_problems=4, eval_problems=4)
    with pytest.raises(StopAtTraining):
        run_sft_stage(tiny(world, seed=0), world, SFTStageConfig(**kw, close_weight=5.0), tmp_path)
    assert seen["cfg"].close_tokens == world.chat.encode("</think>") and seen["cfg"].close_weight == 5.0
    assert "close_weight" not in SFTStageConfig(**kw).train_fields()
    assert SFTStageConfig(**kw, close_weight=1.0).train_fields()["close_weight"] == 1.0


def test_response_starts_marks_each_response_once_in_packed_rows():
    examples = [([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10, 11], [0, 1, 1]), ([12, 13], [0, 1])]
    cfg = SFTConfig(batch_size=1, max_len=16, pack=True)
    rows = build_rows(examples, cfg.max_len, cfg.pack, cfg.seed)
    (mb,) = step_micro_batches(examples, rows, [0], cfg)
    counted = mb[1][:, 1:].float()
    assert int(response_starts(counted).sum()) == 3  # one per example, though responses sit side by side
    assert int(response_starts(counted, 2).sum()) == 5  # the third response has one target only
