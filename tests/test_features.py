"""Random features: unbiasedness, row by row, against the paper's standard errors.

Statistical tolerances: an estimate from R independent draws is compared with the
exact kernel within ``Z`` theoretical standard errors, ``sqrt(MSE(m=1) / R)``, using
Lemma 2's MSE for one iid feature (reference.mse). For each row of an orthogonal
block that SE is exact: each row is marginally N(0, I_d) and rows at the same place
in different blocks are independent. For the mean over all rows of orthogonal
blocks the iid SE is an upper bound (Theorem 2: orthogonality lowers the MSE of
positive features). Seeds are fixed; Z = 5 makes a false alarm ~1e-6 per check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import favorplus as fp

from . import reference as ref

Z = 5.0
SOFTMAX_KERNELS = ["softmax", "softmax_hyperbolic", "softmax_trig"]


def pair(max_norm: float):
    """Two vectors x, y of dimension 2..8 with norms <= max_norm."""

    @st.composite
    def draw(draw_):
        d = draw_(st.integers(2, 8))
        rng = np.random.default_rng(draw_(st.integers(0, 2**32 - 1)))
        out = []
        for _ in range(2):
            direction = rng.standard_normal(d)
            direction /= np.linalg.norm(direction)
            out.append(direction * draw_(st.floats(0.0, max_norm)))
        return out[0], out[1]

    return draw()


def row_estimates(b, x, y, w_np, kernel):
    """Per-row estimates m * sum_{features of row r} phi(x) phi(y), computed on backend b."""
    xs = b.asarray(np.stack([x, y]), "float64")
    w = b.asarray(w_np, "float64")
    phi = b.numpy(fp.feature_map(xs, w, kernel=kernel, scale=1.0))
    prod = phi[0] * phi[1]
    m = w_np.shape[0]
    if prod.shape[-1] == 2 * m:
        prod = prod[:m] + prod[m:]
    return m * prod


@pytest.mark.parametrize("kernel", SOFTMAX_KERNELS)
@pytest.mark.parametrize("kind", ["iid", "orthogonal"])
@given(xy=pair(0.7), seed=st.integers(0, 2**31 - 1))
def test_unbiased_mean(xp, kernel, kind, xy, seed):
    x, y = xy
    d = x.shape[0]
    blocks = 1500
    w = fp.draw_projection(blocks * d, d, kind=kind, seed=seed)
    est = row_estimates(xp, x, y, w, kernel).mean()
    exact = math.exp(float(x @ y))
    se = math.sqrt(ref.mse(kernel, x, y, blocks * d))
    if kind == "orthogonal" and kernel == "softmax_trig":
        # Theorem 2 covers positive features only: use the row-wise SE (each row iid across blocks).
        se = math.sqrt(ref.mse(kernel, x, y, blocks))
    assert abs(est - exact) <= Z * se + 1e-9 * exact, (est, exact, se)


@pytest.mark.parametrize("kernel", SOFTMAX_KERNELS)
@given(xy=pair(0.7), seed=st.integers(0, 2**31 - 1))
def test_unbiased_each_orthogonal_row(xp, kernel, xy, seed):
    """Every row position of a Haar block is marginally isotropic: unbiased on its own."""
    x, y = xy
    d = x.shape[0]
    blocks = 1500
    w = fp.draw_projection(blocks * d, d, kind="orthogonal", seed=seed)
    per_row = row_estimates(xp, x, y, w, kernel).reshape(blocks, d).mean(axis=0)
    exact = math.exp(float(x @ y))
    se = math.sqrt(ref.mse(kernel, x, y, blocks))
    assert np.all(np.abs(per_row - exact) <= Z * se + 1e-9 * exact), (per_row, exact, se)


def _rows_unbiased_along_axes(w: np.ndarray, d: int, blocks: int) -> bool:
    """The row-wise check of the test below, on a given (blocks*d, d) matrix."""
    for axis in range(d):
        for sign in (1.0, -1.0):
            x = np.zeros(d)
            x[axis] = 0.5 * sign
            y = x.copy()
            exact = math.exp(float(x @ y))
            u = w @ (x + y)
            est = np.exp(u - float(x @ x)).reshape(blocks, d).mean(axis=0)
            se = math.sqrt(ref.mse("softmax", x, y, blocks))
            if np.any(np.abs(est - exact) > Z * se):
                return False
    return True


@pytest.mark.numpy_only
def test_orthogonal_rows_isotropic_along_axes():
    """Inputs along coordinate axes catch sign conventions of QR (a non-Haar block)."""
    d, blocks = 6, 4000
    w = fp.draw_projection(blocks * d, d, kind="orthogonal", seed=123)
    assert _rows_unbiased_along_axes(w, d, blocks)
    # The same check rejects a bare QR without the sign correction: it can fail.
    rng = np.random.default_rng(123)
    bad = np.concatenate([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(blocks)])
    bad *= np.sqrt(rng.chisquare(d, size=blocks * d))[:, None]
    assert not _rows_unbiased_along_axes(bad, d, blocks)


@pytest.mark.parametrize("kind", ["iid", "orthogonal"])
def test_sqrt_d_norms_estimate_regularized_kernel(xp, kind):
    """sqrt(d) row norms estimate SMREG (biased low), not SM, as documented."""
    d, blocks = 4, 20000
    x = np.array([0.6, 0.3, -0.2, 0.1])
    y = np.array([0.5, 0.2, 0.1, -0.3])
    w = fp.draw_projection(blocks * d, d, kind=kind, norms="sqrt_d", seed=7)
    est = row_estimates(xp, x, y, w, "softmax").mean()
    sm, smreg = math.exp(float(x @ y)), ref.regularized_kernel(x, y)
    # iid SE as a bound: fixed row lengths lower the variance.
    se = math.sqrt(ref.mse("softmax", x, y, blocks * d))
    assert smreg < 0.95 * sm
    assert abs(est - smreg) <= Z * se
    assert sm - est > Z * se


@pytest.mark.parametrize("kernel", [*SOFTMAX_KERNELS, "relu"])
def test_feature_map_matches_definition(xp, kernel):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6)) * 0.5
    w = fp.draw_projection(10, 6, seed=4)
    got = fp.feature_map(xp.asarray(x), xp.asarray(w), kernel=kernel, scale=0.3)
    assert got.shape == ref.features(x, w, kernel, 0.3).shape
    np.testing.assert_allclose(
        xp.numpy(got), ref.features(x, w, kernel, 0.3), rtol=1e-12, atol=1e-14
    )


def test_feature_map_custom_and_deterministic(xp):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3))
    w = fp.draw_projection(7, 3, seed=1)
    xb, wb = xp.asarray(x), xp.asarray(w)

    def elu1(u):
        return xp.xp.where(u > 0, u + 1.0, xp.xp.exp(xp.xp.minimum(u, 0.0)))

    got = xp.numpy(fp.feature_map(xb, wb, kernel=elu1, scale=1.0))
    u = x @ w.T
    np.testing.assert_allclose(got, np.where(u > 0, u + 1, np.exp(np.minimum(u, 0))) / math.sqrt(7))
    det = xp.numpy(fp.feature_map(xb, None, kernel="relu", scale=1.0))
    np.testing.assert_allclose(det, np.maximum(x, 0) / math.sqrt(3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_feature_map_keeps_namespace_device_dtype(xp, dtype):
    x = xp.asarray(np.ones((3, 4)) * 0.1, dtype)
    w = fp.draw_projection(8, 4, seed=0, like=x)
    out = fp.feature_map(x, w)
    assert type(out) is type(x)
    assert out.dtype == x.dtype
    assert str(xp.xp.__name__) and _device(out) == _device(x)


def _device(a):
    from array_api_compat import device

    return device(a)
