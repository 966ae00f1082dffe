"""The switch between the array API path and the fused GPU kernels, and the dispatch.

``import favorplus`` imports nothing of triton: :func:`dispatch` looks at the call and
the switch first and imports :mod:`favorplus._triton` only when the fused path runs.

Modes (:func:`set_fast_path`, :func:`fast_path`):

* ``"auto"`` (default): the fused kernels for torch CUDA tensors when ``triton`` is
  importable and a kernel covers the call; the array API path otherwise.
* ``"triton"``: the fused kernels for every call they cover, also for CPU tensors,
  which Triton runs only under its interpreter (``TRITON_INTERPRET=1``, for tests);
  calls they do not cover run the array API path.
* ``"array_api"``: always the array API path (the reference).

Covered today: ``"softmax"`` and ``"softmax_hyperbolic"`` attention of float32 /
float16 / bfloat16 torch tensors with a projection, bidirectional, or causal with as
many queries as keys (and a state of at most 256 x 128 numbers), with key masks and
per-key biases, no dropout; forward fused, backward by recomputation through the array
API path. Everything else (causal with Lq < Lk, decoding steps, the other kernels,
dropout, float64, torch.compile tracing) runs the array API path.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ._backend import Array, is_torch

__all__ = ["MODES", "fast_path", "get_fast_path", "set_fast_path"]

MODES = ("auto", "triton", "array_api")

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("favorplus_fast_path", default="auto")

# Calls that ran the fused kernels (for tests and diagnostics).
stats = {"fused": 0}


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"fast path mode must be one of {MODES}; got {mode!r}")
    if mode == "triton" and not _triton_available():
        raise ModuleNotFoundError(
            "fast path mode 'triton' needs the triton package (pip install 'favorplus[gpu]')"
        )
    return mode


def set_fast_path(mode: str) -> str:
    """Choose how :func:`favorplus.favor_attention` computes; returns the previous mode.

    Parameters
    ----------
    mode : {"auto", "triton", "array_api"}
        ``"auto"``: fused Triton kernels for torch CUDA tensors where a kernel covers
        the call (the default); ``"triton"``: the fused kernels wherever they cover the
        call, CPU tensors included (those need ``TRITON_INTERPRET=1``); ``"array_api"``:
        always the array API implementation.

    Examples
    --------
    >>> import favorplus
    >>> previous = favorplus.set_fast_path("array_api")
    >>> favorplus.get_fast_path()
    'array_api'
    >>> _ = favorplus.set_fast_path(previous)
    """
    previous = _MODE.get()
    _MODE.set(_check_mode(mode))
    return previous


def get_fast_path() -> str:
    """The current fast path mode (see :func:`set_fast_path`)."""
    return _MODE.get()


@contextlib.contextmanager
def fast_path(mode: str) -> Iterator[None]:
    """Context manager: the fast path ``mode`` inside the ``with`` block only.

    Examples
    --------
    >>> import numpy as np
    >>> import favorplus
    >>> x = np.ones((4, 8)) * 0.1
    >>> w = favorplus.draw_projection(16, 8, seed=0)
    >>> with favorplus.fast_path("array_api"):
    ...     out = favorplus.favor_attention(x, x, x, w)
    >>> out.shape
    (4, 8)
    """
    token = _MODE.set(_check_mode(mode))
    try:
        yield
    finally:
        _MODE.reset(token)


def _compiling() -> bool:
    import torch

    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def dispatch(
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    prep: Any,
    kern: Any,
    chunk: int | None,
    reference: Callable[..., Array],
) -> Array | None:
    """The fused result of a ``favor_attention`` call, or None: then the array API path runs.

    ``prep`` is the call's checked inputs (``_prepare.Prepared``), ``chunk`` its
    ``chunk_size`` (or None); ``reference(q, k, v,
    projection, key_mask, key_bias)`` computes the same call on the array API path (the
    backward recomputes through it).
    """
    if not is_torch(q) or _compiling():
        return None  # (checked first: torch.compile cannot trace ContextVar.get)
    mode = _MODE.get()
    if mode == "array_api":
        return None
    if not (is_torch(k) and is_torch(v) and is_torch(projection)):
        return None
    cuda = q.device.type == "cuda"
    if mode == "auto" and not (cuda and _triton_available()):
        return None
    if not _covers(q, k, v, projection, prep, kern):
        return None
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "fast path mode 'triton' on CPU tensors runs Triton's interpreter only: set "
            f"TRITON_INTERPRET=1 before triton is imported (tensors on {q.device})"
        )
    from triton.runtime.errors import OutOfResources

    from ._triton.ops import fused_attention

    try:
        out = fused_attention(q, k, v, projection, prep, kern, chunk, reference)
    except OutOfResources as err:
        # A kernel whose tiles do not fit this GPU's on-chip memory: say so, and compute
        # the call on the array API path instead.
        warnings.warn(
            f"favorplus: the fused kernel does not fit this GPU ({err}); the array API "
            "path computes this call",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    stats["fused"] += 1
    return out


def _covers(q: Any, k: Any, v: Any, w: Any, prep: Any, kern: Any) -> bool:
    """Whether the fused kernels compute this call (else the array API path does)."""
    import torch

    if kern.name not in ("softmax", "softmax_hyperbolic") or prep.keep is not None:
        return False
    if prep.causal:
        # One program holds the causal state; queries at the last Lq of Lk positions
        # (Lq < Lk) and larger states run the array API path.
        m = w.shape[0] * (2 if kern.name == "softmax_hyperbolic" else 1)
        if q.shape[-2] != k.shape[-2] or m * max(v.shape[-1], 16) > 256 * 128:
            return False
    if prep.chk.dtype not in (torch.float32,) or q.dtype == torch.float64:
        return False
    if any(t.dtype not in (torch.float32, torch.float16, torch.bfloat16) for t in (q, k, v, w)):
        return False
    if not (q.device == k.device == v.device == w.device):
        return False
    for t in (prep.key_mask, prep.key_bias):
        if t is not None and (not is_torch(t) or t.device != q.device):
            return False
    d, dv = q.shape[-1], v.shape[-1]
    return 0 < q.shape[-2] and 0 < k.shape[-2] and 0 < d <= 256 and 0 < dv <= 256
