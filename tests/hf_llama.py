"""A small random Hugging Face Llama directory, written by transformers as a user's would be:
sharded safetensors, bf16, tied embeddings, Llama-3 rope scaling, and a byte-level BPE tokenizer
of its own (not the tiny world's) with a ChatML chat template (SmolLM2's)."""

from pathlib import Path

# SmolLM2-Instruct's template: ChatML, with a default system prompt when none is given.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe(vocab_size: int = 600):
    """A GPT-2 style byte-level BPE (digits split) trained on tiny-world chat texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nemo_plugins.data import reasoning_world as rw

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    texts = [t.replace("<|", "").replace("|>", "") for t in rw.chat_texts(rw.generate_problems(2000, seed=1))]
    tok.train_from_iterator(texts + ["You are a helpful AI assistant system user assistant"] * 10, trainer=trainer)
    return tok


def write_hf_llama(path: Path, *, seed: int = 0, layers: int = 3, dtype: str = "bfloat16") -> Path:
    """config.json + sharded safetensors + tokenizer files, through transformers' save_pretrained."""
    import torch
    import transformers

    tok = train_bpe()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip
    fast.chat_template = CHATML_TEMPLATE
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size="60KB", safe_serialization=True)
    fast.save_pretrained(path)
    return Path(path)
