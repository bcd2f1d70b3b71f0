"""Text documents: readers (JSONL / txt, malformed records), held-out split, streamed packing."""

import json
from collections import Counter

import pytest
import torch

from nemo_plugins.data.text_data import (
    Document,
    expand_paths,
    is_heldout,
    pack_documents,
    read_documents,
    select_split,
    split_documents,
    split_point,
)


def _write(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


# ============================================================================ JSONL


@pytest.fixture
def messy_jsonl(tmp_path):
    return _write(
        tmp_path / "docs.jsonl",
        [
            json.dumps({"text": "first document", "id": "a"}),  # 1 ok
            "{not json",  # 2 bad_json
            "[1, 2]",  # 3 not_object
            json.dumps({"title": "no text"}),  # 4 missing_field
            json.dumps({"text": 5}),  # 5 bad_type
            json.dumps({"text": "  \n "}),  # 6 empty_text
            "",  # 7 blank
            b"\xff\xfe{}",  # 8 bad_json (not UTF-8)
            json.dumps({"text": None}),  # 9 missing_field (null)
            json.dumps({"text": "last document"}),  # 10 ok
        ],
    )


def test_jsonl_malformed_records_counted_and_located(messy_jsonl):
    reader = read_documents(messy_jsonl)
    docs = list(reader)
    assert [d.text for d in docs] == ["first document", "last document"]
    assert [d.id for d in docs] == [f"{messy_jsonl}:1", f"{messy_jsonl}:10"]  # default id = file:line
    assert docs[1].source == (str(messy_jsonl), 10)
    r = reader.report
    assert (r.read, r.kept, r.skipped, r.blank) == (9, 2, 7, 1)
    assert r.reasons == Counter(bad_json=2, not_object=1, missing_field=2, bad_type=1, empty_text=1)
    located = [p.split(": ", 1)[0] for p in r.problems]
    assert located == [f"{messy_jsonl}:{n}" for n in (2, 3, 4, 5, 6, 8, 9)]
    assert "empty_text" in r.problems[4] and "bad_type" in r.problems[3]


def test_jsonl_raise_names_first_bad_line(messy_jsonl):
    reader = read_documents(messy_jsonl, on_error="raise")
    it = iter(reader)
    assert next(it).text == "first document"
    with pytest.raises(ValueError, match=rf"^{messy_jsonl}:2: bad_json"):
        next(it)
    with pytest.raises(ValueError, match="on_error"):
        read_documents(messy_jsonl, on_error="ignore")


def test_jsonl_text_and_id_fields(tmp_path):
    path = _write(
        tmp_path / "c.jsonl",
        [
            json.dumps({"body": "one", "doc": "x-1"}),
            json.dumps({"body": "two", "doc": 7}),  # int id -> "7"
            json.dumps({"body": "three"}),  # id field required once named
            json.dumps({"body": "four", "doc": True}),  # bool is not an id
            json.dumps({"body": "five", "doc": " "}),  # blank id
            json.dumps({"text": "six", "doc": "x-6"}),  # wrong text field
        ],
    )
    reader = read_documents(path, text_field="body", id_field="doc")
    assert [(d.id, d.text) for d in reader] == [("x-1", "one"), ("7", "two")]
    assert reader.report.reasons == Counter(missing_field=2, bad_type=1, bad_value=1)
    assert [p.split(": ", 1)[0] for p in reader.report.problems] == [f"{path}:{n}" for n in (3, 4, 5, 6)]


# ============================================================================ txt


def test_txt_file_mode_one_document_per_file(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("Line one.\n\nLine two after a blank line.\n")
    (tmp_path / "b.txt").write_text("  \n\n")  # blank file
    (tmp_path / "c.txt").write_bytes(b"ok\n\xff bad\n")  # not UTF-8
    reader = read_documents(tmp_path)
    docs = list(reader)
    assert [(d.id, d.text) for d in docs] == [(str(a), "Line one.\n\nLine two after a blank line.\n")]
    r = reader.report
    assert (r.read, r.kept, r.skipped, r.blank) == (2, 1, 1, 1)
    assert r.reasons == Counter(bad_encoding=1)
    assert r.problems[0].startswith(f"{tmp_path / 'c.txt'}:1: bad_encoding")


def test_txt_paragraph_mode(tmp_path):
    path = _write(
        tmp_path / "p.txt",
        [
            "",  # 1 leading blank
            "First paragraph,",  # 2
            "second line.",  # 3
            "",  # 4
            "   ",  # 5 whitespace-only separates too
            "Second paragraph.",  # 6
            "",  # 7
            b"bad \xff line",  # 8 paragraph with a non-UTF-8 line
            "rest of it",  # 9
            "",  # 10
            "Last one, no trailing blank",  # 11
        ],
    )
    reader = read_documents(path, txt_mode="paragraph")
    docs = list(reader)
    assert [(d.id, d.text) for d in docs] == [
        (f"{path}:2", "First paragraph,\nsecond line."),
        (f"{path}:6", "Second paragraph."),
        (f"{path}:11", "Last one, no trailing blank"),
    ]
    assert reader.report.reasons == Counter(bad_encoding=1)
    assert reader.report.problems[0].startswith(f"{path}:8: bad_encoding")
    with pytest.raises(ValueError, match=rf"^{path}:8: bad_encoding"):
        list(read_documents(path, txt_mode="paragraph", on_error="raise"))
    with pytest.raises(ValueError, match="txt_mode"):
        read_documents(path, txt_mode="line")


# ============================================================================ paths


def test_paths_expand_sorted_and_missing_is_an_error(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "a.txt", "sub/c.txt", "notes.md", "sub/d.jsonl"):
        (tmp_path / name).write_text(json.dumps({"text": name}) + "\n" if name.endswith("jsonl") else name)
    d = str(tmp_path)
    expected = [f"{d}/a.txt", f"{d}/b.jsonl", f"{d}/sub/c.txt", f"{d}/sub/d.jsonl"]
    assert [str(p) for p in expand_paths(tmp_path)] == expected
    assert [str(p) for p in expand_paths(f"{d}/**/*.jsonl")] == [f"{d}/b.jsonl", f"{d}/sub/d.jsonl"]
    # a file named twice (directly and through its directory) is read once
    assert [str(p) for p in expand_paths([tmp_path / "sub" / "c.txt", tmp_path / "sub"])] == [
        f"{d}/sub/c.txt",
        f"{d}/sub/d.jsonl",
    ]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_documents([tmp_path / "a.txt", tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.jsonl"):
        expand_paths(f"{d}/nothing*.jsonl")
    with pytest.raises(ValueError, match="notes.md"):
        expand_paths(tmp_path / "notes.md")
    texts = [doc.text for doc in read_documents(tmp_path)]
    assert texts == ["a.txt", "b.jsonl", "sub/c.txt", "sub/d.jsonl"]


# ============================================================================ split


def test_split_point_is_pinned():
    """BLAKE2b of (seed, id): the same in every process and release; a change would move documents."""
    assert split_point("doc-0", 0) == pytest.approx(0.3559101781147905, abs=0)
    assert split_point("doc-0", 1) != split_point("doc-0", 0)


def test_split_disjoint_stable_and_independent_of_other_documents():
    ids = [f"doc-{i}" for i in range(2000)]
    docs = [Document(i, "t") for i in ids]
    train, held = split_documents(docs, 0.2, seed=3)
    assert {d.id for d in train}.isdisjoint({d.id for d in held})
    assert len(train) + len(held) == len(docs)
    assert 0.17 < len(held) / len(docs) < 0.23
    held_ids = {d.id for d in held}
    # order and the presence of other documents do not move anybody
    _, held_rev = split_documents(list(reversed(docs)), 0.2, seed=3)
    assert {d.id for d in held_rev} == held_ids
    more = docs[::3] + [Document(f"new-{i}", "t") for i in range(500)]
    _, held_more = split_documents(more, 0.2, seed=3)
    assert {d.id for d in held_more if d.id.startswith("doc-")} == {d.id for d in docs[::3]} & held_ids
    # a larger fraction only adds documents; another seed gives another split
    assert held_ids < {i for i in ids if is_heldout(i, 0.3, seed=3)}
    assert held_ids != {i for i in ids if is_heldout(i, 0.2, seed=4)}
    assert not any(is_heldout(i, 0.0) for i in ids) and all(is_heldout(i, 1.0) for i in ids)
    assert [d.id for d in select_split(iter(docs), "heldout", 0.2, seed=3)] == [d.id for d in held]
    assert [d.id for d in select_split(iter(docs), "train", 0.2, seed=3)] == [d.id for d in train]
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="fraction"):
            is_heldout("x", bad)


# ============================================================================ packing


def _toy_encode(calls):
    def encode(s):
        calls.append(s)
        return [ord(c) - 96 for c in s]  # a=1, b=2, ...

    return encode


def test_pack_rows_match_hand_computation():
    calls = []
    docs = [Document("d1", "abc"), Document("d2", "de"), Document("d3", "fghij"), Document("d4", "k")]
    packed = pack_documents(docs, _toy_encode(calls), seq_len=4, token_budget=8, eos_id=0)
    # stream: a b c <eos> | d e <eos> f | g h i j <eos>  -> two rows, d3's tail left unused
    assert packed.rows == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert (packed.num_rows, packed.tokens, packed.documents, packed.unused_tokens) == (2, 8, 3, 5)
    assert packed.doc_ids == ["d1", "d2", "d3"] and not packed.exhausted
    assert calls == ["abc", "de", "fghij"]  # d4 never tokenized
    assert packed.as_tensor().shape == (2, 4) and packed.as_tensor().dtype == torch.long

    # BOS and EOS around every document; a budget that is not a multiple of seq_len rounds down
    packed = pack_documents(["ab", "c"], _toy_encode([]), seq_len=3, token_budget=8, eos_id=0, bos_id=9)
    assert packed.rows == [[9, 1, 2], [0, 9, 3]] and packed.tokens == 6 <= 8
    assert packed.unused_tokens == 1 and not packed.exhausted  # budget reached; d2's EOS left over
    # documents run out before the budget: the partial last row is dropped
    packed = pack_documents(["ab", "c"], _toy_encode([]), seq_len=3, token_budget=30, eos_id=0, bos_id=9)
    assert packed.rows == [[9, 1, 2], [0, 9, 3]] and packed.unused_tokens == 1 and packed.exhausted

    # no separators at all: plain concatenation
    packed = pack_documents(["abc", "de", "f"], _toy_encode([]), seq_len=2, token_budget=100)
    assert packed.rows == [[1, 2], [3, 4], [5, 6]] and packed.exhausted and packed.unused_tokens == 0


def test_pack_is_streamed_and_stops_early():
    def docs(n_ok):
        for i in range(n_ok):
            yield f"doc{i} " * 3  # 15 tokens each with the toy encode
        raise RuntimeError("pulled a document the budget does not need")

    calls = []
    packed = pack_documents(docs(3), _toy_encode(calls), seq_len=8, token_budget=40, eos_id=0)
    assert packed.num_rows == 5 and packed.tokens == 40 and len(calls) == 3  # 3 docs x 16 tokens >= 40
    with pytest.raises(RuntimeError, match="budget does not need"):
        pack_documents(docs(3), _toy_encode([]), seq_len=8, token_budget=56, eos_id=0)  # needs a 4th doc


def test_pack_validates_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(["a"], _toy_encode([]), seq_len=0, token_budget=4)
    with pytest.raises(ValueError, match="token_budget"):
        pack_documents(["a"], _toy_encode([]), seq_len=8, token_budget=4)
    with pytest.raises(TypeError, match="Document or str"):
        pack_documents([3], _toy_encode([]), seq_len=1, token_budget=4)
