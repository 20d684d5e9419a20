"""The accuracy/size Pareto frontier: the cells no other cell beats on both size and top-1."""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["pareto_front"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points on the frontier of (smaller size, higher top-1), ordered by size.

    A point is on it when no other point is at most as large *and* at least as accurate, and strictly better in one
    of the two. Identical points are all on it (neither beats the other).

    Args:
        points: ``(size, top1)`` pairs, finite numbers.

    Returns:
        Indices into ``points``, by increasing size (then decreasing top-1, then index).

    Raises:
        ValueError: a coordinate is NaN or infinite.

    Example::

        >>> pareto_front([(100, 70.0), (150, 75.0), (120, 69.0), (150, 74.0)])
        [0, 1]
    """
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"pareto_front: point {i} ({x}, {y}) is not finite")
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
        elif front and tuple(points[i]) == tuple(points[front[-1]]):
            front.append(i)
    return front
