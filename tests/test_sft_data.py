"""SFT chat data: readers (real dataset schema and plain messages), malformed-record reports,
loss masks on responses only, paired on/off examples, truncation, first-fit packing, and a
packed forward through the reference model equal to running each example alone."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from nemo_plugins.arch import ATTENTION_LINEAR, ATTENTION_NO_OP, FFN_LINEAR, BlockConfig, ModelConfig, gqa, swiglu
from nemo_plugins.data import chat
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data import sft_data as S
from nemo_plugins.data import tokenizer as T
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model.llama import causal_lm_loss

SAMPLE = Path(__file__).parent / "fixtures" / "sft" / "nemotron_sample.jsonl"


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(rw.chat_texts(rw.generate_problems(1500, seed=0)))


def write_jsonl(path: Path, lines) -> Path:
    """Each line: a dict (dumped as JSON), a str (written as is) or bytes (raw)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def nemo(**kw) -> dict:
    """A valid thinking-off record in the Llama-Nemotron-Post-Training-Dataset schema, overridable."""
    rec = {
        "input": [{"role": "user", "content": "What is 1 + 1?"}],
        "output": "The answer is 2.",
        "reasoning": "off",
        "system_prompt": "detailed thinking off",
        "category": "math",
        "license": "cc-by-4.0",
        "generator": "some-model",
        "used_in_training": ["Nano"],
        "version": "v1.1",
    }
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not DROP}


def msgs(**kw) -> dict:
    """A valid plain-messages record (mode from the system message), overridable."""
    rec = {
        "messages": [
            {"role": "system", "content": "detailed thinking off"},
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "The answer is 2."},
        ]
    }
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not DROP}


DROP = object()
ON = {"reasoning": "on", "system_prompt": "detailed thinking on"}


# ============================================================================ Nemotron reader


def test_reads_the_real_schema_sample():
    reader = S.read_nemotron_jsonl(SAMPLE)
    on, off, multi = list(reader)
    r = reader.report
    assert (r.read, r.kept, r.skipped, r.blank, dict(r.reasons)) == (3, 3, 0, 0, {})

    assert on.thinking and on.system == chat.THINKING_ON
    assert on.messages == (S.Turn("user", "What is (3 + 4) * 2?"),)
    assert on.response == "<think>\n3 + 4 = 7\n7 * 2 = 14\n</think>\n\nThe answer is 14."
    assert on.reasoning == "\n3 + 4 = 7\n7 * 2 = 14\n"
    assert on.category == "math" and on.source == (str(SAMPLE), 1)
    assert on.meta == {"license": "cc-by-4.0", "generator": "DeepSeek-R1", "used_in_training": ["Ultra", "Nano"],
                       "version": "v1.1"}  # fmt: skip

    assert not off.thinking and off.reasoning is None and off.response == "The answer is 14."
    assert off.meta["used_in_training"] == "Ultra, Super, Nano" and off.source == (str(SAMPLE), 2)

    assert [t.role for t in multi.messages] == ["user", "assistant", "user"]
    assert multi.messages[1].content == "7 is a prime number." and multi.category == "chat"


def test_reads_v1_llama3_template_strings(tmp_path):
    templated = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    path = write_jsonl(tmp_path / "v1.jsonl", [
        {"input": templated, "output": "<think>2 + 2 = 4</think>The answer is 4.<|eot_id|>", "reasoning": "on",
         "used_in_training": "yes", "version": "v1"},
        {"input": "What is 3 + 3?", "output": "The answer is 6.", "reasoning": "off"},
        {"input": templated.replace("<|eot_id|><|start_header_id|>user", "<|start_header_id|>user"),
         "output": "<think>x</think>y", "reasoning": "on"},
        {"input": templated, "output": "The answer is 4.", "reasoning": "off"},
    ])  # fmt: skip
    reader = S.read_nemotron_jsonl(path)
    a, b = list(reader)
    assert a.thinking and a.messages == (S.Turn("user", "What is 2 + 2?"),)
    assert a.response == "<think>2 + 2 = 4</think>The answer is 4." and a.meta["used_in_training"] == "yes"
    assert not b.thinking and b.messages == (S.Turn("user", "What is 3 + 3?"),)
    assert reader.report.reasons == Counter({"bad_value": 1, "mode_conflict": 1})
    assert reader.report.problems[0].startswith(f"{path}:3: bad_value:")
    assert reader.report.problems[1].startswith(f"{path}:4: mode_conflict:")


# Every malformed case of the Nemotron schema: (line, reason).
NEMOTRON_BAD = [
    ('{"input": [', "bad_json"),
    (b"\xff\xfe{}", "bad_json"),
    ("[1, 2]", "not_object"),
    (nemo(output=DROP), "missing_field"),
    (nemo(reasoning=DROP), "missing_field"),
    (nemo(input=None), "missing_field"),
    (nemo(reasoning="maybe"), "bad_value"),
    (nemo(input=7), "bad_type"),
    (nemo(input=["hi"]), "bad_type"),
    (nemo(input=[{"role": "user"}]), "missing_field"),
    (nemo(input=[{"role": "user", "content": 3}]), "bad_type"),
    (nemo(input=[{"role": "tool", "content": "x"}]), "bad_value"),
    (nemo(output=["The answer is 2."]), "bad_type"),
    (nemo(category=5), "bad_type"),
    (nemo(used_in_training={"Nano": True}), "bad_type"),
    (nemo(system_prompt="You are a helpful assistant."), "bad_value"),
    (nemo(system_prompt="detailed thinking on"), "mode_conflict"),
    (nemo(input=[{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "Q"}]),
     "mode_conflict"),
    (nemo(input=[]), "bad_turns"),
    (nemo(input=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]), "bad_turns"),
    (nemo(input=[{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}]), "bad_turns"),
    (nemo(input=[{"role": "user", "content": "Q <|eos|>"}]), "special_token"),
    (nemo(output="The answer is 2.<|eos|><|user|>more"), "special_token"),
    (nemo(**ON, output="The answer is 2."), "think_mismatch"),
    (nemo(**ON, output="Sure. <think>x</think>The answer is 2."), "think_mismatch"),
    (nemo(**ON, output="<think>a</think><think>b</think>The answer is 2."), "think_mismatch"),
    (nemo(**ON, output="<think>unterminated The answer is 2."), "think_mismatch"),
    (nemo(output="<think>x</think>The answer is 2."), "think_mismatch"),
    (nemo(output="The answer is 2.</think>"), "think_mismatch"),
    (nemo(**ON, output="<think>\n\n</think>The answer is 2."), "empty_think"),
    (nemo(**ON, output="<think>x</think>  \n"), "empty_response"),
    (nemo(output=" \n "), "empty_response"),
]  # fmt: skip


def test_nemotron_malformed_records_are_counted_with_file_and_line(tmp_path):
    good_on = nemo(**ON, output="<think>1 + 1 = 2</think>The answer is 2.")
    lines = [nemo()] + [line for line, _ in NEMOTRON_BAD] + ["", good_on]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    reader = S.read_nemotron_jsonl(path)
    kept = list(reader)
    r = reader.report
    n_bad = len(NEMOTRON_BAD)
    assert [ex.source for ex in kept] == [(str(path), 1), (str(path), n_bad + 3)]
    assert (r.read, r.kept, r.skipped, r.blank) == (n_bad + 2, 2, n_bad, 1)
    assert r.reasons == Counter(reason for _, reason in NEMOTRON_BAD)
    assert set(r.reasons) <= set(S.REASONS)
    for k, (problem, (_, reason)) in enumerate(zip(r.problems, NEMOTRON_BAD)):
        assert problem.startswith(f"{path}:{k + 2}: {reason}: "), problem


@pytest.mark.parametrize("line,reason", NEMOTRON_BAD, ids=[f"{i}-{r}" for i, (_, r) in enumerate(NEMOTRON_BAD)])
def test_nemotron_raise_names_file_line_and_problem(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "x.jsonl", [nemo(), "   ", line, nemo()])
    reader = S.read_nemotron_jsonl(path, on_error="raise")
    it = iter(reader)
    assert next(it).source == (str(path), 1)  # streaming: the good line comes before the failure
    with pytest.raises(ValueError, match=rf"^{path}:3: {reason}: ") as e:
        next(it)
    assert (reader.report.read, reader.report.kept, reader.report.skipped) == (2, 1, 1)
    assert str(e.value) == reader.report.problems[0]


def test_allow_empty_think_keeps_blank_traces(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [nemo(**ON, output="<think></think>The answer is 2.")])
    assert list(S.read_nemotron_jsonl(path)) == []
    (ex,) = S.read_nemotron_jsonl(path, allow_empty_think=True)
    assert ex.thinking and ex.reasoning == ""


def test_reader_rejects_unknown_on_error():
    with pytest.raises(ValueError, match="on_error"):
        S.read_nemotron_jsonl(SAMPLE, on_error="ignore")


def test_reader_streams_several_files_and_resets_its_report(tmp_path):
    other = write_jsonl(tmp_path / "o.jsonl", [nemo(), "oops"])
    reader = S.read_nemotron_jsonl([SAMPLE, other])
    for _ in range(2):  # a second pass reports the same, not the sum
        assert [ex.source for ex in reader][-1] == (str(other), 1)
        assert (reader.report.read, reader.report.kept, reader.report.skipped) == (5, 4, 1)


# ============================================================================ plain messages reader


def test_messages_reader_valid_forms(tmp_path):
    q, a = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "The answer is 3."}
    path = write_jsonl(tmp_path / "m.jsonl", [
        msgs(category="math"),                                              # mode from the system message
        {"messages": [q, a], "thinking": False},                            # mode from the flag
        {"messages": [q, a], "thinking": True, "reasoning": "1 + 2 = 3"},   # trace from 'reasoning'
        {"messages": [{"role": "system", "content": "detailed thinking on"}, q,
                      {"role": "assistant", "content": "<think>t</think>The answer is 3."}], "thinking": True},
        {"messages": [q, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2?"}, a],
         "thinking": False},
    ])  # fmt: skip
    reader = S.read_messages_jsonl(path)
    e1, e2, e3, e4, e5 = reader
    assert reader.report.kept == 5 and reader.report.skipped == 0
    assert not e1.thinking and e1.messages == (S.Turn("user", "What is 1 + 1?"),) and e1.category == "math"
    assert not e2.thinking and e2.response == "The answer is 3." and e2.reasoning is None
    assert e3.thinking and e3.response == "<think>1 + 2 = 3</think>The answer is 3." and e3.reasoning == "1 + 2 = 3"
    assert e4.thinking and e4.reasoning == "t"
    assert [t.content for t in e5.messages] == ["Q?", "A1", "Q2?"] and e5.source == (str(path), 5)


MESSAGES_BAD = [
    ("nope", "bad_json"),
    ('"a string"', "not_object"),
    ({"thinking": True}, "missing_field"),
    (msgs(messages="hi"), "bad_type"),
    (msgs(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]), "missing_field"),
    (msgs(thinking="yes"), "bad_type"),
    (msgs(thinking=True), "mode_conflict"),
    (msgs(reasoning="trace"), "mode_conflict"),
    (msgs(reasoning=3), "bad_type"),
    (msgs(category=["math"]), "bad_type"),
    (msgs(messages=[{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"}]), "bad_value"),
    (msgs(messages=[{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "Q"}]),
     "bad_turns"),
    (msgs(messages=[{"role": "system", "content": "detailed thinking off"},
                    {"role": "assistant", "content": "A"}]), "bad_turns"),
    (msgs(messages=[{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "Q"},
                    {"role": "system", "content": "detailed thinking off"}, {"role": "assistant", "content": "A"}]),
     "bad_turns"),
    (msgs(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], thinking=True),
     "think_mismatch"),
    (msgs(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>x</think>A"}],
          thinking=True, reasoning="y"), "think_mismatch"),
    (msgs(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], thinking=True,
          reasoning=" "), "empty_think"),
    (msgs(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}], thinking=False),
     "empty_response"),
    (msgs(messages=[{"role": "user", "content": "<|assistant|>Q"}, {"role": "assistant", "content": "A"}],
          thinking=False), "special_token"),
]  # fmt: skip


def test_messages_malformed_records_skip_and_raise(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [line for line, _ in MESSAGES_BAD] + [msgs()])
    reader = S.read_messages_jsonl(path)
    (kept,) = reader
    r = reader.report
    assert kept.source == (str(path), len(MESSAGES_BAD) + 1)
    assert (r.read, r.kept, r.skipped) == (len(MESSAGES_BAD) + 1, 1, len(MESSAGES_BAD))
    assert r.reasons == Counter(reason for _, reason in MESSAGES_BAD)
    for k, (problem, (_, reason)) in enumerate(zip(r.problems, MESSAGES_BAD)):
        assert problem.startswith(f"{path}:{k + 1}: {reason}: "), problem
    for k, (line, reason) in enumerate(MESSAGES_BAD):
        one = write_jsonl(tmp_path / f"one{k}.jsonl", [msgs(), line])
        with pytest.raises(ValueError, match=rf"^{one}:2: {reason}: "):
            list(S.read_messages_jsonl(one, on_error="raise"))


# ============================================================================ rendering and loss masks


def test_single_turn_renders_exactly_like_chat_template():
    for thinking, response in ((True, "<think>t</think>A"), (False, "A")):
        ex = S.make_example([S.Turn("user", "Q?")], response, thinking)
        assert S.render_chat(ex) == chat.render_example("Q?", response, thinking)


def test_multi_turn_rendering():
    turns = [S.Turn("user", "Q1"), S.Turn("assistant", "A1"), S.Turn("user", "Q2")]
    prompt, response = S.render_chat(S.make_example(turns, "<think>t</think>A2", True))
    assert prompt == "<|bos|><|system|>detailed thinking on<|user|>Q1<|assistant|>A1<|eos|><|user|>Q2<|assistant|>"
    assert response == "<think>t</think>A2<|eos|>"


@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("thinking", [True, False])
def test_loss_mask_covers_the_response_only(tok, thinking, multi_turn):
    p = rw.generate_problems(1, seed=3, difficulties=(3,))[0]
    turns = [S.Turn("user", "What is 1 + 2?"), S.Turn("assistant", "The answer is 3."), S.Turn("user", p.question)]
    ex = S.make_example(turns if multi_turn else turns[-1:], rw.response_for(p, thinking), thinking)
    prompt, response = S.render_chat(ex)
    ids, mask = S.tokenize_example(tok, ex)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    first = mask.index(1)
    assert mask == [0] * first + [1] * (len(ids) - first)  # one contiguous response span at the end
    assert T.decode(tok, ids[:first]) == prompt  # system + user (+ earlier turns) are masked out
    assert T.decode(tok, ids[first:]) == response == ex.response + chat.EOS  # response and EOS count
    assert ids == T.encode(tok, prompt + response)  # the boundary is exact
    assert ids[-1] == T.token_id(tok, chat.EOS) and mask[-1] == 1
    sys_id = T.token_id(tok, chat.SYSTEM)
    assert sys_id in ids[:first] and sys_id not in ids[first:]
    eos_inside_prompt = ids[:first].count(T.token_id(tok, chat.EOS))
    assert eos_inside_prompt == (1 if multi_turn else 0)  # an earlier assistant turn's EOS is not a target


# ============================================================================ paired examples


def test_world_pairs_give_one_on_and_one_off_per_prompt(tok):
    problems = rw.generate_problems(6, seed=1)
    exs = S.world_paired_examples(problems)
    assert len(exs) == 2 * len(problems)
    for p, on, off in zip(problems, exs[0::2], exs[1::2]):
        assert on.messages == off.messages == (S.Turn("user", p.question),)
        assert (on.thinking, off.thinking) == (True, False)
        assert on.response == rw.reasoning_response(p) and off.response == rw.direct_response(p)
        assert on.reasoning == rw.STEP_SEP.join(p.steps) and off.reasoning is None
        assert rw.is_well_formatted(on.response, True) and rw.is_well_formatted(off.response, False)
        assert rw.is_correct(on.response, p) and rw.is_correct(off.response, p)
        assert on.category == off.category == f"difficulty_{p.difficulty}"
        # the same prompt but for the system prompt
        (p_on, _), (p_off, _) = S.render_chat(on), S.render_chat(off)
        assert p_on.replace(chat.THINKING_ON, chat.THINKING_OFF) == p_off and p_on != p_off
        # built from a trace and an answer, the pair is the same
        assert S.paired_examples(p.question, on.reasoning, rw.answer_text(p.answer), category=on.category) == (on, off)


def test_paired_examples_checks_its_parts():
    on, off = S.paired_examples([S.Turn("user", "Q")], "think", "A")
    assert (on.response, on.reasoning, off.response) == ("<think>think</think>A", "think", "A")
    with pytest.raises(S.RecordError, match="empty_think"):
        S.paired_examples("Q", " ", "A")
    with pytest.raises(S.RecordError, match="think_mismatch"):
        S.paired_examples("Q", "t", "A <think>")


# ============================================================================ truncation


def test_truncation_policy_is_counted(tok):
    exs = S.world_paired_examples(rw.generate_problems(20, seed=2))
    full, rep = S.tokenize_examples(tok, exs)
    assert (rep.examples, rep.kept, rep.dropped, rep.truncated) == (40, 40, 0, 0)
    assert rep.tokens == sum(len(ids) for ids, _ in full)
    lengths = [len(ids) for ids, _ in full]
    prompt_lens = [m.index(1) for _, m in full]
    max_len = sorted(lengths)[len(lengths) // 2]
    n_long = sum(n > max_len for n in lengths)
    assert n_long > 0

    kept, rep = S.tokenize_examples(tok, exs, max_len=max_len, overflow="drop")
    assert (rep.kept, rep.dropped, rep.truncated) == (40 - n_long, n_long, 0)
    assert kept == [e for e in full if len(e[0]) <= max_len] and rep.reasons == Counter(too_long=n_long)

    cut, rep = S.tokenize_examples(tok, exs, max_len=max_len, overflow="truncate")
    assert (rep.kept, rep.dropped, rep.truncated) == (40, 0, n_long)
    for (ids, mask), (fids, fmask) in zip(cut, full):
        assert len(ids) == min(len(fids), max_len) and ids == fids[: len(ids)] and mask == fmask[: len(ids)]

    tight = min(prompt_lens) + 1  # room for the shortest prompt plus one response token
    cut, rep = S.tokenize_examples(tok, exs, max_len=tight, overflow="truncate")
    n_no_room = sum(p >= tight for p in prompt_lens)
    assert rep.dropped == n_no_room > 0 and rep.reasons == Counter(prompt_too_long=n_no_room)
    assert all(len(ids) == tight and sum(mask) >= 1 for ids, mask in cut)

    with pytest.raises(ValueError, match="overflow"):
        S.tokenize_examples(tok, exs, max_len=10, overflow="wrap")


def test_overlong_records_are_refused_before_tokenizing(tok, monkeypatch):
    """A 10 MB record is dropped without tokenizing it (it once cost 3.7 GB and 50 s to refuse);
    with overflow=truncate only a bounded prefix of it is tokenized, and the cut is the same as
    tokenizing it whole and cutting the tokens."""
    from nemo_plugins.data.chat_tokenizer import ChatTokenizer, as_chat

    chat = as_chat(tok)
    on, off = S.paired_examples("What is 2 + 3?", "add " * 2000, "The answer is 5.")
    full, _ = S.tokenize_examples(chat, [on])
    n = full[0][1].index(1) + 4  # the prompt and 4 response tokens
    assert len(on.response) > n * chat.max_token_chars * S._CHAR_SLACK  # so the character cut applies
    cut, rep = S.tokenize_examples(chat, [on], max_len=n, overflow="truncate")
    assert rep.truncated == 1 and cut == [(full[0][0][:n], full[0][1][:n])]

    seen = []
    real_encode = ChatTokenizer.encode
    monkeypatch.setattr(ChatTokenizer, "encode", lambda self, text: seen.append(len(text)) or real_encode(self, text))
    huge = S.paired_examples("What is 2 + 3?", "add " * 2_500_000, "The answer is 5.")[0]  # 10 MB
    n = len(S.tokenize_examples(chat, [off])[0][0][0])  # room for the direct answer
    kept, rep = S.tokenize_examples(chat, [huge, off], max_len=n)
    assert rep.dropped == 1 and rep.reasons == Counter(too_long=1) and len(kept) == 1
    bound = n * chat.max_token_chars * S._CHAR_SLACK
    assert max(seen) < bound < 1_000_000
    seen.clear()
    kept, rep = S.tokenize_examples(chat, [huge], max_len=n, overflow="truncate")
    assert rep.truncated == 1 and len(kept[0][0]) == n and max(seen) <= bound + 100  # + the template's tags


# ============================================================================ packing


def test_first_fit_known_answer():
    lengths = [5, 4, 3, 6, 2, 1]
    assert S.first_fit(lengths, 8) == [[0, 2], [1, 4, 5], [3]]
    assert S.first_fit(lengths, 8, decreasing=True) == [[3, 4], [0, 2], [1, 5]]
    with pytest.raises(ValueError, match="example 2 has 9 tokens"):
        S.first_fit([1, 2, 9], 8)


def test_first_fit_invariants():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    bins = S.first_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))  # each example exactly once
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert all(b == sorted(b) for b in bins)  # input order kept inside a row
    # first fit: an example opens bin k only if it fit none of the bins before, as they were then
    for k, b in enumerate(bins):
        first = b[0]
        for j in range(k):
            used_then = sum(lengths[i] for i in bins[j] if i < first)
            assert used_then + lengths[first] > 64


def _packed_examples(tok, n=12):
    exs = S.world_paired_examples(rw.generate_problems(n // 2, seed=5))
    return S.tokenize_examples(tok, exs)[0]


def test_pack_examples_layout(tok):
    examples = _packed_examples(tok)
    max_len = 96
    batch = S.pack_examples(examples, max_len, pad_id=0)
    B = len(batch.rows)
    assert batch.input_ids.shape == batch.loss_mask.shape == batch.position_ids.shape == batch.segment_ids.shape
    assert batch.input_ids.shape == (B, max_len) and B < len(examples)
    assert batch.rows == S.first_fit([len(x) for x, _ in examples], max_len)
    for b, row in enumerate(batch.rows):
        start = 0
        for s, i in enumerate(row, 1):
            ids, mask = examples[i]
            span = slice(start, start + len(ids))
            assert batch.input_ids[b, span].tolist() == ids  # the example is whole and in one piece
            assert batch.position_ids[b, span].tolist() == list(range(len(ids)))
            assert batch.segment_ids[b, span].tolist() == [s] * len(ids)
            assert batch.loss_mask[b, span].tolist() == [0] + mask[1:]
            start += len(ids)
        assert batch.input_ids[b, start:].eq(0).all() and batch.segment_ids[b, start:].eq(0).all()
        assert batch.loss_mask[b, start:].eq(0).all() and batch.position_ids[b, start:].eq(0).all()
    assert batch.loss_mask.sum() == sum(sum(m[1:]) for _, m in examples)


def test_pack_zeroes_a_segment_start_that_is_marked_for_loss():
    batch = S.pack_examples([([5, 6, 7], [1, 1, 1]), ([8, 9], [1, 1])], 8)
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0, 0, 0]]


def brute_force_mask(seg: torch.Tensor) -> torch.Tensor:
    B, T = seg.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(T):
                same_example = seg[b, q] == seg[b, k] and seg[b, k] != 0
                out[b, 0, q, k] = (same_example and k <= q) or k == q
    return out


def test_packed_attention_mask_matches_brute_force():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 2, 2, 0, 0, 0, 0]])
    mask = S.packed_attention_mask(seg)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 8, 8)
    assert torch.equal(mask, brute_force_mask(seg))
    assert torch.equal(mask[1, 0], torch.ones(8, 8, dtype=torch.bool).tril())  # one example: plain causal
    assert mask[0, 0, 3, 2].item() is False and mask[0, 0, 6, 5].item() is False  # no cross-example attention
    assert mask[0, 0, 6].tolist() == [False] * 6 + [True, False]  # padding sees itself only


def small_model(vocab: int) -> HeteroLlamaForCausalLM:
    blocks = (
        BlockConfig(gqa(2), swiglu(96)),
        BlockConfig(ATTENTION_LINEAR, FFN_LINEAR),
        BlockConfig(gqa(8), swiglu(64)),
        BlockConfig(ATTENTION_NO_OP, swiglu(32)),
        BlockConfig(gqa(1), swiglu(48)),
    )
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, num_attention_heads=8, blocks=blocks, rope_theta=10000.0)
    torch.manual_seed(0)
    return HeteroLlamaForCausalLM(cfg).eval()


def packed_logits(model: HeteroLlamaForCausalLM, batch: S.PackedBatch) -> torch.Tensor:
    """The model's forward with the block-diagonal mask in place of its own causal mask."""
    return model(batch.input_ids, positions=batch.position_ids, attn_mask=batch.attention_mask())


def test_packed_forward_equals_each_example_alone(tok):
    examples = _packed_examples(tok)
    batch = S.pack_examples(examples, 96)
    model = small_model(tok.get_vocab_size())
    with torch.no_grad():
        packed = packed_logits(model, batch)
        plain_causal = model(batch.input_ids, positions=batch.position_ids)  # no block mask: leaks across examples
        worst, leak = 0.0, 0.0
        for b, row in enumerate(batch.rows):
            start = 0
            for s, i in enumerate(row):
                ids = torch.tensor(examples[i][0])[None]
                alone = model(ids)[0]
                span = slice(start, start + ids.shape[1])
                worst = max(worst, (packed[b, span] - alone).abs().max().item())
                if s > 0:
                    leak = max(leak, (plain_causal[b, span] - alone).abs().max().item())
                start += ids.shape[1]
        assert worst < 1e-5
        assert leak > 1e-3  # the test would notice a mask that is not block-diagonal

        # the packed loss is the token-weighted mean of the per-example losses
        total, count = 0.0, 0
        for ids, mask in examples:
            ids_t, mask_t = torch.tensor(ids)[None], torch.tensor(mask)[None]
            n = int(mask_t[0, 1:].sum())
            total += causal_lm_loss(model(ids_t), ids_t, mask_t).item() * n
            count += n
        packed_loss = causal_lm_loss(packed, batch.input_ids, batch.loss_mask).item()
        assert abs(packed_loss - total / count) < 1e-5
