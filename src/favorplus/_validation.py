"""Input checks with clear errors naming the argument, the expected and the received value."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import (
    Array,
    Namespace,
    broadcast_shapes,
    check_float,
    common_namespace,
    require,
)

__all__ = ["Checked", "check_attention_inputs", "check_projection", "check_scale"]


def check_scale(scale: float | None, dim: int) -> float:
    """Default ``1 / sqrt(d)``; otherwise a finite, non-negative real number."""
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None; got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"scale must be finite and non-negative; got {scale!r}")
    return value


def check_projection(xp: Namespace, projection: Array | None, dim: int, kernel: Any) -> None:
    """The projection is an (m, d) float array with d matching the inputs.

    ``kernel`` is a resolved :class:`favorplus.features.Kernel`, read through its
    ``softmax`` and ``name`` attributes only, so that validation sits below the feature
    maps in the module layers.
    """
    if projection is None:
        if kernel.softmax:
            raise ValueError(
                f"projection must be an (m, {dim}) array for kernel {kernel.name!r}; got None "
                "(only generalized kernels have a deterministic, projection-free form)"
            )
        return
    check_float(xp, "projection", projection)
    if projection.ndim != 2:
        raise ValueError(
            f"projection must have shape (num_features, {dim}); got shape {tuple(projection.shape)}"
        )
    if projection.shape[1] != dim:
        raise ValueError(
            f"projection.shape[1] must equal the feature dimension of q and k ({dim}); "
            f"got projection shape {tuple(projection.shape)}"
        )
    if projection.shape[0] < 1:
        raise ValueError(
            f"projection must have at least one row (num_features >= 1); "
            f"got shape {tuple(projection.shape)}"
        )


@dataclass(frozen=True)
class Checked:
    """Validated attention inputs."""

    xp: Namespace
    batch: tuple[int, ...]
    scale: float
    dtype: Any


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool: Python's or NumPy's bool only (a string such as "False"
    or a number would otherwise silently count as true or false)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


def check_attention_inputs(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None,
    scale: float | None,
    *,
    projection: Array | None = None,
    kernel: Any = None,
    causal: bool = False,
) -> Checked:
    """Check q, k, v, key_mask, projection and scale together."""
    from ._backend import compute_dtype

    causal = check_flag("causal", causal)

    # k and v first: the summaries pass k as q too, and a bad k must be named k.
    require(k=k, v=v, q=q)
    xp = common_namespace(k=k, v=v, q=q, projection=projection, key_mask=key_mask)
    for name, x in (("k", k), ("v", v), ("q", q)):
        check_float(xp, name, x)
        if x.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., length, features); "
                f"got shape {tuple(x.shape)}"
            )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same feature dimension; got q.shape={tuple(q.shape)} "
            f"and k.shape={tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length (axis -2); got k.shape={tuple(k.shape)} "
            f"and v.shape={tuple(v.shape)}"
        )
    if q.shape[-1] < 1:
        raise ValueError(
            f"q and k must have at least one feature (d >= 1); got q.shape={tuple(q.shape)} "
            f"and k.shape={tuple(k.shape)}"
        )
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"causal attention needs as many queries as keys; got q.shape={tuple(q.shape)} "
            f"and k.shape={tuple(k.shape)}"
        )
    if kernel is not None:
        check_projection(xp, projection, q.shape[-1], kernel)
    shapes = [q.shape[:-2], k.shape[:-2], v.shape[:-2]]
    names = ["q", "k", "v"]
    if key_mask is not None:
        if key_mask.dtype != xp.bool:
            raise TypeError(
                f"key_mask must be a boolean array (True where a key takes part); "
                f"got dtype {key_mask.dtype}"
            )
        if key_mask.ndim < 1 or key_mask.shape[-1] != k.shape[-2]:
            raise ValueError(
                f"key_mask must have shape (..., Lk) with Lk = {k.shape[-2]} keys; "
                f"got shape {tuple(key_mask.shape)}"
            )
        shapes.append(key_mask.shape[:-1])
        names.append("key_mask")
    batch = broadcast_shapes(*shapes, names=names)
    return Checked(
        xp=xp, batch=batch, scale=check_scale(scale, q.shape[-1]), dtype=compute_dtype(xp, q, k, v)
    )
