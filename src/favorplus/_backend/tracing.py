"""What favorplus may read or decide on the host: traced arrays (JAX tracers, torch.compile
graphs, torch.func transforms), accelerators, and autodiff tracking. Host-side fast
paths and checks run only where :func:`host_readable` says so.
"""

from __future__ import annotations

import sys

from .namespaces import device, is_cupy, is_dask, is_jax, is_torch
from .types import Array


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
    torch.compile graphs, inside torch.func transforms, for (lazy) dask arrays and for
    torch tensors off the CPU (``meta`` ones hold no values at all)."""
    if is_dask(x) or (is_torch(x) and x.device.type != "cpu"):
        return False
    return not ((is_jax(x) and is_traced(x)) or on_accelerator(x) or _torch_traced(x))


def scanned_form(x: Array) -> bool:
    """True for arrays of a traced JAX program that runs on a CPU: there the causal
    recurrence runs as one ``lax.scan`` over the chunks whose step does a whole chunk's
    work on chunk-sized temporaries (cache-resident; no L x m array stored). On GPUs the
    chunks are processed side by side instead (few, large kernels)."""
    if not (is_jax(x) and is_traced(x)):
        return False
    dev = device(x)
    if dev is not None:
        return getattr(dev, "platform", None) == "cpu"
    import jax

    return bool(jax.default_backend() == "cpu")
