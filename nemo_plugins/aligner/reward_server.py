"""Accuracy and format rewards as a reward server speaking NeMo-Aligner's stock PyTriton protocol.

Same model name, inputs and output as Aligner's `RewardModelServer` (`algorithms.reward_server`):
model `reward_model` (Aligner's `remote_rm.reward_model.name`), optional inputs `sentences`
(bytes), `tokens` (int64) and `sequence_lengths` (int64), output `rewards` (float32, one per
row). So Aligner's own `RemoteGPTRMClient` talks to it unchanged; it sends `tokens` and
`sequence_lengths`, and the server finds each row's reference through the prompt rows of
`prompt_set` (`verifier.TokenVerifier`). `sentences` carry no prompt/response split, so a request
without tokens is refused.

Run it beside the trainer (the same prompt files, modes and tokenizer the trainer's prompt file
was written with; `remote_rm.reward_model.ip/port` point at it):

    python -m nemo_plugins.aligner.reward_server prompts=[train.jsonl] tokenizer=MODEL_DIR port=5555

Before serving, every reference is checked once (`rl.rewards.check_references`), so a bad answer
in the prompt file fails at start, naming the prompt, not as a zero on every sample.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..data.chat_tokenizer import ChatTokenizer
from ..rl.config import JudgeSettings, ScoringSettings
from ..rl.rewards import check_references
from ..rl.scoring import JudgeScorer, RuleScorer
from .deps import require
from .prompt_index import PromptIndex
from .prompt_set import load_prompt_set
from .verifier import TokenVerifier

log = logging.getLogger("nemo_plugins.aligner.reward_server")

MAX_BATCH = 9999999  # Aligner's server value: requests are never split by PyTriton


@dataclass
class RewardServerConfig(ScoringSettings):
    """Settings (each overridable as key=value). `prompts`, `tokenizer` and `modes` must be what the
    trainer's prompt file was written with (`prompt_set`), which also gives the reward task; the
    weights and sandbox limits are `rl.config.ScoringSettings`' (`accuracy_weight=`, `workers=`, ...);
    `unknown_reward` scores a row whose prompt is not in the file. `host` 0.0.0.0 and `port` 5555
    as in Aligner's reward-model server. `judge` (`rl.config.JudgeSettings`: `judge.base_url=`,
    `judge.model=`, ...) grades prompts of task "judge" and is required for them."""

    prompts: list[str] = field(default_factory=list)
    tokenizer: str = ""
    modes: list[bool] = field(default_factory=lambda: [True, False])
    model_name: str = "reward_model"
    host: str = "0.0.0.0"
    port: int = 5555
    unknown_reward: float = 0.0
    max_queue_delay_microseconds: float = 2000.0
    judge: JudgeSettings = field(default_factory=JudgeSettings)

    def __post_init__(self):
        try:
            super().__post_init__()
            if isinstance(self.judge, Mapping):
                self.judge = JudgeSettings(**self.judge)
            if self.judge.base_url is not None:
                self.judge.judge_config()  # validates the judge's keys
        except ValueError as e:  # the server's keys are flat: workers=, not grpo.rewards.workers=
            raise ValueError(str(e).replace("grpo.rewards.", "", 1)) from None
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port}: expected 1..65535")
        if not self.model_name:
            raise ValueError("model_name is empty: expected Aligner's remote_rm.reward_model.name (default reward_model)")


def build_verifier(cfg: RewardServerConfig) -> TokenVerifier:
    """The prompt rows, their index and the scorer of the prompts' task (`RuleScorer`, or
    `JudgeScorer` for task "judge"), references checked."""
    for key in ("prompts", "tokenizer"):
        if not getattr(cfg, key):
            raise ValueError(f"{key} is not set: expected prompts=[file.jsonl] tokenizer=MODEL_DIR")
    tok = ChatTokenizer.from_dir(cfg.tokenizer)
    prompt_set = load_prompt_set(cfg.prompts, tok, cfg.modes)
    references = {r.problem_id: r.answer for r in prompt_set.rows}
    check_references(references, prompt_set.task, workers=max(cfg.workers, 1))
    if prompt_set.task == "judge":
        if cfg.judge.base_url is None or cfg.judge.model is None:
            raise ValueError(f"prompts {cfg.prompts} are of task 'judge': set judge.base_url= and judge.model= "
                             "(the OpenAI-compatible LLM judge that grades them)")  # fmt: skip
        scorer = JudgeScorer(cfg.reward_config_for("judge"), cfg.judge.judge_config(), cfg.limits())
    else:
        scorer = RuleScorer(cfg.reward_config_for(prompt_set.task), cfg.limits())
    index = PromptIndex(prompt_set.rows, tok.encode)
    log.info("reward server: %d prompt rows (%d problems), task %s", len(index), len(references), prompt_set.task)
    return TokenVerifier(index, tok, scorer, cfg.unknown_reward)


def make_infer_fn(verifier: TokenVerifier, totals: Counter | None = None):
    """The PyTriton inference function: {tokens [B,T], sequence_lengths [B,1]} -> {rewards [B,1]}.
    `totals` (if given) accumulates rows scored and failures by reason across requests."""
    batch = require("pytriton.decorators", "the Aligner reward server").batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        if "tokens" not in inputs or "sequence_lengths" not in inputs:
            raise ValueError(f"request has inputs {sorted(inputs)}: expected 'tokens' and 'sequence_lengths' "
                             "(prompt + response ids, as RemoteGPTRMClient sends them); 'sentences' are not supported")  # fmt: skip
        result = verifier(inputs["tokens"], inputs["sequence_lengths"])
        if result.failures:
            log.warning("reward server: %d rows, failures %s", len(result.rewards), dict(result.failures))
        if totals is not None:
            totals["rows"] += len(result.rewards)
            totals.update(result.failures)
        return {"rewards": result.rewards.reshape(-1, 1).astype(np.float32)}

    return infer


def bind(triton, verifier: TokenVerifier, cfg: RewardServerConfig, totals: Counter | None = None) -> None:
    """Bind the reward model to a `pytriton.triton.Triton` with Aligner's tensors and batching."""
    mc = require("pytriton.model_config", "the Aligner reward server")
    inputs = (
        mc.Tensor(name="sentences", shape=(-1,), dtype=bytes, optional=True),
        mc.Tensor(name="tokens", shape=(-1,), dtype=np.int64, optional=True),
        mc.Tensor(name="sequence_lengths", shape=(-1,), dtype=np.int64, optional=True),
    )
    outputs = (mc.Tensor(name="rewards", shape=(1,), dtype=np.float32),)
    batcher = mc.DynamicBatcher(max_queue_delay_microseconds=int(cfg.max_queue_delay_microseconds))
    config = mc.ModelConfig(batching=True, max_batch_size=MAX_BATCH, batcher=batcher)
    triton.bind(model_name=cfg.model_name, infer_func=make_infer_fn(verifier, totals),
                inputs=inputs, outputs=outputs, config=config)  # fmt: skip


def triton_server(cfg: RewardServerConfig):
    """An unstarted `Triton` with HTTP only on `cfg.host:cfg.port` (as Aligner's server)."""
    pt = require("pytriton.triton", "the Aligner reward server")
    return pt.Triton(config=pt.TritonConfig(allow_http=True, allow_grpc=False, allow_metrics=False,
                                            http_address=cfg.host, http_port=cfg.port))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from ..config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(RewardServerConfig, overrides=sys.argv[1:] if argv is None else argv)
    verifier = build_verifier(cfg)
    try:
        with triton_server(cfg) as triton:
            bind(triton, verifier, cfg)
            log.info("serving %r on http://%s:%d", cfg.model_name, cfg.host, cfg.port)
            triton.serve()
    finally:
        verifier.scorer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
