"""The `puzzle` stage: library -> init -> BLD -> scores + costs -> MIP -> child -> report.

Every step keeps its result on disk keyed by what it depends on: the trained library by
(parent, library, init, BLD config), scores by the scoring config, costs by the cost config.
A changed budget therefore re-runs only the MIP and the realization.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path


from ..arch.accounting import block_params
from ..arch.accounting import report as arch_report
from ..data.chat_tokenizer import ChatTokenizer
from ..data.problems import ProblemSet
from ..data.reasoning_world import is_correct
from ..data.sources import Corpus
from ..data.tiny_world import World
from ..model.checkpoint import save_checkpoint
from ..model.llama import HeteroLlamaForCausalLM
from ..model.metrics import model_metrics
from ..model.train import token_batches
from ..utils.atomic import write_json_atomic
from ..utils.hashing import config_hash, source_digest
from . import mip
from .baselines import drop_choice, uniform_choice
from .bld import BLDConfig, bld_speed, variant_path
from .build import InitConfig
from .costs import PHASES, CostConfig, measure_in_model, measure_speedup, non_block_stats, predicted_speedup, variant_stats
from .launch import bld_processes, run_bld_processes
from .library import LibraryConfig, build_variants, is_parent_variant
from .realize import realize_child
from .shards import load_shard, score_shard, train_shard

# The code that initializes, trains and scores a block library: part of its cache key (as for the
# parent, not the generation code, which the library never runs).
LIBRARY_SOURCE = ("puzzle", "model/llama.py", "model/train.py", "model/metrics.py", "model/losses.py",
                  "model/checkpoint.py", "arch", "data/sources.py", "data/text_data.py", "utils/training.py",
                  "utils/resume.py")  # fmt: skip

log = logging.getLogger("nemo_plugins.puzzle")


@dataclass
class BudgetConfig:
    """Targets as users think of them; each becomes a bound on a sum over the chosen variants
    (after subtracting what no variant changes: embeddings, final norm, lm_head)."""

    params_fraction: float | None = 0.7  # of the parent's parameters in blocks
    kv_cache_fraction: float | None = 0.5  # of the parent's KV cache
    memory_gib: float | None = None  # weights + KV cache at costs.batch_size/lengths/dtype
    throughput: float | None = None  # generated tokens/s at costs.batch_size (roofline, costs.hardware)
    latency_ms: float | None = None  # prefill + decode of one batch (roofline)
    max_attention_layers: int | None = None

    def __post_init__(self):
        for name in ("params_fraction", "kv_cache_fraction"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise ValueError(f"puzzle.budget.{name}={v}: expected a fraction in (0, 1]")
        for name in ("memory_gib", "throughput", "latency_ms"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"puzzle.budget.{name}={v}: expected a positive number")


@dataclass
class PuzzleConfig:
    library: LibraryConfig = field(default_factory=LibraryConfig)
    init: InitConfig = field(default_factory=InitConfig)
    bld: BLDConfig = field(default_factory=BLDConfig)
    costs: CostConfig = field(default_factory=CostConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    objective: str = "metrics.kl_div"
    score_batches: int = 8
    score_batch_size: int = 32
    pareto_points: int = 16


def budget_bounds(budget: BudgetConfig, parent_totals: dict[str, float], non_block: dict[str, float], costs: CostConfig) -> dict[str, float]:
    """{stats key: max} for the MIP from the user's targets."""
    bounds: dict[str, float] = {}
    if budget.params_fraction is not None:
        bounds["stats.num_params"] = budget.params_fraction * parent_totals["num_params"]
    if budget.kv_cache_fraction is not None:
        bounds["stats.kv_cache_mib"] = budget.kv_cache_fraction * parent_totals["kv_cache_mib"]
    if budget.memory_gib is not None:
        bounds["stats.memory_mib"] = budget.memory_gib * 1024 - non_block["memory_mib"]
    runtime = []
    if budget.throughput is not None:  # tokens/s -> ms for one batch's generation
        runtime.append(1000.0 * costs.batch_size * costs.decode_len / budget.throughput)
    if budget.latency_ms is not None:
        runtime.append(budget.latency_ms)
    if runtime:
        bounds["stats.runtime_ms"] = min(runtime) - non_block["runtime_ms"]
    if budget.max_attention_layers is not None:
        bounds["stats.num_attention_layers"] = budget.max_attention_layers
    return bounds


def held_out_batches(cfg: PuzzleConfig, held_out: list) -> tuple[list, list]:
    """(scoring, measuring) batches of `cfg.score_batch_size` from two disjoint halves of the
    held-out examples. Every choice is made on the first half (up to `cfg.score_batches` batches:
    the variants' scores that the MIP, uniform shrinking and layer dropping select with); children
    are measured on all of the second, which no choice saw (a whole-model pass per child is cheap
    next to scoring every variant)."""
    if len(held_out) < 2:
        raise ValueError(
            f"puzzle: {len(held_out)} held-out example(s); scoring and measuring need at least 2 "
            "(raise data.text.heldout_tokens, or world.n_eval for the tiny world)"
        )
    half = len(held_out) // 2
    batches = lambda rows, n: token_batches(rows, cfg.score_batch_size, n, 0, response_only=True)  # noqa: E731
    rest = held_out[half:]
    return batches(held_out[:half], cfg.score_batches), batches(rest, -(-len(rest) // cfg.score_batch_size))


def library_dir(cfg: PuzzleConfig, parent_id: str, world_dir: Path) -> Path:
    """The directory of the trained block library under the world's directory: keyed by the
    parent and the library, init and BLD configs (what the trained variants depend on; not how
    often a wave checkpoints)."""
    bld = {k: v for k, v in asdict(cfg.bld).items() if k != "ckpt_every"}
    code = source_digest(*LIBRARY_SOURCE)
    return Path(world_dir) / f"puzzle-{config_hash(parent_id, asdict(cfg.library), asdict(cfg.init), bld, code)}"


def scores_file(cfg: PuzzleConfig, lib_dir: Path, n_held_out: int) -> Path:
    """The file of the variants' scores in `lib_dir`: keyed by the scoring config (response
    tokens of `cfg.score_batches` x `cfg.score_batch_size` of the selection half of the
    `n_held_out` eval examples)."""
    key = config_hash("response-tokens", "selection-half", cfg.score_batches, cfg.score_batch_size, n_held_out)
    return Path(lib_dir) / f"scores-{key}.json"


def _cached_json(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json_atomic(path, value)
    return value


def build_library_file(parent_cfg, variants, scores, measured, costs: CostConfig) -> dict:
    """{group: {variant: {"stats": {...}, "metrics": {...}}}}: the MIP's plain input."""
    lib: dict = {}
    for v in variants:
        stats = variant_stats(parent_cfg, v, costs)
        stats.update(measured.get(v.key, {}))
        lib.setdefault(v.group, {})[v.name] = {"stats": stats, "metrics": scores[v.key]}
    return lib


def run_puzzle(
    parent: HeteroLlamaForCausalLM, parent_id: str, world: World, cfg: PuzzleConfig, out_dir: Path, *,
    progress: bool = True, chat: ChatTokenizer | None = None, corpus: Corpus | None = None,
    problems: ProblemSet | None = None, verify=is_correct,
) -> dict:
    """Run the whole Puzzle stage; returns the report also written to out_dir/report.json, with
    the child in out_dir/model. `chat`: the parent's tokenizer and template (default: the
    world's); `corpus`: the text to calibrate, train and score on (default: the world's);
    `problems` / `verify`: the held-out problems of the report's task accuracy and their check."""
    chat, corpus = chat or world.chat, corpus or Corpus(world)
    pcfg = parent.config
    variants, students, lib_dir, bld_losses = trained_library(parent, parent_id, corpus, cfg, progress=progress, chat=chat)
    held_out = corpus.eval_examples(chat)
    score_batches, quality_batches = held_out_batches(cfg, held_out)
    exact = {v for v in variants if is_parent_variant(pcfg, v)}
    parent_choice = {v.group: v.name for v in exact}

    scores = _cached_json(
        scores_file(cfg, lib_dir, len(held_out)),
        lambda: score_shard(parent, students, score_batches, progress=progress),
    )
    measured = {"variants": {}, "non_block": {}}
    if cfg.costs.measure:
        measured = _cached_json(
            lib_dir / f"measured-{config_hash('in-model', asdict(cfg.costs))}.json",
            lambda: measure_in_model(parent, variants, students, cfg.costs),
        )
    library = build_library_file(pcfg, variants, scores, measured["variants"], cfg.costs)
    write_json_atomic(out_dir / "library.json", library)

    parent_totals = choice_totals(library, parent_choice)
    non_block = non_block_stats(pcfg, cfg.costs)
    bounds = budget_bounds(cfg.budget, parent_totals, non_block, cfg.costs)
    solution = mip.solve(library, cfg.objective, max_bounds=bounds)[0]
    log.info("MIP: %s objective %.4f under %s", solution.status, solution.objective, bounds)

    sweep_key = "stats.num_params"
    budgets = [parent_totals["num_params"] * (i + 1) / cfg.pareto_points for i in range(cfg.pareto_points)]
    others = {k: v for k, v in bounds.items() if k != sweep_key}
    frontier = mip.pareto_sweep(library, cfg.objective, sweep_key, budgets, max_bounds=others)

    child = realize_child(parent, solution.choices, variants, lambda v: students[v].state_dict())
    child_dir = out_dir / "model"
    save_checkpoint(child, child_dir, architecture="nemotron-nas", extra_files=chat.files())

    report = _report(
        parent, child, solution, frontier, budgets, bounds, parent_choice, parent_totals, non_block, library, cfg,
        quality_batches, measured, chat, (problems or ProblemSet(world)).eval, verify,
    )  # fmt: skip
    report["baselines"] = compare_baselines(
        parent, child, library, bounds, parent_choice, variants, students, report["quality"], quality_batches
    )
    report.update(library_dir=str(lib_dir), model=str(child_dir), bld_trained=len(bld_losses), bld_speed=bld_speed(lib_dir))
    write_json_atomic(out_dir / "report.json", report)
    from .report_plots import plot_architecture, plot_pareto

    plot_architecture(pcfg, child.config, out_dir / "architecture.png")
    plot_pareto(frontier, budgets, solution, out_dir / "pareto.png", sweep_key, cfg.objective)
    return report


def trained_library(
    parent: HeteroLlamaForCausalLM, parent_id: str, corpus: Corpus | World, cfg: PuzzleConfig, *, progress: bool = True,
    chat: ChatTokenizer | None = None,
):  # fmt: skip
    """(variants, {variant: trained module}, library directory, BLD losses of what trained now):
    every variant initialized from the parent, then trained by BLD on `corpus` unless already on
    disk (the library directory is keyed by the parent, the configs and the corpus)."""
    variants = build_variants(parent.config, cfg.library)
    examples = corpus.training_examples(chat)
    lib_dir = library_dir(cfg, parent_id, corpus.directory)
    processes = bld_processes(cfg.bld.processes)
    if processes > 1 and not all(variant_path(lib_dir, v).is_file() for v in variants):
        run_bld_processes(parent, variants, examples, lib_dir, cfg, processes)
    shard = {"rank": cfg.bld.rank, "world_size": cfg.bld.world_size}  # all of it, unless the user shards by hand
    built, bld_losses = train_shard(parent, variants, examples, lib_dir, cfg, **shard, progress=progress)
    students = load_shard(parent, variants, examples, lib_dir, cfg, built=built)
    return variants, students, lib_dir, bld_losses


def choice_totals(library: dict, choices: dict[str, str]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for group, name in choices.items():
        for k, val in library[group][name]["stats"].items():
            totals[k] = totals.get(k, 0.0) + val
    return totals


def roofline_speedup(library: dict, parent_choice: dict, choices: dict, non_block: dict, phase: str) -> float:
    """Parent/child time ratio of `phase` under the library's roofline costs (blocks plus what
    lies outside them)."""
    key = f"{phase}_ms"
    parent = choice_totals(library, parent_choice)[key] + non_block[key]
    return parent / (choice_totals(library, choices)[key] + non_block[key])


def compare_baselines(parent, child, library, bounds, parent_choice, variants, students, child_quality, batches) -> dict:
    """The Puzzle child's quality next to uniform shrinking and layer dropping under the same
    bounds, all assembled from the same trained library (see `baselines`): per child, the block
    parameters and KV cache as fractions of the parent's, the layers dropped whole, and
    `model_metrics` on `batches` (`child_quality`: the Puzzle child's, already measured there)."""
    pcfg = parent.config
    parent_block, parent_kv = _block_params(pcfg), arch_report(pcfg).kv_cache_bytes_per_token

    def row(model, quality):
        return {
            "params_fraction": _block_params(model.config) / parent_block,
            "kv_fraction": arch_report(model.config).kv_cache_bytes_per_token / parent_kv,
            "layers_dropped": sum(b.attention.kind == b.ffn.kind == "no_op" for b in model.config.blocks),
            **quality,
        }

    rows: dict = {"puzzle": row(child, child_quality)}
    for name, choice in (("uniform", uniform_choice(library, bounds)), ("drop", drop_choice(library, parent_choice, bounds))):
        if choice is None:
            rows[name] = None  # nothing of this shape fits the budget
            continue
        other = realize_child(parent, choice, variants, lambda v: students[v].state_dict())
        rows[name] = row(other, model_metrics(parent, other, batches))
        del other
    kls = [r["kl_div"] for n, r in rows.items() if n != "puzzle" and r is not None]
    return {"children": rows, "puzzle_strictly_best_kl": all(child_quality["kl_div"] < kl for kl in kls)}


def _block_params(cfg) -> int:
    return sum(block_params(cfg, b) for b in cfg.blocks)


def _runtime_check(parent, child, library, parent_choice, choices, non_block, measured, cfg) -> dict:
    """Measured child/parent speed-up next to the cost model's predictions.

    Predicted from the library alone: (a) the roofline model at costs.hardware, and (b) the
    per-variant times measured in the model on this device plus the measured time of what no
    variant touches (`predicted_speedup`). Parent and child are then timed in alternation,
    twice as many rounds as the library was (`measure_speedup`)."""
    timed = measure_speedup(parent, child, cfg.costs, reps=2 * cfg.costs.measure_reps)
    predicted = predicted_speedup(measured, parent_choice, choices)
    out = {}
    for phase in PHASES:
        roof = roofline_speedup(library, parent_choice, choices, non_block, phase)
        out[phase] = {
            "parent_ms": timed[phase]["parent_ms"], "child_ms": timed[phase]["child_ms"],
            "measured_speedup": timed[phase]["speedup"],
            "predicted_speedup_measured_blocks": predicted[phase],
            "prediction_error": predicted[phase] / timed[phase]["speedup"] - 1,
            "predicted_speedup_roofline": roof,
        }  # fmt: skip
    return out


def _report(
    parent, child, solution, frontier, budgets, bounds, parent_choice, parent_totals, non_block, library, cfg,
    quality_batches, measured, chat, eval_problems, verify,
) -> dict:
    from ..evaluate import task_accuracy

    quality = model_metrics(parent, child, quality_batches)
    easy = [p for p in eval_problems if p.difficulty <= 2][:100]  # levels 1-2 of the tiny world, or all
    acc_parent = task_accuracy(parent, chat, easy, verify=verify)["accuracy"]
    acc_child = task_accuracy(child, chat, easy, verify=verify)["accuracy"]
    predicted = choice_totals(library, solution.choices)
    runtime = (
        _runtime_check(parent, child, library, parent_choice, solution.choices, non_block, measured, cfg)
        if cfg.costs.measure
        else None
    )
    arch = arch_report(child.config, dtype=cfg.costs.dtype, batch_size=cfg.costs.batch_size,
                       seq_len=cfg.costs.prefill_len + cfg.costs.decode_len)  # fmt: skip
    return {
        "status": solution.status,
        "objective": solution.objective,
        "choices": solution.choices,
        "bounds": bounds,
        "predicted_totals": predicted,
        "parent_totals": parent_totals,
        "non_block": non_block,
        "child_params": arch.params,
        "parent_params": arch_report(parent.config).params,
        "child_kv_cache_bytes_per_token": arch.kv_cache_bytes_per_token,
        "parent_kv_cache_bytes_per_token": arch_report(parent.config).kv_cache_bytes_per_token,
        "quality": quality,
        "runtime": runtime,
        "task_accuracy_easy": {"parent": acc_parent, "child": acc_child},
        "pareto": [
            {"budget": b, "objective": None if s is None else s.objective} for b, s in zip(budgets, frontier)
        ],
        "layers": [
            {"attention": b.attention.kind, "kv_heads": b.attention.num_kv_heads, "ffn": b.ffn.kind,
             "ffn_width": b.ffn.intermediate_size}  # fmt: skip
            for b in child.config.blocks
        ],
    }
