"""Lower-variance softmax estimators: OPRF (FAVOR++) and SADERF (FAVOR#), and their parameters.

All formulas are for inputs already multiplied by ``sqrt(scale)``: ``x = sqrt(s) q``,
``y = sqrt(s) k``, kernel ``exp(x . y)``.

**OPRF** (optimal positive random features, Likhosherstov et al., NeurIPS 2022,
arXiv 2205.15317). One feature of a row ``w ~ N(0, I_d)``::

    f(w, x) = D exp(A |w|^2 + B w . x - |x|^2 / 2),   B = sqrt(1 - 4A),  D = (1 - 4A)^(d/4)

with ``A < 1/8``. ``E[f(w, x) f(w, y)] = exp(x . y)`` for every such A (a Gaussian integral:
``E exp(2A|w|^2 + b . w) = (1 - 4A)^(-d/2) exp(|b|^2 / (2 (1 - 4A)))``), and ``A = 0`` is
FAVOR+. The second moment of one feature is, by the same integral::

    M2(A) = (1 - 4A)^d (1 - 8A)^(-d/2) exp(2 (1 - 4A) / (1 - 8A) |x + y|^2 - |x|^2 - |y|^2)

Averaging ``log M2`` over all pairs of queries and keys and setting its derivative in A to
zero gives ``16 d A (1 - 8A) + 8 S (1 - 4A) = 0`` with ``S = mean_ij |x_i + y_j|^2``,
i.e. ``16 A^2 - 2 (1 - 2 rho) A - rho = 0`` with ``rho = S / d``, whose root below 1/8 is::

    A* = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16 <= 0,
    S = mean |x|^2 + mean |y|^2 + 2 mean(x) . mean(y)

(note the division by d: without it A* is far too negative). One A serves all the queries
and keys that interact (one per sequence and head).

**SADERF** (FAVOR#, Likhosherstov et al., arXiv 2302.00787): queries are rescaled per
coordinate by ``psi_l = (mean_j y_jl^2 / mean_i x_il^2)^(1/4)`` and keys by ``1 / psi_l``
(the kernel ``exp(x . y)`` is unchanged), which balances their per-coordinate second
moments and minimises ``S`` over diagonal rescalings up to the cross term; then OPRF with
``A*`` of the rescaled statistics. The rescaled inputs are never formed: ``psi`` goes
into the projection rows, ``w . (psi x) = (w psi) . x`` (one side's rows ``W diag(psi)``,
the other's ``W diag(1/psi)``), so SADERF's features cost what OPRF's do.

**Where the parameters come from.** Every estimator here is a frozen object passed as
``kernel=`` to :func:`~favorplus.favor_attention`, :func:`~favorplus.favor_attention_step`,
:func:`~favorplus.feature_map`, :func:`~favorplus.favor_attention_matrix` and
:func:`~favorplus.init_causal_state`:

* ``OPRF()`` / ``"softmax_oprf"`` and ``SADERF()`` / ``"softmax_saderf"``: the parameters
  are computed from the call's own queries and keys (masked keys excluded), per sequence,
  and treated as constants (no gradient flows through them). Bidirectional attention only:
  in causal attention and decoding they would make every output depend on later tokens,
  which is refused.
* ``OPRF(statistics=...)`` / ``SADERF(statistics=...)``: from :class:`FeatureStatistics`
  the caller supplies (from a previous batch, a calibration set, or a layer's running
  averages: :func:`feature_statistics` computes them from a batch, and they average
  linearly, like BatchNorm's). Causal-safe.
* ``OPRF(a=...)`` / ``SADERF(psi=..., a=...)``: fixed values. Causal-safe.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from ._backend import (
    Array,
    Namespace,
    broadcast_shapes,
    call_core,
    check_float,
    common_namespace,
    device,
    host_readable,
    is_jax,
    stop_gradient,
    subtract,
)
from .features import FeatureParts, Kernel, register_resolver

__all__ = [
    "ESTIMATORS",
    "OPRF",
    "SADERF",
    "FeatureStatistics",
    "feature_statistics",
    "optimal_a",
    "saderf_psi",
    "oprf_second_moment",
]

ESTIMATORS = ("softmax_oprf", "softmax_saderf")
_FIELDS = ("query_mean", "query_sq_mean", "key_mean", "key_sq_mean")

# Bounds that keep every parameter finite whatever the data (overflowed statistics, a
# coordinate that is zero in all queries): rho is clipped to [0, RHO_MAX] and psi^4 to
# [PSI4_MIN, 1 / PSI4_MIN]. Any A < 1/8 and any psi > 0 keep the estimator unbiased.
RHO_MAX = 1e8
PSI4_MIN = 1e-8
A_MAX = 0.125


class FeatureStatistics(NamedTuple):
    """Per-coordinate first and second moments of the (unscaled) queries and keys.

    All four arrays have shape ``(..., d)``; the leading dimensions broadcast into the
    attention's batch dimensions (e.g. ``(heads, d)`` or ``(1, heads, d)`` for
    ``(batch, heads, L, d)`` inputs: one set of parameters per head). They are means, so
    statistics of several batches combine linearly: a layer can keep exponential moving
    averages of them like BatchNorm's running mean (a tuple of arrays: a JAX pytree).

    Attributes
    ----------
    query_mean, query_sq_mean : array, shape (..., d)
        ``mean_i q_il`` and ``mean_i q_il^2`` over the query positions.
    key_mean, key_sq_mean : array, shape (..., d)
        The same over the (unmasked) key positions.
    """

    query_mean: Array
    query_sq_mean: Array
    key_mean: Array
    key_sq_mean: Array


def _stats(
    xp: Namespace, q: Array, k: Array, key_mask: Array | None, axes: tuple[int, ...]
) -> FeatureStatistics:
    """Means over the sequence axis and the leading ``axes`` (kept as size 1)."""

    def mean(x: Array, weight: Array | None) -> tuple[Array, Array]:
        if weight is None:
            count = float(x.shape[-2] * math.prod([x.shape[a] for a in axes]))
            s1 = xp.sum(x, axis=-2)
            s2 = xp.sum(x * x, axis=-2)
            if axes:
                s1 = xp.sum(s1, axis=axes, keepdims=True)
                s2 = xp.sum(s2, axis=axes, keepdims=True)
            return s1 / max(count, 1.0), s2 / max(count, 1.0)
        xw = x * weight
        s1 = xp.sum(xw, axis=-2)
        s2 = xp.sum(xw * x, axis=-2)
        n = xp.sum(weight, axis=-2)
        if axes:
            s1 = xp.sum(s1, axis=axes, keepdims=True)
            s2 = xp.sum(s2, axis=axes, keepdims=True)
            n = xp.sum(n, axis=axes, keepdims=True)
        n = xp.maximum(n, xp.ones_like(n))
        return s1 / n, s2 / n

    qm, qs = mean(q, None)
    if key_mask is None:
        km, ks = mean(k, None)
    else:
        weight = xp.astype(key_mask, k.dtype)[..., None]
        kz = xp.where(key_mask[..., None], k, 0.0)
        km, ks = mean(kz, weight)
    return FeatureStatistics(qm, qs, km, ks)


def feature_statistics(
    q: Array,
    k: Array,
    *,
    key_mask: Array | None = None,
    axis: int | tuple[int, ...] | None = None,
) -> FeatureStatistics:
    """Per-coordinate means and mean squares of queries and keys, for OPRF and SADERF.

    The statistics that :class:`OPRF` and :class:`SADERF` take as ``statistics=``. They
    carry no gradient (the estimators' parameters are constants). Averaged over the
    sequence axis (-2) and over the leading ``axis`` (kept as size-1 dimensions, so that
    the result broadcasts into the inputs' batch dimensions).

    Parameters
    ----------
    q : array, shape (..., Lq, d)
    k : array, shape (..., Lk, d)
        Queries and keys, unscaled (the scale is applied where the parameters are used).
    key_mask : bool array, shape (..., Lk), optional
        True where a key takes part; masked keys (whatever their values) are left out.
    axis : int or tuple of int, optional
        Leading (batch) axes of ``q`` / ``k`` to average over as well, e.g. ``0`` for
        per-head statistics of ``(batch, heads, L, d)`` inputs. Negative values count from
        the batch dimensions' end (``-1`` is the axis just before the sequence axis).

    Returns
    -------
    FeatureStatistics
        Four arrays of shape ``(..., d)`` in the compute dtype (float32 for half inputs).

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import feature_statistics
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 4, 8, 100, 16))   # (batch, heads, L, d)
    >>> st = feature_statistics(q, k, axis=0)             # one set per head
    >>> st.query_mean.shape, st.key_sq_mean.shape
    ((1, 8, 16), (1, 8, 16))
    """
    from ._backend import compute_dtype

    xp = common_namespace(q=q, k=k, key_mask=key_mask)
    for name, x in (("q", q), ("k", k)):
        check_float(xp, name, x)
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (..., L, d); got shape {tuple(x.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same feature dimension; got q.shape={tuple(q.shape)} "
            f"and k.shape={tuple(k.shape)}"
        )
    if key_mask is not None:
        if key_mask.dtype != xp.bool or key_mask.ndim < 1 or key_mask.shape[-1] != k.shape[-2]:
            raise ValueError(
                f"key_mask must be a boolean array of shape (..., {k.shape[-2]}); "
                f"got dtype {key_mask.dtype} and shape {tuple(key_mask.shape)}"
            )
    nbatch = max(q.ndim, k.ndim, 0 if key_mask is None else key_mask.ndim + 1) - 2
    axes = _check_axes(axis, nbatch)
    dtype = compute_dtype(xp, q, k)
    batch = broadcast_shapes(
        q.shape[:-2],
        k.shape[:-2],
        () if key_mask is None else key_mask.shape[:-1],
        names=["q", "k", "key_mask"],
    )
    qc = _expand(xp, stop_gradient(xp.astype(q, dtype, copy=False)), batch, axes)
    kc = _expand(xp, stop_gradient(xp.astype(k, dtype, copy=False)), batch, axes)
    mask = None
    if key_mask is not None:
        mask = key_mask
        if axes:
            mask = xp.broadcast_to(mask, (*batch, mask.shape[-1]))
    return _stats(xp, qc, kc, mask, axes)


def _expand(xp: Namespace, x: Array, batch: tuple[int, ...], axes: tuple[int, ...]) -> Array:
    """``x`` with the full batch dimensions where it is averaged over leading axes."""
    if not axes:
        return x
    return xp.broadcast_to(x, (*batch, *x.shape[-2:]))


def _check_axes(axis: Any, nbatch: int) -> tuple[int, ...]:
    if axis is None:
        return ()
    items = axis if isinstance(axis, tuple) else (axis,)
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"axis must be an int, a tuple of ints or None; got {axis!r}")
        if not -nbatch <= a < nbatch:
            raise ValueError(
                f"axis must name leading (batch) axes, in [{-nbatch}, {nbatch}); got {axis!r}"
            )
        out.append(int(a) % nbatch)
    return tuple(sorted(set(out)))


def _rho(xp: Namespace, st: FeatureStatistics, scale: float) -> Array:
    """``rho = scale (sum_l E q_l^2 + E k_l^2 + 2 E q_l E k_l) / d``, clipped to [0, RHO_MAX]."""
    dim = st.query_mean.shape[-1]
    total = xp.sum(st.query_sq_mean, axis=-1) + xp.sum(st.key_sq_mean, axis=-1)
    cross = xp.sum(st.query_mean * st.key_mean, axis=-1)
    rho = (total + 2.0 * cross) * (scale / dim)
    rho = xp.where(xp.isnan(rho), RHO_MAX, rho)
    return xp.clip(rho, 0.0, RHO_MAX)


def _a_from_rho(xp: Namespace, rho: Array) -> Array:
    """The root ``(1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16``, written without
    cancellation: for small rho as ``-rho / (1 - 2 rho + sqrt(...))`` (the same number)."""
    root = xp.sqrt((2.0 * rho + 1.0) ** 2 + 8.0 * rho)
    direct = (1.0 - 2.0 * rho - root) / 16.0
    small = -rho / (1.0 - 2.0 * rho + root)
    return xp.where(rho < 0.25, small, direct)


def optimal_a(statistics: FeatureStatistics, *, scale: float | None = None) -> Array:
    """OPRF's closed-form optimal ``A*`` for the given statistics.

    ``A* = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16`` with
    ``rho = scale (mean|q|^2 + mean|k|^2 + 2 mean(q) . mean(k)) / d``: the minimiser of
    the log of OPRF's second moment averaged over all query-key pairs (module docstring).

    Parameters
    ----------
    statistics : FeatureStatistics
        From :func:`feature_statistics`.
    scale : float, optional
        The attention's inner-product scale, default ``1 / sqrt(d)``.

    Returns
    -------
    array, shape (...)
        ``A* <= 0`` (0 when queries and keys are 0: FAVOR+).

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import FeatureStatistics, optimal_a
    >>> d = 64
    >>> ones = np.full(d, 1.0)                  # E q_l^2 = E k_l^2 = 1, zero means
    >>> st = FeatureStatistics(0 * ones, ones, 0 * ones, ones)
    >>> rho = 2 * d / np.sqrt(d) / d            # scaled: (|x|^2 + |y|^2) / d = 0.25
    >>> a = optimal_a(st)
    >>> bool(np.isclose(a, (1 - 2 * rho - np.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16))
    True
    """
    xp = _stats_namespace(statistics)
    from ._validation import check_scale

    sc = check_scale(scale, statistics.query_mean.shape[-1])
    return _a_from_rho(xp, _rho(xp, statistics, sc))


def _psi(xp: Namespace, st: FeatureStatistics) -> Array:
    """``(E k_l^2 / E q_l^2)^(1/4)``, guarded against zero coordinates and clipped."""
    qs, ks = st.query_sq_mean, st.key_sq_mean
    level = 0.5 * (xp.mean(qs, axis=-1, keepdims=True) + xp.mean(ks, axis=-1, keepdims=True))
    tiny = 1e-12 * level + float(xp.finfo(qs.dtype).smallest_normal)
    ratio = (ks + tiny) / (qs + tiny)
    ratio = xp.where(xp.isnan(ratio), 1.0, ratio)
    return xp.sqrt(xp.sqrt(xp.clip(ratio, PSI4_MIN, 1.0 / PSI4_MIN)))


def saderf_psi(statistics: FeatureStatistics) -> Array:
    """SADERF's diagonal rescaling ``psi_l = (E k_l^2 / E q_l^2)^(1/4)``.

    Queries are multiplied by ``psi`` and keys divided by it (the kernel is unchanged).
    A coordinate that is zero in all queries or all keys is guarded (a relative
    ``1e-12`` added to both moments) and ``psi^4`` is clipped to ``[1e-8, 1e8]``.

    Returns
    -------
    array, shape (..., d)

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import FeatureStatistics, saderf_psi
    >>> z = np.zeros(2)
    >>> st = FeatureStatistics(z, np.array([1.0, 16.0]), z, np.array([16.0, 1.0]))
    >>> np.round(saderf_psi(st), 3)
    array([2. , 0.5])
    """
    return _psi(_stats_namespace(statistics), statistics)


def _rescaled(xp: Namespace, st: FeatureStatistics, psi: Array) -> FeatureStatistics:
    """Statistics of ``psi q`` and ``k / psi``."""
    sq = psi * psi
    return FeatureStatistics(
        st.query_mean * psi, st.query_sq_mean * sq, st.key_mean / psi, st.key_sq_mean / sq
    )


def _stats_namespace(statistics: Any) -> Namespace:
    if not (isinstance(statistics, tuple) and len(statistics) == 4):
        raise TypeError(
            "statistics must be a FeatureStatistics (query_mean, query_sq_mean, key_mean, "
            f"key_sq_mean); got {type(statistics).__name__}"
        )
    names = _FIELDS
    xp = common_namespace(**{f"statistics.{n}": a for n, a in zip(names, statistics)})
    shape = tuple(statistics[0].shape)
    for n, a in zip(names, statistics):
        check_float(xp, f"statistics.{n}", a)
        if a.ndim < 1 or tuple(a.shape[-1:]) != shape[-1:]:
            raise ValueError(
                f"statistics arrays must have shape (..., d) with one d; got statistics.{n} "
                f"of shape {tuple(a.shape)} and statistics.query_mean of shape {shape}"
            )
    return xp


def oprf_second_moment(x: Array, y: Array, a: Array | float) -> Array:
    """Closed-form ``E[(f(w, x) f(w, y))^2]`` of one OPRF feature, ``w ~ N(0, I_d)``.

    ``(1 - 4A)^d (1 - 8A)^(-d/2) exp(2 (1 - 4A) / (1 - 8A) |x + y|^2 - |x|^2 - |y|^2)``,
    for inputs already scaled (kernel ``exp(x . y)``) and ``A < 1/8``. The MSE of the
    estimate from m iid rows is ``(M2 - exp(2 x . y)) / m``; ``A = 0`` gives FAVOR+'s.

    Parameters
    ----------
    x, y : array, shape (..., d)
    a : float or array broadcasting with ``x[..., 0]``

    Returns
    -------
    array, shape (...)

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import oprf_second_moment
    >>> x = y = np.array([0.5, 0.0])
    >>> z2 = 1.0                               # |x + y|^2
    >>> bool(np.isclose(oprf_second_moment(x, y, 0.0), np.exp(2 * z2 - 0.5)))
    True
    """
    xp = common_namespace(x=x, y=y)
    check_float(xp, "x", x)
    check_float(xp, "y", y)
    if x.ndim < 1 or y.ndim < 1 or x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x and y must have shape (..., d) with the same d; got shapes {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    a = _check_a_value(a)
    if a is None:
        raise TypeError("a must be a real number or a floating array; got None")
    if not isinstance(a, float):
        common_namespace(x=x, a=a)
        check_float(xp, "a", a)
        _check_a_array(xp, a)
    d = x.shape[-1]
    z = x + y
    zz = xp.sum(z * z, axis=-1)
    rest = xp.sum(x * x, axis=-1) + xp.sum(y * y, axis=-1)
    a = xp.asarray(a, dtype=zz.dtype, device=device(zz))
    log = (
        d * xp.log(1.0 - 4.0 * a)
        - 0.5 * d * xp.log(1.0 - 8.0 * a)
        + 2.0 * (1.0 - 4.0 * a) / (1.0 - 8.0 * a) * zz
        - rest
    )
    return xp.exp(log)


# --- the estimator objects ---------------------------------------------------------------


def _check_a_value(a: Any) -> Any:
    if a is None:
        return None
    if isinstance(a, bool):
        raise TypeError(f"a must be a real number or a floating array; got {a!r}")
    if isinstance(a, numbers.Real):
        value = float(a)
        if not (math.isfinite(value) and value < A_MAX):
            raise ValueError(f"a must be finite and below 1/8 (finite variance); got {a!r}")
        return value
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"a must be a real number or a floating array; got {type(a).__name__}")
    return a


def _check_a_array(xp: Namespace, a: Array) -> None:
    """An array ``a`` that the host can read: finite and below 1/8 everywhere."""
    if host_readable(a) and not _holds(xp, a, lambda ns, x: ns.isfinite(x) & (x < A_MAX)):
        raise ValueError(f"a must be finite and below 1/8 (finite variance) everywhere; got {a}")


@dataclass(frozen=True, eq=False)
class OPRF:
    """FAVOR++: optimal positive random features ``D exp(A|w|^2 + B w.x - |x|^2/2)``.

    Pass as ``kernel=`` to the attention functions; ``"softmax_oprf"`` is ``OPRF()``.
    At most one of ``a`` and ``statistics``; with neither, A is the closed-form optimum
    for the call's own queries and keys (bidirectional calls only; no gradient flows
    through it). Unbiased for every A < 1/8 with chi-norm projections of any kind.

    Parameters
    ----------
    a : float or array, optional
        A fixed A < 1/8, a number or an array of shape broadcasting into the batch
        dimensions (e.g. one per head). ``a = 0`` is FAVOR+'s positive estimator.
    statistics : FeatureStatistics, optional
        Statistics (e.g. a layer's running averages) from which A is computed with
        :func:`optimal_a` at every call.

    Examples
    --------
    >>> import numpy as np
    >>> import favorplus as fp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 128, 16))
    >>> w = fp.draw_projection(64, 16, seed=0)
    >>> out = fp.favor_attention(q, k, v, w, kernel=fp.OPRF())   # A from q and k
    >>> st = fp.feature_statistics(q, k)                          # e.g. from the past
    >>> causal = fp.favor_attention(q, k, v, w, kernel=fp.OPRF(statistics=st), causal=True)
    >>> out.shape, causal.shape
    ((2, 128, 16), (2, 128, 16))
    """

    a: float | Array | None = None
    statistics: FeatureStatistics | None = None
    _estimator: ClassVar[str] = "oprf"

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _check_a_value(self.a))
        if self.a is not None and self.statistics is not None:
            raise ValueError("OPRF takes at most one of a and statistics; got both")


@dataclass(frozen=True, eq=False)
class SADERF:
    """FAVOR#: queries rescaled by ``psi``, keys by ``1/psi`` per coordinate, then OPRF.

    Pass as ``kernel=``; ``"softmax_saderf"`` is ``SADERF()``. Either ``statistics``, or
    both ``psi`` and ``a``, or nothing: then psi and A come from the call's own queries
    and keys (bidirectional calls only; constants for autodiff).

    Parameters
    ----------
    psi : array, shape (..., d), optional
        Positive per-coordinate rescaling (:func:`saderf_psi`); leading dimensions
        broadcast into the batch dimensions.
    a : float or array, optional
        OPRF's A for the rescaled queries and keys.
    statistics : FeatureStatistics, optional
        Statistics of the unscaled queries and keys: psi from :func:`saderf_psi`, then
        A from :func:`optimal_a` of the rescaled statistics.

    Examples
    --------
    >>> import numpy as np
    >>> import favorplus as fp
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((128, 16)) * np.linspace(0.2, 2.0, 16)  # anisotropic
    >>> k = rng.standard_normal((128, 16)) / np.linspace(0.2, 2.0, 16)
    >>> v = rng.standard_normal((128, 4))
    >>> w = fp.draw_projection(64, 16, seed=0)
    >>> out = fp.favor_attention(q, k, v, w, kernel="softmax_saderf")
    >>> st = fp.feature_statistics(q, k)
    >>> est = fp.SADERF(psi=fp.saderf_psi(st), a=-0.05)       # fixed values
    >>> step, state = fp.favor_attention_step(q[:5], k[:5], v[:5], w, kernel=est)
    >>> out.shape, step.shape
    ((128, 4), (5, 4))
    """

    psi: Array | None = None
    a: float | Array | None = None
    statistics: FeatureStatistics | None = None
    _estimator: ClassVar[str] = "saderf"

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _check_a_value(self.a))
        given = (self.psi is not None, self.a is not None)
        if self.statistics is not None and any(given):
            raise ValueError("SADERF takes either statistics or psi and a; got both")
        if given[0] != given[1]:
            raise ValueError(
                "SADERF needs both psi and a when one of them is fixed (or statistics, or "
                f"neither); got psi={'set' if given[0] else None}, "
                f"a={'set' if given[1] else None}"
            )
        if self.psi is not None and not (hasattr(self.psi, "shape") and self.psi.ndim >= 1):
            raise TypeError(f"psi must be a floating array of shape (..., d); got {self.psi!r}")


@dataclass(frozen=True)
class EstimatorKernel(Kernel):
    """The resolved kernel of an OPRF / SADERF call.

    Hashable and array-free in its static form (a static argument of the compiled core);
    ``spec`` (the user's object) and ``a`` (the bound parameter, inside the core) are
    left out of comparisons and hashing.
    """

    saderf: bool = False
    spec: Any = field(default=None, compare=False, repr=False)
    a: Any = field(default=None, compare=False, repr=False)
    psi: Any = field(default=None, compare=False, repr=False)

    def static(self) -> EstimatorKernel:
        return EstimatorKernel(self.name, True, saderf=self.saderf)

    def bind(self, a: Array, psi: Array | None = None) -> EstimatorKernel:
        """The kernel bound to its A and, folded into the rows, SADERF's psi."""
        return EstimatorKernel(self.name, True, saderf=self.saderf, a=a, psi=psi)

    def one_side(
        self, xp: Namespace, x: Array, role: str, scale: float, dtype: Any
    ) -> tuple[Array, EstimatorKernel]:
        """:func:`one_side` (for :func:`favorplus.feature_map`, which sees one side)."""
        return one_side(xp, self, x, role, scale, dtype)

    def feature_parts(
        self,
        xp: Namespace,
        x: Array,
        projection: Array,
        scale: float,
        *,
        row_constants: bool,
        role: str | None = None,
    ) -> FeatureParts:
        """OPRF log-features ``A|w|^2 + B sqrt(s) w.x [- s|x|^2/2 + (d/4) log(1-4A) - log(m)/2]``
        (the bracket only with ``row_constants``), from one matrix product of
        ``[x, 1]`` with ``[B sqrt(s) W, A |w|^2]``.

        A SADERF kernel bound with ``psi`` computes the features of ``psi x`` (``role``
        ``"query"``) or ``x / psi`` (``"key"``) without forming them: the rescaling goes
        into the rows, ``w.(psi x) = (w psi).x``, and ``|psi x|^2 = x^2 . psi^2``."""
        a = self.a
        assert a is not None, "an OPRF kernel is bound to its parameter inside the core"
        if x.ndim == 1:
            one = self.feature_parts(
                xp, x[None, :], projection, scale, row_constants=row_constants, role=role
            )
            assert one.log is not None
            return FeatureParts(sign=None, log=one.log[0, :])
        side = None
        if self.psi is not None:
            if role not in ("query", "key"):
                raise ValueError(f"a bound SADERF kernel needs role 'query' or 'key'; got {role!r}")
            side = self.psi if role == "query" else 1.0 / self.psi  # (..., d)
        num_rows, dim = projection.shape
        a_ = xp.reshape(a, (*a.shape, 1, 1))
        one_minus = 1.0 - 4.0 * a_
        wsq = xp.sum(projection * projection, axis=-1)  # (m,): of the drawn rows
        factor = math.sqrt(scale) * xp.sqrt(one_minus)  # (..., 1, 1)
        if side is not None:
            factor = factor * xp.reshape(side, (*side.shape[:-1], 1, dim))  # (..., 1, d)
        rows = projection * factor  # (..., m, d)
        bias = a_ * wsq  # (..., 1, m)
        weights = xp.concat(
            [rows, xp.matrix_transpose(xp.broadcast_to(bias, (*rows.shape[:-2], 1, num_rows)))],
            axis=-1,
        )  # (..., m, d + 1)
        ones = xp.ones((*x.shape[:-1], 1), dtype=x.dtype, device=device(x))
        log = xp.matmul(xp.concat([x, ones], axis=-1), xp.matrix_transpose(weights))
        if row_constants:
            if side is None:
                row = (0.5 * scale) * xp.sum(x * x, axis=-1, keepdims=True)
            else:
                squares = xp.reshape(side * side, (*side.shape[:-1], dim, 1))
                row = (0.5 * scale) * xp.matmul(x * x, squares)
            const = 0.5 * math.log(num_rows) - (0.25 * dim) * xp.log(one_minus)
            log = subtract(xp, log, row + const, owned=True)
        return FeatureParts(sign=None, log=log)


def resolve_estimator(kernel: Any) -> EstimatorKernel | None:
    """The kernel of an estimator name or object; None for anything else."""
    if isinstance(kernel, str):
        if kernel not in ESTIMATORS:
            return None
        spec: Any = OPRF() if kernel == "softmax_oprf" else SADERF()
    elif getattr(kernel, "_estimator", None) in ("oprf", "saderf"):
        spec = kernel  # an OPRF or SADERF (tagged: robust to a module imported twice)
    else:
        return None
    saderf = spec._estimator == "saderf"
    name = "softmax_saderf" if saderf else "softmax_oprf"
    return EstimatorKernel(name, True, saderf=saderf, spec=spec)


def is_estimator(kern: Any) -> bool:
    return isinstance(kern, EstimatorKernel)


class _Params(NamedTuple):
    a: Any
    psi: Any
    statistics: Any


def _holds(xp: Namespace, x: Array, test: Any) -> bool:
    """Whether ``test(namespace, x)`` holds everywhere, for a host-readable ``x``. A
    concrete JAX array is tested with NumPy: inside the caller's ``jit`` trace, a ``jnp``
    comparison of it would be staged into the program and could not be read."""
    if is_jax(x):
        import numpy as np

        return bool(np.all(test(np, np.asarray(x))))
    return bool(xp.all(test(xp, x)))


def _data_driven(spec: Any) -> bool:
    return spec.statistics is None and spec.a is None


LEAK = "that would make every output depend on later tokens"


def _check_params(
    xp: Namespace,
    kern: EstimatorKernel,
    q: Array,
    batch: tuple[int, ...],
    refuse: str | None,
) -> _Params:
    """The arrays that the core needs, checked against the inputs ``q`` (namespace, d).
    ``refuse``: why the call cannot estimate the parameters from its own data (None: it
    can)."""
    spec = kern.spec
    dim = q.shape[-1]
    if _data_driven(spec) and refuse is not None:
        cls = type(spec).__name__
        raise ValueError(
            f"kernel={cls}() estimates its parameters from the call's own queries and keys; "
            f"{refuse}. Pass fixed "
            f"values ({'SADERF(psi=..., a=...)' if kern.saderf else 'OPRF(a=...)'}) or "
            f"{cls}(statistics=feature_statistics(...)) computed from other (past) data"
        )

    def fits(name: str, shape: tuple[int, ...]) -> None:
        out = broadcast_shapes(batch, shape, names=["the inputs' batch dimensions", name])
        if out != tuple(batch):
            raise ValueError(
                f"{name} must broadcast into the inputs' batch dimensions {tuple(batch)}; "
                f"got leading shape {tuple(shape)}"
            )

    statistics = spec.statistics
    if statistics is not None:
        _stats_namespace(statistics)
        common_namespace(q=q, **{f"statistics.{n}": s for n, s in zip(_FIELDS, statistics)})
        if statistics[0].shape[-1] != dim:
            raise ValueError(
                f"statistics must have feature dimension {dim} (that of q and k); "
                f"got shape {tuple(statistics[0].shape)}"
            )
        for n, s in zip(_FIELDS, statistics):
            fits(f"statistics.{n}", tuple(s.shape[:-1]))
        statistics = FeatureStatistics(*statistics)
    a = spec.a
    if a is not None and not isinstance(a, float):
        common_namespace(q=q, a=a)
        check_float(xp, "a", a)
        fits("a", tuple(a.shape))
        _check_a_array(xp, a)
    psi = getattr(spec, "psi", None)
    if psi is not None:
        common_namespace(q=q, psi=psi)
        check_float(xp, "psi", psi)
        if psi.shape[-1] != dim:
            raise ValueError(
                f"psi must have shape (..., {dim}) (d of q and k); got {tuple(psi.shape)}"
            )
        fits("psi", tuple(psi.shape[:-1]))
        if host_readable(psi) and not _holds(xp, psi, lambda ns, x: (x > 0) & ns.isfinite(x)):
            raise ValueError("psi must be positive and finite")
    return _Params(a, psi, statistics)


def bind(
    xp: Namespace,
    kern: EstimatorKernel,
    params: _Params,
    q: Array | None,
    k: Array | None,
    key_mask: Array | None,
    scale: float,
    dtype: Any,
) -> tuple[Array | None, Array | None, EstimatorKernel]:
    """The kernel bound to its A and SADERF's psi, constants for autodiff; q and k are
    returned as they are (psi is folded into the projection rows: the bound kernel's
    features take ``role=``, see :meth:`EstimatorKernel.feature_parts`), so no rescaled
    copy of the inputs is made. ``q`` or ``k`` may be None (feature maps of one side)."""
    like = q if q is not None else k
    dev = device(like)
    a, psi, st = params
    if st is None and a is None:
        # Data-driven: this call's own queries and keys, one set per sequence.
        st = _stats(
            xp,
            stop_gradient(xp.astype(q, dtype, copy=False)),
            stop_gradient(xp.astype(k, dtype, copy=False)),
            key_mask,
            (),
        )
    if st is not None:
        st = FeatureStatistics(*(stop_gradient(xp.astype(s, dtype, copy=False)) for s in st))
        if kern.saderf:
            psi = _psi(xp, st)
            st = _rescaled(xp, st, psi)
        a = _a_from_rho(xp, _rho(xp, st, scale))
    elif isinstance(a, float):
        a = xp.asarray(a, dtype=dtype, device=dev)
    else:
        a = stop_gradient(xp.astype(a, dtype, copy=False))
    if psi is not None:
        psi = stop_gradient(xp.astype(psi, dtype, copy=False))
    return q, k, kern.bind(a, psi)


def call_estimator(
    fn: Any,
    arrays: tuple[Any, ...],
    statics: tuple[Any, ...],
    kern: EstimatorKernel,
    *,
    xp: Namespace,
    scale: float,
    dtype: Any,
    batch: tuple[int, ...],
    refuse: str | None,
    mask_index: int = 4,
) -> Any:
    """``fn(*arrays, *statics)`` with ``kern`` (one of the statics) bound to its
    parameters and q, k (the first two arrays) rescaled, as one compiled program on JAX
    like :func:`call_core`. ``arrays[mask_index]`` is the key mask."""
    params = _check_params(xp, kern, arrays[0], batch, refuse)
    index = next(i for i, s in enumerate(statics) if s is kern)
    statics = (*statics[:index], kern.static(), *statics[index + 1 :])
    layout = (mask_index, index, xp, scale, dtype)
    return call_core(
        _estimator_core, (arrays[0], arrays[1], arrays[2:], params), (fn, layout, statics)
    )


def _estimator_core(
    q: Array,
    k: Array,
    rest: tuple[Any, ...],
    params: _Params,
    fn: Any,
    layout: tuple[Any, ...],
    statics: tuple[Any, ...],
) -> Any:
    mask_index, index, xp, scale, dtype = layout
    key_mask = rest[mask_index - 2]
    q, k, bound = bind(xp, statics[index], params, q, k, key_mask, scale, dtype)
    statics = (*statics[:index], bound, *statics[index + 1 :])
    return fn(q, k, *rest, *statics)


def one_side(
    xp: Namespace, kern: EstimatorKernel, x: Array, role: str, scale: float, dtype: Any
) -> tuple[Array, EstimatorKernel]:
    """``x`` and the kernel bound to its parameters, for :func:`favorplus.feature_map`,
    which sees one side only (``role``, passed on to the features, says which)."""
    params = _check_params(xp, kern, x, tuple(x.shape[:-2]), "feature_map sees one side only")
    q, k = (x, None) if role == "query" else (None, x)
    q, k, bound = bind(xp, kern, params, q, k, None, scale, dtype)
    out = q if role == "query" else k
    assert out is not None
    return out, bound


register_resolver(resolve_estimator)
