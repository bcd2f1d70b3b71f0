"""The rule-reward server against NeMo-Aligner's own `RemoteGPTRMClient`, over HTTP on localhost.

The server runs as a separate process (`python -m nemo_plugins.aligner.reward_server`), as beside
a trainer; the client is Aligner's, unchanged, in a one-process gloo group with Megatron's
model-parallel state at TP=1 (its result is moved to `torch.cuda.current_device()`, pointed at the
CPU here). Each row's reward must equal the core's `RuleScorer` on the same completion and
reference, and the hand-computed value of the world task (accuracy 1.0 + format 0.1).
"""

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request

import pytest
import torch

pytestmark = pytest.mark.aligner

QUESTIONS = {"q-add": ("What is 2 + 3?", 5), "q-mul": ("What is 4 * 3?", 12)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from nemo_plugins.data.chat import render_example
    from nemo_plugins.data.tokenizer import save_tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("rm")
    texts = [render_example(q, f"<think>{q}</think>The answer is {a}.", t)[0] for q, a in QUESTIONS.values() for t in (True, False)]
    save_tokenizer(train_tokenizer(texts * 20, vocab_size=300), d / "tok")
    with open(d / "prompts.jsonl", "w") as f:
        for pid, (q, a) in QUESTIONS.items():
            f.write(json.dumps({"prompt": q, "answer": a, "task": "world", "id": pid}) + "\n")
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc, port: int, deadline_s: float = 180.0) -> None:
    url = f"http://127.0.0.1:{port}/v2/models/reward_model/ready"
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        if proc.poll() is not None:
            raise AssertionError(f"reward server exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"reward server not ready on port {port} after {deadline_s} s")


@pytest.fixture(scope="module")
def server(files):
    port = _free_port()
    env = dict(os.environ, LD_LIBRARY_PATH=sysconfig.get_config_var("LIBDIR"))  # PyTriton's stub on a pyenv Python
    cmd = [sys.executable, "-m", "nemo_plugins.aligner.reward_server", f"prompts=[{files / 'prompts.jsonl'}]",
           f"tokenizer={files / 'tok'}", f"port={port}", "host=127.0.0.1", "workers=1", "max_chars=2000"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(proc, port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def model_parallel():
    """A one-process gloo group with Megatron's model-parallel state at TP=PP=1 (what the client reads)."""
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _rows(tok, cases):
    """Aligner's rollout batch: prompt + response ids (EOS-ended), zero-padded, and their lengths."""
    seqs = [tok.prompt_ids(q, thinking) + tok.encode(response) + [tok.eos_id] for q, thinking, response in cases]
    width = max(map(len, seqs)) + 3
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return {"response_tokens": tokens, "response_lengths": torch.tensor([len(s) for s in seqs])}


def test_remote_gpt_rm_client_gets_the_core_rewards(files, server, model_parallel, monkeypatch):
    from omegaconf import OmegaConf
    from nemo_aligner.models.nlp.gpt.reward_critic_clients import RemoteGPTRMClient

    from nemo_plugins.data.chat_tokenizer import ChatTokenizer
    from nemo_plugins.rl.rewards import RewardConfig
    from nemo_plugins.rl.scoring import Reference, RuleScorer, SandboxLimits

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    tok = ChatTokenizer.from_dir(files / "tok")
    add, mul = QUESTIONS["q-add"][0], QUESTIONS["q-mul"][0]
    hostile = "<think>" + "(" * 3000 + "</think>The answer is 5."  # over max_chars: never parsed, scores 0
    cases = [  # (question, thinking, response), expected reward
        ((add, True, "<think>2 + 3 = 5</think>The answer is 5."), 1.1),  # correct, well formatted
        ((add, True, "<think>2 + 3 = 6</think>The answer is 6."), 0.1),  # wrong, well formatted
        ((mul, False, "The answer is 12."), 1.1),  # correct with thinking off
        ((mul, False, "<think>4 * 3 = 12</think>The answer is 12."), 1.0),  # correct, think block while off
        ((add, True, "The answer is 5"), 0.0),  # no think block, no final period: neither
        (("What is 9 - 1?", True, "<think>9 - 1 = 8</think>The answer is 8."), 0.0),  # prompt not in the file
        ((add, True, hostile), 0.0),
    ]
    client = RemoteGPTRMClient(OmegaConf.create({"reward_model": {"name": "reward_model", "ip": "127.0.0.1", "port": server},
                                                 "pad_to_length": None}))  # fmt: skip
    try:
        rewards = client.infer_rm(_rows(tok, [c for c, _ in cases])).result()
    finally:
        client.communicator.close()

    assert rewards.dtype == torch.float32 and rewards.shape == (len(cases), 1)  # ReinforceTrainer squeezes dim 1
    rewards = rewards.squeeze(1)
    assert rewards.tolist() == pytest.approx([r for _, r in cases], abs=1e-6)
    known = [c for c, _ in cases if c[0] in (add, mul)]
    with RuleScorer(RewardConfig("world"), SandboxLimits(workers=0, max_chars=2000)) as core:
        answers = {q: a for q, a in QUESTIONS.values()}
        expected = core.score([r for _, _, r in known], [Reference(answers[q], t) for q, t, _ in known]).total
    got = [r for (c, _), r in zip(cases, rewards.tolist()) if c[0] in (add, mul)]
    assert got == pytest.approx(expected.tolist(), abs=1e-6)
