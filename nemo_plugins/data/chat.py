"""A tiny chat template with the Llama-Nemotron reasoning toggle.

A conversation is one flat string made of special tokens and text:

    <|bos|><|system|>detailed thinking on<|user|>QUESTION<|assistant|>RESPONSE<|eos|>

The system prompt switches reasoning on or off, as in Llama-Nemotron. The prompt
and the response are kept apart so a trainer can put the loss on response tokens only.
"""

PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
THINK_START = "<think>"
THINK_END = "</think>"

# Order fixes the token ids: PAD=0, BOS=1, EOS=2, ... (see data/tokenizer.py).
SPECIAL_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, THINK_START, THINK_END)

THINKING_ON = "detailed thinking on"
THINKING_OFF = "detailed thinking off"


def system_prompt(thinking: bool | None) -> str | None:
    """The system prompt for a reasoning mode; None means no system turn at all."""
    if thinking is None:
        return None
    return THINKING_ON if thinking else THINKING_OFF


def render_prompt(question: str, thinking: bool | None) -> str:
    """Everything the model is conditioned on; its response follows directly."""
    system = system_prompt(thinking)
    head = BOS if system is None else f"{BOS}{SYSTEM}{system}"
    return f"{head}{USER}{question}{ASSISTANT}"


def render_example(question: str, response: str, thinking: bool | None) -> tuple[str, str]:
    """(prompt_text, response_text + EOS): concatenated they are the full training text."""
    return render_prompt(question, thinking), response + EOS
