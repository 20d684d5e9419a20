"""The Pareto frontier (smaller size, higher top-1) against brute force on random point sets."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfmpc_deploy.sweep.pareto import pareto_front


def _brute(points):
    def beaten(i):
        x, y = points[i]
        return any(a <= x and b >= y and (a < x or b > y) for j, (a, b) in enumerate(points) if j != i)
    return {i for i in range(len(points)) if not beaten(i)}


# few distinct coordinates, so ties in size, in top-1 and whole duplicates are frequent
_coord = st.integers(0, 6).map(float)
_points = st.lists(st.tuples(_coord, _coord), max_size=25)


@given(_points)
def test_frontier_is_exactly_the_unbeaten_points(points):
    front = pareto_front(points)
    assert set(front) == _brute(points) and len(front) == len(set(front))


@given(_points)
def test_frontier_is_ordered_by_size_with_top1_rising(points):
    front = pareto_front(points)
    sizes = [points[i][0] for i in front]
    tops = [points[i][1] for i in front]
    assert sizes == sorted(sizes) and tops == sorted(tops)


@given(st.lists(st.tuples(st.floats(0, 1e9), st.floats(0, 100)), max_size=40))
def test_frontier_on_real_valued_points(points):
    assert set(pareto_front(points)) == _brute(points)


def test_small_cases():
    assert pareto_front([]) == []
    assert pareto_front([(100, 70.0), (150, 75.0), (120, 69.0), (150, 74.0)]) == [0, 1]
    assert pareto_front([(1, 5.0), (1, 5.0), (2, 5.0)]) == [0, 1]  # identical points are both on it


@pytest.mark.parametrize("bad", [(math.nan, 1.0), (1.0, math.inf)])
def test_non_finite_points_are_refused(bad):
    with pytest.raises(ValueError, match="point 1"):
        pareto_front([(1.0, 1.0), bad])
