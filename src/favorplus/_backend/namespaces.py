"""Array kinds, namespaces and devices: which library an array comes from, the array API
namespace shared by named arrays, and the device they live on (plain ``isinstance``
checks against already-imported libraries: cheap, and traceable by torch.compile).
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat

from .types import Array, Namespace


def _instance(x: Any, module: str, attr: str) -> bool:
    mod = sys.modules.get(module)
    return mod is not None and isinstance(x, getattr(mod, attr))


def is_torch(x: Any) -> bool:
    """True for a torch.Tensor."""
    return _instance(x, "torch", "Tensor")


def is_jax(x: Any) -> bool:
    """True for a JAX array or tracer (tracers are jax.Array instances)."""
    return _instance(x, "jax", "Array")


def is_cupy(x: Any) -> bool:
    """True for a CuPy array."""
    return _instance(x, "cupy", "ndarray")


def is_dask(x: Any) -> bool:
    """True for a dask array (lazy: its values are not on the host until computed)."""
    return _instance(x, "dask.array", "Array")


def is_numpy(x: Any) -> bool:
    """True for a NumPy array."""
    return _instance(x, "numpy", "ndarray")


def device(x: Array) -> Any:
    """The device of ``x`` (None for a JAX tracer whose device is not known)."""
    if is_torch(x):
        return x.device
    return array_api_compat.device(x)


def _torch_namespace() -> Namespace:
    import array_api_compat.torch as torch_namespace

    return torch_namespace


def common_namespace(**arrays: Array | None) -> Namespace:
    """Return the array API namespace shared by all named arrays.

    Raises a ``TypeError`` that names each argument and its kind when the arrays
    come from different libraries, or when one is not an array at all, and a
    ``ValueError`` when they live on different devices.
    """
    named = {k: v for k, v in arrays.items() if v is not None}
    if named and all(is_torch(v) for v in named.values()):
        return _check_devices(_torch_namespace(), named)
    spaces: dict[str, Namespace] = {}
    for name, value in named.items():
        _refuse_numpy_subclass(name, value)
        try:
            spaces[name] = array_api_compat.array_namespace(value)
        except TypeError:
            raise TypeError(
                f"{name} must be an array of a library supported by array-api-compat "
                f"(numpy, torch, jax, cupy, array-api-strict, ...); got {type(value).__name__}"
            ) from None
    distinct = {id(ns) for ns in spaces.values()}
    if len(distinct) > 1:
        parts = ", ".join(
            f"{k}: {type(named[k]).__module__}.{type(named[k]).__name__}" for k in named
        )
        raise TypeError(f"all arrays must come from the same array library; got {parts}")
    return _check_devices(next(iter(spaces.values())), named)


def _refuse_numpy_subclass(name: str, value: Any) -> None:
    """A TypeError for NumPy array subclasses (np.matrix, np.ma.MaskedArray, ...): their
    operators do not follow the array API (``*`` is a matrix product for np.matrix; a
    masked array's mask would be silently ignored by the linear-time products)."""
    if is_numpy(value) and type(value) is not sys.modules["numpy"].ndarray:
        kind = f"{type(value).__module__}.{type(value).__name__}"
        raise TypeError(
            f"{name} must be a plain numpy.ndarray (or another library's array), not a NumPy "
            f"subclass; got {kind}. Convert it with numpy.asarray(...); for a masked array, "
            f"pass its data and use key_mask for the keys to leave out"
        )


def require(**arrays: Any) -> None:
    """A TypeError naming each required array argument that is None."""
    for name, value in arrays.items():
        if value is None:
            raise TypeError(f"{name} must be an array; got None")


def _check_devices(xp: Namespace, named: dict[str, Array]) -> Namespace:
    """``xp``, after checking that all named arrays are on one device."""
    # Under tracing (jax.jit, vmap, grad) an array's device may be unknown (None): skip it.
    devices = {name: device(value) for name, value in named.items()}
    devices = {name: dev for name, dev in devices.items() if dev is not None}
    if not devices:
        return xp
    first_name, first_dev = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first_dev:
            raise ValueError(
                f"all arrays must be on the same device; {first_name} is on {first_dev} "
                f"but {name} is on {dev}"
            )
    return xp
