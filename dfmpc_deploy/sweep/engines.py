"""Where cells run: ``local`` (worker processes on this machine) or ``ray`` (a Ray cluster, local or joined).

Both engines take :class:`~dfmpc_deploy.sweep.cell.CellTask` objects and hand back ``(cell id, outcome)`` pairs;
the driver (dfmpc_deploy.sweep.run) alone writes the results store. Both run :func:`~dfmpc_deploy.sweep.cell.run_cell`
in a separate process, so a cell that crashes its process (out of memory, a native crash) fails alone.

``local``: ``slots`` worker processes (``spawn``: a fresh interpreter, nothing inherited from the driver's torch
threads), each running one cell at a time and kept for the next cell; a worker that dies is replaced. Default
slots: the CPUs this process may use divided by the CPUs a cell declares. Workers do not receive the terminal's
Ctrl-C (SIGINT is blocked in them from birth): the driver stops them with SIGTERM, which removes a running cell's
half-written folder as it does for an interrupted ``build``.

``ray``: each cell is a Ray task declaring ``num_cpus`` = the cell's CPUs and ``num_gpus`` = 1 with
``device = "cuda"``, so Ray never puts more cells on a node than it has CPUs (and GPUs) for. Without an address a
local cluster is started (``ray.init``: no dashboard, worker logs not forwarded, session files in a temporary folder
that is removed afterwards); with one (``--address HOST:PORT`` of ``ray start --head``) the driver joins that
cluster. **Shared-filesystem assumption**: a task reads the weights and data by the paths in the grid and writes
``DIR/cells/<id>/`` on whatever node runs it, so on several machines those paths must name the same files
everywhere (one NFS mount, for example), and ``dfmpc-deploy`` must be installed in the same Python on every node.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any, Protocol

from .cell import CellTask, failed_outcome, one_line, run_cell

__all__ = ["Engine", "LocalEngine", "RayEngine", "make_engine", "ENGINES", "available_cpus"]

ENGINES = ("local", "ray")
Finished = list[tuple[str, dict[str, Any]]]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Engine(Protocol):
    """What the driver needs from an engine."""

    name: str

    def start(self, cpus_per_cell: int) -> int:
        """Get ready; return how many cells may run at once."""

    def submit(self, task: CellTask) -> None:
        """Start ``task`` (the driver submits at most the returned number at once)."""

    def wait(self, timeout: float) -> Finished:
        """Cells finished within ``timeout`` seconds (an empty list when none)."""

    def close(self, cancel: bool = False) -> None:
        """Release everything; with ``cancel`` stop running cells first (they are not recorded)."""


# ---------------------------------------------------------------------------------------------- local


def _worker_main(conn: Connection) -> None:
    """A local worker: run the cells the driver sends until it sends None or goes away."""
    from ..io.outdir import terminate_as_interrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us (SIGTERM) when the user presses Ctrl-C
    with terminate_as_interrupt(("SIGTERM",)):
        try:
            while True:
                try:
                    task = conn.recv()
                except EOFError:
                    return
                if task is None:
                    return
                conn.send(run_cell(task))
        except (KeyboardInterrupt, BrokenPipeError):
            return


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the worker process running this cell was killed by {name}{why}"
    return f"the worker process running this cell exited (code {code}) before returning a result"


class _Worker:
    def __init__(self, ctx: Any):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="dfmpc-sweep-worker")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # inherited: born deaf to Ctrl-C
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        child.close()
        self.task: CellTask | None = None

    def stop(self, cancel: bool) -> None:
        if self.process.is_alive():
            if self.task is not None and cancel:
                self.process.terminate()
            elif self.task is None:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
        self.process.join(timeout=15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class LocalEngine:
    """Cells in worker processes on this machine.

    Args:
        max_parallel: cells at once (default: available CPUs // the CPUs a cell declares).
    """

    name = "local"

    def __init__(self, max_parallel: int | None = None):
        self.max_parallel = max_parallel
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def start(self, cpus_per_cell: int) -> int:
        return self.max_parallel or max(1, available_cpus() // max(1, cpus_per_cell))

    def submit(self, task: CellTask) -> None:
        idle = [w for w in self._workers if w.task is None]
        for w in idle:
            if not w.process.is_alive():
                w.stop(cancel=False)
                self._workers.remove(w)
        worker = next((w for w in self._workers if w.task is None), None)
        if worker is None:
            worker = _Worker(self._ctx)
            self._workers.append(worker)
        worker.conn.send(task)
        worker.task = task

    def wait(self, timeout: float) -> Finished:
        busy = [w for w in self._workers if w.task is not None]
        if not busy:
            return []
        ready = set(wait_any([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout))
        done: Finished = []
        for w in busy:
            assert w.task is not None
            if w.conn in ready:
                try:
                    outcome = w.conn.recv()
                except (EOFError, OSError):
                    w.process.join(timeout=5)
                    outcome = failed_outcome(_death(w.process.exitcode))
            elif w.process.sentinel in ready:
                w.process.join(timeout=5)
                outcome = failed_outcome(_death(w.process.exitcode))
            else:
                continue
            done.append((w.task.id, outcome))
            w.task = None
        return done

    def close(self, cancel: bool = False) -> None:
        workers, self._workers = self._workers, []
        for w in workers:
            if cancel and w.task is not None and w.process.is_alive():
                w.process.terminate()  # all at once, then wait for each
        for w in workers:
            w.stop(cancel)


# ---------------------------------------------------------------------------------------------- ray


class RayEngine:
    """Cells as Ray tasks.

    Args:
        address: ``HOST:PORT`` of a running cluster to join; None starts a local one for this sweep.
        max_parallel: cells in flight at once (default: the cluster's CPUs // the CPUs a cell declares). On a
            local cluster it also sets the cluster's CPUs (``max_parallel`` x CPUs per cell).
    """

    name = "ray"

    def __init__(self, address: str | None = None, max_parallel: int | None = None):
        self.address = address
        self.max_parallel = max_parallel
        self._ray: Any = None
        self._remote: Any = None
        self._refs: dict[Any, str] = {}
        self._tmp: str | None = None
        self.init_seconds: float | None = None

    def start(self, cpus_per_cell: int) -> int:
        import logging

        from .._deps import require

        ray = require("ray", "sweep")
        t = time.perf_counter()
        if self.address:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            # session files under a short temporary folder (Ray's socket paths must stay under ~107 bytes)
            self._tmp = tempfile.mkdtemp(prefix="dfmpc-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            cpus = (self.max_parallel * cpus_per_cell) if self.max_parallel else available_cpus()
            # ERROR: a private cluster's start-up notices (token authentication ...) would only clutter the terminal
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     _temp_dir=self._tmp)
        self.init_seconds = time.perf_counter() - t
        self._ray = ray
        self._remote = ray.remote(max_retries=0)(run_cell)
        total = int(ray.cluster_resources().get("CPU", 1))
        return self.max_parallel or max(1, total // max(1, cpus_per_cell))

    def submit(self, task: CellTask) -> None:
        ref = self._remote.options(num_cpus=task.cpus, num_gpus=task.gpus, name=f"dfmpc-cell-{task.id}").remote(task)
        self._refs[ref] = task.id

    def wait(self, timeout: float) -> Finished:
        ray = self._ray
        refs = list(self._refs)
        if not refs:
            return []
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        done: Finished = []
        for ref in ready:
            cid = self._refs.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as err:  # the task's process or node died, or Ray could not run it
                outcome = failed_outcome(f"Ray: {type(err).__name__}: {one_line(str(err))[:300]}")
            done.append((cid, outcome))
        return done

    def close(self, cancel: bool = False) -> None:
        ray, self._ray = self._ray, None
        try:
            if ray is not None:
                if cancel and self._refs:
                    for ref in self._refs:  # KeyboardInterrupt in the task: its folder is cleaned up
                        ray.cancel(ref)
                    ray.wait(list(self._refs), num_returns=len(self._refs), timeout=10)
                ray.shutdown()
        finally:
            self._refs.clear()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None


def make_engine(name: str, address: str | None = None, max_parallel: int | None = None) -> Engine:
    """``local`` or ``ray``; ``address`` only for ``ray``."""
    if name == "ray":
        return RayEngine(address, max_parallel)
    return LocalEngine(max_parallel)
