"""FAVOR+ random features as a scikit-learn transformer: :class:`FavorFeatures`.

Positive (orthogonal) random features approximate the Gaussian kernel
``exp(-gamma |x - y|^2)`` and the softmax kernel ``exp(gamma x . y)`` with an error
that stays small, relative to the kernel value, where the kernel is small (where the
trigonometric features of :class:`sklearn.kernel_approximation.RBFSampler` are least
accurate). A linear model on the features is a kernel machine in time linear in the
number of samples.

The transformer follows scikit-learn's conventions (``fit`` draws the random matrix
from ``random_state``, ``set_output``, ``get_feature_names_out``, ``Pipeline`` and
``GridSearchCV``) and supports array API dispatch: under
``sklearn.set_config(array_api_dispatch=True)`` (with ``SCIPY_ARRAY_API=1`` in the
environment) it takes and returns torch, CuPy or array-api-strict arrays on their
device. Needs scikit-learn >= 1.6 (``pip install "favorplus[sklearn]"``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np
import sklearn  # noqa: F401  (a missing scikit-learn is a ModuleNotFoundError naming it)
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._array_api import get_namespace
from sklearn.utils.validation import check_is_fitted, validate_data

from ._backend import Array, add, exp, multiply, subtract
from .features import feature_parts, resolve_kernel
from .projection import draw_projection

__all__ = ["FavorFeatures"]

_KERNELS = ("rbf", "softmax", "relu")
_FEATURES = ("positive", "hyperbolic", "trig")
_KINDS = ("orthogonal", "iid")
_NORMS = ("chi", "sqrt_d")
# favorplus's feature map for each (kernel, features) of the exponential kernels
_SOFTMAX_MAPS = {
    "positive": "softmax",
    "hyperbolic": "softmax_hyperbolic",
    "trig": "softmax_trig",
}


class FavorFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Random features of the Gaussian or softmax kernel (FAVOR+, Performers).

    ``phi = FavorFeatures(...).fit_transform(X)`` gives features whose inner
    products estimate the kernel: ``phi @ phi.T ~ K(X, X)``, unbiased with the
    default ``norms="chi"``. A linear model on ``phi`` (ridge regression, logistic
    regression, a linear SVM) approximates the kernel machine.

    Parameters
    ----------
    n_components : int, default=100
        Number of features, the width of the output. ``features="hyperbolic"`` and
        ``"trig"`` make a pair of features from each of ``ceil(n_components / 2)``
        random rows; for an odd count the last row gives a single feature, weighted
        so that the estimate stays unbiased.
    kernel : {"rbf", "softmax", "relu"} or callable, default="rbf"
        The kernel to approximate:

        * ``"rbf"``: the Gaussian kernel ``exp(-gamma |x - y|^2)`` (as
          :func:`sklearn.metrics.pairwise.rbf_kernel`). It equals
          ``exp(-gamma |x|^2) exp(-gamma |y|^2) exp(2 gamma x . y)``: the softmax
          features of ``sqrt(2 gamma) (x - center_)`` times ``exp(-gamma |x - center_|^2)``,
          computed in one exponential.
        * ``"softmax"``: ``exp(gamma x . y)``.
        * ``"relu"``, or an elementwise callable ``f`` taking and returning
          arrays of the input's namespace: the generalized kernel
          ``E_w[f(sqrt(gamma) w . x) f(sqrt(gamma) w . y)]``, w ~ N(0, I), with
          features ``f(sqrt(gamma) W x) / sqrt(n_components)``; ``relu`` gives
          the arc-cosine kernel of order 1. ``features`` and ``center`` are
          ignored.
    gamma : float or "scale", default=1.0
        Kernel parameter (>= 0). ``"scale"`` uses ``1 / (n_features * X.var())``
        of the training data (1 where the variance is 0), as ``RBFSampler``.
    features : {"hyperbolic", "positive", "trig"}, default="hyperbolic"
        Estimator of the exponential kernels. ``"hyperbolic"``: positive
        antithetic pairs ``exp(+-w . x)`` (for iid rows, a lower variance than
        ``"positive"`` at equal width);
        ``"positive"``: FAVOR+'s ``exp(w . x - |x|^2 / 2)``; ``"trig"``: ``cos``
        and ``sin`` of ``w . x`` (for ``"rbf"``, classic random Fourier features;
        not positive, and inaccurate where the kernel is small).
    kind : {"orthogonal", "iid"}, default="orthogonal"
        Rows of the random matrix: Haar-distributed orthogonal blocks or iid
        Gaussian (see :func:`favorplus.draw_projection`).
    norms : {"chi", "sqrt_d"}, default="chi"
        Row lengths of orthogonal blocks: ``"chi"`` keeps the estimate unbiased,
        ``"sqrt_d"`` lowers the variance but estimates a regularized kernel
        (biased low).
    center : bool, default=True
        For ``kernel="rbf"``: subtract the training mean ``center_`` before the
        features. The Gaussian kernel does not change under a shift, but the
        variance of the positive estimators grows like
        ``exp(2 gamma |x + y - 2 center_|^2)``: centering is what keeps them
        usable for data away from the origin. Ignored by the other kernels.
    random_state : int, RandomState instance, numpy.random.Generator or None, default=None
        Seed of the random matrix. An int gives the matrix of
        ``favorplus.draw_projection(rows, n_features_in_, kind=kind, norms=norms,
        seed=random_state)`` on every backend.

    Attributes
    ----------
    projection_ : array of shape (rows, n_features_in_)
        The random matrix W, rows ~ N(0, I) before any ``gamma`` scaling; ``rows``
        is ``ceil(n_components / 2)`` for paired features, else ``n_components``. In
        the namespace, device and floating dtype of the training data.
    center_ : array of shape (n_features_in_,) or None
        Training mean subtracted before the features (``kernel="rbf"`` with
        ``center=True``), else None.
    gamma_ : float
        The ``gamma`` used (``"scale"`` resolved).
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during ``fit``, where ``X`` had string column names.

    Notes
    -----
    **Accuracy.** For the exponential kernels with positive features and iid rows,
    the relative mean squared error of one kernel value is
    ``(exp(|z|^2) - 1) / n_components`` with ``z = sqrt(2 gamma) (x + y - 2 center_)``
    (``"rbf"``) or ``sqrt(gamma) (x + y)`` (``"softmax"``); hyperbolic features
    multiply it by ``1 - exp(-|z|^2)``, orthogonal rows lower it further. It is
    small where ``x`` and ``y`` lie on opposite sides of the center, which is
    where the Gaussian kernel is small; ``RBFSampler``'s relative error is about
    ``1 / (n_components K(x, y)^2)`` there. Conversely, for nearby points far from
    the center (large ``gamma |x - center_|^2``) the positive estimators are worse
    than trigonometric features: see the user guide's kernel-methods page.

    **Underflow.** Each feature is one ``exp`` of its exact exponent, so it is
    accurate to the dtype's rounding wherever it is representable. The exponent of
    a point is at most ``|w|^2 / 4`` (``"rbf"``) or ``|w|^2 / 2`` (``"softmax"``):
    positive features never overflow. For a point far from the center they
    underflow: below about ``exp(-745)`` in float64 (``exp(-103)`` in float32) a
    feature is 0, and a row whose features are all 0 estimates the kernel with
    every point as exactly 0. That happens only where ``2 gamma |x - center_|^2``
    is in the hundreds, far beyond the region where the estimator has any
    accuracy (its relative variance there exceeds ``exp(100) / n_components``).
    Trigonometric ``"rbf"`` features are bounded and never underflow. A feature
    that would overflow is an error (``ValueError``), not ``inf``: it happens for
    the softmax kernel with trigonometric features, whose factor
    ``exp(gamma |x|^2 / 2)`` exceeds the dtype beyond ``gamma |x|^2 / 2 ~ 709``
    (88 in float32), where ``exp(gamma x . x)`` itself is not representable.

    See Also
    --------
    sklearn.kernel_approximation.RBFSampler : trigonometric random Fourier features.
    sklearn.kernel_approximation.Nystroem : data-dependent kernel approximation.
    favorplus.feature_map : the same feature maps on arrays of any backend.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.metrics.pairwise import rbf_kernel
    >>> from favorplus.sklearn import FavorFeatures
    >>> X = np.random.default_rng(0).standard_normal((6, 4))
    >>> phi = FavorFeatures(n_components=4096, gamma=0.05, random_state=0).fit_transform(X)
    >>> phi.shape
    (6, 4096)
    >>> err = np.abs(phi @ phi.T - rbf_kernel(X, gamma=0.05)).max()
    >>> bool(err < 0.05)
    True
    """

    def __init__(
        self,
        *,
        n_components: int = 100,
        kernel: str | Callable[[Array], Array] = "rbf",
        gamma: float | str = 1.0,
        features: str = "hyperbolic",
        kind: str = "orthogonal",
        norms: str = "chi",
        center: bool = True,
        random_state: int | np.random.RandomState | np.random.Generator | None = None,
    ) -> None:
        self.n_components = n_components
        self.kernel = kernel
        self.gamma = gamma
        self.features = features
        self.kind = kind
        self.norms = norms
        self.center = center
        self.random_state = random_state

    # -- scikit-learn API -------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> FavorFeatures:
        """Draw the random matrix (and, for ``"rbf"``, take the training mean).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data. Under ``array_api_dispatch=True`` an array of any array
            API library; the fitted arrays then live in its namespace and device.
        y : None
            Ignored.

        Returns
        -------
        self : FavorFeatures
            The fitted transformer.
        """
        rows = self._check_params()
        X = self._validate(X, reset=True)
        xp = array_api_compat.array_namespace(X)
        n_features = X.shape[1]
        self.gamma_ = self._resolve_gamma(xp, X)
        self.projection_ = draw_projection(
            rows,
            n_features,
            kind=self.kind,
            norms=self.norms,
            seed=self._seed(),
            like=X,
        )
        if self._uses_center():
            self.center_ = xp.mean(X, axis=0)
        else:
            self.center_ = None
        self._n_features_out = self.n_components
        return self

    def transform(self, X: Any) -> Array:
        """The random features of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data, in the namespace and on the device used in ``fit``.

        Returns
        -------
        array of shape (n_samples, n_components)
            Features in the namespace and on the device of ``X``, in the promoted
            floating dtype of ``X`` and ``projection_`` (float32 stays float32
            when fitted on float32). ``phi(X) @ phi(Y).T`` estimates the kernel.
        """
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        self._check_same_namespace(X, "transform")
        return self._features(X)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.array_api_support = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- internals --------------------------------------------------------------------

    def _check_params(self) -> int:
        """Check the parameters; return the number of random rows."""
        n = self.n_components
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n_components must be an int; got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"n_components must be at least 1; got {n}")
        kernel = self.kernel
        if not callable(kernel) and kernel not in _KERNELS:
            raise ValueError(
                f"kernel must be one of {_KERNELS} or an elementwise callable; got {kernel!r}"
            )
        gamma = self.gamma
        if isinstance(gamma, str):
            if gamma != "scale":
                raise ValueError(f"gamma must be a non-negative float or 'scale'; got {gamma!r}")
        elif isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
            raise TypeError(
                f"gamma must be a non-negative float or 'scale'; got {type(gamma).__name__}"
            )
        elif not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be finite and non-negative; got {gamma!r}")
        if self.features not in _FEATURES:
            raise ValueError(f"features must be one of {_FEATURES}; got {self.features!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}; got {self.kind!r}")
        if self.norms not in _NORMS:
            raise ValueError(f"norms must be one of {_NORMS}; got {self.norms!r}")
        if not isinstance(self.center, (bool, np.bool_)):
            raise TypeError(f"center must be a bool; got {type(self.center).__name__}")
        rs = self.random_state
        if not (rs is None or isinstance(rs, (np.random.RandomState, np.random.Generator))) and (
            isinstance(rs, bool) or not isinstance(rs, numbers.Integral)
        ):
            raise TypeError(
                "random_state must be None, an int, a numpy.random.RandomState or a "
                f"numpy.random.Generator; got {type(rs).__name__}"
            )
        if isinstance(rs, numbers.Integral) and not 0 <= rs < 2**32:
            raise ValueError(f"random_state must be in [0, 2**32); got {rs}")
        return (n + 1) // 2 if self._paired() else n

    def _paired(self) -> bool:
        return self.kernel in ("rbf", "softmax") and self.features in ("hyperbolic", "trig")

    def _uses_center(self) -> bool:
        return self.kernel == "rbf" and bool(self.center)

    def _seed(self) -> int | np.random.Generator:
        rs = self.random_state
        if isinstance(rs, np.random.Generator):
            return rs
        if isinstance(rs, numbers.Integral):
            return int(rs)
        # None (NumPy's global RandomState, as scikit-learn does) or a RandomState.
        return int(check_random_state(rs).randint(0, 2**31 - 1))

    def _validate(self, X: Any, *, reset: bool) -> Array:
        sk_xp, _ = get_namespace(X)
        return validate_data(self, X, reset=reset, dtype=[sk_xp.float64, sk_xp.float32])

    def _resolve_gamma(self, xp: Any, X: Array) -> float:
        if self.gamma != "scale":
            return float(self.gamma)
        var = float(xp.var(X))
        return 1.0 / (X.shape[1] * var) if var > 0 else 1.0

    def _check_same_namespace(self, X: Array, method: str) -> None:
        """The fitted arrays and ``X`` share a namespace and a device (scikit-learn's
        rule for array API estimators)."""
        w = self.projection_
        fit_ns, x_ns = array_api_compat.array_namespace(w), array_api_compat.array_namespace(X)
        fit_dev, x_dev = array_api_compat.device(w), array_api_compat.device(X)
        if fit_ns is x_ns and fit_dev == x_dev:
            return
        raise ValueError(
            f"Inputs passed to {type(self).__name__}.{method}() must use the same namespace "
            f"and the same device as those passed to fit(); fit() got {_describe(w)} on "
            f"{fit_dev}, {method}() got {_describe(X)} on {x_dev} (with "
            "sklearn.set_config(array_api_dispatch=True), arrays keep their namespace; "
            "without it, inputs become NumPy arrays). Fit again on data like X, or move "
            "the estimator with sklearn.utils._array_api.move_estimator_to."
        )

    def _features(self, X: Array) -> Array:
        xp = array_api_compat.array_namespace(X)
        w = self.projection_
        dtype = xp.result_type(X.dtype, w.dtype)
        x = xp.astype(X, dtype, copy=False)
        w = xp.astype(w, dtype, copy=False)
        if self.center_ is not None:
            x = x - xp.astype(self.center_, dtype, copy=False)
        gamma, rows, n = self.gamma_, w.shape[0], self.n_components
        if self.kernel not in ("rbf", "softmax"):
            # generalized kernel: f(sqrt(gamma) W x) / sqrt(m)
            parts = feature_parts(xp, x, w, resolve_kernel(self.kernel), gamma, row_constants=False)
            return parts.sign / math.sqrt(rows)
        rbf = self.kernel == "rbf"
        # rbf: the softmax features of x' = sqrt(2 gamma) x, times exp(-gamma |x|^2)
        scale = 2.0 * gamma if rbf else gamma
        u = feature_parts(xp, x, w, resolve_kernel("softmax"), scale, row_constants=False).log
        pairs = n // 2 if self._paired() else 0
        lone = rows > pairs  # hyperbolic / trig with odd n_components: one unpaired row
        # The row constants of the exponent, as one coefficient of |x|^2: -|x'|^2 / 2 for
        # positive and hyperbolic features, +|x'|^2 / 2 for trig; rbf adds -gamma |x|^2.
        # For trigonometric rbf features they cancel exactly (coef == 0).
        sign = 1.0 if self.features == "trig" else -1.0
        coef = sign * 0.5 * scale - (gamma if rbf else 0.0)
        row = None
        if coef != 0.0:
            row = coef * xp.sum(x * x, axis=-1, keepdims=True)
        if self.features == "positive":
            log = u if row is None else add(xp, u, row, owned=True)
            log = subtract(xp, log, 0.5 * math.log(rows), owned=True)
            return exp(xp, self._check_exponent(xp, log), owned=True)
        # Pairs from rows[:pairs]; an unpaired last row gives one feature whose weight
        # makes the average over rows unbiased: exp(+u) (hyperbolic), or
        # cos(u) - sin(u) (trig; E[sin(w . (x + y))] = 0 as w and -w are equally likely).
        head = u[:, :pairs]
        if self.features == "hyperbolic":
            pieces = [head, -head] + ([u[:, pairs:] + 0.5 * math.log(2.0)] if lone else [])
            log = xp.concat(pieces, axis=-1)
            if row is not None:
                log = add(xp, log, row, owned=True)
            log = subtract(xp, log, 0.5 * math.log(2 * rows), owned=True)
            return exp(xp, self._check_exponent(xp, log), owned=True)
        pieces = [xp.cos(head), xp.sin(head)]
        if lone:
            last = u[:, pairs:]
            pieces.append(xp.cos(last) - xp.sin(last))
        out = xp.concat(pieces, axis=-1)
        if row is None:
            return multiply(xp, out, 1.0 / math.sqrt(rows), owned=True)
        log = self._check_exponent(xp, row - 0.5 * math.log(rows))
        return multiply(xp, out, xp.exp(log), owned=True)

    def _check_exponent(self, xp: Any, log: Array) -> Array:
        """``log``, after checking that its exponential is finite in its dtype.

        Features that overflow are features whose exact value is not representable
        (for the softmax kernel, ``exp(gamma x . x)`` itself is not): an error, not inf.
        """
        top = float(xp.max(log))
        limit = math.log(float(xp.finfo(log.dtype).max))
        if top >= limit:
            hints = ["lower gamma", "scale X down"]
            if log.dtype == xp.float32:
                hints.append("use float64")
            if self.features == "trig":
                hints.append("use positive features")
            raise ValueError(
                f"{type(self).__name__}.transform: a feature is exp({top:.4g}), beyond the "
                f"largest {log.dtype} (exp({limit:.4g})): the {self.kernel!r} kernel's "
                f"{self.features!r} features of this X are not representable; " + ", ".join(hints)
            )
        return log


def _describe(x: Any) -> str:
    kind = type(x)
    return f"{kind.__module__.split('.')[0]}.{kind.__name__}"
