"""The arithmetic world: answers are right, values stay in range, splits are clean, parsing is strict."""

import ast
import operator
import random
import re
from collections import Counter

import pytest

from nemo_plugins.data import reasoning_world as rw

BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
STEP_RE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def safe_eval(expr: str) -> int:
    """Evaluate an expression of int literals and + - * only (anything else raises)."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            return BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"disallowed node {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval"))


def question_expr(q: str) -> str:
    m = re.fullmatch(r"What is (.+)\?", q)
    assert m, q
    return m.group(1)


@pytest.fixture(scope="module")
def problems():
    return rw.generate_problems(3000, seed=123)


def test_answer_matches_question_and_steps(problems):
    for p in problems:
        expr = question_expr(p.question)
        assert safe_eval(expr) == p.answer, p
        # operator count in the question is the difficulty
        assert len(re.findall(r"[-+*]", expr)) == p.difficulty == len(p.steps)
        # operands single digit; multiplier 2..5
        for op, b in re.findall(r"([-+*]) (\d+)", expr):
            assert (2 <= int(b) <= 5) if op == "*" else (1 <= int(b) <= 9)
        # steps chain: first operand starts the question, each result feeds the next step
        a = int(re.match(r"\(*(\d+)", expr).group(1))
        assert 1 <= a <= 9
        for step in p.steps:
            m = STEP_RE.fullmatch(step)
            assert m, step
            x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
            assert x == a
            assert z == safe_eval(f"{x} {op} {y}")
            assert rw.MIN_VALUE <= z <= rw.MAX_VALUE
            a = z
        assert a == p.answer


def test_intermediate_values_in_range_by_evaluating_prefixes(problems):
    # independent of the step strings: every left-nested prefix of the question is in range
    for p in problems[:500]:
        expr = question_expr(p.question)
        tokens = re.findall(r"\d+|[-+*]", expr)
        prefix = tokens[0]
        for i in range(1, len(tokens), 2):
            prefix = f"({prefix}) {tokens[i]} {tokens[i + 1]}"
            assert 0 <= safe_eval(prefix) <= 99


def test_safe_eval_rejects_non_arithmetic():
    with pytest.raises(ValueError):
        safe_eval("__import__('os')")


def test_determinism():
    assert rw.generate_problems(200, seed=7) == rw.generate_problems(200, seed=7)
    assert rw.generate_problems(200, seed=7) != rw.generate_problems(200, seed=8)
    a = rw.generate_problem(random.Random(3), 4)
    assert a == rw.generate_problem(random.Random(3), 4)
    assert rw.split_problems(5, 300, 50) == rw.split_problems(5, 300, 50)


def test_difficulty_distribution(problems):
    counts = Counter(p.difficulty for p in problems)
    assert set(counts) == set(rw.DIFFICULTIES)
    for d in rw.DIFFICULTIES:
        assert abs(counts[d] - 600) < 120, counts
    only = rw.generate_problems(100, seed=1, difficulties=(2, 4))
    assert {p.difficulty for p in only} == {2, 4}


def test_bad_difficulties_rejected():
    with pytest.raises(ValueError):
        rw.generate_problem(random.Random(0), 0)
    with pytest.raises(ValueError):
        rw.generate_problems(5, seed=0, difficulties=())


def test_split_disjoint_and_balanced():
    train, ev = rw.split_problems(seed=0, n_train=4000, n_eval=103)
    assert len(train) == 4000 and len(ev) == 103
    eval_q = [p.question for p in ev]
    assert len(set(eval_q)) == len(eval_q)
    assert not set(eval_q) & {p.question for p in train}
    counts = Counter(p.difficulty for p in ev)
    assert sorted(counts.values()) == [20, 20, 21, 21, 21]
    assert max(counts.values()) - min(counts.values()) <= 1
    train_counts = Counter(p.difficulty for p in train)
    assert all(abs(train_counts[d] - 800) < 150 for d in rw.DIFFICULTIES), train_counts


def test_split_raises_when_level_exhausted():
    # difficulty 1 has only 162 distinct questions
    with pytest.raises(ValueError, match="difficulty 1"):
        rw.split_problems(seed=0, n_train=10, n_eval=200, difficulties=(1,))


def test_extra_heldout_is_new_unique_balanced_and_reproducible():
    from nemo_plugins.data.tiny_world import World, WorldConfig

    cfg = WorldConfig(n_train=3000, n_eval=50)
    train, ev = rw.split_problems(cfg.seed, cfg.n_train, cfg.n_eval)
    world = World(cfg, train, ev, tokenizer=None)
    extra = world.extra_heldout(301, [2, 3, 4])
    questions = [p.question for p in extra]
    assert len(set(questions)) == 301
    assert not set(questions) & ({p.question for p in train} | {p.question for p in ev})
    assert sorted(Counter(p.difficulty for p in extra).values()) == [100, 100, 101]
    assert [p.question for p in world.extra_heldout(301, [2, 3, 4])] == questions
    assert [p.question for p in world.extra_heldout(301, [2, 3, 4], tag="other")] != questions
    with pytest.raises(ValueError, match="difficulty 1"):  # only 162 distinct questions, many in train
        world.extra_heldout(200, [1])


P = rw.Problem(question="What is (7 + 5) * 3?", steps=("7 + 5 = 12", "12 * 3 = 36"), answer=36, difficulty=2)


def test_responses():
    assert rw.reasoning_response(P) == "<think>7 + 5 = 12\n12 * 3 = 36</think>The answer is 36."
    assert rw.direct_response(P) == "The answer is 36."
    assert rw.response_for(P, True) == rw.reasoning_response(P)
    assert rw.response_for(P, False) == rw.direct_response(P)


def test_generated_responses_verify(problems):
    for p in problems[:300]:
        r, d = rw.reasoning_response(p), rw.direct_response(p)
        assert rw.extract_answer(r) == rw.extract_answer(d) == p.answer
        assert rw.is_correct(r, p) and rw.is_correct(d, p)
        assert rw.has_think_block(r) and not rw.has_think_block(d)
        assert rw.is_well_formatted(r, thinking=True) and rw.is_well_formatted(d, thinking=False)
        assert not rw.is_well_formatted(r, thinking=False) and not rw.is_well_formatted(d, thinking=True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 36.", 36),
        ("<think>12 * 3 = 36</think>The answer is 36.", 36),
        ("<think></think>The answer is 0.", 0),
        ("The answer is 5. The answer is 7.", 7),  # last one wins
        ("<think>x</think>The answer is 5. Actually, The answer is 9.", 9),
        ("<think>The answer is 3.</think>The answer is 4.", 4),
        ("<think>The answer is 3.</think>", None),  # only inside the think block
        ("<think>The answer is 3.", None),  # unterminated think block
        ("<think>a</think>b</think>The answer is 8.", 8),  # after the last </think>
        ("<think>a</think>The answer is 8.<think>The answer is 2.", 8),  # reopened thought ignored
        ("The answer is -4.", -4),
        ("", None),
        ("The answer is 12", None),  # no period
        ("The answer is twelve.", None),
        ("The answer is 1a.", None),
        ("The answer is 12.5.", None),
        ("the answer is 12.", None),
        ("The answer is .", None),
    ],
)
def test_extract_answer(text, expected):
    assert rw.extract_answer(text) == expected


def test_is_correct():
    assert rw.is_correct("<think>...</think>The answer is 36.", P)
    assert not rw.is_correct("<think>...</think>The answer is 35.", P)
    assert not rw.is_correct("<think>The answer is 36.</think>", P)
    assert not rw.is_correct("garbage", P)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<think>a</think>The answer is 1.", True),
        ("<think></think>The answer is 1.", True),
        ("The answer is 1.", False),
        (" <think>a</think>The answer is 1.", False),  # not at the start
        ("<think>a</think><think>b</think>The answer is 1.", False),  # two blocks
        ("<think>a The answer is 1.", False),  # unterminated
        ("</think><think>a</think>", False),
        ("<think>a</think></think>", False),
    ],
)
def test_has_think_block(text, ok):
    assert rw.has_think_block(text) is ok


def test_is_well_formatted_is_strict():
    assert not rw.is_well_formatted("<think>a</think>The answer is 1. extra", thinking=True)
    assert not rw.is_well_formatted("So, The answer is 1.", thinking=False)
    assert not rw.is_well_formatted("The answer is 1.</think>", thinking=False)
