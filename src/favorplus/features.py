"""Random feature maps phi with E[phi(x) . phi(y)] = exp(x . y) (and generalized kernels).

Every feature map is kept in a factored form ``phi = sign * exp(log)``: ``log`` holds
the exponents (where overflow happens) and ``sign`` a bounded or polynomial factor
(``None`` means 1). The attention code stabilizes the ``log`` part with constants that
cancel exactly; :func:`feature_map` returns the plain, unstabilized phi(x).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ._backend import Array, Namespace, check_float, common_namespace, compute_dtype, subtract

__all__ = ["Kernel", "FeatureParts", "feature_map", "resolve_kernel", "KERNELS"]

KernelLike = str | Callable[[Array], Array]

KERNELS = ("softmax", "softmax_hyperbolic", "softmax_trig", "relu")


@dataclass(frozen=True)
class Kernel:
    """A resolved kernel: its name, whether it estimates softmax, and the map ``f``."""

    name: str
    softmax: bool
    func: Callable[[Array], Array] | None = None

    def num_features(self, num_rows: int) -> int:
        """Number of features produced from ``num_rows`` random rows."""
        return 2 * num_rows if self.name in ("softmax_hyperbolic", "softmax_trig") else num_rows


# Resolvers of further kernels, tried first: favorplus.estimators registers OPRF and SADERF
# here when it is imported (``import favorplus`` does), so that this module, below it in
# the layers, never imports it.
_RESOLVERS: list[Callable[[object], Kernel | None]] = []


def register_resolver(resolver: Callable[[object], Kernel | None]) -> None:
    """Let :func:`resolve_kernel` accept the kernels that ``resolver`` knows (it returns
    None for the others)."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def resolve_kernel(kernel: KernelLike) -> Kernel:
    """Check and resolve the ``kernel`` argument."""
    for resolver in _RESOLVERS:
        found = resolver(kernel)  # e.g. OPRF / SADERF names and objects
        if found is not None:
            return found
    if callable(kernel):
        return Kernel(getattr(kernel, "__name__", "custom"), softmax=False, func=kernel)
    if isinstance(kernel, str) and kernel in KERNELS:
        return Kernel(kernel, softmax=kernel != "relu")
    raise ValueError(
        f"kernel must be one of {KERNELS}, 'softmax_oprf', 'softmax_saderf', an OPRF or "
        f"SADERF object, or a callable applied elementwise to the projections (generalized "
        f"attention); got {kernel!r}"
    )


@dataclass(frozen=True)
class FeatureParts:
    """phi = sign * exp(log); ``None`` stands for 1 (sign) or 0 (log).

    ``log`` has shape ``(..., L, M)``, or ``(..., L, 1)`` when ``shared``: one
    exponent for all features of a row.
    """

    sign: Array | None
    log: Array | None
    shared: bool = False


def feature_parts(
    xp: Namespace,
    x: Array,
    projection: Array | None,
    kernel: Kernel,
    scale: float,
    *,
    row_constants: bool,
    role: str | None = None,
) -> FeatureParts:
    """Factored features of ``x`` (shape ``(..., L, d)``), in ``x``'s dtype.

    ``scale`` multiplies the kernel's inner product: features of ``sqrt(scale) x``.
    With ``row_constants=False`` the terms of ``log`` that are the same for every
    feature of a row, and the global normalisation, are left out (they cancel in
    the attention ratio for queries); the result then is phi up to a per-row factor.
    ``role`` (``"query"`` or ``"key"``) says which side ``x`` is, for a kernel whose
    two sides differ (a bound SADERF kernel: its rescaling folded into the rows).
    """
    own = getattr(kernel, "feature_parts", None)  # estimators.EstimatorKernel
    if own is not None:
        return own(xp, x, projection, scale, row_constants=row_constants, role=role)
    root = math.sqrt(scale)
    if projection is None:
        # Deterministic generalized attention: phi(x) = f(sqrt(scale) x).
        u = x * root
        num_rows = x.shape[-1]
    else:
        num_rows = projection.shape[0]
        u = xp.matmul(x, xp.matrix_transpose(projection * root))
    if not kernel.softmax:
        f = kernel.func if kernel.func is not None else _relu(xp)
        sign = f(u)
        _check_kernel_output(kernel, u, sign)
        if row_constants:
            sign = sign / math.sqrt(num_rows)
        return FeatureParts(sign=sign, log=None)

    half_sq_norm = None
    if row_constants:
        half_sq_norm = (0.5 * scale) * xp.sum(x * x, axis=-1, keepdims=True)
    if kernel.name == "softmax":
        log = u
        if row_constants:
            log = subtract(xp, log, half_sq_norm + 0.5 * math.log(num_rows), owned=True)
        return FeatureParts(sign=None, log=log)
    if kernel.name == "softmax_hyperbolic":
        log = xp.concat([u, -u], axis=-1)
        if row_constants:
            log = subtract(xp, log, half_sq_norm + 0.5 * math.log(2 * num_rows), owned=True)
        return FeatureParts(sign=None, log=log)
    # softmax_trig: m^-1/2 exp(|x|^2 / 2) [cos(Wx), sin(Wx)]
    sign = xp.concat([xp.cos(u), xp.sin(u)], axis=-1)
    log = None
    if row_constants:
        log = half_sq_norm - 0.5 * math.log(num_rows)
    return FeatureParts(sign=sign, log=log, shared=True)


def _check_kernel_output(kernel: Kernel, u: Array, out: Array) -> None:
    """A TypeError unless the kernel's callable returned an array shaped like its input."""
    if tuple(getattr(out, "shape", ())) != tuple(u.shape) or not hasattr(out, "dtype"):
        got = getattr(out, "shape", None)
        raise TypeError(
            f"kernel {kernel.name!r} must return an array of the shape of its input "
            f"{tuple(u.shape)} (f applied elementwise); got "
            f"{type(out).__name__}" + ("" if got is None else f" of shape {tuple(got)}")
        )


def _relu(xp: Namespace) -> Callable[[Array], Array]:
    def relu(u: Array) -> Array:
        return xp.maximum(u, xp.zeros_like(u))

    return relu


def assemble(xp: Namespace, parts: FeatureParts, like: Array) -> Array:
    """phi = sign * exp(log), with no stabilization."""
    if parts.log is None:
        assert parts.sign is not None
        return parts.sign
    values = xp.exp(parts.log)
    return values if parts.sign is None else parts.sign * values


def feature_map(
    x: Array,
    projection: Array | None,
    *,
    kernel: KernelLike = "softmax",
    scale: float | None = None,
    role: str = "query",
) -> Array:
    """The random features phi(x) of a kernel, unstabilized.

    For the softmax kernels, ``feature_map(q, W) @ feature_map(k, W).T`` is an
    estimate of ``exp(scale * q @ k.T)`` (unbiased with iid or chi-norm
    orthogonal ``W``). The exponentials are returned as they are: for large
    ``scale * |x|**2`` they overflow, which the attention functions avoid with
    stabilizers that cancel. Computed in float32 for float16 and bfloat16 inputs
    and returned in the input's dtype.

    Parameters
    ----------
    x : array, shape (..., L, d)
        Queries or keys.
    projection : array, shape (m, d), or None
        Random matrix from :func:`favorplus.draw_projection`. ``None`` only for
        generalized kernels, giving the deterministic map ``f(sqrt(scale) x)``.
    kernel : str or callable
        ``"softmax"`` (positive features, m of them), ``"softmax_hyperbolic"``
        (2m), ``"softmax_trig"`` (2m), ``"relu"`` or an elementwise callable
        ``f`` for generalized attention ``f(W x) / sqrt(m)``; :class:`~favorplus.OPRF`
        or :class:`~favorplus.SADERF` with fixed parameters or statistics (see
        :mod:`favorplus.estimators`).
    scale : float, optional
        Scale of the inner product, default ``1 / sqrt(d)``.
    role : {"query", "key"}
        Which side ``x`` is: only SADERF's features differ (queries are multiplied by
        psi, keys divided by it).

    Returns
    -------
    array, shape (..., L, M)

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import draw_projection, feature_map
    >>> x = np.array([[0.3, -0.2, 0.1, 0.4]])
    >>> w = draw_projection(4096, 4, seed=0)
    >>> est = (feature_map(x, w) @ feature_map(x, w).T)[0, 0]  # scale = 1 / sqrt(4)
    >>> exact = np.exp(0.5 * float(x[0] @ x[0]))
    >>> bool(abs(est - exact) < 0.06)  # about 4 standard errors at m = 4096
    True
    """
    from ._backend import require
    from ._validation import check_projection, check_scale

    kern = resolve_kernel(kernel)
    require(x=x)
    xp = common_namespace(x=x, projection=projection)
    check_float(xp, "x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., L, d) with d >= 1; got shape {tuple(x.shape)}")
    check_projection(xp, projection, x.shape[-1], kern)
    sc = check_scale(scale, x.shape[-1])
    dtype = compute_dtype(xp, x)
    xc = xp.astype(x, dtype, copy=False)
    w = None if projection is None else xp.astype(projection, dtype, copy=False)
    if role not in ("query", "key"):
        raise ValueError(f"role must be 'query' or 'key'; got {role!r}")
    bind_one_side = getattr(kern, "one_side", None)  # OPRF / SADERF: bind the parameters
    if bind_one_side is not None:
        xc, kern = bind_one_side(xp, xc, role, sc, dtype)
    parts = feature_parts(xp, xc, w, kern, sc, row_constants=True, role=role)
    return xp.astype(assemble(xp, parts, xc), x.dtype, copy=False)
