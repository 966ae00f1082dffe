"""The in-place fast path: where favorplus runs an elementwise step in place.

Big (L x m) temporaries dominate the run time on CPU: each new one costs page faults.
Where the array is a temporary that favorplus itself created and that no other
operation (nor a backward pass) still needs, and the backend allows mutation
(NumPy; PyTorch, also under autograd), elementwise steps run in place. This also
keeps fewer L x m arrays alive for the backward pass. The results are bit-for-bit
those of the generic expressions, which every other backend (JAX, CuPy,
array-api-strict) runs.
"""

from __future__ import annotations

import operator
import sys
from typing import Any

from .namespaces import device, is_numpy, is_torch
from .types import Array, Namespace


def _fits(x: Array, y: Array | float) -> bool:
    """True when ``x op y`` has x's shape (y broadcasts into x)."""
    shape = getattr(y, "shape", ())
    if len(shape) > x.ndim:
        return False
    return all(b in (1, a) for a, b in zip(reversed(x.shape), reversed(shape)))


def _mutable(x: Array) -> str | None:
    if is_numpy(x):
        return "numpy" if x.flags.writeable and x.flags.c_contiguous else None
    if is_torch(x):
        if sys.modules["torch"].compiler.is_compiling():
            # torch.compile functionalizes in-place steps anyway, and under its tracing of
            # torch.func transforms the operands' wrapping cannot be inspected.
            return None
        # Autograd allows in-place steps on non-leaf tensors that no backward needs:
        # callers pass owned=True only for such temporaries (see needs_grad).
        # In-place steps on a tracked view would make autograd copy its base in the
        # backward pass (CopySlices): not worth it.
        ok = x.is_contiguous() and not (x.requires_grad and (x.is_leaf or x._base is not None))
        return "torch" if ok else None
    return None


def _functorch_wrapped(y: Array | float) -> bool:
    """True for a tensor that a ``torch.func`` transform wraps (vmap's batched tensors
    and the like): its ``shape`` is one example's, so ``_fits`` cannot tell whether
    ``x op y`` has x's shape, and an unwrapped x cannot take the result in place."""
    if not is_torch(y):
        return False
    wrapped = getattr(sys.modules["torch"]._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and wrapped(y)


def _binary(x: Array, y: Array | float, owned: bool, name: str, op: Any) -> Array:
    """``op(x, y)``, in place on x (torch ``x.<name>_``, NumPy ``out=x``) when allowed."""
    kind = _mutable(x) if owned and _fits(x, y) else None
    if kind == "torch" and _functorch_wrapped(y):
        kind = None
    if kind == "torch":
        return getattr(x, f"{name}_")(y)
    if kind == "numpy":
        import numpy as np

        return getattr(np, _NUMPY_UFUNCS[name])(x, y, out=x)
    return op(x, y)


_NUMPY_UFUNCS = {"sub": "subtract", "add": "add", "mul": "multiply"}


def subtract(xp: Namespace, x: Array, y: Array | float, *, owned: bool) -> Array:
    """``x - y``; in place when ``owned`` says x is a temporary of ours."""
    return _binary(x, y, owned, "sub", operator.sub)


def add(xp: Namespace, x: Array, y: Array | float, *, owned: bool) -> Array:
    """``x + y``; in place when ``owned`` says x is a temporary of ours."""
    return _binary(x, y, owned, "add", operator.add)


def multiply(xp: Namespace, x: Array, y: Array | float, *, owned: bool) -> Array:
    """``x * y``; in place when ``owned`` says x is a temporary of ours."""
    return _binary(x, y, owned, "mul", operator.mul)


def exp(xp: Namespace, x: Array, *, owned: bool) -> Array:
    """``exp(x)``; in place when ``owned`` says x is a temporary of ours."""
    kind = _mutable(x) if owned else None
    if kind == "torch":
        return x.exp_()
    if kind == "numpy":
        import numpy as np

        return np.exp(x, out=x)
    return xp.exp(x)


def lower_triangle(xp: Namespace, x: Array, *, owned: bool) -> Array:
    """``x`` with every entry above the diagonal of its last two axes set to 0 (a
    select, not a product: inf or NaN there do not leak); in place when ``owned``
    says x is a temporary of ours.

    torch's and NumPy's own triangle functions (about ten times faster than a masked
    fill with a broadcast mask on a CPU); elsewhere ``where`` with the mask.
    """
    kind = _mutable(x) if owned else None
    if kind == "torch":
        return x.tril_()
    if is_torch(x):
        return sys.modules["torch"].tril(x)
    if is_numpy(x):
        import numpy as np

        return np.tril(x)
    n, p = x.shape[-2], x.shape[-1]
    keep = xp.arange(p, device=device(x))[None, :] <= xp.arange(n, device=device(x))[:, None]
    return xp.where(keep, x, xp.zeros((), dtype=x.dtype, device=device(x)))
