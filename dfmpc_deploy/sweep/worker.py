"""A local sweep worker process: ``python -m dfmpc_deploy.sweep.worker FD``.

It runs the :class:`~dfmpc_deploy.sweep.cell.CellTask` objects the driver sends over the socket ``FD`` (pickled, by
:class:`multiprocessing.connection.Connection`), one at a time, and sends each outcome back; it ends when the
driver sends None or goes away. It imports nothing of the driver's program (unlike a ``spawn`` child, which imports
the driver's ``__main__``), so starting one costs an interpreter and this small module. It runs in its own session:
the terminal's Ctrl-C reaches the driver only, which stops the workers with SIGTERM; SIGTERM is raised as an
interrupt here, so a running cell's half-written folder is removed as for an interrupted ``build``.
"""
from __future__ import annotations

import signal
import sys
from multiprocessing.connection import Connection

from ..io.outdir import terminate_as_interrupt
from .cell import run_cell

__all__ = ["serve"]


def serve(conn: Connection) -> None:
    """Run the cells sent over ``conn`` until None, end of file, or SIGTERM."""

    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
