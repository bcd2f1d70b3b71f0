"""CHAMP: loading the package's data, references the math reward can score, SFT pairs, prompts, split."""

import importlib.util
import json
from collections import Counter

import pytest

from nemo_plugins.data import champ
from nemo_plugins.data.champ import (
    CHAMP_SIZE,
    champ_answer_text,
    champ_documents,
    champ_prompts,
    champ_reference,
    champ_sft_examples,
    champ_split,
    load_champ,
)
from nemo_plugins.data.chat import THINK_END, THINK_START
from nemo_plugins.data.reasoning_world import has_think_block

HAVE_CHAMP = importlib.util.find_spec("champ_dataset") is not None
needs_champ = pytest.mark.skipif(
    not HAVE_CHAMP, reason='needs champ-dataset: pip install -c constraints.txt -e ".[dev]"'
)


@pytest.fixture(scope="module")
def problems():
    return load_champ()


def _by_id(problems):
    return {p.id: p for p in problems}


# ============================================================================ without the package


def test_missing_package_names_the_requirement(monkeypatch):
    monkeypatch.setattr(champ.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="champ-dataset==1.0.0"):
        load_champ()


def _tiny_champ(path, problem_overrides=None):
    p = {
        "identifier": "P_Sequence_1",
        "_text": "Find x.",
        "_answer": "The limit exists and is equal to 3",
        "_raw_answer": "The limit exists and is equal to 3",
        "category": "Sequence",
        "solution": {"steps": [{"_text": "Step one."}, {"_text": "Step two."}]},
        "ch_list": ["C_a", "H_Sequence_1_1"],
    }
    p.update(problem_overrides or {})
    data = {
        "problems": {"P_Sequence_1": p},
        "concepts": {"C_a": {"_text": "A concept."}},
        "hints": {"H_Sequence_1_1": {"_text": "A hint."}},
    }
    path.write_text(json.dumps(data))
    return path


def test_load_from_a_file_copy(tmp_path):
    (p,) = load_champ(_tiny_champ(tmp_path / "v0.json"))
    assert p == champ.ChampProblem(
        "P_Sequence_1", "Find x.", "The limit exists and is equal to 3", ("Step one.", "Step two."), "Sequence",
        "3", "The limit exists and is equal to 3", ("A concept.", "A hint."),
    )
    bad = _tiny_champ(tmp_path / "bad.json", {"solution": {}})
    with pytest.raises(ValueError, match="P_Sequence_1 has no 'steps'"):
        load_champ(bad)


@pytest.mark.parametrize(
    "raw, ref",
    [
        ("239", "239"),
        ("@@2^(n-1)@@", "2^(n-1)"),
        ("@@C(10, 5)@@, or equivalently @@252@@", "252"),
        ("@@5/14@@, or approximately 35.7%", "5/14"),
        ("@@C(n+1, 2m+1)@@", "\\binom{n+1}{2m+1}"),
        ("@@2^floor(n/2)*floor(n/2)!@@", "2^(\\lfloor n/2 \\rfloor)*(\\lfloor n/2 \\rfloor)!"),
        ("@@sum_(k=1)^n 1/k@@", "\\sum_{k=1}^{n} 1/k"),
        ("0 is the only possible value", "0"),
        ("100 (i.e., all values)", "100"),
        ("At most 0 integer-valued zeros (i.e., no integer zeros)", "0"),
        ("Exactly one sequence", "1"),
        ("@@n@@ times", "n"),
        ("1, 4 and 9", "1, 4, 9"),
        ("@@x=0, y=2@@ and @@x=9, y=11@@", "(x=0, y=2), (x=9, y=11)"),
        ("The limit exists and is equal to @@(a+3b)/2@@", "(a+3b)/2"),
        ("@@(x^3−x^2+1)@@", "(x^3-x^2+1)"),
        ("No", None),
        ("No integer solutions", None),
        ("@@x(n)<y(n-1)@@ for all @@n≥3@@", None),
        ("Yes, and the sequence is @@1/2^3, 1/2^6, ...@@", None),
        ("@@x(x-1)...(x-2022)@@", None),
    ],
)
def test_reference_rules(raw, ref):
    assert champ_reference(raw) == ref


# ============================================================================ the shipped data


@needs_champ
def test_load_champ(problems):
    assert len(problems) == CHAMP_SIZE == 270
    assert len({p.id for p in problems}) == 270
    assert Counter(p.category for p in problems) == {
        "Number-Theory": 80, "Inequality": 50, "Polynomial": 50, "Sequence": 50, "Combinatorics": 40,
    }
    for p in problems:
        assert p.id.startswith(f"P_{p.category}_")
        assert p.statement.strip() and p.answer.strip() and p.steps and all(s.strip() for s in p.steps)
        assert "@@" not in p.statement + p.answer + "".join(p.steps)
        assert p.hints
    assert load_champ() == problems  # cached, same content, a fresh list
    assert load_champ() is not load_champ()


@needs_champ
def test_references_score_with_the_math_reward(problems):
    from nemo_plugins.rl.rewards import extract_final_answer, math_accuracy

    with_ref = [p for p in problems if p.reference is not None]
    assert len(with_ref) == 212  # the other 58 answers are words (yes/no, "No integer solutions", ...)
    failures = []
    for p in with_ref:
        completion = f"{THINK_START}{' '.join(p.steps)}{THINK_END}{champ_answer_text(p)}"
        assert extract_final_answer(completion) == p.reference
        if math_accuracy(completion, p.reference) != 1.0:
            failures.append(p.id)
    assert failures == []


@needs_champ
def test_references_reject_wrong_answers_and_accept_latex(problems):
    from nemo_plugins.rl.rewards import math_accuracy

    ref = {p.id: p.reference for p in problems}
    raw = {p.id: p.answer for p in problems}
    boxed = lambda s: f"\\boxed{{{s}}}"  # noqa: E731
    # CHAMP's words as reference would reward a wrong "1" (math-verify reads the sum as 1) ...
    assert math_accuracy(boxed("1"), raw["P_Combinatorics_33"]) == 1.0
    # ... the derived reference does not, and accepts the closed form in LaTeX
    assert math_accuracy(boxed("1"), ref["P_Combinatorics_33"]) == 0.0
    assert math_accuracy(boxed("\\left(\\frac{n(n+1)}{2}\\right)^2"), ref["P_Combinatorics_33"]) == 1.0
    assert math_accuracy(boxed("3"), ref["P_Sequence_7"]) == 1.0
    assert math_accuracy(boxed("2"), ref["P_Sequence_7"]) == 0.0
    assert math_accuracy(boxed("\\binom{10}{5}"), ref["P_Combinatorics_2"]) == 1.0
    assert math_accuracy(boxed("\\binom{n+1}{2m+1}"), ref["P_Combinatorics_16"]) == 1.0
    assert math_accuracy(boxed("2^{\\lfloor n/2 \\rfloor} \\lfloor n/2 \\rfloor!"), ref["P_Combinatorics_3"]) == 1.0
    assert math_accuracy(boxed("(0,2), (9,11)"), ref["P_Number-Theory_39"]) == 1.0
    assert math_accuracy(boxed("(0,2)"), ref["P_Number-Theory_39"]) == 0.0
    assert math_accuracy(boxed("625, 376"), ref["P_Number-Theory_3"]) == 1.0
    assert math_accuracy(boxed("1"), ref["P_Number-Theory_19"]) == 0.0


@needs_champ
def test_sft_pairs(problems):
    examples = champ_sft_examples(problems)
    assert len(examples) == 2 * 270
    for p, on, off in zip(problems, examples[0::2], examples[1::2]):
        assert on.thinking and not off.thinking and on.messages == off.messages
        assert on.messages[0].content.endswith(p.statement) and on.meta["id"] == p.id
        assert on.response.count(THINK_START) == 1 and on.response.count(THINK_END) == 1
        assert has_think_block(on.response) and on.reasoning == "\n".join(p.steps)
        assert on.response.split(THINK_END, 1)[1] == off.response == champ_answer_text(p)
        assert THINK_START not in off.response and THINK_END not in off.response
        assert off.response.endswith("}.") and "\\boxed{" in off.response
    bare = champ_sft_examples(problems[:1], instruction=None)
    assert bare[0].messages[0].content == problems[0].statement


@needs_champ
def test_concluded_traces_end_on_the_plain_answer(problems):
    """conclude: the trace's last step states CHAMP's answer unboxed; the rest is unchanged."""
    plain, concluded = champ_sft_examples(problems), champ_sft_examples(problems, conclude=True)
    for p, on, off, on_c, off_c in zip(problems, plain[0::2], plain[1::2], concluded[0::2], concluded[1::2]):
        assert off_c == off
        *steps, last = on_c.reasoning.split("\n")
        assert steps == list(p.steps) and last == f"So the answer is {p.answer.rstrip('.')}."
        assert "\\boxed" not in on_c.reasoning and has_think_block(on_c.response)
        assert on_c.response.split(THINK_END, 1)[1] == on.response.split(THINK_END, 1)[1]
    assert problems[0].id == "P_Combinatorics_1" and concluded[0].reasoning.endswith("\nSo the answer is 239.")


@needs_champ
def test_plain_wording_answers_with_the_boxed_reference_alone(problems):
    """wording=plain: "The answer is \\boxed{R}." for every problem with a reference, so CHAMP's
    worded answers ("..., so the answer is \\boxed{R}.") are gone; traces and prompts unchanged."""
    champ, plain = champ_sft_examples(problems), champ_sft_examples(problems, wording="plain")
    worded = 0
    for p, on, off, on_p, off_p in zip(problems, champ[0::2], champ[1::2], plain[0::2], plain[1::2]):
        expected = champ_answer_text(p) if p.reference is None else f"The answer is \\boxed{{{p.reference}}}."
        assert off_p.response == expected and on_p.response == f"{THINK_START}{on.reasoning}{THINK_END}{expected}"
        assert on_p.messages == on.messages and on_p.reasoning == on.reasoning
        worded += off.response != off_p.response
        assert off.response == off_p.response or ", so the answer is \\boxed{" in off.response
    assert worded > 50  # CHAMP words about 80 of its answers
    with pytest.raises(ValueError, match="wording 'words'"):
        champ_answer_text(problems[0], "words")


@needs_champ
def test_prompts_and_documents(problems):
    recs = champ_prompts(problems)
    assert len(recs) == 212 and len({r.id for r in recs}) == 212
    by_id = _by_id(problems)
    for r in recs:
        assert r.task == "math" and r.answer == by_id[r.id].reference
        assert r.prompt.endswith(by_id[r.id].statement)
    docs = champ_documents(problems)
    assert [d.id for d in docs] == [p.id for p in problems]
    for d, p in zip(docs, problems):
        assert d.text.startswith(p.statement) and all(s in d.text for s in p.steps)


@needs_champ
def test_split_by_problem_id(problems):
    train, held = champ_split(problems, 0.2, seed=1)
    assert {p.id for p in train}.isdisjoint({p.id for p in held})
    assert len(train) + len(held) == 270 and 30 < len(held) < 80
    # stable: order and the other problems do not matter
    _, held_rev = champ_split(list(reversed(problems)), 0.2, seed=1)
    assert {p.id for p in held_rev} == {p.id for p in held}
    sub = [p for p in problems if p.category == "Sequence"]
    _, held_sub = champ_split(sub, 0.2, seed=1)
    assert {p.id for p in held_sub} == {p.id for p in held if p.category == "Sequence"}
