"""Preference-pair JSONL: the reader on good and malformed records, and the tiny world's pairs."""

import json

import pytest

from nemo_plugins.data.preference_pairs import (
    DEFAULT_WORLD_KINDS, PAIR_REASONS, WORLD_KINDS, PairReader, PreferencePair, load_pairs, pair_examples, world_pairs, write_pairs,
)  # fmt: skip
from nemo_plugins.data.reasoning_world import generate_problems, is_correct, is_well_formatted
from nemo_plugins.data.sft_data import BadRecord

GOOD = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6."}


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_good_records_and_round_trip(tmp_path):
    f = _write(tmp_path / "p.jsonl", [GOOD, {**GOOD, "thinking": True, "kind": "wrong_answer", "extra": 1}, ""])
    pairs, report = load_pairs(f)
    assert [p.thinking for p in pairs] == [None, True]
    assert pairs[1].kind == "wrong_answer" and pairs[0].source == (str(f), 1) and pairs[1].source == (str(f), 2)
    assert (report.read, report.kept, report.skipped, report.blank) == (2, 2, 0, 1)
    out = tmp_path / "back.jsonl"
    assert write_pairs(pairs, out) == 2
    back, _ = load_pairs(out)
    assert [(p.prompt, p.chosen, p.rejected, p.thinking, p.kind) for p in back] == [
        (p.prompt, p.chosen, p.rejected, p.thinking, p.kind) for p in pairs
    ]


def test_malformed_records_counted_located_and_skipped(tmp_path):
    bad = [
        "{not json",  # 2 bad_json
        "[1, 2]",  # 3 not_object
        {"prompt": "q", "chosen": "a"},  # 4 missing_field
        {**GOOD, "rejected": 7},  # 5 bad_type
        {**GOOD, "chosen": "   "},  # 6 empty_text
        {**GOOD, "prompt": "hi <|user|> there"},  # 7 special_token
        {**GOOD, "rejected": GOOD["chosen"]},  # 8 same_response
        {**GOOD, "thinking": "yes"},  # 9 bad_type
    ]
    f = _write(tmp_path / "p.jsonl", [GOOD, *bad, GOOD])
    reader = PairReader(f)
    pairs = list(reader)
    r = reader.report
    assert len(pairs) == 2 and [p.source[1] for p in pairs] == [1, 10]
    assert (r.read, r.kept, r.skipped) == (10, 2, 8)
    assert dict(r.reasons) == {"bad_json": 1, "not_object": 1, "missing_field": 1, "bad_type": 2, "empty_text": 1,
                               "special_token": 1, "same_response": 1}  # fmt: skip
    assert set(r.reasons) <= set(PAIR_REASONS)
    assert [m.split(":")[1] for m in r.problems] == [str(i) for i in range(2, 10)]
    assert all(m.startswith(f"{f}:") for m in r.problems)


def test_raise_names_file_and_line(tmp_path):
    f = _write(tmp_path / "p.jsonl", [GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    with pytest.raises(BadRecord, match=rf"{f}:2: .*same"):
        load_pairs(f, on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        PairReader(f, on_error="ignore")


def test_world_pairs_chosen_right_rejected_wrong():
    problems = generate_problems(60, seed=3)
    pairs = world_pairs(problems, seed=0)
    assert pairs == world_pairs(problems, seed=0)  # deterministic
    assert {p.kind for p in pairs} == set(DEFAULT_WORLD_KINDS) and {p.thinking for p in pairs} == {True, False}
    every = world_pairs(problems, seed=0, kinds=WORLD_KINDS)
    assert {p.kind for p in every} == set(WORLD_KINDS)
    for prob, p in zip(problems * 2, pairs + every, strict=True):
        assert p.prompt == prob.question
        assert is_correct(p.chosen, prob) and is_well_formatted(p.chosen, p.thinking)
        assert not (is_correct(p.rejected, prob) and is_well_formatted(p.rejected, p.thinking))
        if p.kind == "bad_format":
            assert is_correct(p.rejected, prob)  # right answer, wrong format
        else:
            assert not is_correct(p.rejected, prob)


def _step(line: str) -> tuple[int, str, int, int]:
    a, op, b, eq, c = line.split()
    assert eq == "="
    return int(a), op, int(b), int(c)


def test_carried_step_slips_once_and_computes_on_from_the_slip():
    """A carried_step rejection keeps the steps before the slip, gets one step's result wrong, and
    computes every later step correctly from the wrong value, into the stated answer."""
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    problems = generate_problems(300, seed=5, difficulties=[1, 2, 3, 4])
    pairs = world_pairs(problems, seed=1, kinds=["carried_step"], thinking_fraction=1.0)
    slips_at = set()
    for prob, p in zip(problems, pairs, strict=True):
        assert p.kind == "carried_step" and p.thinking
        body, answer = p.rejected.removeprefix("<think>").split("</think>")
        lines = body.split("\n")
        assert len(lines) == len(prob.steps)
        k = next(i for i, (x, y) in enumerate(zip(lines, prob.steps)) if x != y)
        slips_at.add(k)
        a, op, b, c = _step(lines[k])
        ra, rop, rb, rc = _step(prob.steps[k])
        assert (a, op, b) == (ra, rop, rb) and c != rc and 0 <= c <= 99  # the slip: same operation, wrong result
        for line, right in zip(lines[k + 1 :], prob.steps[k + 1 :]):
            a2, op2, b2, c2 = _step(line)
            assert (op2, b2) == _step(right)[1:3] and a2 == c and c2 == ops[op2](a2, b2)  # carried, computed right
            c = c2
        assert answer == f"The answer is {c}." and c != prob.answer
    assert slips_at == {0, 1, 2, 3}  # the slip can be at any step
    off = world_pairs(problems[:20], seed=1, kinds=["carried_step"], thinking_fraction=0.0)
    assert all(p.rejected.startswith("The answer is ") and not is_correct(p.rejected, q) for p, q in zip(off, problems))


def test_pair_examples_render_the_prompt_with_the_toggle(tiny_world):
    chat = tiny_world.chat
    pairs = [PreferencePair("What is 2 + 3?", "The answer is 5.", "The answer is 6.", thinking)
             for thinking in (True, False, None)]  # fmt: skip
    for p, (c, r) in zip(pairs, pair_examples(chat, pairs), strict=True):
        prompt = chat.prompt_ids(p.prompt, p.thinking)
        assert c[: len(prompt)] == prompt and r[: len(prompt)] == prompt
        assert chat.decode(c[len(prompt) :]) == p.chosen + "<|eos|>"
        assert chat.decode(r[len(prompt) :]) == p.rejected + "<|eos|>"
    texts = [chat.decode(c) for c, _ in pair_examples(chat, pairs)]
    assert "detailed thinking on" in texts[0] and "detailed thinking off" in texts[1] and "thinking" not in texts[2]
