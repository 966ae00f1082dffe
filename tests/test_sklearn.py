"""favorplus.sklearn.FavorFeatures: scikit-learn's estimator checks, the features
against independent formulas, unbiasedness and variance against closed forms, and use
in Pipeline / GridSearchCV / set_output.

Statistical tolerances: with ``kind="iid"`` the R random rows of one fit give R
independent per-row estimates Y_r of the kernel (their mean is the feature inner
product). Their mean is compared with the exact kernel within ``Z`` theoretical
standard errors ``sqrt(Var(Y) / R)``, and their sample variance with the closed-form
variance (Lemma 2 of Choromanski et al. 2021, here for the rescaled inputs) within
``Z`` standard errors ``sqrt((mu_4 - Var(Y)^2) / R)``; the moments E[Y^k] are exact
(log-normal for the positive and hyperbolic estimators, of a cosine of a Gaussian
for the trigonometric ones). Seeds are fixed; Z = 5 makes a false alarm ~1e-6 per
check.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # before scikit-learn imports SciPy
pytest.importorskip("sklearn")

from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks
from sklearn.utils.estimator_checks import parametrize_with_checks

import favorplus as fp
from favorplus.sklearn import FavorFeatures

from . import reference as ref

Z = 5.0

# One instance per estimator family the checks should see: every kernel, every feature
# map, both kinds and norms, odd widths (a single unpaired row) and gamma="scale".
INSTANCES = [
    FavorFeatures(),
    FavorFeatures(features="positive", kind="iid", center=False),
    FavorFeatures(features="trig", norms="sqrt_d", gamma="scale", n_components=7),
    FavorFeatures(kernel="softmax", features="hyperbolic", n_components=9, gamma=0.1),
    # exp(gamma |x|^2 / 2) of the checks' data (|x| up to ~150) must be representable
    FavorFeatures(kernel="softmax", features="trig", kind="iid", gamma=1e-3),
    FavorFeatures(kernel="relu", n_components=10),
]


# scikit-learn's own estimator test suite. No check is expected to fail: the ones that
# skip need hardware or libraries that are absent (CuPy, dpnp, CUDA, XPU, MPS).
@parametrize_with_checks(INSTANCES)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# Transformer checks that scikit-learn runs on its own transformers (sklearn/tests/
# test_common.py) but that check_estimator leaves out: set_output, feature names.
EXTRA_CHECKS = [
    "check_set_output_transform",
    "check_set_output_transform_pandas",
    "check_global_output_transform_pandas",
    "check_set_output_transform_polars",
    "check_global_set_output_transform_polars",
    "check_transformer_get_feature_names_out",
    "check_transformer_get_feature_names_out_pandas",
    "check_dataframe_column_names_consistency",
]


@pytest.mark.parametrize("name", EXTRA_CHECKS)
@pytest.mark.parametrize("estimator", INSTANCES[:4], ids=lambda e: repr(e))
def test_sklearn_transformer_checks(name, estimator):
    check = getattr(estimator_checks, name, None)
    if check is None:
        pytest.skip(f"this scikit-learn has no {name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        check(type(estimator).__name__, estimator)  # raises SkipTest without pandas/polars


# --- the features against independent formulas -------------------------------------------


def _data(n=5, d=4, seed=0, scale=0.5, offset=0.0):
    return np.random.default_rng(seed).standard_normal((n, d)) * scale + offset


@pytest.mark.parametrize("features", ["positive", "hyperbolic", "trig"])
@pytest.mark.parametrize("kernel", ["rbf", "softmax"])
def test_features_match_reference(kernel, features):
    """transform = the reference features of favorplus's own projection (even width)."""
    X, gamma = _data(offset=2.0), 0.3
    est = FavorFeatures(n_components=12, kernel=kernel, gamma=gamma, features=features)
    phi = est.set_params(random_state=3).fit(X).transform(X)
    rows = 6 if features != "positive" else 12
    w = fp.draw_projection(rows, 4, seed=3)
    np.testing.assert_array_equal(est.projection_, w)  # random_state=int: same matrix
    name = {"positive": "softmax", "hyperbolic": "softmax_hyperbolic", "trig": "softmax_trig"}
    if kernel == "rbf":
        c = X.mean(axis=0)
        np.testing.assert_allclose(est.center_, c, rtol=1e-15)
        xc = X - c
        expected = np.exp(-gamma * np.sum(xc**2, axis=1, keepdims=True)) * ref.features(
            xc, w, name[features], 2 * gamma
        )
    else:
        assert est.center_ is None
        expected = ref.features(X, w, name[features], gamma)
    assert phi.shape == (5, 12)
    np.testing.assert_allclose(phi, expected, rtol=1e-12, atol=1e-300)


def test_rbf_trig_is_random_fourier_features():
    X = _data(offset=50.0)  # far from the origin: no exp(|x|^2) factors anywhere
    est = FavorFeatures(n_components=8, features="trig", gamma=0.7, random_state=1).fit(X)
    u = (X - X.mean(axis=0)) @ est.projection_.T * math.sqrt(1.4)
    expected = np.concatenate([np.cos(u), np.sin(u)], axis=1) / 2.0
    np.testing.assert_allclose(est.transform(X), expected, rtol=1e-12, atol=1e-14)


def test_relu_and_callable_kernels():
    X, gamma = _data(), 0.5
    est = FavorFeatures(n_components=6, kernel="relu", gamma=gamma, random_state=2).fit(X)
    u = X @ est.projection_.T * math.sqrt(gamma)
    np.testing.assert_allclose(est.transform(X), np.maximum(u, 0) / math.sqrt(6), rtol=1e-13)
    cos = FavorFeatures(n_components=6, kernel=np.cos, gamma=gamma, random_state=2).fit(X)
    np.testing.assert_allclose(cos.transform(X), np.cos(u) / math.sqrt(6), rtol=1e-13)


def test_odd_width_layout():
    """An odd width: pairs from the first rows, then one feature of the last row."""
    X, gamma = _data(offset=1.0), 0.4
    for features in ("hyperbolic", "trig"):
        est = FavorFeatures(n_components=5, features=features, gamma=gamma, random_state=4)
        phi = est.fit_transform(X)
        assert phi.shape == (5, 5) and est.projection_.shape == (3, 4)
        xc = X - est.center_
        u = xc @ est.projection_.T * math.sqrt(2 * gamma)
        if features == "hyperbolic":
            damp = np.exp(-2 * gamma * np.sum(xc**2, axis=1, keepdims=True))
            expected = damp * np.concatenate(
                [np.exp(u[:, :2]) / math.sqrt(6), np.exp(-u[:, :2]) / math.sqrt(6),
                 np.exp(u[:, 2:]) / math.sqrt(3)],
                axis=1,
            )  # fmt: skip
        else:
            expected = np.concatenate(
                [np.cos(u[:, :2]), np.sin(u[:, :2]), np.cos(u[:, 2:]) - np.sin(u[:, 2:])], axis=1
            ) / math.sqrt(3)
        np.testing.assert_allclose(phi, expected, rtol=1e-12)


# --- unbiasedness and variance ------------------------------------------------------------


def _moments(features, kernel_value, z2, d2, k_max=4):
    """Raw moments E[Y^k], k = 1..k_max, of one row's estimate Y of the kernel.

    z2 = |z|^2 with z the rescaled sum (positive, hyperbolic), d2 = |delta|^2 with
    delta the rescaled difference (trig, rbf). With a = w . v ~ N(0, |v|^2):
    positive Y = K exp(a - |z|^2 / 2); hyperbolic Y = K exp(-|z|^2 / 2) cosh(a);
    trig Y = cos(a) with v = delta. E exp(c a) = exp(c^2 |v|^2 / 2) for real or
    imaginary c, and cosh^k, cos^k expand binomially.
    """
    out = []
    for k in range(1, k_max + 1):
        binom = [math.comb(k, j) / 2**k for j in range(k + 1)]
        if features == "positive":
            m = kernel_value**k * math.exp(-k * z2 / 2 + k * k * z2 / 2)
        elif features == "hyperbolic":
            s = sum(b * math.exp((k - 2 * j) ** 2 * z2 / 2) for j, b in enumerate(binom))
            m = kernel_value**k * math.exp(-k * z2 / 2) * s
        else:
            m = sum(b * math.exp(-((k - 2 * j) ** 2) * d2 / 2) for j, b in enumerate(binom))
        out.append(m)
    return out


def _row_estimates(phi_x, phi_y, rows):
    prod = phi_x * phi_y
    if prod.shape[-1] == 2 * rows:
        prod = prod[:rows] + prod[rows:]
    return rows * prod


@pytest.mark.parametrize("features", ["positive", "hyperbolic", "trig"])
@pytest.mark.parametrize(
    "sign", [1.0, -1.0], ids=["same-side", "opposite"]
)  # opposite: K(x, y) < 0.1
def test_rbf_unbiased_with_lemma2_variance(features, sign):
    d, gamma, rows = 4, 0.6, 40000
    rng = np.random.default_rng(11)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    center = np.array([3.0, -1.0, 0.5, 2.0])  # far from the origin: centering matters
    a, b = (0.6, 0.5) if sign > 0 else (1.2, 0.9)
    x, y = center + a * u, center + sign * b * u + 0.1 * rng.standard_normal(d)
    X = np.stack([x, y, 2 * center - x, 2 * center - y])  # mean = center
    kernel_value = float(rbf_kernel(x[None], y[None], gamma=gamma)[0, 0])
    n = rows if features == "positive" else 2 * rows
    est = FavorFeatures(n_components=n, gamma=gamma, features=features, kind="iid")
    phi = est.set_params(random_state=5).fit_transform(X)
    np.testing.assert_allclose(est.center_, center, atol=1e-12)
    estimates = _row_estimates(phi[0], phi[1], rows)
    z2 = 2 * gamma * np.sum((x + y - 2 * center) ** 2)
    d2 = 2 * gamma * np.sum((x - y) ** 2)
    m1, m2, m3, m4 = _moments(features, kernel_value, z2, d2)
    var = m2 - m1**2
    mu4 = m4 - 4 * m3 * m1 + 6 * m2 * m1**2 - 3 * m1**4
    assert abs(m1 - kernel_value) < 1e-12 * kernel_value  # the estimator is unbiased
    assert abs(estimates.mean() - kernel_value) < Z * math.sqrt(var / rows)
    assert abs(estimates.var() - var) < Z * math.sqrt((mu4 - var**2) / rows)
    if sign < 0:
        assert kernel_value < 0.1


@pytest.mark.parametrize("features", ["positive", "hyperbolic", "trig"])
def test_softmax_unbiased(features):
    gamma, rows = 0.5, 30000
    x, y = np.array([0.6, -0.3, 0.2]), np.array([-0.5, 0.4, 0.1])
    kernel_value = math.exp(gamma * x @ y)
    n = rows if features == "positive" else 2 * rows
    est = FavorFeatures(n_components=n, kernel="softmax", gamma=gamma, features=features)
    phi = est.set_params(kind="iid", random_state=6).fit_transform(np.stack([x, y]))
    estimates = _row_estimates(phi[0], phi[1], rows)
    z2 = gamma * np.sum((x + y) ** 2)
    d2 = gamma * np.sum((x - y) ** 2)
    if features == "trig":  # Y = exp(gamma (|x|^2 + |y|^2) / 2) cos(a)
        scale = math.exp(gamma * (x @ x + y @ y) / 2)
        m1, m2 = (scale**k * m for k, m in zip((1, 2), _moments("trig", 1.0, z2, d2, 2)))
    else:
        m1, m2 = _moments(features, kernel_value, z2, d2, 2)
    assert abs(m1 - kernel_value) < 1e-12 * kernel_value
    assert abs(estimates.mean() - kernel_value) < Z * math.sqrt((m2 - m1**2) / rows)


@pytest.mark.parametrize("features", ["hyperbolic", "trig"])
def test_unpaired_row_unbiased(features):
    """n_components=1: the single feature of an unpaired row, over many seeds.

    SE: the row's estimate is exp(a - |z|^2/2) K (hyperbolic: the positive estimator)
    or cos(a) - sin(b) (trig, a = w.delta, b = w.z; Var = (1 + K^4)/2 + (1 - exp(-2|z|^2))/2
    - K^2, since E[cos(a) sin(b)] = 0).
    """
    gamma, draws = 0.5, 1500
    X = np.array([[0.4, -0.2], [-0.3, 0.5], [0.8, 0.6]])
    c = X.mean(axis=0)
    x, y = X[0], X[1]
    kernel_value = float(rbf_kernel(X, gamma=gamma)[0, 1])
    z2 = 2 * gamma * np.sum((x + y - 2 * c) ** 2)
    if features == "hyperbolic":
        var = kernel_value**2 * (math.exp(z2) - 1)
    else:
        var = (1 + kernel_value**4) / 2 + (1 - math.exp(-2 * z2)) / 2 - kernel_value**2
    est = FavorFeatures(n_components=1, gamma=gamma, features=features, kind="iid")
    rng = np.random.default_rng(7)
    values = [
        float((lambda p: p[0, 0] * p[1, 0])(est.set_params(random_state=rng).fit_transform(X)))
        for _ in range(draws)
    ]
    assert abs(np.mean(values) - kernel_value) < Z * math.sqrt(var / draws)


def test_orthogonal_unbiased_block_means():
    """Orthogonal rows: blocks of d rows are independent; the SE of the mean over B
    blocks is the empirical std of the block means / sqrt(B)."""
    d, gamma, blocks = 4, 0.25, 8000
    X = _data(n=6, d=d, seed=3, scale=1.0)
    exact = rbf_kernel(X, gamma=gamma)
    for features in ("positive", "hyperbolic", "trig"):
        rows = d * blocks
        n = rows if features == "positive" else 2 * rows
        phi = FavorFeatures(n_components=n, gamma=gamma, features=features, random_state=8)
        phi = phi.fit_transform(X)
        prod = phi[:, None, :] * phi[None, :, :]
        if features != "positive":
            prod = prod[..., :rows] + prod[..., rows:]
        block_means = rows * prod.reshape(6, 6, blocks, d).mean(axis=-1)
        se = block_means.std(axis=-1) / math.sqrt(blocks)
        assert np.all(np.abs(block_means.mean(axis=-1) - exact) < Z * se + 1e-12), features


def test_orthogonal_lowers_the_error():
    """Theorem 2 in practice: over 30 fits, orthogonal rows give a smaller mean squared
    kernel error than iid rows at the same width (d = 16, 64 features)."""
    X = _data(n=20, d=16, seed=4, scale=0.3)
    exact = rbf_kernel(X, gamma=0.5)

    def mse(kind):
        errs = []
        for seed in range(30):
            phi = FavorFeatures(n_components=64, gamma=0.5, kind=kind, random_state=seed)
            phi = phi.fit_transform(X)
            errs.append(np.mean((phi @ phi.T - exact) ** 2))
        return np.mean(errs)

    assert mse("orthogonal") < 0.8 * mse("iid")


# --- numerics: no overflow, honest underflow ------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rbf_far_points_underflow_to_zero_rows(dtype):
    """A point far from the training data: each feature is one exp of its exact
    exponent (accurate where representable, 0 below), no NaN, no inf, no warning."""
    X = _data(n=30, d=8, seed=5).astype(dtype)
    est = FavorFeatures(n_components=64, gamma=1.0, random_state=0).fit(X)
    far = np.full((3, 8), 0.0, dtype=dtype)
    far[0, 0], far[1, 0], far[2, 0] = 5.0, 30.0, 1e6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        phi = est.transform(far)
    assert phi.dtype == dtype and np.all(np.isfinite(phi)) and np.all(phi >= 0)
    assert np.all(phi[2] == 0)  # exp(-2e12): all features underflow; K estimate 0
    # against an extended-precision evaluation of the same exponents
    xc = far.astype(np.longdouble) - est.center_.astype(np.longdouble)
    u = xc @ est.projection_.astype(np.longdouble).T * np.sqrt(np.longdouble(2.0))
    log = np.concatenate([u, -u], axis=1) - 2 * np.sum(xc**2, axis=1, keepdims=True)
    expected = np.exp(log - 0.5 * np.log(np.longdouble(64)))
    tiny = np.finfo(dtype).tiny
    ok = expected > tiny
    rtol = 1e-5 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(phi[ok], expected[ok].astype(np.float64), rtol=rtol)
    assert np.all(phi[expected < tiny * np.finfo(dtype).eps / 2] == 0)


def test_overflow_is_an_error():
    X = np.array([[40.0, 0.0], [0.0, 1.0]])  # exp(0.5 * 1600) > float64's largest
    est = FavorFeatures(n_components=8, kernel="softmax", features="trig", random_state=0)
    # 0.5 |x|^2 - 0.5 log(4 rows) = 800 - 0.69
    with pytest.raises(ValueError, match=r"a feature is exp\(799\.3\).* not representable"):
        est.fit_transform(X)
    assert np.all(np.isfinite(est.transform(X / 4)))  # exp(50): fine


def test_softmax_positive_features_never_overflow():
    X = np.array([[1e30, -1e30, 0.0], [3.0, 4.0, 0.0]])
    for features in ("positive", "hyperbolic"):
        est = FavorFeatures(n_components=16, kernel="softmax", features=features)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            phi = est.set_params(random_state=0).fit_transform(X)
        assert np.all(np.isfinite(phi)) and np.all(phi[0] == 0) and np.all(phi[1] > 0)


# --- scikit-learn conventions -------------------------------------------------------------


def test_pipeline_and_grid_search():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:600] / 16.0, y[:600]
    pipe = make_pipeline(FavorFeatures(random_state=0), RidgeClassifier(alpha=1e-3))
    grid = GridSearchCV(
        pipe,
        {"favorfeatures__gamma": [0.01, 0.05], "favorfeatures__n_components": [128, 256]},
        cv=3,
    ).fit(X, y)
    assert grid.best_params_["favorfeatures__n_components"] == 256
    assert grid.best_score_ > 0.9  # linear model on the raw pixels: ~0.9 with 600 images


def test_set_output_pandas_and_feature_names():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(_data(), columns=list("abcd"), index=list("vwxyz"))
    est = FavorFeatures(n_components=6, random_state=0).set_output(transform="pandas")
    out = est.fit_transform(df)
    assert list(out.columns) == [f"favorfeatures{i}" for i in range(6)]
    assert list(out.index) == list("vwxyz")
    assert list(est.feature_names_in_) == list("abcd") and est.n_features_in_ == 4
    np.testing.assert_allclose(
        out.to_numpy(), FavorFeatures(n_components=6, random_state=0).fit_transform(df.values)
    )


def test_random_state_conventions():
    X = _data()
    a = FavorFeatures(random_state=0).fit(X).projection_
    np.testing.assert_array_equal(a, FavorFeatures(random_state=0).fit(X).projection_)
    rs = np.random.RandomState(0)
    est = FavorFeatures(random_state=rs)
    first, second = est.fit(X).projection_.copy(), est.fit(X).projection_
    assert not np.array_equal(first, second)  # a RandomState instance advances
    np.random.seed(3)  # noqa: NPY002  (random_state=None draws from np.random)
    g1 = FavorFeatures().fit(X).projection_
    np.random.seed(3)  # noqa: NPY002  (random_state=None draws from np.random)
    np.testing.assert_array_equal(g1, FavorFeatures().fit(X).projection_)  # None: np.random
    gen = FavorFeatures(random_state=np.random.default_rng(1))
    assert not np.array_equal(gen.fit(X).projection_, gen.fit(X).projection_)
    cloned = clone(FavorFeatures(n_components=8, gamma=0.5, random_state=2))
    assert cloned.get_params()["n_components"] == 8 and not hasattr(cloned, "projection_")


def test_gamma_scale():
    X = _data(scale=3.0)
    est = FavorFeatures(gamma="scale", random_state=0).fit(X)
    assert est.gamma_ == pytest.approx(1.0 / (4 * X.var()))
    assert FavorFeatures(gamma="scale").fit(np.ones((3, 2))).gamma_ == 1.0


def test_float32_preserved_and_promoted():
    X = _data().astype(np.float32)
    est = FavorFeatures(random_state=0).fit(X)
    assert est.projection_.dtype == np.float32 and est.transform(X).dtype == np.float32
    assert est.transform(X.astype(np.float64)).dtype == np.float64
    assert FavorFeatures().fit(np.arange(8).reshape(4, 2)).transform([[1, 2]]).dtype == np.float64


def test_not_fitted():
    with pytest.raises(NotFittedError):
        FavorFeatures().transform(_data())


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"n_components": 0}, ValueError, "n_components must be at least 1; got 0"),
        ({"n_components": 2.5}, TypeError, "n_components must be an int; got float"),
        ({"n_components": True}, TypeError, "n_components must be an int; got bool"),
        ({"kernel": "laplacian"}, ValueError, "kernel must be one of .*'laplacian'"),
        ({"gamma": -1.0}, ValueError, "gamma must be finite and non-negative; got -1.0"),
        ({"gamma": float("inf")}, ValueError, "gamma must be finite and non-negative"),
        ({"gamma": "auto"}, ValueError, "gamma must be a non-negative float or 'scale'"),
        ({"gamma": None}, TypeError, "gamma must be a non-negative float or 'scale'"),
        ({"features": "cos"}, ValueError, "features must be one of .*'cos'"),
        ({"kind": "haar"}, ValueError, "kind must be one of .*'haar'"),
        ({"norms": "unit"}, ValueError, "norms must be one of .*'unit'"),
        ({"center": "yes"}, TypeError, "center must be a bool; got str"),
        ({"random_state": -1}, ValueError, r"random_state must be in \[0, 2\*\*32\); got -1"),
        ({"random_state": "0"}, TypeError, "random_state must be None, an int"),
    ],
)
def test_bad_parameters(params, error, match):
    with pytest.raises(error, match=match):
        FavorFeatures(**params).fit(_data())
