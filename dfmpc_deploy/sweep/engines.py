"""Where cells run: ``local`` (worker processes on this machine) or ``ray`` (a Ray cluster, local or joined).

Both engines take :class:`~dfmpc_deploy.sweep.cell.CellTask` objects and hand back ``(cell id, outcome)`` pairs;
the driver (dfmpc_deploy.sweep.run) alone writes the results store. Both run :func:`~dfmpc_deploy.sweep.cell.run_cell`
in a separate process, so a cell that crashes its process (out of memory, a native crash) fails alone.

``local``: ``slots`` worker processes (``python -m dfmpc_deploy.sweep.worker``: a fresh interpreter that imports
nothing of the driver's program and inherits none of its torch threads), each running one cell at a time and kept
for the next cell; a worker that dies is replaced. Default slots: the CPUs this process may use divided by the CPUs
a cell declares. Workers run in their own session, so the terminal's Ctrl-C reaches the driver only: it stops them
with SIGTERM, which removes a running cell's half-written folder as it does for an interrupted ``build``.

``ray``: each cell is a Ray task declaring ``num_cpus`` = the cell's CPUs and ``num_gpus`` = 1 with
``device = "cuda"``, so Ray never puts more cells on a node than it has CPUs (and GPUs) for. Without an address a
local cluster is started (``ray.init``: no dashboard, worker logs not forwarded, session files in a temporary folder
that is removed afterwards); with one (``--address HOST:PORT`` of ``ray start --head``) the driver joins that
cluster. **Shared-filesystem assumption**: a task reads the weights and data by the paths in the grid and writes
``DIR/cells/<id>/`` on whatever node runs it, so on several machines those paths must name the same files
everywhere (one NFS mount, for example), and ``dfmpc-deploy`` must be installed in the same Python on every node.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any, Protocol

from .._deps import require
from ..errors import DfmpcError
from .cell import CellTask, failed_outcome, one_line, run_cell

__all__ = ["Engine", "LocalEngine", "RayEngine", "make_engine", "ENGINES", "available_cpus"]

ENGINES = ("local", "ray")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding dfmpc_deploy, for the workers
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


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the worker process running this cell was killed by {name}{why}"
    return f"the worker process running this cell exited (code {code}) before returning a result"


class _Worker:
    """One ``python -m dfmpc_deploy.sweep.worker`` process and its end of a socket pair."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "dfmpc_deploy.sweep.worker", str(theirs.fileno())],
                                            pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.task: CellTask | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def outcome(self) -> dict[str, Any]:
        """The result the worker sent, or a failed outcome when it died instead."""
        try:
            return dict(self.conn.recv())
        except (EOFError, OSError):
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            return failed_outcome(_death(code))

    def stop(self, cancel: bool) -> None:
        if self.alive():
            if self.task is not None and cancel:
                self.process.terminate()
            elif self.task is None:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


class LocalEngine:
    """Cells in worker processes on this machine.

    Args:
        max_parallel: cells at once (default: available CPUs // the CPUs a cell declares).
    """

    name = "local"

    def __init__(self, max_parallel: int | None = None):
        self.max_parallel = max_parallel
        self._workers: list[_Worker] = []

    def start(self, cpus_per_cell: int) -> int:
        return self.max_parallel or max(1, available_cpus() // max(1, cpus_per_cell))

    def submit(self, task: CellTask) -> None:
        idle = [w for w in self._workers if w.task is None]
        for w in idle:
            if not w.alive():
                w.stop(cancel=False)
                self._workers.remove(w)
        worker = next((w for w in self._workers if w.task is None), None)
        if worker is None:
            worker = _Worker()
            self._workers.append(worker)
        worker.conn.send(task)
        worker.task = task

    def wait(self, timeout: float) -> Finished:
        busy = [w for w in self._workers if w.task is not None]
        if not busy:
            return []
        ready = set(wait_any([w.conn for w in busy], timeout))  # a result, or end of file when a worker died
        done: Finished = []
        for w in busy:
            if w.conn in ready and w.task is not None:
                done.append((w.task.id, w.outcome()))
                w.task = None
        return done

    def close(self, cancel: bool = False) -> None:
        workers, self._workers = self._workers, []
        for w in workers:
            if cancel and w.task is not None and w.alive():
                w.process.terminate()  # all at once, then wait for each
        for w in workers:
            w.stop(cancel)


# ---------------------------------------------------------------------------------------------- ray


def _probe(address: str) -> None:
    """Refuse at once a ``HOST:PORT`` where nothing listens (``ray.init`` would retry for many minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://...": left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise DfmpcError(f"--address {address}: nothing answers there ({err.strerror or err}); start the head with "
                         "'ray start --head --port PORT' and pass the address it prints") from None


def _run_on_ray(task: CellTask) -> dict[str, Any]:
    """:func:`run_cell` as a Ray task; ``host`` also names the Ray node (several nodes may share a machine)."""
    import ray

    outcome = run_cell(task)
    outcome["host"] = f"{outcome.get('host')} node {ray.get_runtime_context().get_node_id()[:8]}"
    return outcome


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

        ray = self._ray = require("ray", "sweep")  # set first: close() shuts down whatever init started
        t = time.perf_counter()
        if self.address:
            _probe(self.address)
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise DfmpcError(f"--address {self.address}: cannot join the Ray cluster ({one_line(str(err))}); "
                                 "check the address 'ray start --head' printed and, when the cluster uses token "
                                 "authentication (Ray's default), run with RAY_AUTH_MODE=token and the same "
                                 "~/.ray/auth_token (or RAY_AUTH_TOKEN) as the nodes") from None
        else:
            # session files under a short temporary folder (Ray's socket paths must stay under ~107 bytes)
            self._tmp = tempfile.mkdtemp(prefix="dfmpc-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            cpus = (self.max_parallel * cpus_per_cell) if self.max_parallel else available_cpus()
            # ERROR: a private cluster's start-up notices (token authentication ...) would only clutter the terminal
            # address="local": a new cluster of our own, even where `ray start` left one running on this machine
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, _temp_dir=self._tmp)
        self.init_seconds = time.perf_counter() - t
        self._remote = ray.remote(max_retries=0)(_run_on_ray)
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
