"""favorplus.sklearn.FavorFeatures under ``sklearn.set_config(array_api_dispatch=True)``,
tested the way scikit-learn tests its array API estimators: every (namespace, device,
dtype) of ``yield_namespace_device_dtype_combinations`` (those without their library or
hardware skip), the result compared with the NumPy result, in the input's namespace,
on its device, in its dtype.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # before scikit-learn imports SciPy
pytest.importorskip("sklearn")

from sklearn import config_context
from sklearn.base import clone
from sklearn.utils._array_api import (
    _atol_for_type,
    _convert_to_numpy,
    get_namespace,
    yield_namespace_device_dtype_combinations,
)
from sklearn.utils._array_api import device as array_device
from sklearn.utils._testing import _array_api_for_tests

from favorplus.sklearn import FavorFeatures

COMBINATIONS = list(yield_namespace_device_dtype_combinations())
IDS = ["-".join(str(p) for p in c) for c in COMBINATIONS]
PARAMS = [
    {},
    {"features": "positive", "kind": "iid"},
    {"features": "trig", "n_components": 7, "norms": "sqrt_d", "gamma": "scale"},
    {"kernel": "softmax", "features": "hyperbolic", "gamma": 0.2},
    {"kernel": "softmax", "features": "trig", "n_components": 9},
    {"kernel": "relu"},
]


def _array_api(namespace, device_name, dtype_name):
    try:
        return _array_api_for_tests(namespace, device_name, dtype_name)
    except Exception as exc:  # unittest.SkipTest: library or hardware missing
        pytest.skip(str(exc))


@pytest.mark.parametrize("array_namespace, device_name, dtype_name", COMBINATIONS, ids=IDS)
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_array_api_matches_numpy(params, array_namespace, device_name, dtype_name):
    xp, device = _array_api(array_namespace, device_name, dtype_name)
    dtype_name = dtype_name or "float64"
    X_np = np.random.default_rng(0).standard_normal((20, 5)).astype(dtype_name)
    X_np[:, 0] += 3.0  # away from the origin: the center matters
    est = FavorFeatures(**params, random_state=0)
    expected = clone(est).fit_transform(X_np)
    X_xp = xp.asarray(X_np, device=device)
    with config_context(array_api_dispatch=True):
        fitted = clone(est).fit(X_xp)
        out = fitted.transform(X_xp)
        out_ft = clone(est).fit_transform(X_xp)
        assert get_namespace(out)[0] is get_namespace(X_xp)[0]
        assert array_device(out) == array_device(X_xp)
        assert array_device(fitted.projection_) == array_device(X_xp)
        assert get_namespace(fitted.projection_)[0] is get_namespace(X_xp)[0]
        if fitted.center_ is not None:
            assert array_device(fitted.center_) == array_device(X_xp)
    assert out.dtype == X_xp.dtype
    out_np = _convert_to_numpy(out, xp=xp)
    assert out_np.dtype == expected.dtype
    # The same host-drawn matrix on every backend: the same features up to rounding.
    # (float32 cos/sin of arguments ~10 differ by ~1 ulp between libraries; the trig
    # softmax features multiply that by exp(gamma |x|^2 / 2): an absolute tolerance
    # relative to the largest feature.)
    rtol = 1e-5 if dtype_name == "float32" else 1e-10
    atol = max(_atol_for_type(dtype_name), rtol * float(np.abs(expected).max()))
    np.testing.assert_allclose(out_np, expected, rtol=rtol, atol=atol)
    np.testing.assert_allclose(_convert_to_numpy(out_ft, xp=xp), out_np, rtol=rtol, atol=0)


@pytest.mark.parametrize("namespace", ["array_api_strict", "torch"])
def test_pipeline_end_to_end(namespace):
    """FavorFeatures + Ridge (itself array API aware) on torch / strict arrays."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    xp, device = _array_api(namespace, "cpu" if namespace == "torch" else None, "float64")
    rng = np.random.default_rng(1)
    X = rng.uniform(-2, 2, size=(200, 3))
    y = np.sin(X[:, 0]) + X[:, 1] ** 2
    pipe = make_pipeline(
        FavorFeatures(n_components=200, gamma=0.1, random_state=0), Ridge(1e-3, solver="svd")
    )
    expected = clone(pipe).fit(X, y).predict(X)
    with config_context(array_api_dispatch=True):
        X_xp, y_xp = xp.asarray(X, device=device), xp.asarray(y, device=device)
        pred = pipe.fit(X_xp, y_xp).predict(X_xp)
        assert get_namespace(pred)[0] is get_namespace(X_xp)[0]
    pred_np = _convert_to_numpy(pred, xp=xp)
    np.testing.assert_allclose(pred_np, expected, rtol=1e-6, atol=1e-8)
    assert np.mean((pred_np - y) ** 2) < 0.05 * np.var(y)  # it does learn the function


def test_torch_without_dispatch_returns_numpy():
    torch = pytest.importorskip("torch")
    X = torch.randn(10, 3, dtype=torch.float64)
    est = FavorFeatures(random_state=0).fit(X)
    out = est.transform(X)
    assert isinstance(out, np.ndarray) and isinstance(est.projection_, np.ndarray)
    np.testing.assert_allclose(out, FavorFeatures(random_state=0).fit_transform(X.numpy()))


def test_namespace_mismatch_is_a_clear_error():
    torch = pytest.importorskip("torch")
    X = np.random.default_rng(0).standard_normal((10, 3))
    with config_context(array_api_dispatch=True):
        est = FavorFeatures(random_state=0).fit(torch.asarray(X))
        with pytest.raises(ValueError, match=r"FavorFeatures\.transform\(\) must use the same"):
            est.transform(X)
    # fitted on torch under dispatch, called without it: inputs become NumPy arrays
    with pytest.raises(ValueError, match=r"fit\(\) got torch.Tensor on cpu, transform"):
        est.transform(torch.asarray(X))
