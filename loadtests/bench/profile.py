"""Where a server's CPU goes: py-spy samples, grouped by the code they land in.

``py-spy record --format raw --threads`` writes collapsed stacks (``thread (tid):
name;frame;frame;... count``, root first, each frame ``function (file:line)``).
Without ``--idle`` py-spy drops samples of threads waiting (an event loop in
``epoll_wait``), so the samples stand for CPU time. Each sample is charged to its
innermost frame (*self* time); time spent in a C extension (orjson, hiredis, uvloop,
grpc's Cython, onnxruntime) shows up on the Python line that called it, which is
the line to look at anyway.

Two ways of sampling, each with a flaw, so each is used for what it does well
(measured on this 2-core VM, gateway at 16 connections, 2026-11-29):

- ``--nonblocking`` reads the stacks while the process runs: unbiased in time, but
  about 9 % of samples fail and two thirds come back *torn* (missing their outer
  frames), so only the innermost frame is trusted: used for self time.
- blocking (py-spy's default) stops the process for each sample: whole stacks, but
  the stop lands at the next kernel exit, which over-weights lines just after a
  system call (``asyncio.get_running_loop`` calls ``getpid()``: ``asyncio.timeout``
  came out at 7 % of samples blocking against 2.7 % non-blocking) and it slows the
  server by about 10 %: used only for inclusive shares of the gateway's functions.

Only the event-loop (main) thread's samples are used (:func:`loop_thread`): py-spy
counts a ``ThreadPoolExecutor`` worker blocked in ``queue.get`` as busy (a fifth of
gateway-cpu's samples, where the OS charges that thread under a tenth of the
process's CPU), so the other threads' CPU is taken from the OS instead.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.procs import PYTHON

PY_SPY = str(Path(PYTHON).with_name("py-spy"))
# Samples per second: 250 Hz over a few seconds gives thousands of samples (a share
# of 1 % is then tens of samples) while pausing the process for each sample stays a
# small fraction of its time.
RATE_HZ = 250

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")

# (path fragment of the innermost frame's file, category); first match wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("gateway/api/", "gateway HTTP layer (route, body, parse, shed middleware)"),
    ("gateway/pipeline.py", "gateway pipeline (stages, guarded calls)"),
    ("gateway/policy/", "gateway policies (admission, breaker, retry, budget)"),
    ("gateway/runtime.py", "gateway runtime (admit, observe)"),
    ("gateway/metrics.py", "metrics (prometheus-client)"),
    ("prometheus_client/", "metrics (prometheus-client)"),
    ("gateway/features/", "features: keys, MGET call, decode"),
    ("gateway/inference/", "inference backend wrapper"),
    ("gateway/schema.py", "feature assembly (schema)"),
    ("gateway/fallback.py", "fallback scorer"),
    ("gateway/", "gateway, other"),
    ("loadtests/minimal_app.py", "minimal app route (parse, keys, assemble, render)"),
    ("pydantic", "pydantic validation"),
    ("fastapi/", "FastAPI"),
    ("starlette/", "Starlette"),
    ("uvicorn/", "uvicorn HTTP protocol"),
    ("redis/", "redis-py"),
    ("tritonclient/", "tritonclient"),
    ("grpc/", "grpc aio"),
    ("onnxruntime/", "onnxruntime"),
    ("pybreaker", "pybreaker / tenacity"),
    ("tenacity/", "pybreaker / tenacity"),
    ("numpy/", "numpy"),
    # Runner.run's line is where uvloop's C loop runs: socket reads and writes, httptools
    # parsing, callback and task scheduling.
    ("asyncio/runners.py", "uvloop in C: socket I/O, httptools, scheduling"),
    ("uvloop/", "uvloop in C: socket I/O, httptools, scheduling"),
    ("asyncio/timeouts.py", "asyncio.timeout"),
    ("asyncio/tasks.py", "asyncio tasks (wait_for, current_task)"),
    ("asyncio/streams.py", "asyncio streams (redis-py's socket)"),
    ("asyncio/", "asyncio, other"),
    ("concurrent/", "threads (executor)"),
    ("threading.py", "threads (executor)"),
)


Stack = tuple["Frame", ...]


@dataclass(frozen=True)
class Frame:
    func: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.func} ({self.file})"


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text)
    if m is None:
        return Frame(text, "", 0)
    return Frame(m["func"], m["file"], int(m["line"]))


def parse_raw(text: str) -> dict[str, Counter[Stack]]:
    """Collapsed stacks recorded with ``--threads`` -> {thread name: {stack: samples}},
    each stack root first, without the thread frame."""
    out: dict[str, Counter[Stack]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, _, frames = stack.partition(";")
        name = thread.rpartition(": ")[2] if thread.startswith("thread (") else "?"
        if not frames:
            continue
        key = tuple(parse_frame(f) for f in frames.split(";"))
        out.setdefault(name, Counter())[key] += int(count)
    return out


def loop_thread(threads: dict[str, Counter[Stack]]) -> Counter[Stack]:
    """The event loop's thread: Python's MainThread (uvicorn runs the loop there)."""
    return threads.get("MainThread", Counter())


def category(frame: Frame) -> str:
    for fragment, name in CATEGORIES:
        if fragment in frame.file:
            return name
    top = frame.file.split("/", 1)[0] if "/" in frame.file else (frame.file or "?")
    return f"other ({top})"


def self_by_category(stacks: Counter[Stack]) -> dict[str, float]:
    """Share of samples (0-1) whose innermost frame falls in each category."""
    total = sum(stacks.values()) or 1
    out: Counter[str] = Counter()
    for stack, n in stacks.items():
        out[category(stack[-1])] += n
    return {k: v / total for k, v in out.most_common()}


def self_by_function(stacks: Counter[Stack], top: int = 15) -> dict[str, float]:
    """Share of samples (0-1) whose innermost frame is each function, the ``top`` first."""
    total = sum(stacks.values()) or 1
    out: Counter[str] = Counter()
    for stack, n in stacks.items():
        out[stack[-1].where] += n
    return {k: v / total for k, v in out.most_common(top)}


def inclusive(stacks: Counter[Stack], fragment: str, top: int = 15) -> dict[str, float]:
    """Share of samples with a frame in a file containing ``fragment`` anywhere on the
    stack (each function counted once per sample)."""
    total = sum(stacks.values()) or 1
    out: Counter[str] = Counter()
    for stack, n in stacks.items():
        for where in {f.where for f in stack if fragment in f.file and f.file not in _ENTRY}:
            out[where] += n
    return {k: v / total for k, v in out.most_common(top)}


# The process's entry point: on every stack of the main thread, so never a hot spot.
_ENTRY = {"gateway/__main__.py", "gateway/cli.py", "gateway/server.py"}


def record(
    pid: int, seconds: int, out: Path, nonblocking: bool, rate_hz: int = RATE_HZ
) -> subprocess.Popen:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` (returns at once; wait on it)."""
    return subprocess.Popen(
        [PY_SPY, "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
         str(rate_hz), "--format", "raw", "--threads", "--output", str(out),
         *(["--nonblocking"] if nonblocking else [])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
