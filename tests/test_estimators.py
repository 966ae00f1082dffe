"""Simplex random features, OPRF (FAVOR++) and SADERF (FAVOR#): theory and attention paths.

Statistical checks compare an estimate from n independent samples with the exact value
within ``Z`` standard errors, the SE taken from the estimator's own closed form:

* OPRF, one feature ``Y = m phi_r(x) phi_r(y)`` of an iid row: ``E Y = exp(x . y)``,
  ``E Y^2 = M2 = (1-4A)^d (1-8A)^(-d/2) exp(2(1-4A)/(1-8A) |x+y|^2 - |x|^2 - |y|^2)`` and
  ``E Y^4 = M4 = (1-4A)^(2d) (1-16A)^(-d/2) exp(8(1-4A)/(1-16A) |x+y|^2 - 2|x|^2 - 2|y|^2)``
  (Gaussian integrals; checked below against numerical quadrature). The SE of the mean of
  n samples of Y is ``sqrt((M2 - K^2) / n)``, that of the mean of Y^2 ``sqrt((M4 - M2^2) / n)``.
* Positive features with coupled rows (orthogonal, simplex): the MSE of the m-row estimate
  is ``c0^2 / m^2 [m e^{2|z|^2} + m (d-1) G(cos) + m (m-d) e^{|z|^2}] - K^2`` with
  ``c0 = exp(-(|x|^2+|y|^2)/2)`` and ``G(cos) = E 0F1(d/2; |w_i+w_j|^2 |z|^2 / 4)`` over two
  independent chi_d lengths at the block's fixed cosine (0 orthogonal, -1/(d-1) simplex;
  iid: ``G = e^{|z|^2}``), computed here by quadrature. The measured MSE of R draws is
  compared with it within Z empirical SEs of the squared errors (their sample standard
  deviation / sqrt(R)).

Seeds are fixed; Z = 5 (a false alarm ~1e-6 per check).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import favorplus as fp

Z = 5.0


# --- independent references (NumPy float64, from the formulas; no favorplus) -------------


def ref_m2(x, y, a):
    d = x.shape[-1]
    z2 = np.sum((x + y) ** 2, -1)
    rest = np.sum(x * x, -1) + np.sum(y * y, -1)
    return np.exp(
        d * np.log1p(-4 * a) - d / 2 * np.log1p(-8 * a) + 2 * (1 - 4 * a) / (1 - 8 * a) * z2 - rest
    )


def ref_m4(x, y, a):
    d = x.shape[-1]
    z2 = np.sum((x + y) ** 2, -1)
    rest = np.sum(x * x, -1) + np.sum(y * y, -1)
    return np.exp(
        2 * d * np.log1p(-4 * a)
        - d / 2 * np.log1p(-16 * a)
        + 8 * (1 - 4 * a) / (1 - 16 * a) * z2
        - 2 * rest
    )


def ref_oprf_features(x, w, a, scale):
    """D exp(A|w|^2 + B w.x - |x|^2/2) / sqrt(m) of sqrt(scale) x; ``a`` of the batch shape."""
    x = np.asarray(x, np.float64) * math.sqrt(scale)
    a = np.asarray(a, np.float64)[..., None, None]
    d, m = x.shape[-1], w.shape[0]
    b = np.sqrt(1 - 4 * a)
    log = a * np.sum(w * w, -1) + b * (x @ w.T) - 0.5 * np.sum(x * x, -1, keepdims=True)
    return np.exp(log + d / 4 * np.log(1 - 4 * a)) / math.sqrt(m)


def ref_stats(q, k, mask=None):
    """Per-sequence means (over axis -2) of q, q^2, k, k^2; masked keys left out."""
    wk = np.ones(k.shape[:-1]) if mask is None else mask.astype(float)
    wk = np.broadcast_to(wk, np.broadcast_shapes(wk.shape, k.shape[:-1]))
    kz = np.where(wk[..., None] > 0, k, 0.0)
    n = np.maximum(wk.sum(-1, keepdims=True), 1)
    return (
        q.mean(-2),
        (q * q).mean(-2),
        (kz * wk[..., None]).sum(-2) / n,
        (kz * kz * wk[..., None]).sum(-2) / n,
    )


def ref_a(stats, scale):
    qm, qs, km, ks = stats
    d = qm.shape[-1]
    rho = scale * (qs.sum(-1) + ks.sum(-1) + 2 * (qm * km).sum(-1)) / d
    return (1 - 2 * rho - np.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16


def ref_psi(stats):
    return (stats[3] / stats[1]) ** 0.25


def ref_attention(q, k, v, w, a, psi=None, mask=None, causal=False):
    scale = 1 / math.sqrt(q.shape[-1])
    if psi is not None:
        q, k = q * psi[..., None, :], k / psi[..., None, :]
    fq = ref_oprf_features(q, w, a, scale)
    fk = ref_oprf_features(
        np.where(mask[..., None], k, 0.0) if mask is not None else k, w, a, scale
    )
    s = fq @ np.swapaxes(fk, -1, -2)
    if mask is not None:
        s = np.where(mask[..., None, :], s, 0.0)
    if causal:
        s = np.tril(s)
    vz = v if mask is None else np.where(mask[..., None], v, 0.0)
    return (s @ vz) / s.sum(-1, keepdims=True)


def coupled_term(d, z2, cos, n=400):
    """G(cos) = E 0F1(d/2; (r_i^2 + r_j^2 + 2 r_i r_j cos) z2 / 4), r ~ chi_d, by quadrature."""
    special = pytest.importorskip("scipy.special")
    stats = pytest.importorskip("scipy.stats")
    r = np.linspace(1e-9, math.sqrt(d) + 12.0, n)
    pdf = stats.chi.pdf(r, d)
    dr = r[1] - r[0]
    ri, rj = np.meshgrid(r, r, indexing="ij")
    val = special.hyp0f1(d / 2, (ri * ri + rj * rj + 2 * ri * rj * cos) * z2 / 4)
    return float(np.sum(val * pdf[:, None] * pdf[None, :]) * dr * dr)


def positive_mse(x, y, m, kind):
    """MSE of the m-row positive estimate, m a multiple of d, for the kind's coupling."""
    d = x.shape[0]
    z2 = float((x + y) @ (x + y))
    c0 = math.exp(-(x @ x + y @ y) / 2)
    k = math.exp(x @ y)
    if kind == "iid":
        g = math.exp(z2)
    else:
        g = coupled_term(d, z2, 0.0 if kind == "orthogonal" else -1.0 / (d - 1))
    return (
        c0**2 / m**2 * (m * math.exp(2 * z2) + m * (d - 1) * g + m * (m - d) * math.exp(z2)) - k * k
    )


def vector(d, norm, seed):
    x = np.random.default_rng(seed).standard_normal(d)
    return x * (norm / np.linalg.norm(x))


# --- simplex random features ---------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3, 8])
def test_simplex_blocks_geometry(d):
    """Each block: d directions with pairwise cosine -1/(d-1) (summing to 0), chi lengths."""
    m = 2 * d + 1  # two full blocks and part of a third
    w = fp.draw_projection(m, d, kind="simplex", seed=3)
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    expected = np.where(np.eye(d) == 1, 1.0, -1.0 / (d - 1))
    for start in (0, d):
        block = u[start : start + d]
        np.testing.assert_allclose(block @ block.T, expected, atol=1e-12)
        np.testing.assert_allclose(block.sum(0), 0.0, atol=1e-12)
    assert not np.allclose(u[:d] @ u[d : 2 * d].T, expected)  # blocks independently rotated
    same = fp.draw_projection(m, d, kind="simplex", seed=3, norms="sqrt_d")
    np.testing.assert_allclose(np.linalg.norm(same, axis=1), math.sqrt(d))


def test_simplex_each_row_unbiased(xp):
    """Every row position of a simplex block is marginally N(0, I): unbiased on its own,
    within Z of the iid SE of one row over the blocks (exact: rows at one position in
    different blocks are independent). Inputs along the axes catch a non-Haar rotation."""
    d, blocks = 4, 3000
    w = fp.draw_projection(blocks * d, d, kind="simplex", seed=11)
    wx = xp.asarray(w)
    for axis in range(d):
        x = np.zeros(d)
        x[axis] = 0.5
        y = 0.8 * x
        phi = xp.numpy(fp.feature_map(xp.asarray(np.stack([x, y])), wx, scale=1.0))
        per_row = (blocks * d * phi[0] * phi[1]).reshape(blocks, d).mean(0)
        exact = math.exp(x @ y)
        se = math.sqrt((ref_m2(x, y, 0.0) - exact**2) / blocks)
        assert np.all(np.abs(per_row - exact) <= Z * se), (axis, per_row, exact, se)


def _measured_mse(x, y, m, kind, draws, seed):
    d = x.shape[0]
    rng = np.random.default_rng(seed)
    w = np.stack([fp.draw_projection(m, d, kind=kind, seed=rng) for _ in range(draws)])
    c0 = math.exp(-(x @ x + y @ y) / 2)
    est = c0 * np.exp(w @ (x + y)).mean(-1)
    sq = (est - math.exp(x @ y)) ** 2
    return sq.mean(), sq.std() / math.sqrt(draws)


def _check_mse_order(d, norm, draws, seed):
    x = vector(d, norm, seed)
    y = 0.8 * vector(d, norm, seed + 1) + 0.6 * x
    m = d
    theory = {kind: positive_mse(x, y, m, kind) for kind in ("iid", "orthogonal", "simplex")}
    assert theory["simplex"] < theory["orthogonal"] < theory["iid"]  # the theory's order
    measured = {}
    for kind, value in theory.items():
        mse, se = _measured_mse(x, y, m, kind, draws, seed)
        assert abs(mse - value) <= Z * se, (kind, mse, value, se)
        measured[kind] = (mse, se)
    return theory, measured


@pytest.mark.numpy_only
def test_simplex_mse_below_orthogonal_below_iid_fast():
    """Positive features: measured MSEs inside Z SE of their closed forms, which are ordered
    simplex < orthogonal < iid; the simplex gain is significant in the measurement too."""
    theory, measured = _check_mse_order(d=4, norm=0.4, draws=3000, seed=5)
    (s, s_se), (o, o_se) = measured["simplex"], measured["orthogonal"]
    assert o - s > Z * math.hypot(s_se, o_se), measured


@pytest.mark.slow
@pytest.mark.numpy_only
@pytest.mark.parametrize("d,norm", [(3, 0.5), (6, 0.5), (8, 0.4), (16, 0.35)])
def test_simplex_mse_order_slow(d, norm):
    """The same at other d (moderate norms: at larger ones the squared errors are so
    heavy-tailed that their sample SE is no longer a reliable tolerance)."""
    theory, measured = _check_mse_order(d=d, norm=norm, draws=40000, seed=d)
    (s, s_se), (o, o_se), (i, i_se) = (measured[k] for k in ("simplex", "orthogonal", "iid"))
    assert o - s > 3 * math.hypot(s_se, o_se)
    assert i - o > 3 * math.hypot(o_se, i_se) or theory["iid"] - theory["orthogonal"] < (
        5 * math.hypot(o_se, i_se)
    )


# --- OPRF: closed forms ---------------------------------------------------------------------


@pytest.mark.parametrize("a", [-0.4, -0.05, 0.0, 0.05])
def test_oprf_moments_against_quadrature(a):
    """Unbiasedness and M2 = E[(f f)^2] of the module's closed form, against numerical
    quadrature over w (the d-dimensional integrals factor into 1-D ones)."""
    integrate = pytest.importorskip("scipy.integrate")
    x, y = np.array([0.4, -0.3, 0.2]), np.array([0.1, 0.5, -0.2])
    d = 3
    b, big_d = math.sqrt(1 - 4 * a), (1 - 4 * a) ** (d / 4)
    first = second = 1.0
    for i in range(d):

        def f(w, power, i=i):
            val = math.exp(2 * a * w * w + b * w * (x[i] + y[i]))
            return val**power * math.exp(-w * w / 2) / math.sqrt(2 * math.pi)

        first *= integrate.quad(f, -40, 40, args=(1,))[0]
        second *= integrate.quad(f, -40, 40, args=(2,))[0]
    rest = math.exp(-(x @ x + y @ y) / 2)
    np.testing.assert_allclose(big_d**2 * first * rest, math.exp(x @ y), rtol=1e-9)
    m2 = big_d**4 * second * rest**2
    np.testing.assert_allclose(float(fp.oprf_second_moment(x, y, a)), m2, rtol=1e-9)
    np.testing.assert_allclose(ref_m2(x, y, a), m2, rtol=1e-9)


@pytest.mark.parametrize(
    "d,norm_q,norm_k,shift", [(8, 0.7, 0.7, 0.0), (16, 1.2, 0.5, 0.3), (64, 1.5, 1.5, 0.2)]
)
def test_optimal_a_minimises_mean_log_second_moment(d, norm_q, norm_k, shift):
    """A* from the statistics is the minimiser over A of mean_ij log M2(A; x_i, y_j),
    found here by a grid search (this fixes the 1/d in rho: without it A* would be d
    times too far from 0)."""
    rng = np.random.default_rng(d)
    q = rng.standard_normal((40, d)) * norm_q / math.sqrt(d) + shift
    k = rng.standard_normal((30, d)) * norm_k / math.sqrt(d) + shift / 2
    grid = np.linspace(-3.0, 0.12, 31201)  # step 1e-4
    xi, yj = q[:, None, :], k[None, :, :]
    z2 = np.sum((xi + yj) ** 2, -1).mean()
    rest = (np.sum(xi * xi, -1) + np.sum(yj * yj, -1)).mean()
    objective = (
        d * np.log1p(-4 * grid) - d / 2 * np.log1p(-8 * grid)
        + 2 * (1 - 4 * grid) / (1 - 8 * grid) * z2 - rest
    )  # fmt: skip
    best = grid[np.argmin(objective)]
    a = float(fp.optimal_a(fp.feature_statistics(q, k), scale=1.0))
    assert abs(a - best) <= 1.5e-4, (a, best)
    assert a <= 0


@pytest.mark.parametrize(
    "norm,a", [(0.5, None), (1.0, None), (1.0, -0.3), (0.7, 0.04), (1.4, None)]
)
def test_oprf_unbiased_and_second_moment(xp, norm, a):
    """Per pair, from the features favorplus computes: the mean of the one-row estimates
    Y_r is exp(x.y) within Z sqrt((M2 - K^2)/n) and the mean of Y_r^2 is M2 within
    Z sqrt((M4 - M2^2)/n). A None: the optimum for this pair."""
    d, n = 4, 40000
    x, y = vector(d, norm, 1), vector(d, norm, 2)
    if a is None:
        st = fp.feature_statistics(x[None], y[None])
        a = float(fp.optimal_a(st, scale=1.0))
    w = fp.draw_projection(n, d, kind="iid", seed=7)
    est = fp.OPRF(a=a)
    fx = fp.feature_map(xp.asarray(x[None]), xp.asarray(w), kernel=est, scale=1.0)
    fy = fp.feature_map(xp.asarray(y[None]), xp.asarray(w), kernel=est, scale=1.0, role="key")
    samples = n * xp.numpy(fx)[0] * xp.numpy(fy)[0]
    exact, m2, m4 = math.exp(x @ y), ref_m2(x, y, a), ref_m4(x, y, a)
    assert abs(samples.mean() - exact) <= Z * math.sqrt((m2 - exact**2) / n)
    assert abs((samples**2).mean() - m2) <= Z * math.sqrt((m4 - m2**2) / n)


def test_oprf_optimum_lowers_second_moment_where_norms_are_large():
    """Closed form, d = 64, |x| = |y| = 3 (parallel): A* cuts the MSE by two orders of
    magnitude against FAVOR+ (A = 0); at small norms the two nearly coincide."""
    d = 64
    x = vector(d, 3.0, 0)
    a = float(fp.optimal_a(fp.feature_statistics(x[None], x[None]), scale=1.0))
    k2 = math.exp(2 * x @ x)
    ratio = (ref_m2(x, x, 0.0) - k2) / (ref_m2(x, x, a) - k2)
    assert ratio > 100
    small = vector(d, 0.2, 1)
    a_small = float(fp.optimal_a(fp.feature_statistics(small[None], small[None]), scale=1.0))
    assert -0.01 < a_small <= 0


# --- SADERF --------------------------------------------------------------------------------


def test_saderf_psi_formula_and_guard():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((50, 6)) * np.array([0.1, 0.5, 1, 2, 4, 0.0])
    k = rng.standard_normal((60, 6)) * np.array([3, 1, 1, 0.5, 0.2, 1.0])
    st = fp.feature_statistics(q, k)
    psi = fp.saderf_psi(st)
    np.testing.assert_allclose(psi[:5], ((k * k).mean(0) / (q * q).mean(0))[:5] ** 0.25, rtol=1e-5)
    assert np.all(np.isfinite(psi)) and psi[5] <= 1e2  # a zero query coordinate: guarded


@pytest.mark.parametrize("norm", [0.6, 1.2])
def test_saderf_unbiased_and_second_moment(xp, norm):
    """SADERF per pair: the features of psi x and y / psi estimate exp(x . y) (unchanged
    kernel) with the OPRF moments of the rescaled pair."""
    d, n = 4, 40000
    x = vector(d, norm, 3) * np.array([0.3, 0.6, 1.5, 2.0])
    y = vector(d, norm, 4) / np.array([0.3, 0.6, 1.5, 2.0])
    psi = np.array([1.7, 1.2, 0.8, 0.6])
    xs, ys = x * psi, y / psi
    a = float(fp.optimal_a(fp.feature_statistics(xs[None], ys[None]), scale=1.0))
    est = fp.SADERF(psi=xp.asarray(psi), a=a)
    w = xp.asarray(fp.draw_projection(n, d, kind="iid", seed=9))
    fx = fp.feature_map(xp.asarray(x[None]), w, kernel=est, scale=1.0)
    fy = fp.feature_map(xp.asarray(y[None]), w, kernel=est, scale=1.0, role="key")
    samples = n * xp.numpy(fx)[0] * xp.numpy(fy)[0]
    exact, m2, m4 = math.exp(x @ y), ref_m2(xs, ys, a), ref_m4(xs, ys, a)
    assert abs(samples.mean() - exact) <= Z * math.sqrt((m2 - exact**2) / n)
    assert abs((samples**2).mean() - m2) <= Z * math.sqrt((m4 - m2**2) / n)


def test_saderf_lowers_mean_second_moment_on_anisotropic_data():
    """Closed form: on queries and keys with opposite per-coordinate scales, SADERF's
    rescaling lowers the mean (over pairs) relative MSE below OPRF's at the same A rule."""
    d = 16
    rng = np.random.default_rng(1)
    g = np.exp(np.linspace(-1.0, 1.0, d))
    q = rng.standard_normal((64, d)) * g * 0.25
    k = rng.standard_normal((64, d)) / g * 0.25
    st = fp.feature_statistics(q, k)
    a = float(fp.optimal_a(st, scale=1.0))
    psi = fp.saderf_psi(st)
    qs, ks = q * psi, k / psi
    a_s = float(fp.optimal_a(fp.feature_statistics(qs, ks), scale=1.0))
    xi, yj = q[:, None], k[None]
    k2 = np.exp(2 * np.sum(xi * yj, -1))
    rel_oprf = ((ref_m2(xi, yj, a) - k2) / k2).mean()
    rel_saderf = ((ref_m2(qs[:, None], ks[None], a_s) - k2) / k2).mean()
    assert rel_saderf < 0.8 * rel_oprf, (rel_saderf, rel_oprf)


# --- the attention paths -------------------------------------------------------------------

D, M = 8, 24


def _problem(seed=0, batch=(2,), length=12, scale_q=1.0):
    rng = np.random.default_rng(seed)
    g = np.linspace(0.5, 1.5, D)
    q = rng.standard_normal((*batch, length, D)) * g * scale_q
    k = rng.standard_normal((*batch, length, D)) / g
    v = rng.standard_normal((*batch, length, 3))
    mask = rng.random((*batch, length)) > 0.3
    mask[..., 0] = True
    return q, k, v, mask


def _specs(xp, stats_np):
    """Estimators with parameters from arguments (causal-safe), and the reference's a, psi.
    On JAX (every new call signature compiles) one OPRF and one SADERF form only."""
    st = fp.FeatureStatistics(*(xp.asarray(s) for s in stats_np))
    scale = 1 / math.sqrt(D)
    a_o = ref_a(stats_np, scale)
    psi = ref_psi(stats_np)
    rs = (stats_np[0] * psi, stats_np[1] * psi**2, stats_np[2] / psi, stats_np[3] / psi**2)
    a_s = ref_a(rs, scale)
    specs = [
        ("oprf-fixed", fp.OPRF(a=-0.07), -0.07, None),
        ("oprf-array", fp.OPRF(a=xp.asarray(np.array([-0.1, 0.02]))), np.array([-0.1, 0.02]), None),
        ("oprf-stats", fp.OPRF(statistics=st), a_o, None),
        ("saderf-stats", fp.SADERF(statistics=st), a_s, psi),
        ("saderf-fixed", fp.SADERF(psi=xp.asarray(psi), a=-0.05), -0.05, psi),
    ]
    if xp.name.startswith("jax"):
        specs = [s for s in specs if s[0] in ("oprf-array", "saderf-stats")]
    return specs


def _past_stats():
    q, k, _, _ = _problem(seed=99)
    return ref_stats(q, k)


def test_attention_paths_match_reference(xp):
    """Bidirectional (key mask), causal, decoding in two blocks, the matrix and the feature
    maps against the float64 reference, for every estimator whose parameters come from
    arguments; and the data-driven ones against the reference with per-sequence statistics."""
    q, k, v, mask = _problem()
    w = fp.draw_projection(M, D, kind="simplex", seed=2)
    bq, bk, bv, bm, bw = (xp.asarray(a) for a in (q, k, v, mask, w))
    for name, est, a, psi in _specs(xp, _past_stats()):
        want = ref_attention(q, k, v, w, a, psi, mask=mask)
        got = xp.numpy(fp.favor_attention(bq, bk, bv, bw, kernel=est, key_mask=bm))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=name)
        want_c = ref_attention(q, k, v, w, a, psi, causal=True)
        got_c = xp.numpy(fp.favor_attention(bq, bk, bv, bw, kernel=est, causal=True, chunk_size=4))
        np.testing.assert_allclose(got_c, want_c, rtol=1e-9, atol=1e-12, err_msg=name)
        first, state = fp.favor_attention_step(
            bq[:, :5, :], bk[:, :5, :], bv[:, :5, :], bw, kernel=est
        )
        second, _ = fp.favor_attention_step(
            bq[:, 5:, :], bk[:, 5:, :], bv[:, 5:, :], bw, state, kernel=est
        )
        steps = np.concatenate([xp.numpy(first), xp.numpy(second)], axis=-2)
        np.testing.assert_allclose(steps, want_c, rtol=1e-9, atol=1e-12, err_msg=name)
        mat = xp.numpy(fp.favor_attention_matrix(bq, bk, bw, kernel=est, causal=True))
        np.testing.assert_allclose(mat @ v, want_c, rtol=1e-9, atol=1e-12, err_msg=name)
        fq = xp.numpy(fp.feature_map(bq, bw, kernel=est))
        fk = xp.numpy(fp.feature_map(bk, bw, kernel=est, role="key"))
        col = None if psi is None else np.asarray(psi)[..., None, :]
        qq, kk = (q, k) if psi is None else (q * col, k / col)
        scale = 1 / math.sqrt(D)
        np.testing.assert_allclose(fq, ref_oprf_features(qq, w, a, scale), rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(fk, ref_oprf_features(kk, w, a, scale), rtol=1e-9, err_msg=name)
    # Data-driven (bidirectional): statistics of this very call, masked keys left out.
    stats = ref_stats(q, k, mask)
    scale = 1 / math.sqrt(D)
    for kernel in ("softmax_oprf", fp.OPRF(), "softmax_saderf", fp.SADERF()):
        saderf = kernel == "softmax_saderf" or isinstance(kernel, fp.SADERF)
        psi = ref_psi(stats) if saderf else None
        st = stats
        if saderf:
            st = (stats[0] * psi, stats[1] * psi**2, stats[2] / psi, stats[3] / psi**2)
        want = ref_attention(q, k, v, w, ref_a(st, scale), psi, mask=mask)
        got = xp.numpy(fp.favor_attention(bq, bk, bv, bw, kernel=kernel, key_mask=bm))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=str(kernel))
        mat = xp.numpy(fp.favor_attention_matrix(bq, bk, bw, kernel=kernel, key_mask=bm))
        np.testing.assert_allclose(
            mat @ np.where(mask[..., None], v, 0), want, rtol=1e-9, atol=1e-12
        )


@pytest.mark.numpy_only
def test_blocked_cpu_path_matches_one_pass(numpy_backend):
    """A long bidirectional input takes the CPU's blocked path: same estimator."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 9000, D)) * 0.5
    v = rng.standard_normal((1, 9000, 2))
    w = fp.draw_projection(M, D, seed=0)
    got = fp.favor_attention(q, k, v, w, kernel="softmax_saderf")
    st = ref_stats(q, k)
    psi = ref_psi(st)
    rs = (st[0] * psi, st[1] * psi**2, st[2] / psi, st[3] / psi**2)
    a = ref_a(rs, 1 / math.sqrt(D))
    qq, kk = q * psi[..., None, :], k / psi[..., None, :]
    fq = ref_oprf_features(qq, w, a, 1 / math.sqrt(D))
    fk = ref_oprf_features(kk, w, a, 1 / math.sqrt(D))
    kv = np.swapaxes(fk, -1, -2) @ np.concatenate([v, np.ones((1, 9000, 1))], -1)
    out = fq @ kv
    np.testing.assert_allclose(got, out[..., :-1] / out[..., -1:], rtol=1e-9)


@pytest.mark.parametrize("kind", ["iid", "orthogonal", "simplex"])
def test_causal_no_leak(xp, kind):
    """Causal attention and decoding with every causal-safe estimator: rows before t are
    bit-identical whatever the later tokens hold (keys of norm 1e6, values of 1e30).
    (The kind of projection does not enter the causal recurrence: iid and orthogonal
    run on NumPy only, to keep the compiled backends' runs short.)"""
    if kind != "simplex" and xp.name != "numpy":
        pytest.skip("projection kinds other than simplex: NumPy only")
    q, k, v, _ = _problem(seed=1, length=16)
    w = xp.asarray(fp.draw_projection(M, D, kind=kind, seed=4))
    t = 7
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[:, t:] *= -3e3
    k2[:, t:] = 1e6
    v2[:, t:] = 1e30
    for name, est, _, _ in _specs(xp, _past_stats()):
        outs, steps = [], []
        for qq, kk, vv in ((q, k, v), (q2, k2, v2)):
            bq, bk, bv = xp.asarray(qq), xp.asarray(kk), xp.asarray(vv)
            outs.append(xp.numpy(fp.favor_attention(bq, bk, bv, w, kernel=est, causal=True)))
            first, st = fp.favor_attention_step(
                bq[:, :3, :], bk[:, :3, :], bv[:, :3, :], w, kernel=est
            )
            rest, _ = fp.favor_attention_step(
                bq[:, 3:, :], bk[:, 3:, :], bv[:, 3:, :], w, st, kernel=est
            )
            steps.append(np.concatenate([xp.numpy(first), xp.numpy(rest)], -2))
        assert np.array_equal(outs[0][:, :t], outs[1][:, :t]), name
        assert np.array_equal(steps[0][:, :t], steps[1][:, :t]), name
        assert np.all(np.isfinite(outs[1])), name


def test_data_driven_parameters_refused_where_they_would_leak(xp):
    q, k, v, _ = _problem()
    bq, bk, bv = (xp.asarray(a) for a in (q, k, v))
    w = xp.asarray(fp.draw_projection(M, D, seed=0))
    for kernel in ("softmax_oprf", "softmax_saderf", fp.OPRF(), fp.SADERF()):
        with pytest.raises(ValueError, match="later tokens"):
            fp.favor_attention(bq, bk, bv, w, kernel=kernel, causal=True)
        with pytest.raises(ValueError, match="later tokens"):
            fp.favor_attention_step(bq, bk, bv, w, kernel=kernel)
        with pytest.raises(ValueError, match="later tokens"):
            fp.favor_attention_matrix(bq, bk, w, kernel=kernel, causal=True)
        with pytest.raises(ValueError, match="one side"):
            fp.feature_map(bq, w, kernel=kernel)


def test_masked_keys_removed(xp):
    """Masked keys (even NaN / inf) change nothing, statistics included: the same as
    attention over the unmasked keys only."""
    q, k, v, _ = _problem(seed=3, batch=(), length=10)
    mask = np.array([True, False, True, True, False, True, True, True, False, True])
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[~mask] = np.nan
    v_bad[~mask] = np.inf
    w = xp.asarray(fp.draw_projection(M, D, kind="simplex", seed=1))
    for kernel in ("softmax_oprf", "softmax_saderf"):
        got = fp.favor_attention(
            xp.asarray(q), xp.asarray(k_bad), xp.asarray(v_bad), w, kernel=kernel,
            key_mask=xp.asarray(mask),
        )  # fmt: skip
        want = fp.favor_attention(
            xp.asarray(q), xp.asarray(k[mask]), xp.asarray(v[mask]), w, kernel=kernel
        )
        np.testing.assert_allclose(xp.numpy(got), xp.numpy(want), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_large_norms_stay_finite(xp, causal):
    """float32 inputs of scaled norm ~15 (and one query of 1e4): finite outputs, rows of
    softmax weights (no overflow in the features or in the parameters)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 64, 16)) * 15 / 2
    k = rng.standard_normal((2, 64, 16)) * 15 / 2
    q[0, 3] *= 1e3
    v = rng.standard_normal((2, 64, 4))
    w = xp.asarray(fp.draw_projection(64, 16, kind="simplex", seed=0), "float32")
    bq, bk, bv = (xp.asarray(a, "float32") for a in (q, k, v))
    st = fp.feature_statistics(bq, bk)
    kernels = [fp.OPRF(statistics=st), fp.SADERF(statistics=st)]
    if not causal:
        kernels += ["softmax_oprf", "softmax_saderf"]
    for kernel in kernels:
        with np.errstate(over="raise", invalid="raise"):
            out = xp.numpy(fp.favor_attention(bq, bk, bv, w, kernel=kernel, causal=causal))
        assert np.all(np.isfinite(out)), kernel
        assert np.all(np.abs(out) <= np.abs(v).max() * (1 + 1e-5)), kernel


def test_statistics_over_batch_axes_and_masks():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 2, 5, 4))
    k = rng.standard_normal((3, 2, 6, 4))
    mask = rng.random((3, 2, 6)) > 0.4
    st = fp.feature_statistics(q, k, key_mask=mask, axis=0)
    assert st.query_mean.shape == (1, 2, 4)
    np.testing.assert_allclose(st.query_sq_mean[0], (q * q).mean((0, 2)))
    sel = mask[..., None]
    want = np.where(sel, k, 0).sum((0, 2)) / sel.sum((0, 2))
    np.testing.assert_allclose(st.key_mean[0], want)
    per_seq = fp.feature_statistics(q, k, key_mask=mask)
    np.testing.assert_allclose(per_seq.key_sq_mean, ref_stats(q, k, mask)[3])
    st_heads = fp.feature_statistics(q, k, axis=-1)
    assert st_heads.key_mean.shape == (3, 1, 4)


def test_gradients_treat_parameters_as_constants():
    """Data-driven A and psi carry no gradient: the same gradients as with the values fixed."""
    torch = pytest.importorskip("torch")
    q, k, v, _ = _problem(seed=5)
    w = torch.asarray(fp.draw_projection(M, D, seed=0))
    stats = ref_stats(q, k)
    scale = 1 / math.sqrt(D)
    psi = ref_psi(stats)
    rs = (stats[0] * psi, stats[1] * psi**2, stats[2] / psi, stats[3] / psi**2)
    pairs = [
        ("softmax_oprf", fp.OPRF(a=torch.asarray(ref_a(stats, scale)))),
        ("softmax_saderf", fp.SADERF(psi=torch.asarray(psi), a=torch.asarray(ref_a(rs, scale)))),
    ]
    for data, fixed in pairs:
        grads = []
        for kernel in (data, fixed):
            tq, tk, tv = (torch.asarray(a, requires_grad=True) for a in (q, k, v))
            fp.favor_attention(tq, tk, tv, w, kernel=kernel).square().sum().backward()
            grads.append([t.grad for t in (tq, tk, tv)])
        for g0, g1 in zip(*grads):
            torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-12)


def test_jax_jit_and_grad():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v, _ = _problem(seed=6)
    w = jnp.asarray(fp.draw_projection(M, D, seed=0))
    st = fp.feature_statistics(jnp.asarray(q), jnp.asarray(k))

    def loss(q, k, v, st):
        out = fp.favor_attention(q, k, v, w, kernel=fp.SADERF(statistics=st), causal=True)
        return jnp.sum(out**2)

    eager = loss(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), st)
    jitted = jax.jit(loss)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), st)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-10)
    g = jax.jit(jax.grad(loss))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), st)
    assert np.all(np.isfinite(np.asarray(g)))

    # Fixed parameters held by an estimator built outside the caller's jit (concrete
    # arrays in the trace): checked on the host, the same result as eagerly.
    psi = jnp.asarray(np.linspace(0.8, 1.25, D))
    for est in (fp.SADERF(psi=psi, a=jnp.asarray(-0.05)), fp.OPRF(a=jnp.asarray(-0.05))):

        def run(q, est=est):
            return fp.favor_attention(q, jnp.asarray(k), jnp.asarray(v), w, kernel=est, causal=True)

        np.testing.assert_allclose(
            np.asarray(jax.jit(run)(jnp.asarray(q))), np.asarray(run(jnp.asarray(q))), rtol=1e-10
        )
    bad = fp.SADERF(psi=-psi, a=-0.05)
    with pytest.raises(ValueError, match="psi must be positive"):
        jax.jit(lambda q: fp.favor_attention(q, q, q, w, kernel=bad, causal=True))(jnp.asarray(q))


def test_init_causal_state_and_errors():
    w = fp.draw_projection(M, D, seed=0)
    state = fp.init_causal_state(w, 3, batch_shape=(2,), kernel=fp.OPRF(a=-0.1))
    assert state.numerator.shape == (2, M, 4)
    q, k, v, _ = _problem()
    with pytest.raises(ValueError, match="below 1/8"):
        fp.OPRF(a=0.2)
    with pytest.raises(ValueError, match="at most one"):
        fp.OPRF(a=-0.1, statistics=fp.feature_statistics(q, k))
    with pytest.raises(ValueError, match="both psi and a"):
        fp.SADERF(psi=np.ones(D))
    with pytest.raises(ValueError, match="feature dimension"):
        bad = fp.feature_statistics(q[..., :4], k[..., :4])
        fp.favor_attention(q, k, v, w, kernel=fp.OPRF(statistics=bad))
    with pytest.raises(ValueError, match="broadcast into"):
        fp.favor_attention(q, k, v, w, kernel=fp.OPRF(a=np.zeros((3, 2))))
    with pytest.raises(ValueError, match="psi must have shape"):
        fp.favor_attention(q, k, v, w, kernel=fp.SADERF(psi=np.ones(3), a=0.0))
    with pytest.raises(ValueError, match="positive"):
        fp.favor_attention(q, k, v, w, kernel=fp.SADERF(psi=-np.ones(D), a=0.0))
    with pytest.raises(ValueError, match="role"):
        fp.feature_map(q, w, kernel=fp.OPRF(a=0.0), role="value")
    with pytest.raises(ValueError, match="softmax_oprf"):
        fp.favor_attention(q, k, v, w, kernel="softmax_fancy")
    with pytest.raises(ValueError, match="kind"):
        fp.draw_projection(4, 4, kind="simplexx")
    # arrays of A are held to what numbers are: finite and below 1/8 everywhere
    for a in (np.array(-np.inf), np.array([-np.inf, 0.0]), np.array(0.2)):
        for est in (fp.OPRF(a=a), fp.SADERF(psi=np.ones(D), a=a)):
            with pytest.raises(ValueError, match="finite and below 1/8"):
                fp.favor_attention(q, k, v, w, kernel=est)


def test_oprf_second_moment_checks_its_arguments():
    x = np.array([0.3, -0.2, 0.1])
    for a in (0.125, 0.2, float("nan"), np.array([0.0, 0.2]), np.array(-np.inf)):
        with pytest.raises(ValueError, match="finite and below 1/8"):
            fp.oprf_second_moment(x, x, a)
    with pytest.raises(ValueError, match=r"x and y must have shape \(\.\.\., d\) with the same d"):
        fp.oprf_second_moment(x, x[:2], 0.0)
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        fp.oprf_second_moment(np.array([1, 2, 3]), x, 0.0)
    with pytest.raises(TypeError, match="a must be a real number"):
        fp.oprf_second_moment(x, x, None)
    # at A = 0, FAVOR+'s second moment: exp(2 |x + y|^2 - |x|^2 - |y|^2)
    y = np.array([0.1, 0.4, -0.3])
    expected = np.exp(2 * np.sum((x + y) ** 2) - np.sum(x * x) - np.sum(y * y))
    assert np.isclose(fp.oprf_second_moment(x, y, np.array(0.0)), expected, rtol=1e-12)
