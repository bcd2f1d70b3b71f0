"""A model directory's tokenizer and chat template, as one object every stage encodes with.

Stages hand models over as Hugging Face directories, so the text side travels with the weights:
`tokenizer.json` (a `tokenizers` fast tokenizer) and `tokenizer_config.json` (its special tokens
and the Jinja `chat_template`; a `chat_template.jinja` file beside it wins, as in transformers).
`ChatTokenizer.from_dir` reads them; `files()` writes them back into the next stage's directory.

The reasoning toggle is a system message, "detailed thinking on" or "detailed thinking off", put
through the model's own template: SmolLM2 gets `<|im_start|>system ...`, Llama-3 gets its header
tokens, the tiny world keeps its own (`TINY_CHAT_TEMPLATE`, which renders exactly the strings of
`data.chat`). Templates render with the same Jinja settings transformers uses, so
`apply_chat_template` is the test-time reference.

A training example is (prompt ids, response ids): the prompt is the conversation rendered with
the generation prompt, the response is what the template adds after it for the assistant turn
(the response text and the template's end of turn). The two are encoded separately, so the
prompt tokens are exactly what generation starts from. A directory without a chat template gets
`PLAIN_CHAT_TEMPLATE` and a warning.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

from . import chat

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"

# The tiny world's template: BOS, then SYSTEM/USER/ASSISTANT markers; each assistant turn ends in EOS.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}" + chat.SYSTEM + "{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + chat.USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + chat.ASSISTANT + "{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + chat.ASSISTANT + "{% endif %}"
)
# For directories that bring no template (base models): role-labelled paragraphs.
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """A tokenizer or chat template that cannot render the conversations a stage needs."""


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ChatTemplateError(f"special token {value!r}: expected a string or an object with 'content'")


def _template_text(value, where: Path) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of named templates ("default" wins)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise ChatTemplateError(f"{where}: chat_template has an unsupported form (expected a string or named templates)")


def _jinja_env():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, **kw
    )
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


@dataclass
class ChatTokenizer:
    """A tokenizer with its chat template and special tokens (see the module docstring)."""

    tokenizer: Tokenizer
    chat_template: str
    eos_token: str
    bos_token: str | None = None
    pad_token: str | None = None
    extra_stop_ids: tuple[int, ...] = ()  # e.g. generation_config's other eos ids (Llama-3.1 Instruct)
    config: dict = field(default_factory=dict)  # the rest of tokenizer_config.json, written back as read

    def __post_init__(self):
        for name in ("eos_token", "bos_token", "pad_token"):
            token = getattr(self, name)
            if token is not None and self.tokenizer.token_to_id(token) is None:
                raise ChatTemplateError(f"{name}={token!r} is not in the tokenizer's vocabulary")
        try:
            self._template = _jinja_env().from_string(self.chat_template)
        except Exception as e:  # jinja raises TemplateSyntaxError and friends
            raise ChatTemplateError(f"chat_template does not parse: {e}") from None

    # ------------------------------------------------------------------ construction

    @classmethod
    def tiny(cls, tok: Tokenizer) -> ChatTokenizer:
        """The tiny world's tokenizer with its own template (the strings of `data.chat`)."""
        return cls(tok, TINY_CHAT_TEMPLATE, eos_token=chat.EOS, bos_token=chat.BOS, pad_token=chat.PAD)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ChatTokenizer:
        """Read `tokenizer.json` and `tokenizer_config.json` (+ `chat_template.jinja`,
        `generation_config.json`) from a model directory."""
        path = Path(path)
        tok_file = path / TOKENIZER_JSON
        if not tok_file.is_file():
            raise ChatTemplateError(
                f"{path}: no {TOKENIZER_JSON} (a model directory must carry its fast tokenizer; "
                "convert a slow/sentencepiece tokenizer with transformers' save_pretrained first)"
            )
        try:
            tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ChatTemplateError(f"{tok_file}: not a valid tokenizer file ({e})") from None
        config = _read_json(path / TOKENIZER_CONFIG) or {}
        if not config and _looks_tiny(tok):  # a tiny-world checkpoint from before tokenizer_config.json
            return cls.tiny(tok)
        template = _template_text(config.get("chat_template"), path / TOKENIZER_CONFIG)
        if (path / TEMPLATE_FILE).is_file():
            template = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        if not template:
            log.warning("%s has no chat template; using the plain 'Role:' template", path)
            template = PLAIN_CHAT_TEMPLATE
        gen = _read_json(path / GENERATION_CONFIG) or {}
        eos = _token_text(config.get("eos_token"))
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos is None and gen_eos:
            eos = tok.id_to_token(gen_eos[0])
        if eos is None:
            raise ChatTemplateError(f"{path / TOKENIZER_CONFIG}: no eos_token (needed to end responses)")
        rest = {k: v for k, v in config.items() if k not in ("chat_template", "eos_token", "bos_token", "pad_token")}
        me = cls(tok, template, eos_token=eos, bos_token=_token_text(config.get("bos_token")),
                 pad_token=_token_text(config.get("pad_token")), config=rest)  # fmt: skip
        me.extra_stop_ids = tuple(i for i in gen_eos if i != me.eos_id)
        return me

    # ------------------------------------------------------------------ ids

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """The pad token's id, else EOS's (padding is always masked)."""
        return self.tokenizer.token_to_id(self.pad_token) if self.pad_token else self.eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a generated response."""
        return (self.eos_id, *self.extra_stop_ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters in the longest vocabulary entry (as the vocabulary spells it, which is never
        shorter than what it decodes to): n characters of text take at least about
        n / max_token_chars tokens, so an overlong text can be refused before it is tokenized."""
        return max(1, max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1))

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in it map to their ids, nothing is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with special tokens kept (think tags may be special tokens)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_response(self, ids: Iterable[int]) -> str:
        """Text of a generated response: cut at the first stop token."""
        stops, out = set(self.stop_ids), []
        for t in ids:
            if t in stops:
                break
            out.append(t)
        return self.decode(out)

    # ------------------------------------------------------------------ rendering

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        special = {"bos_token": self.bos_token or "", "eos_token": self.eos_token, "pad_token": self.pad_token}
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **special)
        except Exception as e:
            raise ChatTemplateError(f"chat_template failed on {len(messages)} message(s): {e}") from None

    @staticmethod
    def messages(turns: Sequence[tuple[str, str]] | str, thinking: bool | None) -> list[dict]:
        """[system toggle message,] then the turns: a question string is one user turn."""
        turns = [("user", turns)] if isinstance(turns, str) else list(turns)
        system = chat.system_prompt(thinking)
        head = [] if system is None else [{"role": "system", "content": system}]
        return head + [{"role": r, "content": c} for r, c in turns]

    def prompt(self, turns: Sequence[tuple[str, str]] | str, thinking: bool | None) -> str:
        """The text a response continues: the conversation and the assistant's generation prompt."""
        return self.render(self.messages(turns, thinking), add_generation_prompt=True)

    def example(self, turns: Sequence[tuple[str, str]] | str, response: str, thinking: bool | None) -> tuple[str, str]:
        """(prompt text, response text): the response text is what the template adds for the
        assistant turn (the response and its end of turn)."""
        msgs = self.messages(turns, thinking)
        prompt = self.render(msgs, add_generation_prompt=True)
        full = self.render([*msgs, {"role": "assistant", "content": response}])
        if not full.startswith(prompt) or response not in full[len(prompt) :]:
            raise ChatTemplateError(
                "chat_template: the conversation with the answer does not extend the prompt with the answer "
                "(a template that rewrites earlier turns cannot be trained on)"
            )
        tail = full[len(prompt) :]
        if self.eos_token not in tail:  # a template that does not end assistant turns: end them with EOS
            tail += self.eos_token
        return prompt, tail

    def prompt_ids(self, turns: Sequence[tuple[str, str]] | str, thinking: bool | None) -> list[int]:
        return self.encode(self.prompt(turns, thinking))

    def example_ids(
        self, turns: Sequence[tuple[str, str]] | str, response: str, thinking: bool | None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, loss_mask): mask 1 on the response tokens (end of turn included)."""
        prompt, tail = self.example(turns, response, thinking)
        p, r = self.encode(prompt), self.encode(tail)
        return p + r, [0] * len(p) + [1] * len(r)

    # ------------------------------------------------------------------ saving

    def files(self) -> dict[str, str]:
        """{file name: content} to put in a model directory (`save_checkpoint(extra_files=...)`)."""
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast", **self.config,
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "chat_template": self.chat_template,
        }  # fmt: skip
        return {TOKENIZER_JSON: self.tokenizer.to_str(), TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n"}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object")
    return data


def _looks_tiny(tok: Tokenizer) -> bool:
    return all(tok.token_to_id(t) == i for i, t in enumerate(chat.SPECIAL_TOKENS))


def as_chat(tok: Tokenizer | ChatTokenizer) -> ChatTokenizer:
    """`tok` itself, or a bare tiny-world `tokenizers.Tokenizer` with the tiny template."""
    return tok if isinstance(tok, ChatTokenizer) else ChatTokenizer.tiny(tok)
