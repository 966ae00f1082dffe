"""Haar-distributed random orthogonal matrices, drawn on the host (the building block of
the orthogonal and simplex projections)."""

from __future__ import annotations

import numpy as np


def haar_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    """One Haar-distributed orthogonal ``dim x dim`` matrix.

    A bare QR factorization of a Gaussian matrix is not Haar distributed (its
    signs depend on the factorization's convention); multiplying each column of
    Q by the sign of the matching diagonal entry of R makes it so (Mezzadri 2007).
    """
    g = rng.standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    signs = np.sign(np.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs[None, :]
