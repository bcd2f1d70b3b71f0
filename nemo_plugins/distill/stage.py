"""The `recovery` stage: distill the parent into the compressed child, and (for comparison)
train a second copy of the child on the plain LM loss with the same data, steps and tokens.

Reported before and after, on the world's held-out problems: KL(parent || model) and LM loss
over response tokens (as the Puzzle report measures them), and greedy task accuracy with
thinking on. The KD-recovered child is saved (HF format where expressible).
"""

from __future__ import annotations

import copy
import gc
import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.tiny_world import World
from ..utils.hashing import config_hash
from ..data.chat_tokenizer import ChatTokenizer
from ..data.problems import ProblemSet
from ..data.reasoning_world import is_correct
from ..data.sources import Corpus
from ..model.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from ..model.llama import HeteroLlamaForCausalLM
from ..utils.atomic import write_json_atomic
from .losses import RecoveryLossConfig
from .recovery import RecoveryConfig, run_recovery

log = logging.getLogger("nemo_plugins.distill")


@dataclass
class RecoveryStageConfig(RecoveryConfig):
    compare_cpt: bool = True  # also train a copy on the LM loss alone, same steps and tokens
    eval_problems: int = 250  # held-out problems for task accuracy (thinking on)
    eval_batches: int = 8  # held-out batches of batch_size for KL / LM loss


def quality(
    parent, model, world: World, cfg: RecoveryStageConfig, chat: ChatTokenizer | None = None, held_out=None,
    problems: ProblemSet | None = None, verify=is_correct,
) -> dict:
    """KL(parent || model) and LM loss on held-out tokens (`held_out`, default: the world's response
    tokens); greedy accuracy (thinking on) on the held-out `problems` (default: the world's),
    checked by `verify`."""
    from ..evaluate import task_accuracy
    from ..model.metrics import model_metrics
    from ..model.train import token_batches

    chat = chat or world.chat
    held_out = held_out if held_out is not None else world.eval_examples(chat)
    batches = token_batches(held_out, cfg.batch_size, cfg.eval_batches, 0, response_only=True)
    metrics = model_metrics(parent, model, batches)
    problems = problems or ProblemSet(world)
    acc = task_accuracy(model, chat, problems.eval[: cfg.eval_problems], thinking=True, verify=verify)
    return {"kl_div": metrics["kl_div"], "lm_loss": metrics["lm_loss"], "accuracy": acc["accuracy"],
            "accuracy_by_difficulty": acc["by_difficulty"]}  # fmt: skip


def run_recovery_stage(
    parent: HeteroLlamaForCausalLM, child: HeteroLlamaForCausalLM, world: World, cfg: RecoveryStageConfig, out_dir: Path,
    *, progress: bool = False, chat: ChatTokenizer | None = None, corpus: Corpus | None = None,
    problems: ProblemSet | None = None, verify=is_correct,
) -> tuple[dict, HeteroLlamaForCausalLM]:  # fmt: skip
    """(report, KD-recovered child). Resumable: each run continues from its checkpoints, which
    live in a directory keyed by the run's config and the child's weights, so a changed setting
    or a different child starts afresh instead of resuming someone else's run. `chat`: the
    child's tokenizer and template, shared with the parent (default: the world's)."""
    chat, corpus = chat or world.chat, corpus or Corpus(world)
    out_dir = Path(out_dir)
    train, val = corpus.training_examples(chat), corpus.eval_examples(chat)
    measure = lambda model: quality(parent, model, world, cfg, chat, val, problems, verify)  # noqa: E731
    report: dict = {"parent": measure(parent), "before": measure(child)}
    runs = {"kd": cfg.loss}
    if cfg.compare_cpt:
        runs["cpt"] = RecoveryLossConfig(mode="cpt")
    target = out_dir / "model"
    for name, loss in runs.items():
        student = copy.deepcopy(child)
        run_cfg = dataclasses.replace(cfg, loss=loss)
        data_key = [corpus.key] if corpus.key else []  # the tiny world's runs keep their keys
        run_dir = out_dir / f"{name}-{config_hash(asdict(run_cfg), fingerprint(child), *data_key)}"
        summary = run_recovery(student, parent, train, val, run_cfg, run_dir, progress=progress)
        tokens = summary["steps"] * cfg.batch_size * cfg.grad_accum
        report[name] = {**measure(student), "steps": summary["steps"], "examples_seen": tokens,
                        "val_history": summary["val_history"], "plot": summary["plot"],
                        "metrics_csv": summary["metrics_csv"]}  # fmt: skip
        if name == "kd":  # written now, so the comparison run does not train beside a held copy
            save_checkpoint(student, target, extra_files=chat.files())
        del student
        gc.collect()  # the finished trainer's optimizer state sits in reference cycles until collected
    before = report["before"]["kl_div"]
    for name in runs:  # the share of the child's KL(parent || child) that each run closed
        report[f"{name}_gap_closed"] = 1 - report[name]["kl_div"] / before if before > 0 else None
    recovered = load_checkpoint(target)
    report["model"] = str(target)
    write_json_atomic(out_dir / "report.json", report)
    log.info("recovery: KL %.4f -> %.4f (KD)%s", before, report["kd"]["kl_div"],
             f", {report['cpt']['kl_div']:.4f} (LM loss only)" if "cpt" in report else "")  # fmt: skip
    return report, recovered
