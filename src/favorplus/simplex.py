"""Simplex random directions (Reid et al., ICML 2023, arXiv 2301.13856).

Each block of d directions holds the d unit vectors of a regular simplex centred at the
origin (pairwise cosine ``-1/(d-1)``; they sum to zero and span a (d-1)-dimensional
subspace), rotated by an independent Haar-distributed orthogonal matrix. Each direction is
then marginally uniform on the sphere, so with independent chi_d lengths every row of the
projection is marginally N(0, I_d) and the softmax estimators stay unbiased row by row,
exactly as with orthogonal blocks.

Why it helps: for positive features, the cross term of two rows of a block,
``E exp((w_i + w_j) . z)``, grows with ``|w_i + w_j|^2 = r_i^2 + r_j^2 + 2 r_i r_j cos``; the
most negative cosine that d rows can share, ``-1/(d-1)``, gives the smallest one, hence a
lower MSE than orthogonal rows (cosine 0), which are below iid rows. The antithetic
(hyperbolic) features pair ``w`` with ``-w``, which makes them symmetric in the cosine: there
the orthogonal coupling is already the best and simplex directions are very slightly worse.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["simplex_blocks", "simplex_directions"]


def simplex_directions(dim: int) -> np.ndarray:
    """The ``(dim, dim)`` unit vertices ``(e_i - 1/d) / sqrt(1 - 1/d)`` of a regular simplex.

    Pairwise cosine ``-1/(d-1)``; for ``dim == 1`` (no simplex), the single direction 1.
    """
    if dim == 1:
        return np.ones((1, 1))
    return (np.eye(dim) - 1.0 / dim) / math.sqrt(1.0 - 1.0 / dim)


def simplex_blocks(rng: np.random.Generator, dim: int, count: int) -> list[np.ndarray]:
    """``count`` independent blocks of ``dim`` simplex directions, each Haar-rotated."""
    from ._haar import haar_orthogonal as _haar_orthogonal

    base = simplex_directions(dim)
    return [base @ _haar_orthogonal(rng, dim) for _ in range(count)]
