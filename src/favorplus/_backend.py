"""Namespace, device and dtype helpers shared by the core modules.

Everything here is array API only, except :func:`stop_gradient` and
:func:`chunk_scan`, which use an optional backend fast path chosen at call time
(no backend is imported when favorplus is imported).
"""

from __future__ import annotations

import operator
import sys
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
    "chunk_scan",
    "stop_gradient",
]


# --- array kinds ----------------------------------------------------------------------
# Plain isinstance checks against already-imported libraries: cheap, and traceable by
# torch.compile (array-api-compat's cached helpers make dynamo warn on every call).


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


def broadcast_shapes(*shapes: Sequence[int], names: Sequence[str]) -> tuple[int, ...]:
    """Broadcast leading (batch) shapes, naming the arguments on failure."""
    ndim = max([0, *(len(s) for s in shapes)])
    out = []
    for axis in range(-ndim, 0):
        size = 1
        for shape in shapes:
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
    if is_torch(x):
        return x.detach()
    if is_jax(x):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def is_traced(x: Array) -> bool:
    """True for a JAX tracer (inside jit, grad, vmap, scan): eager arrays loop in Python."""
    import jax

    return isinstance(x, jax.core.Tracer)


def chunk_scan(
    xp: Namespace, gates: Array | None, updates: Array, state: Array, queries: Array
) -> tuple[Array, Array]:
    """The state recurrence of chunked causal linear attention, read by each chunk.

    ``S_0 = state`` and ``S_{n+1} = gates_n * S_n + updates_n`` for the N chunks
    along axis -3 of ``updates`` (shape (..., N, P, Q); ``gates`` (..., N), or None
    for gates that are all exactly 1; ``state`` (..., P, Q)). Returns
    ``queries_n @ S_n`` for every chunk, (..., N, C, Q) for ``queries`` of shape
    (..., N, C, P), and the final state. N is the number of chunks, not of tokens.

    Eager CPU arrays: each state is read by its chunk's queries as soon as it exists,
    so the N states are never stacked (less memory and copying), and without autograd
    the state is updated in place. GPUs, torch.compile graphs and torch.func
    transforms: the states are stacked and read by one batched product (fewer kernel
    launches; measured faster on an H200). Traced JAX arrays (under ``jax.jit``,
    ``grad``, ``vmap``): the recurrence runs in ``jax.lax.scan``, so the traced
    program, and the compile time, does not grow with N.
    """
    n = updates.shape[-3]
    if is_jax(updates) and is_traced(updates):
        import jax
        import jax.numpy as jnp

        if gates is None:
            gates = jnp.ones((*updates.shape[:-3], n), dtype=updates.dtype)

        def body(s: Array, xs: tuple[Array, Array]) -> tuple[Array, Array]:
            g, u = xs
            return g[..., None, None] * s + u, s

        xs = (jnp.moveaxis(gates, -1, 0), jnp.moveaxis(updates, -3, 0))
        final, before = jax.lax.scan(body, state, xs)
        return jnp.matmul(queries, jnp.moveaxis(before, 0, -3)), final
    # unstack, not indexing in the loop: the backward of N indexings would build N
    # full-size gradients (quadratic in N); that of one unstack is one stack.
    gate_list = [None] * n if gates is None else unstack(xp, gates[..., None, None], -3)
    update_list = unstack(xp, updates, -3)

    def step(s: Array, g: Array | None, u: Array, mine: bool) -> Array:
        # ``mine``: s is a temporary of ours that nothing (no read, no backward) still needs.
        if g is not None:
            s = multiply(xp, s, g, owned=mine)
            mine = True  # a new array, or ours already; autograd saves mul's inputs only
        return add(xp, s, u, owned=mine)

    if on_accelerator(updates) or _torch_traced(updates):
        before = [state]
        s = state
        for g, u in zip(gate_list[:-1], update_list[:-1]):
            s = step(s, g, u, False)
            before.append(s)
        final = step(s, gate_list[-1], update_list[-1], False)
        return xp.matmul(queries, xp.stack(before, axis=-3)), final
    reads = []
    s = state
    for g, u, qn in zip(gate_list, update_list, unstack(xp, queries, -3)):
        reads.append(xp.matmul(qn, s))
        # Autograd may have saved s for the read (for q's gradient): then s must not
        # change in place.
        s = step(s, g, u, s is not state and not (needs_grad(s) or needs_grad(qn)))
    return xp.stack(reads, axis=-3), s


def cumulative_max(x: Array) -> Array | None:
    """Inclusive running maximum along the last axis with the backend's own function
    (torch, NumPy, JAX); None where the standard offers none to use."""
    if is_torch(x):
        return sys.modules["torch"].cummax(x, dim=-1).values
    if is_numpy(x):
        import numpy as np

        return np.maximum.accumulate(x, axis=-1)
    if is_jax(x):
        import jax

        return jax.lax.cummax(x, axis=x.ndim - 1)
    return None


def unstack(xp: Namespace, x: Array, axis: int) -> list[Array]:
    """``xp.unstack``; for torch ``torch.unbind`` (array-api-compat's moves the axis
    first, which torch.func.vmap cannot batch)."""
    if is_torch(x):
        return list(sys.modules["torch"].unbind(x, dim=axis))
    return list(xp.unstack(x, axis=axis))


def split(x: Array, size: int, axis: int) -> list[Array]:
    """``x`` cut into consecutive pieces of ``size`` (the last may be shorter) along
    ``axis`` (negative). For torch, one ``torch.split``: its backward pass is one
    concatenation, where that of separate slices would fill a full-size gradient per
    piece.
    """
    if is_torch(x):
        return list(sys.modules["torch"].split(x, size, dim=axis))
    n = x.shape[axis]
    after = (slice(None),) * (-axis - 1)
    return [x[(..., slice(a, min(a + size, n)), *after)] for a in range(0, n, size)]


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


# --- In-place fast path -------------------------------------------------------------
# Big (L x m) temporaries dominate the run time on CPU: each new one costs page faults.
# Where the array is a temporary that favorplus itself created and that no other
# operation (nor a backward pass) still needs, and the backend allows mutation
# (NumPy; PyTorch, also under autograd), elementwise steps run in place. This also
# keeps fewer L x m arrays alive for the backward pass. The results are bit-for-bit
# those of the generic expressions, which every other backend (JAX, CuPy,
# array-api-strict) runs.


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
        # Autograd allows in-place steps on non-leaf tensors that no backward needs:
        # callers pass owned=True only for such temporaries (see needs_grad).
        # In-place steps on a tracked view would make autograd copy its base in the
        # backward pass (CopySlices): not worth it.
        ok = x.is_contiguous() and not (x.requires_grad and (x.is_leaf or x._base is not None))
        return "torch" if ok else None
    return None


def needs_grad(x: Array) -> bool:
    """True for a tensor that autograd tracks (it may be saved for a backward pass).

    Inside torch.func transforms (grad, vjp, vmap, ...) every tensor counts as
    tracked: no in-place steps there (vmap, for one, refuses some on batched tensors).
    """
    if not is_torch(x):
        return False
    return bool(x.requires_grad) or _functorch_active(default=True)


def _functorch_active(*, default: bool) -> bool:
    """True inside torch.func transforms; ``default`` where torch cannot tell."""
    active = getattr(sys.modules["torch"]._C, "_are_functorch_transforms_active", None)
    return default if active is None else bool(active())


def _binary(x: Array, y: Array | float, owned: bool, name: str, op: Any) -> Array:
    """``op(x, y)``, in place on x (torch ``x.<name>_``, NumPy ``out=x``) when allowed."""
    kind = _mutable(x) if owned and _fits(x, y) else None
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


# --- JAX: compile eager calls ------------------------------------------------------------
_JITTED: dict[Any, Any] = {}


def call_core(fn: Any, arrays: tuple[Any, ...], statics: tuple[Any, ...]) -> Any:
    """``fn(*arrays, *statics)``; for JAX arrays, as one ``jax.jit`` program.

    Op-by-op JAX dispatch compiles every primitive for every new shape; one compiled
    program per call signature is several times faster to compile and to run. Under
    an eager ``jax.grad`` or ``vmap`` the call is still one compiled program; inside
    the caller's own ``jit`` the nested jit is simply inlined.
    """
    present = [a for a in arrays if a is not None]
    if present and is_jax(present[0]):
        jitted = _JITTED.get(fn)
        if jitted is None:
            import jax

            first = len(arrays)
            jitted = jax.jit(fn, static_argnums=tuple(range(first, first + len(statics))))
            _JITTED[fn] = jitted
        return jitted(*arrays, *statics)
    return fn(*arrays, *statics)


# --- CPU blocking ---------------------------------------------------------------------
# On a CPU, long sequences are processed in blocks whose (tokens x features)
# temporaries hold about this many numbers (8 MiB in float32): they stay in cache and
# in the allocator's reusable memory instead of costing fresh page faults each call.
BLOCK_NUMBERS = 1 << 21


def on_accelerator(x: Array) -> bool:
    """True for arrays on a GPU (torch CUDA, CuPy, JAX on GPU)."""
    if is_cupy(x):
        return True
    dev = device(x)
    return getattr(dev, "type", None) == "cuda" or getattr(dev, "platform", None) in (
        "gpu",
        "cuda",
        "rocm",
    )


def _torch_traced(x: Array) -> bool:
    """True while torch.compile traces ``x`` (a Python loop over blocks would be
    unrolled), or inside torch.func transforms (whose tensors cannot be read)."""
    if not is_torch(x):
        return False
    return sys.modules["torch"].compiler.is_compiling() or _functorch_active(default=False)


def host_readable(x: Array) -> bool:
    """True for eager CPU arrays, whose values the host can read mid-computation at no
    cost (a check that picks a fast path); False on GPUs, in traced JAX programs, in
    torch.compile graphs, inside torch.func transforms and for (lazy) dask arrays."""
    if is_dask(x):
        return False
    return not ((is_jax(x) and is_traced(x)) or on_accelerator(x) or _torch_traced(x))


def cpu_block(
    x: Array, numbers_per_token: int, multiple: int = 1, *, training: bool = False
) -> int | None:
    """Block length (a multiple of ``multiple``) for eager CPU arrays; None elsewhere.

    GPUs, traced JAX programs, torch.compile graphs and torch.func transforms process
    the whole sequence at once (one program, few kernel launches). ``training``:
    blocks of a quarter of the size, for blocks that are recomputed in the backward
    pass (see :func:`recompute`), where one block's temporaries and their gradients
    are held at once.
    """
    if not host_readable(x):
        return None
    budget = BLOCK_NUMBERS // 4 if training else BLOCK_NUMBERS
    tokens = budget // max(1, numbers_per_token)
    return max(multiple, tokens // multiple * multiple)


def recompute(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, keeping for torch autograd only what ``fn`` receives.

    Under torch autograd the tensors that ``fn``'s operations save for the backward
    pass are dropped as soon as they are saved; the first time the backward pass needs
    one of them, ``fn(*args)`` runs again (with the same inputs, so the same values)
    and its saved tensors stand in for the dropped ones, in the same order. A backward
    pass then holds one call's temporaries at a time. (The idea of
    ``torch.utils.checkpoint``, whose first call imports torch._dynamo, about 80 MiB,
    which is more than all this saves.) Other arrays, and calls without autograd,
    just run ``fn``. ``args`` must not change in place before the backward pass.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_grad_enabled():
        return fn(*args)
    # torch.func transforms (grad, vjp, ...) turn saved-tensor hooks off: plain call.
    hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    if hooks_enabled is not None and not hooks_enabled():
        return fn(*args)
    hooks = torch.autograd.graph.saved_tensors_hooks
    replay: list[Any] = []  # the saved tensors of a recomputation, in saving order

    def recomputed(index: int) -> Any:
        if not replay:
            with torch.enable_grad(), hooks(_keep(replay), _never):
                fn(*args)
        tensor, version = replay[index]
        if tensor._version != version:  # what autograd itself checks without hooks
            raise RuntimeError(
                "favorplus: a tensor saved for the backward pass was changed in place"
            )
        return tensor

    counter = iter(range(1 << 62))
    with hooks(lambda _: next(counter), recomputed):
        return fn(*args)


def _keep(store: list[Any]) -> Any:
    """A pack hook that records what a recomputation saves, detached (no reference
    cycle through grad_fn) and with its version; its own graph is never used."""

    def pack(t: Any) -> None:
        store.append((t.detach(), t._version))

    return pack


def _never(_: Any) -> Any:
    raise RuntimeError("favorplus: a recomputed graph was used for a backward pass")
