"""NeMo 2 checkpoint import/export for Puzzle children: `llm.import_ckpt` / `llm.export_ckpt`.

Registered on `PuzzleChildModel` under "hf":

- `HFPuzzleImporter` reads a local HF directory in any layout the project reads (plain Llama,
  nemotron-nas `DeciLMForCausalLM` with block_configs, or the project's own
  `nemo_plugins_config.json`) with the project's safetensors loader (no trust_remote_code, no
  download), converts the weights with `convert.to_mcore` and writes a NeMo 2 checkpoint
  (`weights/` dist-ckpt + `context/`) with the tokenizer as a context artifact.
- `HFPuzzleExporter` loads a NeMo checkpoint of a `PuzzleChildModel`, converts back with
  `convert.from_mcore` and writes a HF directory with `save_checkpoint(architecture="auto")`
  (plain Llama stays `LlamaForCausalLM`, nemotron-nas where expressible, the project schema
  otherwise) plus the tokenizer files.

Both write atomically (a temporary sibling renamed into place) and replace an existing output
only with `overwrite=True`; otherwise the importer reuses it (NeMo's import cache) and the
exporter refuses with `FileExistsError`.

Fixes to NeMo's defaults, so that a conversion runs on any host, a CPU login node included:
checkpoints are saved and loaded through `host_io.HostCheckpointIO` (synchronous, in this
process, no CUDA call; NeMo's own IO needs CUDA, and its async variant imports megatron's removed
`tensorstore` strategy), and loading for export runs the trainer in the TESTING state (a load
does not need DDP, whose setup opens a CUDA stream).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from ..errors import CheckpointError
from ..model.checkpoint import (
    NATIVE_CONFIG,
    check_state_dict,
    load_state_dict,
    model_from_state,
    read_config,
    save_checkpoint,
)
from ..utils.atomic import atomic_directory
from . import refuse_in_spawned_import, require_nemo

io = require_nemo("nemo.lightning.io")

import torch  # noqa: E402
from nemo.utils import logging  # noqa: E402

from .convert import ConversionError, from_mcore, to_mcore  # noqa: E402
from .host_io import HostCheckpointIO  # noqa: E402
from .model import PuzzleChildConfig, PuzzleChildModel, arch_of, nemo_config  # noqa: E402

# Files that make up a HF tokenizer; only these travel between the HF dir and the checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip
TOKENIZER_DIR = "nemo_tokenizer"  # the artifact's name under <checkpoint>/context/

# True while this module holds a torch.distributed group it started (so it may destroy it).
_owned_process_group = False


# ----------------------------------------------------------------------------- shared helpers


def _mcore_module(model):
    """The megatron-core GPTModel inside a NeMo model (unwrapping DDP/Float16 wrappers)."""
    from megatron.core.models.gpt import GPTModel as MCoreGPTModel

    m = getattr(model, "module", model)
    while not isinstance(m, MCoreGPTModel) and hasattr(m, "module"):
        m = m.module
    if not isinstance(m, MCoreGPTModel):
        raise TypeError(f"expected a NeMo model holding a megatron-core GPTModel, got {type(m).__name__}")
    return m


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def _started_process_group(was_initialized: bool) -> None:
    global _owned_process_group
    if not was_initialized and torch.distributed.is_initialized():
        _owned_process_group = True


def _finish(trainer, model) -> None:
    """Tear down the trainer and process group, but only a group this module started."""
    global _owned_process_group
    if _owned_process_group and torch.distributed.is_initialized():
        if trainer is not None:
            from nemo.lightning import teardown

            teardown(trainer, model)
        else:  # setup failed half way: drop what it started
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()
    _owned_process_group = False


@contextlib.contextmanager
def _lightning_loops_restored():
    """Undo NeMo's process-wide patch of Lightning's loops when the conversion ends.

    `MegatronStrategy.setup` (NeMo 2.7.3) replaces `_select_data_fetcher` in Lightning's
    fit/evaluation/prediction loop modules with a wrapper that returns None for any other
    strategy, so every plain `lightning.Trainer` fitted later in the same process fails
    (`'NoneType' object has no attribute 'setup'`), the project's own training loops included.
    Each setup wraps again, and `llm.export_ckpt` sets up a trainer before calling the exporter,
    so the modules get Lightning's own function back (not the one found on entry).
    """
    from ..utils.training import restore_lightning_data_fetchers

    try:
        yield
    finally:
        restore_lightning_data_fetchers()


def _atomic_call(connector, output_path, overwrite: bool, kwargs, reuse: bool) -> Path:
    """`Connector.__call__` with an atomic write: `apply` fills a temporary sibling that then
    replaces `output_path`, so a failed run leaves no partial output and keeps an old one.

    An existing output is replaced only with `overwrite=True`; otherwise it is returned as is
    (`reuse`, NeMo's import cache) or refused with `FileExistsError`.
    """
    from filelock import FileLock

    refuse_in_spawned_import(f"{type(connector).__name__} ({connector})")
    # NeMo-Run 0.11's `--yaml` passes its own `_partial_: true` marker on as a keyword (import_ckpt
    # and export_ckpt take **kwargs): not a setting of ours.
    kwargs = {k: v for k, v in kwargs.items() if k != "_partial_"}
    out = Path(output_path) if output_path else Path(connector.local_path())
    lock_path = Path(f"{out}.lock")
    try:
        with FileLock(str(lock_path)).acquire(timeout=connector.LOCK_TIMEOUT):
            if out.exists() and not overwrite:
                if not reuse:
                    raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
                logging.info(f"{out} exists: reusing it (pass overwrite=True to replace it)")
                return out
            with atomic_directory(out) as tmp, _lightning_loops_restored():
                connector.apply(tmp, **kwargs)
    finally:
        if lock_path.exists():
            try:
                os.remove(lock_path)
            except OSError:
                pass
    return out


def _tokenizer_files(directory: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (directory / name).is_file()]


# ----------------------------------------------------------------------------- importer


@io.model_importer(PuzzleChildModel, "hf")
class HFPuzzleImporter(io.ModelConnector["HeteroLlamaForCausalLM", PuzzleChildModel]):
    """A local HF directory (plain Llama, nemotron-nas or the project schema) -> NeMo 2 checkpoint.

    Use through `llm.import_ckpt(model=PuzzleChildModel(...), source="hf:///abs/dir")`; the
    architecture comes from the directory, not from the model passed in (as in NeMo's importers).
    """

    def __call__(self, output_path=None, overwrite: bool = False, **kwargs) -> Path:
        out = _atomic_call(self, output_path, overwrite, kwargs, reuse=True)
        # From now on the tokenizer is the checkpoint's copy (the temporary one goes away).
        if (out / "context" / TOKENIZER_DIR).is_dir():
            self.__dict__["_ckpt_tokenizer_dir"] = out / "context" / TOKENIZER_DIR
            self.__dict__.pop("_tokenizer", None)
        return out

    # -- source

    @property
    def source_dir(self) -> Path:
        """The HF directory, checked to exist."""
        path = Path(str(self))
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: no such directory (expected a HF checkpoint directory with config.json or "
                f"{NATIVE_CONFIG} and *.safetensors weights)"
            )
        return path

    @property
    def arch(self):
        """The source's `ModelConfig`, read with the project's own reader."""
        if "_arch" not in self.__dict__:
            self.__dict__["_arch"] = read_config(self.source_dir)
        return self.__dict__["_arch"]

    def source_state(self) -> dict[str, torch.Tensor]:
        """The source's tensors, as the reference model `HeteroLlamaForCausalLM` names them
        (a tied `lm_head.weight` included), checked against the config (cached until `apply` ends)."""
        if "_state" not in self.__dict__:
            src, arch = self.source_dir, self.arch
            state = load_state_dict(src)
            check_state_dict(arch, state, where=str(src))
            self.__dict__["_state"] = model_from_state(arch, state).state_dict()
        return self.__dict__["_state"]

    @property
    def dtype(self) -> torch.dtype:
        """The source's parameter dtype (that of its embedding); the checkpoint keeps it."""
        return self.source_state()["model.embed_tokens.weight"].dtype

    # -- target

    @property
    def config(self) -> PuzzleChildConfig:
        """The model config: the source's architecture and dtype. `persist_layer_norm` is off:
        it only selects a LayerNorm kernel (these models use RMSNorm), and megatron's local
        (non-TE) norm refuses to build with it on."""
        dtype = self.dtype
        self.arch  # the source's config, checked
        return nemo_config(
            self.source_dir,  # its config file is the checkpoint's copy of the architecture
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            persist_layer_norm=False,
        )

    @property
    def tokenizer(self):
        """NeMo `AutoTokenizer` over the source's tokenizer files, or None if it has none.

        The files are copied into a clean directory first: NeMo saves the tokenizer's whole
        directory as a checkpoint artifact, and the source directory also holds the weights. A
        bare `tokenizer.json` (the project's tiny tokenizer) gets a minimal
        `tokenizer_config.json` naming `PreTrainedTokenizerFast`, so HF's AutoTokenizer loads it
        without a model config or remote code.
        """
        if "_tokenizer" in self.__dict__:
            return self.__dict__["_tokenizer"]
        from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

        directory = self.__dict__.get("_ckpt_tokenizer_dir")
        temporary = directory is None
        if temporary:
            directory = self._copy_tokenizer()
        tok = None
        if directory is not None:
            try:
                tok = AutoTokenizer(str(directory))
            except ValueError as e:
                if temporary:
                    shutil.rmtree(directory.parent, ignore_errors=True)
                raise CheckpointError(
                    f"{self.source_dir}: tokenizer files {_tokenizer_files(self.source_dir)} could not be loaded "
                    f"by NeMo's AutoTokenizer ({e})"
                ) from None
            if temporary:  # the copy lives as long as the tokenizer that reads from it
                weakref.finalize(tok, shutil.rmtree, str(directory.parent), ignore_errors=True)
        self.__dict__["_tokenizer"] = tok
        return tok

    def _copy_tokenizer(self) -> Path | None:
        """The source's tokenizer files copied into a fresh `<tmp>/nemo_tokenizer/`, or None."""
        src = self.source_dir
        names = _tokenizer_files(src)
        if not ({"tokenizer.json", "tokenizer.model"} & set(names)):
            logging.warning(f"{src}: no tokenizer.json or tokenizer.model; the checkpoint will have no tokenizer")
            return None
        directory = Path(tempfile.mkdtemp(prefix="nemo_plugins_tokenizer.")) / TOKENIZER_DIR
        try:
            directory.mkdir()
            for name in names:
                shutil.copyfile(src / name, directory / name)
            if "tokenizer_config.json" not in names:
                config = self._minimal_tokenizer_config(src)
                (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        except BaseException:
            shutil.rmtree(directory.parent, ignore_errors=True)
            raise
        return directory

    def _minimal_tokenizer_config(self, src: Path) -> dict:
        from tokenizers import Tokenizer

        if not (src / "tokenizer.json").is_file():
            raise CheckpointError(
                f"{src}: tokenizer.model without tokenizer_config.json; add a tokenizer_config.json naming its class"
            )
        try:
            tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise CheckpointError(f"{src / 'tokenizer.json'}: not a valid tokenizers file ({e})") from None
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.arch.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
        }
        for key in ("bos", "eos"):
            ids = getattr(self.arch, f"{key}_token_id")
            first = ids[0] if isinstance(ids, list) and ids else ids
            token = tok.id_to_token(first) if isinstance(first, int) else None
            if token is not None:
                cfg[f"{key}_token"] = token
        return cfg

    # -- conversion

    def init(self) -> PuzzleChildModel:
        return PuzzleChildModel(self.config, tokenizer=self.tokenizer)

    def apply(self, output_path: Path) -> Path:
        state = self.source_state()
        target = self.init()
        was_initialized = torch.distributed.is_initialized()
        trainer = None
        try:
            trainer = self.nemo_setup(target, ckpt_async_save=False, checkpoint_io=HostCheckpointIO())
            self.convert_state(state, target)
            self.nemo_save(output_path, trainer)
        finally:
            self.__dict__.pop("_state", None)
            _started_process_group(was_initialized)
            _finish(trainer, target)
        logging.info(f"Imported {self.source_dir} ({state['model.embed_tokens.weight'].dtype}) to {output_path}")
        return output_path

    def convert_state(self, source: dict[str, torch.Tensor], target: PuzzleChildModel) -> None:
        """Put the reference-named `source` tensors into the configured megatron-core model.

        The model's parameters are replaced (not copied into), which also works when they were
        created on the meta device; each is cast to the parameter's dtype. Every parameter must
        be covered, and every converted tensor must have a parameter of its shape.
        """
        module = _mcore_module(target)
        converted = to_mcore(self.arch, source)
        expected = _weights(module)
        missing = sorted(set(expected) - set(converted))
        unexpected = sorted(set(converted) - set(expected))
        if missing or unexpected:
            raise ConversionError(
                f"megatron-core model of {self.source_dir}: converted weights miss {missing[:5]} and have "
                f"unexpected {unexpected[:5]} (the layer spec and convert.to_mcore disagree)"
            )
        for name, param in expected.items():
            if tuple(converted[name].shape) != tuple(param.shape):
                raise ConversionError(
                    f"megatron-core model of {self.source_dir}: {name} has shape {tuple(param.shape)}, "
                    f"converted tensor has {tuple(converted[name].shape)}"
                )
        converted = {k: v.to(expected[k].dtype).contiguous() for k, v in converted.items()}
        module.load_state_dict(converted, strict=False, assign=True)


# ----------------------------------------------------------------------------- exporter


@io.model_exporter(PuzzleChildModel, "hf")
class HFPuzzleExporter(io.ModelConnector[PuzzleChildModel, "HeteroLlamaForCausalLM"]):
    """NeMo 2 checkpoint of a `PuzzleChildModel` -> HF directory (config, safetensors, tokenizer).

    Use through `llm.export_ckpt(path=<nemo checkpoint>, target="hf", output_path=...)`.
    """

    def __call__(self, output_path=None, overwrite: bool = False, **kwargs) -> Path:
        return _atomic_call(self, output_path, overwrite, kwargs, reuse=False)

    @property
    def checkpoint_dir(self) -> Path:
        path = Path(str(self))
        if not (path / "context").is_dir() or not (path / "weights").is_dir():
            raise CheckpointError(f"{path}: not a NeMo 2 checkpoint (expected context/ and weights/ directories)")
        return path

    @property
    def config(self):
        """The checkpoint's architecture (`ModelConfig`)."""
        return arch_of(io.load_context(str(self.checkpoint_dir), subpath="model.config"))

    def nemo_load(self, path, trainer=None, cpu: bool = True):
        """NeMo's loader with a default trainer that works with megatron-core 0.16 and on CPU hosts:
        `HostCheckpointIO`, and the TESTING state (no DDP setup, which needs CUDA)."""
        if trainer is None:
            from lightning.pytorch.trainer.states import TrainerFn
            from nemo.lightning import MegatronStrategy, Trainer

            trainer = Trainer(
                devices=1,
                accelerator="cpu" if cpu else "gpu",
                strategy=MegatronStrategy(
                    ddp="pytorch", setup_optimizers=False, ckpt_async_save=False,
                    checkpoint_io=HostCheckpointIO(),
                ),
            )
            trainer.state.fn = TrainerFn.TESTING
        was_initialized = torch.distributed.is_initialized()
        try:
            result = super().nemo_load(path, trainer=trainer, cpu=cpu)
        except BaseException:
            _started_process_group(was_initialized)
            _finish(None, None)
            raise
        _started_process_group(was_initialized)
        return result

    def apply(self, output_path: Path) -> Path:
        source, trainer = self.nemo_load(str(self.checkpoint_dir))
        try:
            arch, dtype = arch_of(source), source.config.params_dtype
            state = from_mcore(arch, _weights(_mcore_module(source)))
            files = self.tokenizer_files(source.tokenizer)
        finally:
            _finish(trainer, source)
        # One dtype, the model's: megatron keeps some tensors (the local-spec norms) in float32.
        model = model_from_state(arch, {k: v.detach().to("cpu", dtype) for k, v in state.items()})
        save_checkpoint(model, output_path, architecture="auto", extra_files=files)
        logging.info(f"Exported {self.checkpoint_dir} to {output_path}")
        return output_path

    @staticmethod
    def tokenizer_files(tokenizer) -> dict[str, bytes]:
        """The HF tokenizer files of a NeMo tokenizer: copied byte for byte from its directory
        (the checkpoint's artifact) when it has one, else written by `save_pretrained`."""
        hf = getattr(tokenizer, "tokenizer", None)
        if hf is None:
            if tokenizer is not None:
                logging.warning(f"tokenizer {type(tokenizer).__name__} is not a HF tokenizer: not exported")
            return {}
        directory = Path(str(getattr(hf, "name_or_path", "")))
        if directory.is_dir() and _tokenizer_files(directory):
            return {name: (directory / name).read_bytes() for name in _tokenizer_files(directory)}
        with tempfile.TemporaryDirectory(prefix="nemo_plugins_tokenizer.") as tmp:
            hf.save_pretrained(tmp)
            return {name: (Path(tmp) / name).read_bytes() for name in _tokenizer_files(Path(tmp))}
