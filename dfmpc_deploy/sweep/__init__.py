"""``dfmpc-deploy sweep``: many builds (models x flags) from one grid file, resumable, on this machine or on Ray.

    grid.py     the grid file (TOML) -> validated cells with stable ids
    cell.py     one cell on a worker: the same run_build as ``build``, into DIR/cells/<cell id>/
    engines.py  where cells run: local worker processes, or Ray tasks
    store.py    DIR/results.sqlite, written by the driver only
    run.py      the driver: plan, run what is not done, record, write sweep.json and sweep.html
    html.py     sweep.html (per-model size/top-1 scatter with the Pareto frontier, sortable table)
    pareto.py   the frontier itself
    command.py  the subcommand

Example::

    from dfmpc_deploy.sweep import LocalEngine, load_grid, run_sweep
    result = run_sweep(load_grid("grid.toml"), "sweeps/r20", LocalEngine(max_parallel=2))
"""
from .cell import CellTask, run_cell
from .engines import ENGINES, LocalEngine, RayEngine, make_engine
from .grid import Cell, Grid, cell_id, load_grid, parse_grid
from .pareto import pareto_front
from .run import SweepResult, run_sweep
from .store import Row, Store

__all__ = ["Cell", "Grid", "load_grid", "parse_grid", "cell_id", "CellTask", "run_cell", "ENGINES", "LocalEngine",
           "RayEngine", "make_engine", "pareto_front", "SweepResult", "run_sweep", "Row", "Store"]
