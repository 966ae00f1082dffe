"""Namespace, device and dtype helpers shared by the core modules.

Everything here is array API only, except :func:`stop_gradient` and
:func:`linear_scan`, which use an optional backend fast path chosen at call time
(no backend is imported when favorplus is imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat

Array = Any
Namespace = Any

__all__ = [
    "Array",
    "Namespace",
    "broadcast_shapes",
    "common_namespace",
    "compute_dtype",
    "describe",
    "linear_scan",
    "stop_gradient",
]


def describe(x: Array) -> str:
    """A short human description of an array: type, shape, dtype and device."""
    try:
        dev = array_api_compat.device(x)
    except Exception:  # pragma: no cover - exotic objects
        dev = "?"
    mod = type(x).__module__.split(".")[0]
    return f"{mod}.{type(x).__name__}(shape={tuple(x.shape)}, dtype={x.dtype}, device={dev})"


def common_namespace(**arrays: Array | None) -> Namespace:
    """Return the array API namespace shared by all named arrays.

    Raises a ``TypeError`` that names each argument and its kind when the arrays
    come from different libraries, or when one is not an array at all, and a
    ``ValueError`` when they live on different devices.
    """
    named = {k: v for k, v in arrays.items() if v is not None}
    spaces: dict[str, Namespace] = {}
    for name, value in named.items():
        try:
            spaces[name] = array_api_compat.array_namespace(value)
        except TypeError:
            raise TypeError(
                f"{name} must be an array of a library supported by array-api-compat "
                f"(numpy, torch, jax, cupy, array-api-strict, ...); got {type(value).__name__}"
            ) from None
    distinct = {id(ns) for ns in spaces.values()}
    if len(distinct) > 1:
        parts = ", ".join(f"{k}: {type(named[k]).__module__}.{type(named[k]).__name__}" for k in named)
        raise TypeError(f"all arrays must come from the same array library; got {parts}")
    xp = next(iter(spaces.values()))
    devices = {name: array_api_compat.device(value) for name, value in named.items()}
    first_name, first_dev = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first_dev:
            raise ValueError(
                f"all arrays must be on the same device; {first_name} is on {first_dev} "
                f"but {name} is on {dev}"
            )
    return xp


def is_half(xp: Namespace, dtype: Any) -> bool:
    """True for float16 and bfloat16, whichever of them the namespace has."""
    # Compare only with dtypes the namespace has: numpy says dtype("float64") == None.
    halves = [getattr(xp, name) for name in ("float16", "bfloat16") if hasattr(xp, name)]
    return any(dtype == half for half in halves)


def check_float(xp: Namespace, name: str, x: Array) -> None:
    """Raise a TypeError unless ``x`` has a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64); "
            f"got {x.dtype}"
        )


def compute_dtype(xp: Namespace, *xs: Array) -> Any:
    """The dtype to compute in: the promoted input dtype, at least float32."""
    dtype = xp.result_type(*xs)
    if is_half(xp, dtype):
        dtype = xp.float32
    return dtype


def broadcast_shapes(*shapes: Sequence[int], names: Sequence[str]) -> tuple[int, ...]:
    """Broadcast leading (batch) shapes, naming the arguments on failure."""
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(-ndim, 0):
        size = 1
        for shape, name in zip(shapes, names):
            if len(shape) >= -axis:
                n = shape[axis]
                if n != 1:
                    if size not in (1, n):
                        listed = ", ".join(f"{nm}: {tuple(s)}" for nm, s in zip(names, shapes))
                        raise ValueError(
                            f"the leading (batch) dimensions must broadcast together; got {listed}"
                        )
                    size = n
        out.append(size)
    return tuple(out)


def stop_gradient(x: Array) -> Array:
    """Block gradients through ``x`` where the backend has autodiff.

    Stabilizing constants cancel exactly in the attention ratio, so their true
    gradient is zero; cutting them out of the graph saves work and rounding.
    """
    if array_api_compat.is_torch_array(x):
        return x.detach()
    if array_api_compat.is_jax_array(x):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def linear_scan(xp: Namespace, a: Array, x: Array) -> Array:
    """Inclusive scan ``r_n = a_n * r_{n-1} + x_n`` along axis -3.

    ``a`` has shape ``(..., N)`` and ``x`` shape ``(..., N, P, Q)``; ``r_{-1} = 0``.
    The generic path is a loop over the N chunks of small elementwise operations
    (N is the number of chunks, not of tokens). For JAX arrays the same
    recurrence runs in ``jax.lax.scan`` so that the traced program, and so the
    compile time under ``jax.jit``, does not grow with N.
    """
    n = x.shape[-3]
    if array_api_compat.is_jax_array(x):
        import jax
        import jax.numpy as jnp

        def body(carry: Array, inputs: tuple[Array, Array]) -> tuple[Array, Array]:
            an, xn = inputs
            new = an[..., None, None] * carry + xn
            return new, new

        a_t = jnp.moveaxis(a, -1, 0)
        x_t = jnp.moveaxis(x, -3, 0)
        _, out = jax.lax.scan(body, jnp.zeros_like(x_t[0]), (a_t, x_t))
        return jnp.moveaxis(out, 0, -3)
    s = x[..., 0, :, :]
    outs = [s]
    for i in range(1, n):
        s = a[..., i, None, None] * s + x[..., i, :, :]
        outs.append(s)
    return xp.stack(outs, axis=-3)
