"""Dtype rules: which dtypes are accepted and which one favorplus computes in (at least
float32; float16 and bfloat16 inputs compute in float32).
"""

from __future__ import annotations

from typing import Any

from .types import Array, Namespace


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
    dtypes = [x.dtype for x in xs]
    # Equal dtypes need no promotion call (which torch.compile cannot trace).
    dtype = dtypes[0] if all(d == dtypes[0] for d in dtypes) else xp.result_type(*dtypes)
    if is_half(xp, dtype):
        dtype = xp.float32
    return dtype
