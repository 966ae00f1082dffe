"""Random projection matrices W for the random feature maps.

All randomness is drawn on the host with a seeded :class:`numpy.random.Generator`
in float64, then moved to the caller's namespace, device and dtype, so that a seed
gives the same matrix on every backend.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import array_api_compat
import numpy as np

from ._backend import Array, Namespace
from ._haar import haar_orthogonal as _haar_orthogonal

__all__ = ["draw_projection", "to_namespace"]

_KINDS = ("orthogonal", "iid", "simplex")
_NORMS = ("chi", "sqrt_d")


def host_generator(seed: Any, name: str = "seed") -> np.random.Generator:
    """The host generator for ``seed``: a :class:`numpy.random.Generator` is used as
    is, an int >= 0 seeds a new one, None draws fresh entropy. Anything else (bools
    included) is an error that names ``name``."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"{name} must be an int, a numpy.random.Generator or None; got {type(seed).__name__}"
        )
    if seed < 0:
        raise ValueError(f"{name} must be a non-negative int; got {seed}")
    return np.random.default_rng(int(seed))


def _resolve_namespace(xp: Namespace | None) -> Namespace:
    """Turn a user-given module (numpy, torch, jax.numpy, ...) into a compatible namespace."""
    if xp is None:
        return array_api_compat.array_namespace(np.empty(0))
    try:
        probe = xp.asarray(0.0)
        return array_api_compat.array_namespace(probe)
    except Exception as exc:  # pragma: no cover - depends on the object given
        raise TypeError(
            f"xp must be an array namespace such as numpy, torch, jax.numpy or cupy; got {xp!r}"
        ) from exc


def to_namespace(
    values: np.ndarray, *, xp: Namespace | None, device: Any = None, dtype: Any = None
) -> Array:
    """Move a host float64 array to ``xp`` on ``device`` in ``dtype``."""
    ns = _resolve_namespace(xp)
    if dtype is None:
        dtype = ns.float64 if xp is None else _default_float(ns)
    if device is None:
        return ns.asarray(values, dtype=dtype)
    return ns.asarray(values, dtype=dtype, device=device)


def _default_float(ns: Namespace) -> Any:
    try:
        return ns.__array_namespace_info__().default_dtypes()["real floating"]
    except Exception:  # pragma: no cover - older namespaces
        return ns.asarray(0.0).dtype


def default_num_features(head_dim: int) -> int:
    """``round(d ln d)`` random features per head (at least d).

    The Performer paper's bounds need m = Theta(d log d) features; round(d ln d) is also
    performer-pytorch's default.
    """
    return max(head_dim, round(head_dim * math.log(head_dim))) if head_dim > 1 else 1


def draw_projection(
    num_features: int,
    dim: int,
    *,
    kind: Literal["orthogonal", "iid", "simplex"] = "orthogonal",
    norms: Literal["chi", "sqrt_d"] = "chi",
    seed: int | np.random.Generator | None = None,
    xp: Namespace | None = None,
    device: Any = None,
    dtype: Any = None,
    like: Array | None = None,
) -> Array:
    """Draw the ``(num_features, dim)`` random matrix W of a FAVOR+ feature map.

    Parameters
    ----------
    num_features : int
        Number of random rows m (at least 1); any value, below, above or not a
        multiple of ``dim``.
    dim : int
        Feature dimension d of the queries and keys.
    kind : {"orthogonal", "iid", "simplex"}
        ``"orthogonal"`` stacks ``ceil(m / d)`` independent Haar-distributed
        orthogonal blocks (rows orthogonal within a block) and keeps m rows;
        ``"iid"`` draws every entry from N(0, 1); ``"simplex"`` (simplex random
        features, Reid et al. 2023) gives the d rows of each block the directions
        of the vertices of a regular simplex (pairwise cosine ``-1/(d-1)``), rotated
        by an independent Haar matrix: lower variance than orthogonal blocks for
        positive features (see :mod:`favorplus.simplex`).
    norms : {"chi", "sqrt_d"}
        Row lengths. ``"chi"`` gives each row the length of an independent
        N(0, I_d) vector, so every row is marginally N(0, I_d) and the softmax
        estimators stay unbiased. ``"sqrt_d"`` gives every row length sqrt(d):
        lower variance, but it estimates a regularized kernel (biased low, by a
        few percent at d = 16 to 64).
    seed : int, numpy.random.Generator or None
        Seed of the host generator. The same seed gives the same matrix, up to
        the dtype's rounding, on every backend. ``None`` draws fresh entropy.
    xp : namespace, optional
        Array namespace of the result (``numpy``, ``torch``, ``jax.numpy``,
        ``cupy``, ``array_api_strict``, ...). Default: NumPy.
    device : optional
        Device of the result in ``xp``.
    dtype : optional
        Dtype of the result; default float64 for NumPy when no ``xp`` is given,
        else the namespace's default floating dtype.
    like : array, optional
        Take ``xp``, ``device`` and ``dtype`` from this array (explicit
        arguments win).

    Returns
    -------
    array
        The ``(num_features, dim)`` projection.

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import draw_projection
    >>> w = draw_projection(8, 4, seed=0)
    >>> w.shape, w.dtype
    ((8, 4), dtype('float64'))
    >>> block = w[:4] / np.linalg.norm(w[:4], axis=1, keepdims=True)
    >>> bool(np.allclose(block @ block.T, np.eye(4)))
    True
    >>> s = draw_projection(4, 4, kind="simplex", seed=0)
    >>> u = s / np.linalg.norm(s, axis=1, keepdims=True)
    >>> bool(np.allclose(u @ u.T, np.where(np.eye(4) == 1, 1.0, -1 / 3)))
    True
    """
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be an int; got {type(num_features).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int; got {type(dim).__name__}")
    if num_features < 1:
        raise ValueError(f"num_features must be at least 1; got {num_features}")
    if dim < 1:
        raise ValueError(f"dim must be at least 1; got {dim}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")
    if norms not in _NORMS:
        raise ValueError(f"norms must be one of {_NORMS}; got {norms!r}")
    rng = host_generator(seed)
    if like is not None:
        like_xp = _like_namespace(like)
        xp = like_xp if xp is None else xp
        device = array_api_compat.device(like) if device is None else device
        if dtype is None:
            dtype = like.dtype
            if not like_xp.isdtype(dtype, "real floating"):
                raise TypeError(
                    "like must have a real floating dtype (the projection takes its dtype), "
                    f"or pass dtype=...; got like of dtype {dtype}"
                )

    num_features, dim = int(num_features), int(dim)
    if kind == "iid":
        w = rng.standard_normal((num_features, dim))
        if norms == "sqrt_d":
            w = w / np.linalg.norm(w, axis=1, keepdims=True) * math.sqrt(dim)
    else:
        if kind == "simplex":
            from .simplex import simplex_blocks

            blocks = simplex_blocks(rng, dim, -(-num_features // dim))
        else:
            blocks = [_haar_orthogonal(rng, dim) for _ in range(-(-num_features // dim))]
        directions = np.concatenate(blocks, axis=0)[:num_features]
        if norms == "chi":
            lengths = np.sqrt(rng.chisquare(dim, size=num_features))
        else:
            lengths = np.full(num_features, math.sqrt(dim))
        w = directions * lengths[:, None]
    ns = _resolve_namespace(xp)
    if dtype is not None and not _is_real_floating(ns, dtype):
        raise TypeError(
            "dtype must be a real floating dtype (float16, bfloat16, float32 or float64) "
            f"of the result's namespace, or None; got {dtype!r}"
        )
    return to_namespace(w, xp=xp, device=device, dtype=dtype)


def _is_real_floating(ns: Namespace, dtype: Any) -> bool:
    """True when ``dtype`` is a real floating dtype of ``ns`` (a NumPy dtype name included)."""
    try:
        if ns.isdtype(dtype, "real floating"):
            return True
    except Exception:  # a name or type rather than a dtype object, or not a dtype at all
        pass
    try:  # e.g. "float32" or np.float32 for NumPy
        return bool(ns.isdtype(ns.empty(0, dtype=dtype).dtype, "real floating"))
    except Exception:
        return False


def _like_namespace(like: Any) -> Namespace:
    """The namespace of ``like``, or a TypeError naming ``like``."""
    try:
        return array_api_compat.array_namespace(like)
    except TypeError:
        raise TypeError(
            "like must be an array (numpy, torch, jax, cupy, array-api-strict, ...) whose "
            f"namespace, device and dtype the projection takes; got {type(like).__name__}"
        ) from None
