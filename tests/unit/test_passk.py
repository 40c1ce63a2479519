"""pass@k: hand-worked values and the combinatorial definition."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.coordinator.evaluation import pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        # k=1 is the plain success rate c/n: 2/8.
        (8, 2, 1, 0.25),
        # n=4, c=1, k=2: P(no success in 2 draws) = C(3,2)/C(4,2) = 3/6, so pass@2 = 1/2.
        (4, 1, 2, 0.5),
        # n=8, c=2, k=4: 1 - C(6,4)/C(8,4) = 1 - 15/70 = 11/14.
        (8, 2, 4, 11 / 14),
        # No success at all: pass@k = 0 whatever k.
        (8, 0, 1, 0.0),
        (8, 0, 8, 0.0),
        # n - c < k: every k-subset contains a success.
        (8, 5, 4, 1.0),
        (8, 8, 1, 1.0),
        (8, 1, 8, 1.0),
    ],
)
def test_pass_at_k_hand_worked(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@given(st.data())
def test_pass_at_k_matches_combinatorial_definition(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 200), label="n")
    c = data.draw(st.integers(0, n), label="c")
    k = data.draw(st.integers(1, n), label="k")
    # Definition (Chen et al. 2021): 1 - C(n-c, k) / C(n, k); math.comb is 0 when n-c < k.
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
