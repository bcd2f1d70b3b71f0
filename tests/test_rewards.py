"""GRPO rewards: answers are extracted and compared right, formats are strict, and hostile or slow
completions cost a counted 0 inside the sandbox (never a hang, crash or code execution); the
LLM judge survives a stub server's bad replies."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.rl import rewards as R
from nemo_plugins.rl.judge import JudgeConfig, LLMJudge, parse_verdict
from nemo_plugins.rl.sandbox import RewardPool, direct_map

TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"  # parses in ms, then sympy's comparison never ends
DEEP = "(" * 30 + "1" + ")" * 30  # parsing this as a reference takes far longer than a sample's time limit
BARS = "|" * 50 + "1" + "|" * 50  # within the answer limits (bars are not nesting), but seconds to parse
LONG_RUN = 20_000  # spaces/tabs in the backtracking tests (the old regexes took minutes on 4,000)


# --------------------------------------------------------------------------- test-only reward fns
# (module level so worker processes can unpickle them)


def sleepy(x: str) -> float:
    if x == "hang":
        time.sleep(120)
    return float(len(x))


def hog(mb: int) -> float:
    block = bytearray(mb * 2**20)
    return float(len(block) > 0)


def die(x: str) -> float:
    if x == "die":
        os._exit(3)
    return 1.0


def boom(x: str) -> float:
    raise KeyError(x)


def nap_or_spin(how: str) -> float:
    """Sleeps (uses no CPU, like a worker starved by a loaded machine) or spins on the CPU."""
    seconds = float(how[1:])
    if how[0] == "n":
        time.sleep(seconds)
    else:
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
    return 1.0


_WARMED: list[str] = []  # per worker process


def warmed(x: str) -> str:
    """Records warm-up calls; a probe returns what this worker saw before it."""
    if x == "probe":
        return ",".join(_WARMED)
    if x == "bad":
        raise ValueError(x)
    _WARMED.append(x)
    return x


def bounded_map(pool, items, bound_s):
    """pool.map(items), asserting it returns within bound_s (a broken time limit fails, not hangs;
    bounds leave ~30 s for a loaded machine, far below the 120 s a hung sample sleeps)."""
    out = {}

    def run():
        try:
            out["result"] = pool.map(items)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(bound_s)
    assert not thread.is_alive(), f"map did not return within {bound_s} s"
    assert time.monotonic() - start < bound_s
    if "error" in out:
        raise out["error"]
    return out["result"]


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}", "5"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last box wins
        ("\\boxed{1} then \\boxed{2", None),  # ... even when truncated
        ("\\boxed {7}", "7"),
        ("\\boxed{}", None),
        ("The answer is 55.", "55"),
        ("The answer is 1/2.", "1/2"),
        ("The answer is \\frac{1}{2}", "\\frac{1}{2}"),
        ("<think>\\boxed{3}</think>\\boxed{4}", "4"),
        ("<think>The answer is 3.</think>The answer is 4.", "4"),
        ("<think>The answer is 3.", None),  # unclosed think: nothing after it
        ("<think>The answer is 3.</think>", None),  # answer only inside the think block
        ("no answer here", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert R.extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Dividing, the answer is 1/2.", "1/2"),
        ("THE ANSWER IS: 1/2", "1/2"),
        ("The answer is 5. Hmm, no: the answer is 7.", "7"),  # the last phrase decides, whatever its case
        ("the answer is 5. Check: 5 = 5", "5"),  # "N." right after the phrase, as in the tiny world
        ("the answer is 3.5", "3.5"),
    ],
)
def test_answer_phrase_is_case_insensitive(text, expected):
    assert R.extract_final_answer(text) == expected
    assert R.math_accuracy(text, expected) == 1.0
    assert R.extract_choice(text.replace(expected, "B")) == "B"  # the choice extractor reads the same phrases


@pytest.mark.parametrize("ws", [" ", "\t", " \t"])
@pytest.mark.parametrize(
    "template",
    [
        "Let me think. The answer is not obvious{ws}at first.\nThe answer is 1/2.",
        "The answer is{ws}1/2{ws}.{ws}",
        "the answer is:{ws}",
        "The answer{ws}is{ws}:{ws}(B{ws}",
        "Answer{ws}!",
        "Answer{ws}" * 3,
    ],
)
def test_extraction_is_fast_on_long_whitespace_runs(template, ws):
    """Extractors read model output in linear time: a long run of spaces cannot stall them."""
    text = template.format(ws=ws * (LONG_RUN // len(ws)))
    start = time.monotonic()
    R.extract_final_answer(text)
    R.extract_choice(text)
    assert time.monotonic() - start < 2.0


# --------------------------------------------------------------------------- math accuracy


@pytest.mark.parametrize(
    "completion, reference",
    [
        ("\\boxed{0.5}", "1/2"),
        ("\\boxed{1/2}", "0.5"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("The answer is 1/2.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{x + 1}", "1 + x"),
        ("<think>7 + 5 = 12\n12 - 7 = 5</think>The answer is 5.", 5),
        ("<think>guess \\boxed{3}</think>so \\boxed{0.5}", "\\frac12"),
    ],
)
def test_math_accuracy_accepts_equivalent_forms(completion, reference):
    assert R.math_accuracy(completion, reference) == 1.0


@pytest.mark.parametrize(
    "completion, reference",
    [
        ("\\boxed{0.4}", "1/2"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("I believe it is 1/2", "1/2"),  # no box, no "The answer is"
        ("<think>\\boxed{0.5}</think>", "1/2"),  # only inside the think block
        ("\\boxed{0.5}<think>done</think>", "1/2"),  # answer before the think block
        ("<think>\\boxed{0.5}", "1/2"),  # unclosed think
        ("\\boxed{0.5} and then \\boxed{0.", "1/2"),  # truncated last box
    ],
)
def test_math_accuracy_rejects_wrong_or_missing(completion, reference):
    assert R.math_accuracy(completion, reference) == 0.0


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{__import__('os').system('true')}",
        "\\boxed{" + "(" * 20 + "1" + ")" * 20 + "}",
        "\\boxed{" + "1+" * 400 + "1}",
    ],
)
def test_unsafe_answers_are_rejected_before_parsing(completion):
    with pytest.raises(R.RejectedAnswer):
        R.math_accuracy(completion, "1")


def test_bad_reference_names_itself():
    with pytest.raises(ValueError, match="reference"):
        R.math_accuracy("\\boxed{1}", "")


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    "reference, task, why",
    [
        (DEEP, "math", "nests brackets 30 deep"),
        ("1+" * 300 + "1", "math", "chars > MAX_ANSWER_CHARS"),
        ("__import__('os')", "math", "forbidden text"),
        ("", "math", "does not parse"),
        ("\\frac{1}{", "math", "does not parse"),  # math-verify only echoes it back as a string
        ("AB", "choice", "one letter"),
        (None, "choice", "one letter"),
        ("1/2", "world", "not an integer"),
        (True, "world", "not an integer"),
    ],
)
def test_check_reference_names_the_prompt_and_the_problem(reference, task, why):
    with pytest.raises(R.BadReference, match=f"^prompt p17: .*{why}"):
        R.check_reference(reference, task, "prompt p17")


@pytest.mark.parametrize(
    "reference, task",
    [("1/2", "math"), (5, "math"), ("\\frac{\\sqrt{2}}{2}", "math"), ("b", "choice"), ("-3", "world"), (7, "world")],
)
def test_check_reference_accepts_good_references(reference, task):
    R.check_reference(reference, task, "prompt p1")


def test_check_references_times_the_math_parse_in_the_sandbox():
    refs = {"p1": "1/2", "p2": BARS, "p3": DEEP, "p4": 5}
    start = time.monotonic()
    with pytest.raises(R.BadReference, match=r"^prompt p2: .*timeout.*\(and 1 more"):
        R.check_references(refs, "math", timeout_s=1.0)
    assert time.monotonic() - start < 30.0
    R.check_references({"p1": "1/2", "p4": 5}, "math")
    with pytest.raises(R.BadReference, match="^prompt b: reference 'x' is not an integer$"):
        R.check_references({"a": 1, "b": "x"}, "world")  # no pool needed
    R.check_references({"a": "A", "b": "C"}, "choice")


def test_parser_does_not_execute_code(tmp_path):
    """Even past the guard, math-verify's parsers must not eval the answer."""
    sentinel = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {sentinel}')",
        f"1+(__import__('os').system('touch {sentinel}'))",
        f"\\text{{__import__('os').system('touch {sentinel}')}}",
    ]
    gold = R._parse_math("1")
    for p in payloads:
        assert not R.verify(gold, R._parse_math(p), timeout_seconds=None)
    assert not sentinel.exists()


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{B}",
        "\\boxed{(B)}",
        "\\boxed{\\text{B}}",
        "Answer: B",
        "The answer is (B).",
        "so the answer is B, clearly",
        "B",
        "(B).",
        "Between the options, (B) fits.",
        "<think>Answer: A</think>Answer: B",
    ],
)
def test_choice_accepted_forms(completion):
    assert R.extract_choice(completion) == "B"
    assert R.choice_accuracy(completion, "B") == 1.0
    assert R.choice_accuracy(completion, "c") == 0.0


@pytest.mark.parametrize("completion", ["\\boxed{42}", "no letter here", "<think>Answer: B</think>", "Bob said hi"])
def test_choice_without_a_letter(completion):
    assert R.choice_accuracy(completion, "B") == 0.0


@pytest.mark.parametrize("bad", ["", "AB", "1", None])
def test_choice_reference_must_be_a_letter(bad):
    with pytest.raises(ValueError, match="reference_letter"):
        R.choice_accuracy("B", bad)


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion, thinking, expected",
    [
        ("<think>a</think>The answer is 5.", True, 1.0),
        ("<think></think>\\boxed{5}", True, 1.0),
        ("The answer is 5.<think>a</think>", True, 0.0),  # answer before think
        ("<think>a</think><think>b</think>The answer is 5.", True, 0.0),  # two think blocks
        ("<think>a</think>5</think>", True, 0.0),  # stray closing tag
        ("<think>a The answer is 5.", True, 0.0),  # unclosed
        ("<think>a</think>   ", True, 0.0),  # nothing after thinking
        ("  <think>a</think>5", True, 0.0),  # text before the think block
        ("The answer is 5.", True, 0.0),  # no think block at all
        ("The answer is 5.", False, 1.0),
        ("<think>a</think>The answer is 5.", False, 0.0),
        ("The answer is 5.</think>", False, 0.0),
        ("  ", False, 0.0),
    ],
)
def test_format_reward(completion, thinking, expected):
    assert R.format_reward(completion, thinking) == expected


def test_format_agrees_with_the_tiny_world():
    for p in rw.generate_problems(50, seed=7):
        for thinking in (True, False):
            text = rw.response_for(p, thinking)
            assert R.format_reward(text, thinking) == 1.0 == float(rw.is_well_formatted(text, thinking))
            assert R.format_reward(text, not thinking) == 0.0 == float(rw.is_well_formatted(text, not thinking))


# --------------------------------------------------------------------------- combined


def test_combined_reward_weights_components():
    cfg = R.RewardConfig(task="math", accuracy_weight=1.0, format_weight=0.25)
    assert R.combined_reward("<think>x</think>\\boxed{0.5}", "1/2", True, cfg) == R.RewardBreakdown(1.25, 1.0, 1.0)
    assert R.combined_reward("\\boxed{0.5}", "1/2", True, cfg) == R.RewardBreakdown(1.0, 1.0, 0.0)
    wrong = R.combined_reward("\\boxed{0.5}", "1/3", False, cfg)
    assert wrong.as_dict() == {"total": 0.25, "accuracy": 0.0, "format": 1.0}
    choice = R.RewardConfig(task="choice", format_weight=0.0)
    assert R.combined_reward("Answer: C", "C", False, choice).total == 1.0


def test_combined_reward_world_task_is_strict():
    cfg = R.RewardConfig(task="world", format_weight=0.5)
    p = rw.generate_problems(1, seed=3)[0]
    assert R.combined_reward(rw.reasoning_response(p), p.answer, True, cfg) == R.RewardBreakdown(1.5, 1.0, 1.0)
    loose = f"<think>hmm</think>So the answer is {p.answer}. The answer is {p.answer}."
    assert R.combined_reward(loose, p.answer, True, cfg) == R.RewardBreakdown(1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"task": "code"}, "task"),
        ({"accuracy_weight": -1}, "accuracy_weight"),
        ({"format_weight": float("nan")}, "format_weight"),
    ],
)
def test_reward_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        R.RewardConfig(**kwargs)


# --------------------------------------------------------------------------- sandbox


@pytest.fixture(scope="module")
def math_pool():
    with RewardPool(R.math_accuracy, workers=2, timeout_s=2.0, memory_mb=512, max_chars=100_000,
                    warmup=[("\\boxed{1/2}", "1/2")]) as pool:  # fmt: skip
        yield pool


GOOD_ITEMS = [
    ("\\boxed{0.5}", "1/2"),
    ("\\boxed{0.4}", "1/2"),
    ("The answer is 55.", 55),
    ("no answer", "3"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}"),
]


def test_pool_matches_direct(math_pool):
    values, failures = math_pool.map(GOOD_ITEMS)
    assert (values, failures) == direct_map(R.math_accuracy, GOOD_ITEMS)
    assert values == [1.0, 0.0, 1.0, 0.0, 1.0] and not failures


def test_pool_rejects_a_10mb_completion_fast(math_pool):
    huge = "9" * 10_000_000 + "\\boxed{1}"
    start = time.monotonic()
    values, failures = math_pool.map([(huge, "1"), ("\\boxed{1}", "1")])
    assert time.monotonic() - start < 2.0
    assert values == [0.0, 1.0] and failures == Counter(too_long=1)
    assert direct_map(R.math_accuracy, [(huge, "1")], max_chars=100_000) == ([0.0], Counter(too_long=1))


def test_pool_kills_a_pathological_expression(math_pool):
    items = [(TOWER, "5"), *GOOD_ITEMS]
    pids = set(math_pool.pids)
    values, failures = bounded_map(math_pool, items, math_pool.timeout_s + 30.0)
    assert failures == Counter(timeout=1)
    assert values == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert set(math_pool.pids) != pids  # the stuck worker was replaced
    assert math_pool.map(GOOD_ITEMS[:1]) == ([1.0], Counter())


def test_pool_scores_an_answer_after_a_long_space_run(math_pool):
    """The reviewed case: a line with "The answer is" and 1,500 spaces used to time out (0)."""
    text = "Let me think. The answer is not obvious" + " " * 1500 + "at first.\nThe answer is 1/2."
    assert bounded_map(math_pool, [(text, "0.5")], math_pool.timeout_s + 30.0) == ([1.0], Counter())


def test_pool_fails_a_bad_reference_fast(math_pool):
    start = time.monotonic()
    values, failures = math_pool.map([("\\boxed{1}", DEEP), ("\\boxed{1}", "1")])
    assert time.monotonic() - start < 1.5  # refused before parsing, not timed out
    assert values == [0.0, 1.0] and failures == Counter({"error:BadReference": 1})


def test_pool_counts_unsafe_and_nested_answers(math_pool, tmp_path):
    sentinel = tmp_path / "pwned"
    evil = f"\\boxed{{__import__('os').system('touch {sentinel}')}}"
    nested = "\\boxed{" + "(" * 2000 + "1" + ")" * 2000 + "}"
    start = time.monotonic()
    values, failures = math_pool.map([(evil, "1"), (nested, "1")])
    assert time.monotonic() - start < 2.0  # refused before parsing, not timed out
    assert values == [0.0, 0.0] and failures == Counter({"error:RejectedAnswer": 2})
    assert not sentinel.exists()


def test_hung_worker_is_killed_and_pool_keeps_working():
    with RewardPool(sleepy, workers=2, timeout_s=0.5, memory_mb=None) as pool:
        values, failures = bounded_map(pool, ["a", "hang", "bb", "hang", "ccc"], 2 * pool.timeout_s + 30.0)
        assert values == [1.0, 0.0, 2.0, 0.0, 3.0] and failures == Counter(timeout=2)
        assert pool.map(["dddd", "e"]) == ([4.0, 1.0], Counter())
        assert pool.failures == Counter(timeout=2)


def test_memory_limit_is_enforced():
    with RewardPool(hog, workers=1, timeout_s=5.0, memory_mb=200) as pool:
        values, failures = pool.map([20, 2000, 20])
    assert values == [1.0, 0.0, 1.0] and failures == Counter(memory=1)


def test_crash_and_errors_are_counted():
    with RewardPool(die, workers=2, timeout_s=5.0) as pool:
        assert pool.map(["ok", "die", "ok"]) == ([1.0, 0.0, 1.0], Counter(crash=1))
        assert pool.map(["ok"]) == ([1.0], Counter())
        assert pool.map([threading.Lock(), "ok"]) == ([0.0, 1.0], Counter({"error:TypeError": 1}))  # unpicklable
    with RewardPool(boom, workers=1, timeout_s=5.0) as pool:
        assert pool.map(["x"]) == ([0.0], Counter({"error:KeyError": 1}))
    assert direct_map(boom, ["x"]) == ([0.0], Counter({"error:KeyError": 1}))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU time from /proc")
def test_the_time_limit_is_on_cpu_time_with_a_wall_backstop():
    """A sample that waits without using the CPU (as one starved on a loaded machine does) is not
    failed at timeout_s of wall time; one that spins past timeout_s of CPU is; nothing outlives
    WALL_FACTOR x timeout_s of wall time."""
    from nemo_plugins.rl import sandbox

    assert sandbox.cpu_seconds(os.getpid()) > 0
    with RewardPool(nap_or_spin, workers=1, timeout_s=0.3, memory_mb=None) as pool:
        assert pool.map(["n0.9"]) == ([1.0], Counter())  # 3x the limit in wall time, ~0 CPU
        assert bounded_map(pool, ["s5"], 30.0) == ([0.0], Counter(timeout=1))
        start = time.monotonic()
        assert bounded_map(pool, ["n60"], 30.0) == ([0.0], Counter(timeout=1))
        assert time.monotonic() - start >= sandbox.WALL_FACTOR * pool.timeout_s - 0.1


def test_workers_run_the_warmup_before_taking_work():
    """Each worker computes the warm-up items (a failing one included) before its first sample,
    and a fresh replacement worker warms up again."""
    with RewardPool(warmed, workers=1, timeout_s=5.0, memory_mb=None, warmup=["w1", "bad", "w2"], failure_value="") as pool:
        assert pool.map(["probe"]) == (["w1,w2"], Counter())
        assert pool.map(["x", "probe"]) == (["x", "w1,w2,x"], Counter())
    with RewardPool(warmed, workers=1, timeout_s=5.0, memory_mb=None, failure_value="") as pool:
        assert pool.map(["probe"]) == ([""], Counter())


def test_math_reward_workers_parse_once_before_the_first_sample():
    """math-verify's first parse in a process costs about a second; scorers warm their workers
    with a real math item so it never counts against the first sample's deadline."""
    (item,) = R.warmup_completions("math")
    assert R.combined_reward(*item, config=R.RewardConfig(task="math")).total == 1.1
    assert R.warmup_completions("world") == () and R.warmup_completions("choice") == ()
    from nemo_plugins.rl.scoring import RuleScorer, SandboxLimits

    with RuleScorer(R.RewardConfig(task="math"), SandboxLimits(workers=1)) as scorer:
        assert scorer._pool().warmup == R.warmup_completions("math")


def test_combined_reward_pool_scores_breakdowns():
    items = [
        ("<think>x</think>\\boxed{0.5}", "1/2", True),
        (TOWER, "5", False),
        ("x" * 200, "1", False),
    ]
    reward = partial(R.combined_reward, config=R.RewardConfig(format_weight=0.5))
    # warmed up: otherwise the first parse's one-time cost (~1 s) can time out the first item under load
    with RewardPool(reward, workers=2, timeout_s=1.0, max_chars=100, failure_value=R.ZERO_REWARD,
                    warmup=R.warmup_completions("math")) as pool:  # fmt: skip
        values, failures = bounded_map(pool, items, pool.timeout_s + 30.0)
    assert values == [R.RewardBreakdown(1.5, 1.0, 1.0), R.ZERO_REWARD, R.ZERO_REWARD]
    assert failures == Counter(timeout=1, too_long=1)


STDIN_SCRIPT = """
import math
from nemo_plugins.rl.sandbox import RewardPool
if __name__ == "__main__":
    with RewardPool(math.sqrt, workers=1, timeout_s=10.0) as pool:
        print(pool.map([4.0])[0])
"""


def test_pool_explains_a_script_read_from_stdin():
    """Workers re-run the main script, which stdin is not: say so instead of blaming fn or memory."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kw = dict(capture_output=True, text=True, timeout=120, cwd=repo)
    from_stdin = subprocess.run([sys.executable, "-"], input=STDIN_SCRIPT, **kw)
    assert from_stdin.returncode != 0
    assert "'<stdin>' is not a file" in from_stdin.stderr and "python -c" in from_stdin.stderr
    from_c = subprocess.run([sys.executable, "-c", STDIN_SCRIPT], **kw)  # the advice works
    assert (from_c.returncode, from_c.stdout.strip()) == (0, "[2.0]"), from_c.stderr


@pytest.mark.parametrize(
    "kwargs, field", [({"workers": 0}, "workers"), ({"timeout_s": -1}, "timeout_s"), ({"max_chars": 1.5}, "max_chars")]
)
def test_pool_validates_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RewardPool(sleepy, **kwargs)


# --------------------------------------------------------------------------- LLM judge


class _StubJudge(BaseHTTPRequestHandler):
    """Canned OpenAI-compatible replies chosen by a marker in the question."""

    requests: list = []
    calls: Counter = Counter()

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow case)
            pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), payload))
        prompt = payload["messages"][0]["content"]
        marker = prompt.split("Question:\n", 1)[1].split("\n", 1)[0]
        type(self).calls[marker] += 1

        def reply(text):
            body = {"choices": [{"message": {"role": "assistant", "content": text}}]}
            return self._send(200, json.dumps(body).encode())

        if marker == "slow":
            time.sleep(1.5)
            return reply("CORRECT")
        if marker == "flaky" and type(self).calls[marker] == 1:
            return self._send(503, b"{}")
        if marker == "missing":
            return self._send(404, b"{}")
        if marker == "malformed":
            return self._send(200, b"<html>not json")
        if marker == "no-choices":
            return self._send(200, b'{"choices": []}')
        canned = {"wrong": "INCORRECT", "unsure": "I cannot tell.", "both": "CORRECT or INCORRECT"}
        return reply(canned.get(marker, "Verdict: CORRECT"))


@pytest.fixture(scope="module")
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubJudge)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _judge(base_url, **kw):
    cfg = JudgeConfig(base_url=base_url, model="stub-judge", api_key="k", timeout_s=0.4, retries=1, backoff_s=0.05, **kw)
    return LLMJudge(cfg)


def test_judge_correct_and_incorrect(judge_server):
    judge = _judge(judge_server)
    _StubJudge.requests.clear()
    ok = judge.judge("right", "42", "<think>secret reasoning</think>The answer is 42.")
    assert (ok.reward, ok.verdict, ok.failure) == (1.0, "CORRECT", None)
    bad = judge.judge("wrong", "42", "The answer is 41.")
    assert (bad.reward, bad.verdict, bad.failure) == (0.0, "INCORRECT", None)
    path, auth, payload = _StubJudge.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and payload["model"] == "stub-judge"
    prompt = payload["messages"][0]["content"]
    assert "The answer is 42." in prompt and "42" in prompt and "secret reasoning" not in prompt


@pytest.mark.parametrize(
    "marker, failure, calls",
    [
        ("malformed", "malformed", 1),
        ("no-choices", "malformed", 1),
        ("unsure", "no_verdict", 1),
        ("both", "no_verdict", 1),
        ("missing", "http:404", 1),  # client errors are not retried
        ("slow", "timeout", 2),  # retried once, then given up
    ],
)
def test_judge_failures_are_counted_not_raised(judge_server, marker, failure, calls):
    judge = _judge(judge_server)
    _StubJudge.calls[marker] = 0
    start = time.monotonic()
    result = judge.judge(marker, "1", "The answer is 1.")
    assert time.monotonic() - start < 3.0
    assert (result.reward, result.failure) == (0.0, failure)
    assert judge.failures == Counter({failure: 1})
    assert _StubJudge.calls[marker] == calls


def test_judge_retries_a_server_error(judge_server):
    _StubJudge.calls["flaky"] = 0
    result = _judge(judge_server).judge("flaky", "1", "The answer is 1.")
    assert (result.reward, result.failure) == (1.0, None) and _StubJudge.calls["flaky"] == 2


def test_judge_unreachable_and_batch(judge_server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _judge(f"http://127.0.0.1:{port}").judge("right", "1", "1").failure == "connection"
    rewards, failures = _judge(judge_server, concurrency=2).score(
        [("right", "1", "1"), ("wrong", "1", "2"), ("malformed", "1", "1"), ("right", "1", "1")]
    )
    assert rewards == [1.0, 0.0, 0.0, 1.0] and failures == Counter(malformed=1)


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("CORRECT", "CORRECT"),
        ("incorrect.", "INCORRECT"),
        ("Verdict: CORRECT", "CORRECT"),
        ("CORRECT, INCORRECT", None),
        ("INCORRECTLY", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"model": ""}, "model"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"prompt_template": "{question}"}, "reference"),
    ],
)
def test_judge_config_names_the_bad_field(kwargs, field):
    base = {"base_url": "http://127.0.0.1:1", "model": "m"}
    with pytest.raises(ValueError, match=field):
        JudgeConfig(**{**base, **kwargs})
