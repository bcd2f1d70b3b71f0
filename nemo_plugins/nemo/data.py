"""Reasoning-toggle SFT data for NeMo: the project's chat examples as the files NeMo's chat
data module reads, and a data module that writes them on the cluster and trains on the final
assistant turn only.

`write_toggle_chat_files` reads Llama-Nemotron-Post-Training-Dataset JSONL or plain
`{"messages": ...}` JSONL through the project's readers (nemo_plugins.data.sft_data: same
checks, same skip/raise policy) and writes `training.jsonl`, `validation.jsonl` and `test.jsonl`,
one record a line:

    {"messages": [{"role": "system", "content": "detailed thinking on"},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "<think>...</think>answer"}],
     "reasoning": "on", "category": "math"}

The system prompt carries the toggle; under "off" the assistant turn has no think block. Splits
are chosen per prompt (a hash of the prompt turns), so the on and off versions of one prompt
land in the same split and validation never sees a training prompt.

`ToggleChatDataModule` is NeMo's `ChatDataModule` with the HF chat template path, fed by those
files. NeMo masks the loss to what the chat template marks with `{% generation %}`; the Llama-3
template installed here marks only the final assistant turn (its text and `<|eot_id|>`), so
earlier turns, the system prompt and the user turns carry no loss, as in the project's own SFT.

`TextDataModule` is NeMo's pretraining data module (Megatron-indexed text) for recovery and CPT,
with `paths` typed so that a recipe survives NeMo-Run's YAML round trip.
"""

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..data.sft_data import ChatExample, read_messages_jsonl, read_nemotron_jsonl
from . import require_nemo

SPLITS = ("training", "validation", "test")
READERS = {"messages": read_messages_jsonl, "nemotron": read_nemotron_jsonl}
STAMP = "toggle_data.json"  # what the files were written from; a change rewrites them

# Llama-3 chat format (what Llama-Nemotron uses) with only the final assistant turn inside
# {% generation %}, so `return_assistant_tokens_mask` marks exactly the tokens to train on.
LLAMA3_TOGGLE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and loop.last %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% generation %}{{- message['content'] | trim }}{{- '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHAT_TEMPLATES = {"llama3": LLAMA3_TOGGLE_TEMPLATE}


class ToggleDataError(ValueError):
    """Toggle SFT data that cannot be written or used (names the setting or file)."""


# ============================================================================ records and splits


def chat_record(ex: ChatExample) -> dict[str, Any]:
    """One ChatExample as a NeMo chat record: system toggle, prompt turns, the response last."""
    messages = [{"role": "system", "content": ex.system}]
    messages += [{"role": t.role, "content": t.content} for t in ex.messages]
    messages.append({"role": "assistant", "content": ex.response})
    rec: dict[str, Any] = {"messages": messages, "reasoning": "on" if ex.thinking else "off"}
    if ex.category is not None:
        rec["category"] = ex.category
    return rec


def _prompt_key(ex: ChatExample) -> bytes:
    turns = [[t.role, t.content] for t in ex.messages]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode("utf-8")).digest()


def split_of(ex: ChatExample, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """The split of `ex`'s prompt: a uniform draw from a hash of (seed, prompt turns)."""
    h = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + _prompt_key(ex)).digest()
    u = int.from_bytes(h[:8], "little") / 2**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + val_fraction else "training"


def check_split_settings(source_format: str, val_fraction: float, test_fraction: float, on_error: str) -> None:
    if source_format not in READERS:
        raise ToggleDataError(f"source_format={source_format!r}: expected one of {sorted(READERS)}")
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
            raise ToggleDataError(f"{name}={v!r}: expected a fraction in [0, 1)")
    if not 0 < val_fraction or val_fraction + test_fraction >= 1:
        raise ToggleDataError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: expected val_fraction > 0 and a sum below 1"
        )
    if on_error not in ("skip", "raise"):
        raise ToggleDataError(f"on_error={on_error!r}: expected 'skip' or 'raise'")


# ============================================================================ writing


def _source_list(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    paths = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(p) for p in sources]
    if not paths:
        raise ToggleDataError("sources: expected at least one JSONL file")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ToggleDataError(f"sources: {missing[0]} is not a file")
    return paths


def _paired_prompts(paths: list[Path], source_format: str, on_error: str) -> set[bytes]:
    """Prompt keys seen under both modes (first pass of `paired_only`; keeps hashes only)."""
    modes: dict[bytes, int] = {}
    for ex in READERS[source_format](paths, on_error=on_error):
        k = _prompt_key(ex)
        modes[k] = modes.get(k, 0) | (1 if ex.thinking else 2)
    return {k for k, m in modes.items() if m == 3}


def write_toggle_chat_files(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    source_format: str = "messages",
    val_fraction: float = 0.02,
    test_fraction: float = 0.0,
    seed: int = 0,
    on_error: str = "skip",
    paired_only: bool = False,
) -> dict[str, Any]:
    """Write training/validation/test.jsonl under `out_dir`; returns (and stores in
    `out_dir/toggle_data.json`) what was read, kept and written per split and mode.

    Records stream from the sources to the files (nothing is held in memory but prompt hashes
    when `paired_only`, which keeps only prompts present under both modes). With
    `test_fraction=0` the test file repeats the validation records. Files appear atomically.
    """
    check_split_settings(source_format, val_fraction, test_fraction, on_error)
    paths = _source_list(sources)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paired = _paired_prompts(paths, source_format, on_error) if paired_only else None
    reader = READERS[source_format](paths, on_error=on_error)
    counts = {s: Counter() for s in SPLITS}
    tmp = {s: tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out, prefix=f".{s}.", suffix=".tmp", delete=False)
           for s in SPLITS}  # fmt: skip
    try:
        for ex in reader:
            if paired is not None and _prompt_key(ex) not in paired:
                counts["training"]["unpaired_dropped"] += 1
                continue
            split = split_of(ex, val_fraction, test_fraction, seed)
            line = json.dumps(chat_record(ex), ensure_ascii=False) + "\n"
            mode = "on" if ex.thinking else "off"
            tmp[split].write(line)
            counts[split][mode] += 1
            if split == "validation" and test_fraction == 0:
                tmp["test"].write(line)
                counts["test"][mode] += 1
        for f in tmp.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for split in ("training", "validation"):
            if not (counts[split]["on"] + counts[split]["off"]):
                raise ToggleDataError(
                    f"{split} split is empty ({reader.report.kept} examples kept of {reader.report.read} read from "
                    f"{[str(p) for p in paths]}, val_fraction={val_fraction}): add data or change val_fraction"
                )
        for split, f in tmp.items():
            os.replace(f.name, out / f"{split}.jsonl")
    finally:
        for f in tmp.values():
            f.close()
            if os.path.exists(f.name):
                os.unlink(f.name)
    report = {
        "read": reader.report.read,
        "kept": reader.report.kept,
        "skipped": reader.report.skipped,
        "reasons": dict(reader.report.reasons),
        "problems": reader.report.problems[:20],
        "splits": {s: {"on": c["on"], "off": c["off"]} for s, c in counts.items()},
        "unpaired_dropped": counts["training"]["unpaired_dropped"],
    }
    stamp = {"inputs": _inputs(paths, source_format, val_fraction, test_fraction, seed, on_error, paired_only),
             "report": report}  # fmt: skip
    _write_json_atomic(out / STAMP, stamp)
    return report


def _inputs(paths, source_format, val_fraction, test_fraction, seed, on_error, paired_only) -> dict:
    files = [{"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]
    return {
        "sources": files, "source_format": source_format, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "seed": seed, "on_error": on_error, "paired_only": paired_only,
    }  # fmt: skip


def _write_json_atomic(path: Path, data) -> None:
    from ..utils.atomic import write_json_atomic

    write_json_atomic(path, data)


def prepare_toggle_chat_files(sources, out_dir, source_format="messages", val_fraction=0.02, test_fraction=0.0,
                              seed=0, on_error="skip", paired_only=False) -> dict:  # fmt: skip
    """`write_toggle_chat_files` unless `out_dir` already holds the files of exactly these inputs
    (same sources by path, size and mtime, same settings); returns the report either way."""
    check_split_settings(source_format, val_fraction, test_fraction, on_error)
    paths = _source_list(sources)
    out = Path(out_dir)
    stamp_path = out / STAMP
    if stamp_path.is_file() and all((out / f"{s}.jsonl").is_file() for s in SPLITS):
        stamp = json.loads(stamp_path.read_text())
        inputs = _inputs(paths, source_format, val_fraction, test_fraction, seed, on_error, paired_only)
        if stamp.get("inputs") == inputs:
            return stamp["report"]
    return write_toggle_chat_files(paths, out, source_format, val_fraction, test_fraction, seed, on_error, paired_only)


# ============================================================================ chat template


def resolve_chat_template(chat_template: str) -> str:
    """'llama3' -> the bundled template; any other value must be a Jinja template that marks the
    trained tokens with {% generation %} (else NeMo would put the loss on every token)."""
    text = CHAT_TEMPLATES.get(chat_template, chat_template)
    if "{%" not in text:
        raise ToggleDataError(
            f"chat_template={chat_template!r}: expected one of {sorted(CHAT_TEMPLATES)} or a Jinja template"
        )
    if not _has_generation(text):
        raise ToggleDataError(
            "chat_template: the template has no {% generation %} block, so NeMo would train on every token; "
            "wrap the final assistant turn in {% generation %}...{% endgeneration %}"
        )
    return text


def _has_generation(template: str) -> bool:
    import re

    return re.search(r"\{%-?\s+generation\s+-?%\}", template) is not None


def install_chat_template(tokenizer, chat_template: str = "llama3") -> None:
    """Set the answer-only chat template on a NeMo HF tokenizer (`tokenizer.tokenizer` is the
    transformers tokenizer). chat_template='tokenizer' keeps the tokenizer's own, which then
    must have a {% generation %} block."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is None or not hasattr(hf, "apply_chat_template"):
        raise ToggleDataError(
            f"toggle SFT needs a Hugging Face tokenizer (NeMo AutoTokenizer); got {type(tokenizer).__name__}"
        )
    if chat_template == "tokenizer":
        if not _has_generation(getattr(hf, "chat_template", None) or ""):
            raise ToggleDataError(
                "chat_template='tokenizer': the tokenizer's template has no {% generation %} block; use 'llama3'"
            )
        return
    hf.chat_template = resolve_chat_template(chat_template)


# ============================================================================ data module

_chat = require_nemo("nemo.collections.llm.gpt.data.chat")


class ToggleChatDataModule(_chat.ChatDataModule):
    """NeMo chat fine-tuning on reasoning-toggle data (see the module doc).

    `sources` are JSONL files in `source_format` ('messages' or 'nemotron'); the files NeMo reads
    are written to `dataset_root` when first needed (Lightning's prepare_data, or setup) and
    rewritten only when the sources or split settings change.
    """

    def __init__(
        self,
        sources: list[str],
        dataset_root: str,
        source_format: str = "messages",
        val_fraction: float = 0.02,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        on_error: str = "skip",
        paired_only: bool = False,
        chat_template: str = "llama3",
        seq_length: int = 4096,
        tokenizer=None,
        micro_batch_size: int = 1,
        global_batch_size: int = 128,
        seed: int = 1234,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        dataset_kwargs: Optional[dict] = None,
    ):
        check_split_settings(source_format, val_fraction, test_fraction, on_error)
        if chat_template != "tokenizer":
            resolve_chat_template(chat_template)
        if isinstance(sources, (str, os.PathLike)):
            sources = [str(sources)]
        super().__init__(
            dataset_root=dataset_root, seq_length=seq_length, tokenizer=tokenizer, micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size, seed=seed, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=persistent_workers, dataset_kwargs=dataset_kwargs, use_hf_tokenizer_chat_template=True,
        )  # fmt: skip
        self.sources = [str(s) for s in sources]
        self.source_format, self.val_fraction, self.test_fraction = source_format, val_fraction, test_fraction
        self.split_seed, self.on_error, self.paired_only = split_seed, on_error, paired_only
        self.chat_template = chat_template
        self.data_report: Optional[dict] = None

    def write_files(self) -> dict:
        """Write (or reuse) the split files; the report is kept in `data_report`."""
        self.data_report = prepare_toggle_chat_files(
            self.sources, self.dataset_root, self.source_format, self.val_fraction, self.test_fraction,
            self.split_seed, self.on_error, self.paired_only,
        )  # fmt: skip
        return self.data_report

    def prepare_data(self) -> None:
        self.write_files()
        super().prepare_data()

    def setup(self, stage: str = "") -> None:
        if not all((Path(self.dataset_root) / f"{s}.jsonl").is_file() for s in SPLITS):
            self.write_files()
        super().setup(stage)

    def _create_dataset(self, path, pack_metadata_path=None, is_test=False, **kwargs):
        install_chat_template(self.tokenizer, self.chat_template)
        return super()._create_dataset(path, pack_metadata_path=pack_metadata_path, is_test=is_test, **kwargs)


# ============================================================================ pretraining text

_pre_training = require_nemo("nemo.collections.llm.gpt.data.pre_training")


class TextDataModule(_pre_training.PreTrainingDataModule):
    """NeMo's `PreTrainingDataModule` (Megatron-indexed text) with `paths` typed as a list.

    `paths` are dataset prefixes (`<prefix>.bin` / `<prefix>.idx`), optionally weighted as
    `['30', '/data/a_text_document', '70', '/data/b_text_document']`. The parent annotates
    `paths` as `Path | List | Dict[str, List]`, which NeMo-Run 0.11's YAML reader cannot read
    back (`--to-yaml` / `--yaml`); everything else is the parent's (more settings as keywords).
    """

    def __init__(
        self,
        paths: list[str],
        seq_length: int = 2048,
        tokenizer=None,
        micro_batch_size: int = 4,
        global_batch_size: int = 8,
        split: str = "998,1,1",
        seed: int = 1234,
        num_workers: int = 8,
        index_mapping_dir: Optional[str] = None,
        **kwargs,
    ):
        if isinstance(paths, (str, os.PathLike)) or not paths:
            raise ValueError(f"paths={paths!r}: expected a non-empty list of dataset prefixes")
        super().__init__(
            paths=[str(p) for p in paths], seq_length=seq_length, tokenizer=tokenizer,
            micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, split=split, seed=seed,
            num_workers=num_workers, index_mapping_dir=index_mapping_dir, **kwargs,
        )  # fmt: skip
