"""RL prompt JSONL: schema checks, malformed records located and counted, ids, task consistency."""

import json
from collections import Counter

import pytest

from nemo_plugins.data import prompts
from nemo_plugins.data.prompts import (
    PromptRecord,
    load_prompts,
    make_prompt_record,
    read_prompts,
    write_prompts,
)
from nemo_plugins.data.sft_data import RecordError


def _write(path, records):
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in records]
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def test_tasks_match_the_rewards():
    from nemo_plugins.rl import rewards

    assert prompts.TASKS == rewards.TASKS


def test_good_records(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 1/2 + 1/4?", "answer": "3/4", "task": "math", "id": "m1"},
            {"prompt": "Half of 7?", "answer": 3.5, "task": "math"},  # number -> string, default id
            {"prompt": "Pick one: (A) 2 (B) 3", "answer": " b ", "task": "choice", "id": 7},
            {"prompt": "What is (3 - 5) - 1?", "answer": -3, "task": "world", "extra": "ignored"},
        ],
    )
    records, report = load_prompts(path)
    assert records == [
        PromptRecord("m1", "What is 1/2 + 1/4?", "3/4", "math", (str(path), 1)),
        PromptRecord(f"{path}:2", "Half of 7?", "3.5", "math", (str(path), 2)),
        PromptRecord("7", "Pick one: (A) 2 (B) 3", "B", "choice", (str(path), 3)),
        PromptRecord(f"{path}:4", "What is (3 - 5) - 1?", "-3", "world", (str(path), 4)),
    ]
    assert (report.read, report.kept, report.skipped) == (4, 4, 0)
    with pytest.raises(AttributeError):
        records[0].answer = "x"  # frozen


def test_stored_answers_fit_the_rewards(tmp_path):
    from nemo_plugins.rl.rewards import choice_accuracy, math_accuracy, world_accuracy

    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "answer": 0.5, "task": "math"},
            {"prompt": "q", "answer": "c", "task": "choice"},
            {"prompt": "q", "answer": "-3", "task": "world"},
        ],
    )
    m, c, w = list(read_prompts(path))
    assert math_accuracy("The answer is \\boxed{\\frac{1}{2}}.", m.answer) == 1.0
    assert choice_accuracy("The answer is (C).", c.answer) == 1.0
    assert world_accuracy("<think>x</think>The answer is -3.", w.answer) == 1.0


MALFORMED = [
    ({"prompt": "ok", "answer": "1", "task": "math", "id": "dup"}, None),  # 1 kept
    ("{oops", "bad_json"),  # 2
    ('"just a string"', "not_object"),  # 3
    ({"answer": "1", "task": "math"}, "missing_field"),  # 4 no prompt
    ({"prompt": "q", "task": "math"}, "missing_field"),  # 5 no answer
    ({"prompt": "q", "answer": "1"}, "missing_field"),  # 6 no task
    ({"prompt": ["q"], "answer": "1", "task": "math"}, "bad_type"),  # 7
    ({"prompt": "q", "answer": True, "task": "math"}, "bad_type"),  # 8 bool is not a number
    ({"prompt": "q", "answer": [1], "task": "math"}, "bad_type"),  # 9
    ({"prompt": "q", "answer": "1", "task": "code"}, "bad_value"),  # 10 unknown task
    ({"prompt": "q", "answer": "AB", "task": "choice"}, "bad_value"),  # 11
    ({"prompt": "q", "answer": "3.5", "task": "world"}, "bad_value"),  # 12
    ('{"prompt": "q", "answer": NaN, "task": "math"}', "bad_value"),  # 13
    ({"prompt": "  ", "answer": "1", "task": "math"}, "empty_text"),  # 14
    ({"prompt": "q", "answer": " ", "task": "math"}, "empty_text"),  # 15
    ({"prompt": "q<|eos|>", "answer": "1", "task": "math"}, "special_token"),  # 16
    ({"prompt": "again", "answer": "2", "task": "math", "id": "dup"}, "duplicate_id"),  # 17
    ({"prompt": "q", "answer": "1", "task": "math", "id": False}, "bad_type"),  # 18
    ({"prompt": "q", "answer": "1", "task": 3}, "bad_type"),  # 19
    ({"prompt": "last", "answer": "2", "task": "math"}, None),  # 20 kept
]


def test_malformed_records_counted_located_and_skipped(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [r for r, _ in MALFORMED[:10]] + [""] + [r for r, _ in MALFORMED[10:]])
    line_of = [i + 1 if i < 10 else i + 2 for i in range(len(MALFORMED))]  # a blank line after record 10
    records, report = load_prompts(path)
    assert [r.prompt for r in records] == ["ok", "last"]
    assert (report.read, report.kept, report.skipped, report.blank) == (20, 2, 18, 1)
    expected = [(line_of[i], reason) for i, (_, reason) in enumerate(MALFORMED) if reason]
    assert report.reasons == Counter(reason for _, reason in expected)
    got = [(int(p.split(": ", 1)[0].rsplit(":", 1)[1]), p.split(": ", 2)[1]) for p in report.problems]
    assert got == expected
    assert all(p.startswith(f"{path}:") for p in report.problems)
    dup = next(p for p in report.problems if "duplicate_id" in p)
    assert f"{path}:1" in dup  # names where the id was first used


def test_raise_and_default_task(tmp_path):
    path = _write(
        tmp_path / "p.jsonl", [{"prompt": "q", "answer": "1"}, {"prompt": "r", "answer": "x", "task": "choice"}]
    )
    with pytest.raises(ValueError, match=rf"^{path}:1: missing_field: no 'task'"):
        list(read_prompts(path, on_error="raise"))
    records, report = load_prompts(path, default_task="world")
    assert [(r.task, r.answer) for r in records] == [("world", "1"), ("choice", "X")]  # an explicit task wins
    assert report.skipped == 0
    with pytest.raises(ValueError, match="default_task"):
        read_prompts(path, default_task="code")


def test_duplicate_ids_across_files_and_round_trip(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "p1", "answer": "1", "task": "math", "id": "q"}])
    b = _write(tmp_path / "b.jsonl", [{"prompt": "p2", "answer": "2", "task": "math", "id": "q"}])
    records, report = load_prompts(tmp_path)  # a directory: both files, sorted
    assert [r.prompt for r in records] == ["p1"]
    assert report.reasons == Counter(duplicate_id=1) and report.problems[0].startswith(f"{b}:1:")
    assert f"{a}:1" in report.problems[0]

    out = tmp_path / "out" / "rt.jsonl"
    out.parent.mkdir()
    recs = [make_prompt_record("What is 2+2?", 4, "math", id="x"), make_prompt_record("Pick", "d", "choice", id=5)]
    assert write_prompts(recs, out) == 2
    back, _ = load_prompts(out)
    assert [(r.id, r.prompt, r.answer, r.task) for r in back] == [(r.id, r.prompt, r.answer, r.task) for r in recs]
    assert back[1].answer == "D"
    with pytest.raises(RecordError, match="empty_text"):
        make_prompt_record("", "1", "math", id="e")
