"""Benchmark candidates, each in its own worker process, timed round-robin.

A runtime's threads can slow whatever runs after it in the same process (ONNX Runtime's intra-op
threads keep spinning after a run; OpenMP pools of two runtimes fight over the cores), so every
candidate gets a fresh ``spawn`` process: it builds its model once, then answers one request at
a time while the others wait idle in ``recv``. The parent sends the same request to each worker
in turn (one round), so a change in machine load hits every candidate alike.

This module imports no torch at top level: the thread-count environment (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``) is set before a worker imports it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class WorkerError(RuntimeError):
    """A worker could not build or run its candidate; the message is one line."""


def _worker_main(conn, builder: Callable[..., Any], name: str, options: dict, threads: int) -> None:
    for var in THREAD_ENV:
        os.environ[var] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        t0 = time.perf_counter()
        built = builder(name, options, threads)  # -> (run(ids) -> torch.Tensor, label, note)
        run, label, note = built
        conn.send(("ok", {"label": label, "note": note, "build_s": time.perf_counter() - t0}))
    except Exception as exc:  # reported to the parent as one line; the worker ends
        conn.send(("error", _one_line(exc)))
        conn.close()
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        try:
            with torch.inference_mode():
                if msg[0] == "first":  # the first call at a shape (compiles, plans) and its output
                    ids = torch.from_numpy(msg[1])
                    t0 = time.perf_counter()
                    out = run(ids)
                    first_ms = (time.perf_counter() - t0) * 1e3
                    conn.send(("ok", {"first_ms": first_ms, "out": out.float().numpy()}))
                elif msg[0] == "time":  # n timed calls: (wall ms, process CPU ms) each
                    ids, n = torch.from_numpy(msg[1]), msg[2]
                    samples = []
                    for _ in range(n):
                        w0, c0 = time.perf_counter(), time.process_time()
                        run(ids)
                        samples.append(((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3))
                    conn.send(("ok", samples))
                else:
                    conn.send(("error", f"unknown request {msg[0]!r}"))
        except Exception as exc:
            conn.send(("error", _one_line(exc)))
    conn.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    loc = f" ({os.path.basename(where[0].filename)}:{where[0].lineno})" if where else ""
    return f"{type(exc).__name__}: {text[0] if text else ''}{loc}"


@dataclass
class Worker:
    """One candidate in its own process; ``request`` sends a message and waits for the answer."""

    name: str
    process: Any
    conn: Any
    label: str = ""
    note: str = ""
    build_s: float = 0.0
    results: dict = field(default_factory=dict)

    def request(self, *msg, timeout: float = 1800.0):
        self.conn.send(msg)
        if not self.conn.poll(timeout):
            raise WorkerError(f"{self.name}: no answer in {timeout:.0f} s")
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise WorkerError(f"{self.name}: the worker process died (exit code {self.process.exitcode})") from None
        if status != "ok":
            raise WorkerError(f"{self.name}: {payload}")
        return payload

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start(name: str, builder: Callable[..., Any], options: dict, threads: int, *,
          timeout: float = 1800.0, env: dict[str, str] | None = None) -> Worker:
    """Spawn a worker for ``name``, wait until it has built its candidate (or raise :class:`WorkerError`).
    ``env``: extra environment for the worker (e.g. ``OMP_WAIT_POLICY``), read when its libraries load."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    extra = {var: str(threads) for var in THREAD_ENV} | dict(env or {})
    saved = {var: os.environ.get(var) for var in extra}
    for var, value in extra.items():  # the child reads these when its OpenMP runtime starts
        os.environ[var] = value
    try:
        proc = ctx.Process(target=_worker_main, args=(child, builder, name, options, threads), daemon=True,
                           name=f"bench-{name}")
        proc.start()
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    child.close()
    worker = Worker(name, proc, parent)
    if not parent.poll(timeout):
        worker.process.kill()
        raise WorkerError(f"{name}: not built in {timeout:.0f} s")
    try:
        status, payload = parent.recv()
    except EOFError:
        proc.join()
        raise WorkerError(f"{name}: the worker process died while building (exit code {proc.exitcode})") from None
    if status != "ok":
        proc.join(timeout=10)
        raise WorkerError(payload)
    worker.label, worker.note, worker.build_s = payload["label"], payload["note"], payload["build_s"]
    return worker


def _busy_loop(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    x = 0
    while True:  # pure CPU work, no memory traffic to speak of
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


class BusyCore:
    """``with BusyCore(): ...`` keeps one core busy (a spinning process pinned to the last CPU)."""

    def __init__(self, cpu: int | None = None):
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpu = cpu if cpu is not None else (cpus[-1] if cpus else None)

    def __enter__(self) -> "BusyCore":
        ctx = mp.get_context("spawn")
        self.process = ctx.Process(target=_busy_loop, args=(self.cpu,), daemon=True, name="bench-busy-core")
        self.process.start()
        time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.join()
