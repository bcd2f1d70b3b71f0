"""Chat template and tokenizer: exact round trips, fixed special ids, exact loss masks, safe save/load."""

import json
import random

import pytest

from nemo_plugins.data import chat
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(rw.chat_texts(rw.generate_problems(1500, seed=0)))


def world_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for p in rw.generate_problems(n, seed=seed):
        thinking = rng.choice([True, False, None])
        prompt, response = chat.render_example(p.question, rw.response_for(p, bool(thinking)), thinking)
        out.append(prompt + response)
    return out


# ----------------------------------------------------------------------------- chat


def test_render_prompt():
    assert chat.render_prompt("Q?", True) == "<|bos|><|system|>detailed thinking on<|user|>Q?<|assistant|>"
    assert chat.render_prompt("Q?", False) == "<|bos|><|system|>detailed thinking off<|user|>Q?<|assistant|>"
    assert chat.render_prompt("Q?", None) == "<|bos|><|user|>Q?<|assistant|>"


def test_render_example():
    prompt, response = chat.render_example("Q?", "The answer is 1.", False)
    assert prompt == chat.render_prompt("Q?", False)
    assert response == "The answer is 1.<|eos|>"


def test_special_tokens_order():
    assert chat.SPECIAL_TOKENS[:3] == (chat.PAD, chat.BOS, chat.EOS)
    assert len(set(chat.SPECIAL_TOKENS)) == len(chat.SPECIAL_TOKENS) == 8
    assert {chat.THINK_START, chat.THINK_END, chat.SYSTEM, chat.USER, chat.ASSISTANT} <= set(chat.SPECIAL_TOKENS)


# ----------------------------------------------------------------------------- tokenizer


def test_round_trip_world_texts(tok):
    for text in world_texts(200, seed=99):
        assert T.decode(tok, T.encode(tok, text)) == text


def test_round_trip_random_texts(tok):
    rng = random.Random(0)
    alphabet = "0123456789 +-*=()?.\n\tabcXYZ<>|/_é日"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert T.decode(tok, T.encode(tok, text)) == text


def test_digits_are_single_tokens(tok):
    ids = T.encode(tok, "1234567890")
    assert [T.decode(tok, [i]) for i in ids] == list("1234567890")
    for text in world_texts(50, seed=3):
        for i in T.encode(tok, text):
            piece = T.decode(tok, [i])
            if any(c.isdigit() for c in piece):
                assert len(piece) == 1, piece


def test_special_token_ids_fixed(tok):
    for expected, t in enumerate(chat.SPECIAL_TOKENS):
        assert T.token_id(tok, t) == expected
        assert T.encode(tok, t) == [expected]
    assert T.special_token_ids(tok)[chat.EOS] == 2
    with pytest.raises(ValueError, match="not in the tokenizer"):
        T.token_id(tok, "<|nope|>")


def test_special_tokens_never_split(tok):
    ids = set(range(len(chat.SPECIAL_TOKENS)))
    for text in world_texts(100, seed=4):
        enc = T.encode(tok, text)
        for i, t in enumerate(chat.SPECIAL_TOKENS):
            assert enc.count(i) == text.count(t)
    # glued to text on both sides, still one token each
    assert T.encode(tok, "x<|eos|>y").count(2) == 1
    assert T.encode(tok, "12</think>The")[2] == T.token_id(tok, chat.THINK_END)
    # a broken marker is plain text, not a special token
    assert not ids & set(T.encode(tok, "<think <|eos| /think>"))
    # no ordinary vocab entry contains a special token string
    for token, i in tok.get_vocab().items():
        if i not in ids:
            assert not any(t in token for t in chat.SPECIAL_TOKENS)


def test_loss_mask_covers_exactly_the_response(tok):
    eos = T.token_id(tok, chat.EOS)
    for p in rw.generate_problems(50, seed=5):
        for thinking in (True, False):
            prompt, response = chat.render_example(p.question, rw.response_for(p, thinking), thinking)
            ids, mask = T.encode_example(tok, prompt, response)
            assert len(ids) == len(mask)
            n_prompt = len(T.encode(tok, prompt))
            assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
            assert ids == T.encode(tok, prompt + response)  # boundary is exact
            assert T.decode(tok, ids[:n_prompt]) == prompt
            assert T.decode(tok, [i for i, m in zip(ids, mask) if m]) == response
            assert ids[-1] == eos and mask[-1] == 1
            assert ids[0] == T.token_id(tok, chat.BOS)


def test_examples_are_short(tok):
    lengths = []
    for p in rw.generate_problems(300, seed=6, difficulties=(5,)):
        ids, _ = T.encode_example(tok, *chat.render_example(p.question, rw.reasoning_response(p), True))
        lengths.append(len(ids))
    assert max(lengths) < 96, max(lengths)


def test_training_is_deterministic(tok):
    again = T.train_tokenizer(rw.chat_texts(rw.generate_problems(1500, seed=0)))
    assert again.to_str() == tok.to_str()
    assert len(chat.SPECIAL_TOKENS) + 256 < tok.get_vocab_size() <= 384


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        T.train_tokenizer(["a"], vocab_size=100)


def test_save_load_round_trip(tok, tmp_path):
    file = T.save_tokenizer(tok, tmp_path / "tok")
    assert file == tmp_path / "tok" / "tokenizer.json"
    assert [f.name for f in file.parent.iterdir()] == ["tokenizer.json"]  # no temp files left
    for loaded in (T.load_tokenizer(tmp_path / "tok"), T.load_tokenizer(file)):
        assert loaded.to_str() == tok.to_str()
        text = world_texts(1, seed=8)[0]
        assert T.encode(loaded, text) == T.encode(tok, text)
    T.save_tokenizer(tok, tmp_path / "tok")  # overwrite in place
    assert T.load_tokenizer(tmp_path / "tok").to_str() == tok.to_str()


def test_load_errors_name_the_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"invalid tokenizer file .*tokenizer\.json"):
        T.load_tokenizer(tmp_path)
    # valid tokenizer whose special tokens are not at their fixed ids
    data = json.loads(tok.to_str())
    data["added_tokens"] = []
    data["model"]["vocab"].pop(chat.PAD)
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="tokenizer.json.*<\\|pad\\|>"):
        T.load_tokenizer(tmp_path)
