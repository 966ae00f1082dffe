"""Closed forms for the softmax-kernel random-feature estimators (FAVOR-NOTES section 2).

Used by ``benchmarks/paper.py`` beside its measurements. Every function here works on
inputs already multiplied by ``sqrt(scale)`` (``x' = x d^-1/4`` by default), so that the
kernel is ``SM(x, y) = exp(x . y)``, and on float64 NumPy arrays; nothing calls favorplus.

One feature of each estimator, from one row ``w ~ N(0, I_d)`` (the estimate with m
iid rows is the mean of m such terms):

* positive:   ``Y = exp(w . z - (|x|^2 + |y|^2) / 2)``, ``z = x + y``
* trig:       ``Y = exp((|x|^2 + |y|^2) / 2) cos(w . delta)``, ``delta = x - y``
  (the cos and sin features of one row together; 2m features from m rows)
* hyperbolic: ``Y = (Y+(w) + Y+(-w)) / 2`` (2m features from m rows)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "kernel_mse",
    "mse_ratio_trig_positive",
    "feature_moments",
    "mse_estimate_se",
    "orthogonal_bound",
    "output_mse_delta",
]


def _pair_terms(x: np.ndarray, y: np.ndarray, pairwise: bool) -> tuple[np.ndarray, ...]:
    """``x.y``, ``|x|^2 + |y|^2`` for matching rows, or for all pairs when ``pairwise``."""
    xx = np.sum(x * x, axis=-1)
    yy = np.sum(y * y, axis=-1)
    if pairwise:
        return x @ y.T, xx[:, None] + yy[None, :]
    return np.sum(x * y, axis=-1), xx + yy


def kernel_mse(
    kernel: str, x: np.ndarray, y: np.ndarray, m: int, *, pairwise: bool = False
) -> np.ndarray:
    """MSE of the m-iid-feature estimate of ``exp(x . y)`` (Performer paper, Lemma 2).

    ``x``, ``y``: shape (..., d), matching rows; with ``pairwise`` (n, d) and (p, d),
    giving an (n, p) array for all pairs.

    * positive:   ``exp(|z|^2) SM^2 (1 - exp(-|z|^2)) / m``
    * trig:       ``exp(|z|^2) SM^-2 (1 - exp(-|delta|^2))^2 / (2m)``
    * hyperbolic: ``(1 - exp(-|z|^2)) / 2`` times the positive MSE
    """
    xy, sq = _pair_terms(x, y, pairwise)
    zz, dd = sq + 2 * xy, sq - 2 * xy
    if kernel in ("softmax", "softmax_hyperbolic"):
        positive = np.exp(zz + 2 * xy) * -np.expm1(-zz) / m
        return positive if kernel == "softmax" else 0.5 * -np.expm1(-zz) * positive
    if kernel == "softmax_trig":
        # exp(|z|^2) SM^-2 = exp(|x|^2 + |y|^2)
        return np.exp(sq) * np.expm1(-dd) ** 2 / (2 * m)
    raise ValueError(kernel)


def mse_ratio_trig_positive(angle: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """``MSE_trig / MSE_positive`` for ``|x| = |y| = norm`` at ``angle`` between them.

    Independent of m and of d. With ``r = norm`` and ``c = cos(angle)``:
    ``(1 - exp(-2 r^2 (1 - c)))^2 / (2 exp(4 r^2 c) (1 - exp(-2 r^2 (1 + c))))``.
    """
    r2 = np.asarray(norm, dtype=np.float64) ** 2
    c = np.cos(np.asarray(angle, dtype=np.float64))
    dd, zz = 2 * r2 * (1 - c), 2 * r2 * (1 + c)
    return np.expm1(-dd) ** 2 / (2 * np.exp(4 * r2 * c) * -np.expm1(-zz))


def feature_moments(kernel: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Raw moments ``E[Y^k]``, k = 1..4, of one feature's estimate (shape (..., 4)).

    positive: ``E[Y^k] = exp(k^2 |z|^2 / 2 - k (|x|^2 + |y|^2) / 2)``;
    trig: ``exp(k (|x|^2 + |y|^2) / 2) E[cos^k t]``, ``t ~ N(0, |delta|^2)``, from
    ``E[cos(j t)] = exp(-j^2 |delta|^2 / 2)`` and the power-reduction formulas.
    """
    xy, sq = _pair_terms(x, y, False)
    k = np.arange(1, 5, dtype=np.float64)
    if kernel == "softmax":
        zz = (sq + 2 * xy)[..., None]
        return np.exp(k**2 * zz / 2 - k * sq[..., None] / 2)
    if kernel == "softmax_trig":
        dd = sq - 2 * xy
        c1, c2, c3, c4 = (np.exp(-(j**2) * dd / 2) for j in (1, 2, 3, 4))
        cos_moments = np.stack([c1, (1 + c2) / 2, (3 * c1 + c3) / 4, (3 + 4 * c2 + c4) / 8], -1)
        return np.exp(k * sq[..., None] / 2) * cos_moments
    raise ValueError(kernel)


def mse_estimate_se(kernel: str, x: np.ndarray, y: np.ndarray, m: int, draws: int) -> np.ndarray:
    """Standard error of a Monte Carlo MSE: the mean of ``draws`` squared errors ``e^2``.

    ``e`` is the error of the mean of m iid features: ``E[e^2] = mu2 / m`` and
    ``E[e^4] = (mu4 + 3 (m - 1) mu2^2) / m^3`` from the central moments mu of one
    feature; the standard error is ``sqrt((E[e^4] - E[e^2]^2) / draws)``. The positive
    features are log-normal: at large ``|z|`` the fourth moment, and so this error,
    is huge (the Monte Carlo MSE is then mostly an underestimate).
    """
    e1, e2, e3, e4 = np.moveaxis(feature_moments(kernel, x, y), -1, 0)
    mu2 = e2 - e1**2
    mu4 = e4 - 4 * e3 * e1 + 6 * e2 * e1**2 - 3 * e1**4
    ee2 = mu2 / m
    ee4 = (mu4 + 3 * (m - 1) * mu2**2) / m**3
    return np.sqrt(np.maximum(ee4 - ee2**2, 0.0) / draws)


def orthogonal_bound(x: np.ndarray, y: np.ndarray, m: int, d: int) -> np.ndarray:
    """Upper bound on the positive estimator's MSE with orthogonal (chi-norm) rows, all pairs.

    Performer paper, Theorem 2: each pair of distinct rows within one orthogonal block
    has covariance at most ``-2 / (d + 2) (SM - exp(-(|x|^2 + |y|^2) / 2))^2``, so that
    ``MSE_ort <= MSE_iid - 2 (m - 1) / (m (d + 2)) (...)^2`` for m <= d. Rows from
    different blocks (favorplus stacks ``ceil(m / d)`` independent blocks) are
    independent, so only the ``sum_b n_b (n_b - 1)`` within-block pairs count.
    """
    sizes = [min(d, m - start) for start in range(0, m, d)]
    pairs = sum(s * (s - 1) for s in sizes)
    xy, sq = _pair_terms(x, y, True)
    gap = (np.exp(xy) - np.exp(-sq / 2)) ** 2
    return kernel_mse("softmax", x, y, m, pairwise=True) - 2 * pairs / (m**2 * (d + 2)) * gap


def output_mse_delta(
    kernel: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, queries: np.ndarray
) -> float:
    """First-order (delta-method) MSE of the attention output with ONE iid row (m = 1).

    Divide by m for m iid rows. ``q`` (L, d), ``k`` (L, d) scaled, ``v`` (L, dv);
    ``queries``: indices of the query rows to average over (the cost is one
    L x L by L x (len(queries) dv) matrix product per term).

    ``out_i = N_i / D_i`` with ``N_i = sum_j A_ij v_j``, ``D_i = sum_j A_ij``; to first
    order ``out^_i - out_i = sum_j (A^_ij - A_ij) (v_j - out_i) / D_i``, so that
    ``Var = sum_jl Cov(A^_ij, A^_il) a_j a_l / D_i^2`` with ``a_j = v_j - out_i``. The
    ``E[A^] E[A^]`` part of the covariance drops out (``sum_j A_ij a_j = 0``), and the
    second moments of one feature are closed forms:

    * positive:   ``E[Y_j Y_l] = e^{|q|^2} e^{2 q.k_j} e^{2 q.k_l} e^{k_j.k_l}``
    * trig:       ``(e^{-|q|^2} e^{2 q.k_j} e^{2 q.k_l} e^{-k_j.k_l} + e^{|q|^2} e^{k_j.k_l}) / 2``
    * hyperbolic: ``(e^{|q|^2} e^{2 q.k_j} e^{2 q.k_l} e^{k_j.k_l} + e^{-|q|^2} e^{-k_j.k_l}) / 2``

    The first-order term ignores the O(1/m^2) bias and higher terms of the ratio: it
    is the large-m limit, not the small-m behaviour (the trig normaliser can come
    near 0, where the ratio's error is far above this).
    """
    qs = q[queries]  # (n, d)
    logits = qs @ k.T  # (n, L)
    top = logits.max(axis=1, keepdims=True)
    a_exact = np.exp(logits - top)  # A_ij e^{-top_i}
    den = a_exact.sum(axis=1)  # D_i e^{-top_i}
    out = (a_exact @ v) / den[:, None]  # (n, dv)
    a = v[None, :, :] - out[:, None, :]  # (n, L, dv)
    n, L, dv = a.shape
    qq = np.sum(qs * qs, axis=1)
    gram = k @ k.T
    # b_ij = e^{2 q_i.k_j} a_ij, computed as e^{-2 top_i} times that (no overflow).
    b = np.exp(2 * (logits - top))[:, :, None] * a  # (n, L, dv)
    a_flat = np.moveaxis(a, 1, 0).reshape(L, n * dv)
    b_flat = np.moveaxis(b, 1, 0).reshape(L, n * dv)

    def quad(kmat: np.ndarray, vec: np.ndarray) -> np.ndarray:
        """``vec_i^T kmat vec_i`` for every query i and column, shape (n, dv)."""
        return np.sum(vec * (kmat @ vec), axis=0).reshape(n, dv)

    # Divide by D_i^2 = e^{2 top_i} den_i^2: b^T K b carries e^{4 top_i} (taken out of b
    # above), so the b terms get e^{2 top_i} / den_i^2 and the a terms e^{-2 top_i} / den_i^2.
    inv_d2_b = (1.0 / den**2)[:, None]
    inv_d2_a = (np.exp(-2 * top[:, 0]) / den**2)[:, None]
    eq, emq = np.exp(qq)[:, None], np.exp(-qq)[:, None]
    if kernel == "softmax":
        var = eq * quad(np.exp(gram), b_flat) * np.exp(2 * top) * inv_d2_b
    elif kernel == "softmax_trig":
        var = 0.5 * (
            emq * quad(np.exp(-gram), b_flat) * np.exp(2 * top) * inv_d2_b
            + eq * quad(np.exp(gram), a_flat) * inv_d2_a
        )
    elif kernel == "softmax_hyperbolic":
        var = 0.5 * (
            eq * quad(np.exp(gram), b_flat) * np.exp(2 * top) * inv_d2_b
            + emq * quad(np.exp(-gram), a_flat) * inv_d2_a
        )
    else:
        raise ValueError(kernel)
    return float(np.mean(var))


def check_against_reference() -> None:  # pragma: no cover - a development aid
    """Compare :func:`kernel_mse` with tests/reference.py's scalar formulas."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tests" / "reference.py"
    spec = importlib.util.spec_from_file_location("favorplus_reference", path)
    assert spec is not None and spec.loader is not None
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    rng = np.random.default_rng(0)
    for kernel in ("softmax", "softmax_trig", "softmax_hyperbolic"):
        x, y = rng.standard_normal((2, 5, 8)) * 0.4
        ours = kernel_mse(kernel, x, y, 7)
        theirs = [ref.mse(kernel, a, b, 7) for a, b in zip(x, y)]
        assert np.allclose(ours, theirs, rtol=1e-12), kernel
    assert math.isclose(
        float(mse_ratio_trig_positive(np.array(1.0), np.array(0.8))),
        float(
            kernel_mse("softmax_trig", *_unit_pair(1.0, 0.8), 3)
            / kernel_mse("softmax", *_unit_pair(1.0, 0.8), 3)
        ),
        rel_tol=1e-12,
    )


def _unit_pair(angle: float, norm: float) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([norm, 0.0, 0.0])
    y = norm * np.array([math.cos(angle), math.sin(angle), 0.0])
    return x, y
