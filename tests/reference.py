"""Independent NumPy float64 references, written from the formulas (FAVOR-NOTES 1-5).

Nothing here calls favorplus: the tests compare favorplus against these.
"""

from __future__ import annotations

import math

import numpy as np


def features(x: np.ndarray, w: np.ndarray | None, kernel: str, scale: float) -> np.ndarray:
    """phi(sqrt(scale) x) for the kernel, straight from the definitions, unstabilized."""
    x = np.asarray(x, dtype=np.float64) * math.sqrt(scale)
    if w is None:
        u, m = x, x.shape[-1]
    else:
        w = np.asarray(w, dtype=np.float64)
        u, m = x @ w.T, w.shape[0]
    sq = 0.5 * np.sum(x * x, axis=-1, keepdims=True)
    if kernel == "softmax":
        return np.exp(u - sq) / math.sqrt(m)
    if kernel == "softmax_hyperbolic":
        return np.exp(-sq) * np.concatenate([np.exp(u), np.exp(-u)], axis=-1) / math.sqrt(2 * m)
    if kernel == "softmax_trig":
        return np.exp(sq) * np.concatenate([np.cos(u), np.sin(u)], axis=-1) / math.sqrt(m)
    if kernel == "relu":
        return np.maximum(u, 0.0) / math.sqrt(m)
    raise ValueError(kernel)


def quadratic_attention(
    fq: np.ndarray,
    fk: np.ndarray,
    v: np.ndarray,
    *,
    key_mask: np.ndarray | None = None,
    causal: bool = False,
) -> np.ndarray:
    """D^-1 (phi(Q) phi(K)^T, masked) V, with 0 for rows that have no key."""
    a = fq @ np.swapaxes(fk, -1, -2)
    if key_mask is not None:
        a = np.where(key_mask[..., None, :], a, 0.0)
    if causal:
        a = np.tril(a)
    den = a.sum(-1, keepdims=True)
    v = v if key_mask is None else np.where(key_mask[..., None], v, 0.0)
    allowed = np.tril(np.ones(a.shape[-2:], dtype=bool)) if causal else None
    return np.where(den == 0, 0.0, _product(a, v, allowed) / np.where(den == 0, 1.0, den))


def _product(a: np.ndarray, v: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """``a @ v`` over the allowed pairs only: a left-out pair contributes nothing, even
    where its value is inf or NaN (a plain product would give 0 * inf = NaN)."""
    if allowed is None:
        return a @ v
    terms = a[..., :, :, None] * v[..., None, :, :]
    return np.where(allowed[..., None], terms, 0.0).sum(-2)


def exact_attention(q, k, v, *, key_mask=None, causal=False, scale=None) -> np.ndarray:
    """softmax(scale q k^T) v in float64, masked keys removed, rows with no key give 0."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ np.swapaxes(k, -1, -2))
    allowed = np.ones(s.shape, dtype=bool)
    if key_mask is not None:
        allowed = allowed & key_mask[..., None, :]
    if causal:
        allowed = allowed & np.tril(np.ones(s.shape[-2:], dtype=bool))
    s = np.where(allowed, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.where(allowed, np.exp(s - top), 0.0)
    den = p.sum(-1, keepdims=True)
    v = v if key_mask is None else np.where(key_mask[..., None], v, 0.0)
    return np.where(den == 0, 0.0, _product(p, v, allowed) / np.where(den == 0, 1.0, den))


# Mean squared error of one estimate phi(x).phi(y) of exp(x.y) with m iid features
# (Performer paper, Lemma 2), for inputs already multiplied by sqrt(scale).
def mse(kernel: str, x: np.ndarray, y: np.ndarray, m: int) -> float:
    z, delta = x + y, x - y
    sm = math.exp(float(x @ y))
    zz, dd = float(z @ z), float(delta @ delta)
    positive = math.exp(zz) * sm**2 * (1 - math.exp(-zz)) / m
    if kernel == "softmax":
        return positive
    if kernel == "softmax_hyperbolic":
        return 0.5 * (1 - math.exp(-zz)) * positive
    if kernel == "softmax_trig":
        return math.exp(zz) * sm**-2 * (1 - math.exp(-dd)) ** 2 / (2 * m)
    raise ValueError(kernel)


def regularized_kernel(x: np.ndarray, y: np.ndarray) -> float:
    """E over w uniform on the sphere of radius sqrt(d) of exp(w.z - |x|^2/2 - |y|^2/2).

    E[exp(w.z)] = 0F1(; d/2; d |z|^2 / 4) for |w| = sqrt(d) (the SMREG kernel).
    """
    d = x.shape[-1]
    z = x + y
    t = d * float(z @ z) / 4
    b = d / 2
    total, term, n = 1.0, 1.0, 0
    while term > 1e-17 * total:
        term *= t / ((b + n) * (n + 1))
        total += term
        n += 1
    return total * math.exp(-0.5 * float(x @ x) - 0.5 * float(y @ y))
