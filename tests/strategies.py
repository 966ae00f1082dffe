"""Hypothesis strategies for attention problems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st


@dataclass
class Problem:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    key_mask: np.ndarray | None
    num_features: int
    seed: int

    @property
    def d(self) -> int:
        return self.q.shape[-1]


@st.composite
def problems(
    draw,
    *,
    causal: bool = False,
    max_len: int = 24,
    with_mask: bool | None = None,
    max_norm: float = 1.5,
):
    """q, k, v with broadcasting leading dimensions, optional key mask, moderate norms.

    Norms are of the scaled inputs ``d**-0.25 x`` (at most ``max_norm``), where the
    estimators are accurate enough for small m.
    """
    d = draw(st.integers(1, 8))
    dv = draw(st.integers(1, 5))
    lk = draw(st.integers(1, max_len))
    lq = lk if causal else draw(st.integers(1, max_len))
    batch = draw(st.sampled_from([(), (2,), (2, 3), (1, 3)]))

    # Leading dims of each array: full, or broadcast (1s / fewer dims).
    def lead():
        options = [batch]
        if batch:
            options += [tuple(1 for _ in batch), batch[1:]]
        return draw(st.sampled_from(options))

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def vectors(shape):
        x = rng.standard_normal(shape)
        x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        radius = rng.uniform(0.0, max_norm, size=(*shape[:-1], 1))
        return x * radius * d**0.25

    q = vectors((*lead(), lq, d))
    k = vectors((*lead(), lk, d))
    v = rng.standard_normal((*lead(), lk, dv))
    use_mask = draw(st.booleans()) if with_mask is None else with_mask
    mask = None
    if use_mask:
        mask = rng.random((*lead(), lk)) < draw(st.floats(0.3, 1.0))
    m = draw(st.integers(1, 40))
    return Problem(q, k, v, mask, m, draw(st.integers(0, 2**31 - 1)))


# --- adversarial values (tests/test_fuzz.py) -------------------------------------------

NON_FINITE = (float("inf"), float("-inf"), float("nan"))


def extremes(dtype: str) -> tuple[float, ...]:
    """The dtype's largest finite magnitudes, its smallest normal and subnormal numbers."""
    info = np.finfo(np.float32 if dtype == "bfloat16" else dtype)
    big = float(info.max) if dtype != "bfloat16" else 3.3e38
    return (big, -big, float(info.tiny), float(info.smallest_subnormal), -0.0)


def adversarial_values(dtype: str) -> st.SearchStrategy[float]:
    """One adversarial scalar: inf, -inf, NaN, or one of the dtype's extremes."""
    return st.sampled_from((*NON_FINITE, *extremes(dtype)))


@st.composite
def causal_cases(draw, *, max_len: int = 40):
    """A small causal problem, a split point t and a chunk length: (q, k, v, m, t, chunk)."""
    length = draw(st.integers(2, max_len))
    t = draw(st.integers(1, length - 1))
    d = draw(st.sampled_from([1, 3, 8]))
    dv = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k = (0.6 * rng.standard_normal((2, length, d)) for _ in range(2))
    v = rng.standard_normal((2, length, dv))
    m = draw(st.sampled_from([4, 16, 32]))
    chunk = draw(st.sampled_from([None, 1, 3, 8, 64]))
    return q, k, v, m, t, chunk
