"""The `data.problems` section: problems with verifiable answers for evaluation, SFT pairs and
toggle evaluation, and GRPO prompts.

Sources:
- `tiny` (default): the tiny world's arithmetic (integer answers, task "world");
- `champ`: CHAMP's competition math (PyPI `champ-dataset`); every problem with a math-verifiable
  reference, its human steps as the thinking trace of its SFT pair; task "math";
- `jsonl`: RL prompts `{"prompt", "answer", "task", "id"}` (`data.prompts`), one task for all.

Train and held-out are disjoint by problem id (`text_data.is_heldout`), so no setting is chosen
on the problems a result is reported on. Each problem is a `TaskProblem` (question, answer, id,
difficulty 0 where a source has no levels), except the tiny world's own `Problem`s. Answers are
checked by the reward task's verifier (`rl.rewards.answer_checker`), not here: data knows which
task its answers are for, the RL layer knows how to check them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .champ import ANSWER_WORDINGS
from .sft_data import ChatExample, world_paired_examples
from .text_data import split_documents
from ..utils.hashing import config_hash
from .tiny_world import World

PROBLEM_SOURCES = ("tiny", "champ", "jsonl")
# The reward task of a source's problems where the source fixes it (a JSONL's prompts name theirs).
SOURCE_TASKS = {"tiny": "world", "champ": "math"}


@dataclass(frozen=True)
class TaskProblem:
    """A problem of a real data set: `answer` is the reference its task's verifier checks."""

    question: str
    answer: str
    id: str
    difficulty: int = 0
    steps: tuple[str, ...] = ()


@dataclass
class ProblemSourceConfig:
    source: str = "tiny"  # tiny | champ | jsonl
    paths: list[str] = field(default_factory=list)  # jsonl: RL prompt files {prompt, answer, task, id}
    heldout_fraction: float = 0.2  # share of problems held out (champ, jsonl; the tiny world has its own split)
    seed: int = 0  # of the held-out split
    on_error: str = "skip"  # skip | raise: a malformed JSONL record
    # champ: end every SFT thinking trace with "So the answer is <answer>." (champ.champ_solution_text;
    # on SmolLM2 it lowered thinking-on adherence, README "Reasoning-toggle SFT")
    conclude_trace: bool = False
    # champ: the SFT answer's wording (champ.champ_answer_text). plain: "The answer is \\boxed{252}."
    # always; champ: CHAMP's words before the boxed reference where its answer is in words ("C(10, 5),
    # or equivalently 252, so the answer is \\boxed{252}."), which on SmolLM2 thinking-on answers
    # copied into their think block and ended the turn there (README "Reasoning-toggle SFT")
    answer_wording: str = "plain"

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        if self.source not in PROBLEM_SOURCES:
            raise ValueError(f"data.problems.source={self.source!r}: expected one of {', '.join(PROBLEM_SOURCES)}")
        if self.source == "jsonl" and not self.paths:
            raise ValueError("data.problems.source=jsonl: give data.problems.paths=[FILE.jsonl, ...]")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"data.problems.heldout_fraction={self.heldout_fraction}: expected a fraction in (0, 1)")
        if self.answer_wording not in ANSWER_WORDINGS:
            raise ValueError(f"data.problems.answer_wording={self.answer_wording!r}: expected one of "
                             f"{', '.join(ANSWER_WORDINGS)}")  # fmt: skip
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"data.problems.on_error={self.on_error!r}: expected skip or raise")


class ProblemSet:
    """train / eval problems of one task, and SFT pairs for the problems that have solutions."""

    def __init__(self, world: World, cfg: ProblemSourceConfig | None = None):
        self.world, self.cfg = world, cfg or ProblemSourceConfig()
        self.report: dict = {"source": self.cfg.source}
        self._sft: dict[str, ChatExample | tuple] = {}
        if self.cfg.source == "tiny":
            self.task, self.train, self.eval = SOURCE_TASKS["tiny"], world.train, world.eval
        elif self.cfg.source == "champ":
            self._champ()
        else:
            self._jsonl()
        self.report.update(task=self.task, train=len(self.train), eval=len(self.eval))
        # What caches of results on these problems must be keyed by; None for the tiny world,
        # whose caches predate this section and stay valid.
        ids = [(p.id, p.answer) for p in self.train + self.eval] if self.cfg.source != "tiny" else None
        self.key = config_hash(self.cfg.source, self.cfg.heldout_fraction, self.cfg.seed, ids) if ids else None

    def _split(self, problems: list) -> tuple[list, list]:
        return split_documents(problems, self.cfg.heldout_fraction, self.cfg.seed, key=lambda p: p.id)

    def _champ(self) -> None:
        from .champ import DEFAULT_INSTRUCTION, champ_sft_examples, load_champ

        champ = [p for p in load_champ() if p.reference is not None]
        problems = [TaskProblem(f"{DEFAULT_INSTRUCTION}\n\n{p.statement}", p.reference, p.id, steps=p.steps) for p in champ]
        self.task = SOURCE_TASKS["champ"]
        self.train, self.eval = self._split(problems)
        pairs = champ_sft_examples(champ, conclude=self.cfg.conclude_trace, wording=self.cfg.answer_wording)
        self._sft = {p.id: (pairs[2 * i], pairs[2 * i + 1]) for i, p in enumerate(champ)}
        self.report["without_reference"] = len(load_champ()) - len(champ)

    def _jsonl(self) -> None:
        from .prompts import load_prompts

        records, rep = load_prompts(self.cfg.paths, on_error=self.cfg.on_error)
        tasks = sorted({r.task for r in records})
        if len(tasks) != 1:
            raise ValueError(f"data.problems.paths: expected prompts of one task, found {tasks or 'none'} "
                             f"({rep.kept} kept, {rep.skipped} skipped: {rep.problems[:3]})")  # fmt: skip
        self.task = tasks[0]
        self.train, self.eval = self._split([TaskProblem(r.prompt, r.answer, r.id) for r in records])
        self.report["jsonl"] = {"read": rep.read, "kept": rep.kept, "skipped": rep.skipped,
                                "reasons": dict(rep.reasons), "problems": rep.problems[:10]}  # fmt: skip

    def sft_examples(self, problems: list) -> list[ChatExample]:
        """Paired thinking on/off examples for `problems` that have a worked solution (the tiny
        world's all do; CHAMP's human steps; JSONL prompts have none)."""
        if self.cfg.source == "tiny":
            return world_paired_examples(problems)
        return [ex for p in problems if p.id in self._sft for ex in self._sft[p.id]]
