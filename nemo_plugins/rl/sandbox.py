"""Run reward functions on model output in worker processes with time and memory limits.

A completion can be huge, deeply nested, malicious or slow to parse; one such sample must cost
reward 0 and a counted failure, never a crash or a hung batch. `RewardPool` keeps its own
worker processes (not a ProcessPoolExecutor, whose stuck workers cannot be killed one by one):

- too long: items whose string arguments exceed `max_chars` in total never leave the parent
  (failure `too_long`);
- time: the parent tracks a deadline per dispatched sample and SIGKILLs a worker that overruns
  it, then starts a replacement (failure `timeout`); nothing inside the worker has to cooperate.
  The limit is on the worker's CPU time where the OS reports it (Linux /proc): a sample that
  was starved by other processes on a loaded machine gets more wall time, up to
  `WALL_FACTOR` x `timeout_s`, so whether a sample times out depends on the sample, not on the
  machine's load. Elsewhere the limit is wall time;
- memory: each worker caps its address space with `resource.setrlimit(RLIMIT_AS)` at start, so
  an allocation beyond the cap raises MemoryError there (failure `memory`; the worker is
  replaced, as its state is suspect);
- errors: an exception in the reward function becomes `error:<ExceptionType>`; a worker that
  dies mid-sample (segfault, os._exit) becomes `crash` and is replaced.

Workers start with the "forkserver" method where available (not "fork": the trainer process
holds threads and torch state), with the reward function's module preloaded, and announce
readiness before they get work, so start-up time never counts against a sample's deadline.
Those start methods re-run the parent's `__main__` script in every worker, so a pool cannot be
started from a script read from stdin (`python - <<EOF`); `RewardPool` says so up front.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Sequence

TIMEOUT = "timeout"
MEMORY = "memory"
TOO_LONG = "too_long"
CRASH = "crash"
_READY = "__ready__"
MAX_START_FAILURES = 3  # consecutive workers dying before ready: a broken fn/module, so raise
WALL_FACTOR = 10.0  # a sample's wall time limit, in multiples of its CPU time limit
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process `pid` has used (Linux /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


def error_reason(exc: BaseException) -> str:
    """The failure reason for an exception raised by a reward function."""
    return MEMORY if isinstance(exc, MemoryError) else f"error:{type(exc).__name__}"


@dataclass(frozen=True)
class Outcome:
    """One sample's result: the reward function's value, or failure_value and why."""

    value: Any
    failure: str | None = None


def _as_args(item: Any) -> tuple:
    return item if isinstance(item, tuple) else (item,)


def _char_count(args: tuple) -> int:
    return sum(len(a) for a in args if isinstance(a, str))


def direct_map(
    fn: Callable, items: Iterable, max_chars: int | None = None, failure_value: Any = 0.0
) -> tuple[list, Counter]:
    """In-process counterpart of `RewardPool.map` (same failure reasons, but no time/memory limits)."""
    values, failures = [], Counter()
    for item in items:
        args = _as_args(item)
        if max_chars is not None and _char_count(args) > max_chars:
            values.append(failure_value)
            failures[TOO_LONG] += 1
            continue
        try:
            values.append(fn(*args))
        except Exception as exc:  # noqa: BLE001 - every failure is a counted 0, never a crash
            values.append(failure_value)
            failures[error_reason(exc)] += 1
    return values, failures


# --------------------------------------------------------------------------- worker side


def _vm_bytes() -> int:
    """This process's current virtual memory size (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_memory(memory_mb: float | None) -> None:
    """Cap the address space at the current size plus `memory_mb` (RLIMIT_AS; never above the hard cap)."""
    if memory_mb is None:
        return
    import resource

    limit = _vm_bytes() + int(memory_mb * 2**20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(conn, fn: Callable, memory_mb: float | None, warmup: Sequence = ()) -> None:
    """Worker loop: limit memory, run the warm-up items, say ready, then answer (index, args)
    with (index, value, failure)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    _limit_memory(memory_mb)
    for item in warmup:  # one-time costs (a parser's first use) before the first deadline starts
        try:
            fn(*_as_args(item))
        except Exception:  # noqa: BLE001 - a warm-up that fails warms nothing; real samples report errors
            pass
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, args = msg
        try:
            reply = (index, fn(*args), None)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which counts it
            reply = (index, None, error_reason(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable return value
            conn.send((index, None, error_reason(exc)))


# --------------------------------------------------------------------------- parent side


@dataclass
class _Worker:
    proc: Any
    conn: Any
    started: float
    ready: bool = False
    index: int | None = None  # sample being worked on
    deadline: float = 0.0
    wall_limit: float = 0.0  # the latest the sample may end, however starved
    cpu_start: float | None = None  # the worker's CPU seconds when the sample was sent


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def _missing_main_script() -> str | None:
    """The `__main__` script that spawn/forkserver workers would re-run but cannot find, or None.

    Workers import the parent's main module by name when it has one (`python -m`), else run its
    `__file__` again; `python -c` and interactive sessions have no `__file__` (nothing to re-run),
    but a script read from stdin has `__file__` "<stdin>", which is no file, so every worker dies.
    Mirrors `multiprocessing.spawn.get_preparation_data`.
    """
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) is not None:
        return None
    script = getattr(main, "__file__", None)
    if script is None:
        return None
    path = os.path.join(getattr(mp.process, "ORIGINAL_DIR", None) or os.getcwd(), script)  # as multiprocessing does
    return None if os.path.isfile(path) else script


def _module_of(fn: Callable) -> str | None:
    target = getattr(fn, "func", fn)  # functools.partial
    return getattr(target, "__module__", None)


class RewardPool:
    """A pool of `workers` processes computing `fn(*item)` with per-sample limits.

    fn: a picklable (module-level) function; items are tuples of its positional arguments
    (a non-tuple item is one argument). timeout_s: CPU time per sample (wall time up to
    WALL_FACTOR x timeout_s), enforced by killing the worker. memory_mb: how much address space a worker may add beyond its size at start.
    max_chars: limit on the total length of an item's string arguments (None: no limit).
    failure_value: what a failed sample scores. warmup: items each worker computes once before it
    takes work, so one-time costs (math-verify's first parse takes about a second) count against
    `start_timeout_s`, not against the first samples' deadlines. Use as a context manager or call
    close().
    """

    def __init__(
        self,
        fn: Callable,
        workers: int = 2,
        timeout_s: float = 2.0,
        memory_mb: float | None = 512,
        max_chars: int | None = 100_000,
        failure_value: Any = 0.0,
        start_method: str | None = None,
        start_timeout_s: float = 120.0,
        warmup: Sequence = (),
    ):
        _check_positive("workers", workers, integer=True)
        _check_positive("timeout_s", timeout_s)
        _check_positive("start_timeout_s", start_timeout_s)
        if memory_mb is not None:
            _check_positive("memory_mb", memory_mb)
        if max_chars is not None:
            _check_positive("max_chars", max_chars, integer=True)
        self.fn, self.num_workers, self.timeout_s = fn, workers, float(timeout_s)
        self.memory_mb, self.max_chars, self.failure_value = memory_mb, max_chars, failure_value
        self.start_timeout_s = float(start_timeout_s)
        self.warmup = tuple(warmup)
        self.failures: Counter = Counter()  # over the pool's lifetime
        self._ctx = mp.get_context(start_method or _default_start_method())
        if self._ctx.get_start_method() != "fork" and (missing := _missing_main_script()) is not None:
            raise RuntimeError(
                f"RewardPool workers (start method {self._ctx.get_start_method()!r}) re-run the main script, "
                f"but {missing!r} is not a file (was the script read from stdin, `python - <<EOF`?). "
                "Save it to a file and run `python script.py` (pool code under `if __name__ == '__main__':`), "
                "or pass it as `python -c \"...\"`, or run a module with `python -m`."
            )
        if self._ctx.get_start_method() == "forkserver" and _module_of(fn):
            self._ctx.set_forkserver_preload([_module_of(fn)])  # no effect once the server runs
        self._lock = threading.Lock()
        self._start_failures = 0
        self._closed = False
        self._workers: list[_Worker] = []
        for _ in range(workers):
            self._workers.append(self._spawn())

    # ----------------------------------------------------------------- lifecycle

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.fn, self.memory_mb, self.warmup), daemon=True, name="reward-worker"
        )
        proc.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        return _Worker(proc=proc, conn=parent_conn, started=time.monotonic())

    @staticmethod
    def _kill(w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5)
        w.conn.close()

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        if not self._closed:
            self._workers[self._workers.index(w)] = self._spawn()

    def close(self) -> None:
        """Stop all workers (politely, then by SIGKILL). Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(w)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def pids(self) -> list[int]:
        """Current worker process ids (they change when workers are replaced)."""
        return [w.proc.pid for w in self._workers]

    # ----------------------------------------------------------------- mapping

    def map(self, items: Sequence) -> tuple[list, Counter]:
        """(values in item order, failure counts of this call); failed samples get failure_value."""
        outcomes = self.map_outcomes(items)
        return [o.value for o in outcomes], Counter(o.failure for o in outcomes if o.failure)

    def map_outcomes(self, items: Sequence) -> list[Outcome]:
        """One Outcome per item, in order. Never raises for a bad sample; returns once all are settled."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        with self._lock:
            results: list[Outcome | None] = [None] * len(items)
            pending: deque[int] = deque()
            args_of: dict[int, tuple] = {}
            for i, item in enumerate(items):
                args = _as_args(item)
                if self.max_chars is not None and _char_count(args) > self.max_chars:
                    results[i] = Outcome(self.failure_value, TOO_LONG)
                else:
                    args_of[i] = args
                    pending.append(i)
            while pending or any(w.index is not None for w in self._workers):
                if self._closed:
                    raise RuntimeError("RewardPool was closed during map")
                self._dispatch(pending, args_of, results)
                self._collect(results)
            for o in results:
                if o.failure:
                    self.failures[o.failure] += 1
            return results

    def _dispatch(self, pending: deque, args_of: dict, results: list) -> None:
        for w in self._workers:
            while pending and w.ready and w.index is None:
                i = pending.popleft()
                try:
                    w.conn.send((i, args_of[i]))
                except (OSError, ValueError):  # worker died while idle: retry the sample elsewhere
                    pending.appendleft(i)
                    self._replace(w)
                    break
                except Exception as exc:  # noqa: BLE001 - unpicklable arguments: nothing was sent
                    results[i] = Outcome(self.failure_value, error_reason(exc))
                    continue
                now = time.monotonic()
                w.index, w.deadline, w.wall_limit = i, now + self.timeout_s, now + WALL_FACTOR * self.timeout_s
                w.cpu_start = cpu_seconds(w.proc.pid)

    def _collect(self, results: list) -> None:
        """Wait for replies or the nearest deadline; settle finished, dead and overdue samples."""
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.index is not None]
        deadlines += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else 0.1
        handles = {}
        for w in self._workers:
            handles[w.conn] = w
            handles[w.proc.sentinel] = w
        ready = wait(list(handles), timeout=timeout)
        for w in {id(handles[h]): handles[h] for h in ready}.values():
            self._read(w, results)
        now = time.monotonic()
        for w in list(self._workers):
            if w.index is not None and now > w.deadline:
                left = self._cpu_time_left(w)
                if left > 0 and now < w.wall_limit:  # starved by other processes, not slow: wait on
                    w.deadline = min(w.wall_limit, now + left)
                    continue
                results[w.index] = Outcome(self.failure_value, TIMEOUT)
                self._replace(w)
            elif not w.ready and now > w.started + self.start_timeout_s:
                raise RuntimeError(f"reward worker did not start within start_timeout_s={self.start_timeout_s}")

    def _cpu_time_left(self, w: _Worker) -> float:
        """CPU seconds the worker's current sample may still use (0 where CPU time is unknown)."""
        now_cpu = cpu_seconds(w.proc.pid) if w.cpu_start is not None else None
        return 0.0 if now_cpu is None else self.timeout_s - (now_cpu - w.cpu_start)

    def _read(self, w: _Worker, results: list) -> None:
        try:
            if not w.conn.poll():
                raise EOFError  # only the sentinel fired: the process is gone
            msg = w.conn.recv()
        except (EOFError, OSError):
            self._on_death(w, results)
            return
        if msg == _READY:
            w.ready, self._start_failures = True, 0
            return
        index, value, failure = msg
        if index != w.index:  # cannot happen with one sample in flight per worker
            raise RuntimeError(f"reward worker answered sample {index}, expected {w.index}")
        results[index] = Outcome(self.failure_value, failure) if failure else Outcome(value)
        w.index = None
        if failure == MEMORY:
            self._replace(w)  # its heap may be fragmented or half-built

    def _on_death(self, w: _Worker, results: list) -> None:
        if w.index is not None:
            results[w.index] = Outcome(self.failure_value, CRASH)
        elif not w.ready:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                w.proc.join(timeout=5)
                raise RuntimeError(
                    f"reward workers keep dying before ready (exit code {w.proc.exitcode}); "
                    f"is fn={self.fn!r} importable and memory_mb={self.memory_mb} enough?"
                )
        self._replace(w)


def _check_positive(name: str, value: Any, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"RewardPool {name} must be {kind} > 0, got {value!r}")
