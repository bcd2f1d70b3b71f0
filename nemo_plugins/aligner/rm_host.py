"""Find the reward server of this Slurm allocation: the trainer's side of the hand-shake.

The reward server runs as a second task of the same (heterogeneous) Slurm job, on a node the
trainer does not know in advance. Its task writes its host name to a file on the shared work
directory before it starts serving; the trainer's tasks run

    RM_HOST=$(python -m nemo_plugins.aligner.rm_host host_file=/results/x/rm_host port=5555)

which waits until the file names a host whose PyTriton model answers `ready` on that port, and
prints the host (then passed as `remote_rm.reward_model.ip`). A stale file from an earlier job
names a host with no server on it, so the wait goes on until the new one is up. Only the standard
library: it runs before anything heavy is imported.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path


def server_ready(host: str, port: int, model: str = "reward_model", timeout_s: float = 2.0) -> bool:
    """True when PyTriton on host:port reports `model` ready (HTTP 200 on /v2/models/<model>/ready)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v2/models/{model}/ready", timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for_server(host_file: str | Path, port: int, model: str = "reward_model", timeout_s: float = 1800.0,
                    poll_s: float = 5.0) -> str:  # fmt: skip
    """The host named in `host_file` once its server is ready; TimeoutError naming the file otherwise."""
    host_file = Path(host_file)
    deadline = time.monotonic() + timeout_s
    host = ""
    while time.monotonic() < deadline:
        host = host_file.read_text().strip() if host_file.is_file() else ""
        if host and server_ready(host, port, model):
            return host
        time.sleep(poll_s)
    seen = f"it names {host!r}, not serving {model!r} on port {port}" if host else "it was never written"
    raise TimeoutError(f"reward server: no ready server after {timeout_s:.0f} s through {host_file} ({seen}); "
                       "see the reward-server task's log in the same job")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    unknown = sorted(set(args) - {"host_file", "port", "model", "timeout_s", "poll_s"})
    if unknown or "host_file" not in args or "port" not in args:
        raise SystemExit(f"expected host_file=FILE port=PORT [model=reward_model timeout_s=1800 poll_s=5]"
                         f"{f'; unknown: {unknown}' if unknown else ''}")  # fmt: skip
    host = wait_for_server(args["host_file"], int(args["port"]), args.get("model", "reward_model"),
                           float(args.get("timeout_s", 1800)), float(args.get("poll_s", 5)))  # fmt: skip
    print(host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
