"""ChatTokenizer: a model directory's tokenizer and chat template, against transformers'
apply_chat_template as the reference, and the tiny template against data.chat's strings."""

import json

import pytest

from nemo_plugins.data import chat
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data.chat_tokenizer import (
    PLAIN_CHAT_TEMPLATE,
    ChatTemplateError,
    ChatTokenizer,
)
from nemo_plugins.data.sft_data import Turn, make_example, render_chat, tokenize_example
from nemo_plugins.data.tokenizer import encode_example

from hf_llama import CHATML_TEMPLATE, train_bpe, write_hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_llama(tmp_path_factory.mktemp("hf") / "llama", layers=1)


def test_tiny_template_renders_the_strings_of_data_chat(tiny_world):
    tiny = tiny_world.chat
    for thinking in (True, False, None):
        assert tiny.prompt("What is 1 + 2?", thinking) == chat.render_prompt("What is 1 + 2?", thinking)
        assert tiny.example("Q?", "The answer is 3.", thinking) == chat.render_example("Q?", "The answer is 3.", thinking)
    turns = (Turn("user", "Q1?"), Turn("assistant", "A1."), Turn("user", "Q2?"))
    ex = make_example(turns, "<think>t</think>A2.", True)
    assert tokenize_example(tiny, ex) == encode_example(tiny_world.tokenizer, *render_chat(ex))


def test_tiny_examples_are_unchanged_by_the_template(tiny_world):
    p = tiny_world.eval[0]
    ids, mask = tiny_world.eval_examples()[0]
    assert (ids, mask) == encode_example(tiny_world.tokenizer, *chat.render_example(p.question, rw.reasoning_response(p), True))


def test_hf_directory_matches_transformers(hf_dir):
    import transformers

    ours = ChatTokenizer.from_dir(hf_dir)
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert ours.eos_token == "<|im_end|>" and ours.eos_id == ref.eos_token_id and ours.pad_id == ref.pad_token_id
    for thinking in (True, False, None):
        msgs = ours.messages("What is (3 + 4) * 2?", thinking)
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.prompt("What is (3 + 4) * 2?", thinking) == want
        assert ours.prompt_ids("What is (3 + 4) * 2?", thinking) == ref(want, add_special_tokens=False)["input_ids"]
        full = ref.apply_chat_template([*msgs, {"role": "assistant", "content": "<think>3 + 4 = 7</think>14"}], tokenize=False)
        prompt, tail = ours.example("What is (3 + 4) * 2?", "<think>3 + 4 = 7</think>14", thinking)
        assert prompt + tail == full and tail == "<think>3 + 4 = 7</think>14<|im_end|>\n"
    assert "detailed thinking on" in ours.prompt("Q", True) and "SmolLM" in ours.prompt("Q", None)


def test_example_ids_mask_the_prompt_and_keep_the_end_of_turn(hf_dir):
    ours = ChatTokenizer.from_dir(hf_dir)
    ids, mask = ours.example_ids("Q?", "A.", False)
    n_prompt = len(ours.prompt_ids("Q?", False))
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert ours.eos_id in ids[n_prompt:] and ours.decode(ids[n_prompt:]).startswith("A.")
    assert ours.decode_response([*ours.encode("A."), ours.eos_id, *ours.encode("junk")]) == "A."


def test_files_round_trip_through_a_directory(hf_dir, tmp_path):
    ours = ChatTokenizer.from_dir(hf_dir)
    for name, content in ours.files().items():
        (tmp_path / name).write_text(content)
    back = ChatTokenizer.from_dir(tmp_path)
    assert back.chat_template == ours.chat_template and back.prompt("Q", True) == ours.prompt("Q", True)
    assert (back.eos_token, back.bos_token, back.pad_token) == (ours.eos_token, ours.bos_token, ours.pad_token)
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)  # transformers reads what we write
    assert ref.apply_chat_template(ours.messages("Q", True), tokenize=False, add_generation_prompt=True) == ours.prompt("Q", True)


def test_template_file_and_generation_config_stop_ids(hf_dir, tmp_path):
    ours = ChatTokenizer.from_dir(hf_dir)
    (tmp_path / "tokenizer.json").write_text(ours.tokenizer.to_str())
    config = {"eos_token": "<|endoftext|>", "chat_template": "{{ 'ignored' }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(CHATML_TEMPLATE)  # wins over tokenizer_config's
    im_end = ours.tokenizer.token_to_id("<|im_end|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, im_end]}))
    got = ChatTokenizer.from_dir(tmp_path)
    assert got.prompt("Q", True) == ours.prompt("Q", True)
    assert got.eos_id == 0 and set(got.stop_ids) == {0, im_end}


def test_a_directory_without_a_template_gets_the_plain_one(tmp_path, caplog):
    tok = train_bpe(400)
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    got = ChatTokenizer.from_dir(tmp_path)
    assert got.chat_template == PLAIN_CHAT_TEMPLATE and "no chat template" in caplog.text
    assert got.prompt("Q?", True) == "System:\ndetailed thinking on\n\nUser:\nQ?\n\nAssistant:\n"
    prompt, tail = got.example("Q?", "A.", False)
    assert tail == "A.<|endoftext|>\n\n"


def test_bad_directories_name_what_is_wrong(tmp_path, hf_dir):
    with pytest.raises(ChatTemplateError, match="no tokenizer.json"):
        ChatTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{nope")
    with pytest.raises(ChatTemplateError, match="not a valid tokenizer file"):
        ChatTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>", "chat_template": "x"}))
    with pytest.raises(ChatTemplateError, match="eos_token='<|nope|>' is not in the tokenizer's vocabulary"):
        ChatTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "{% if %}"}))
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "{{ raise_exception('no system') }}"}))
    with pytest.raises(ChatTemplateError, match="no system"):
        ChatTokenizer.from_dir(tmp_path).prompt("Q", True)
    rewrite = "{% for m in messages %}{{ m['content'][:1] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": rewrite}))
    with pytest.raises(ChatTemplateError, match="does not extend the prompt"):
        ChatTokenizer.from_dir(tmp_path).example("Q", "Answer", None)
