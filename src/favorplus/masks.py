"""Attention masks as libraries pass them, turned into what FAVOR+ computes in linear time.

FAVOR+ never forms the (Lq, Lk) score matrix, so a mask can only act through what
factors over keys and the causal order (FAVOR-NOTES section 10):

* a key mask: key j takes part or not, for every query;
* a per-key additive bias ``b_j`` (added to every score of key j): exact, since
  ``exp(s_ij + b_j) = exp(s_ij) exp(b_j)`` multiplies key j's features;
* the causal order, with the queries aligned to the last Lq keys (bottom-right) when
  there are fewer queries than keys.

A full (..., Lq, Lk) mask (bool, True = take part, or additive float, 0 / -inf / a
bias) is recognised when it equals a combination of these, and is then computed
exactly as that; any other pattern is refused with the reason. Recognising one reads
its values on the host, so it needs an eager array (not a tracer inside ``jax.jit`` or
``torch.compile``): there, pass ``key_mask`` and ``causal`` instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._backend import Array, Namespace, common_namespace, device, is_cupy, is_jax, is_torch
from .features import FeatureParts

__all__ = ["MaskParts", "split_mask"]


class MaskParts(NamedTuple):
    """A mask in the terms that FAVOR+ computes exactly.

    Attributes
    ----------
    causal : bool
        Query i attends to keys j <= i + Lk - Lq only.
    key_mask : bool array, shape (..., Lk), or None
        True where a key takes part (None: every key).
    key_bias : float array, shape (..., Lk), or None
        A finite additive bias per key (None: no bias).
    """

    causal: bool
    key_mask: Array | None
    key_bias: Array | None


def _readable(x: Array) -> bool:
    """True when the host can read ``x``'s values (not a tracer of jit / compile / vmap)."""
    if is_jax(x):
        import jax

        return not isinstance(x, jax.core.Tracer)
    if is_torch(x):
        import torch

        if torch.compiler.is_compiling():
            return False
        active = getattr(torch._C, "_are_functorch_transforms_active", None)
        return not (active is not None and active())
    from ._backend import is_dask

    return not is_dask(x)  # a dask array's values exist only once computed


def to_host(x: Array) -> np.ndarray:
    """``x``'s values as a NumPy array on the host (bool stays bool, floats float64)."""
    if is_torch(x):
        x = x.detach().cpu()
        out = x.numpy() if x.dtype.is_floating_point is False else x.double().numpy()
    elif is_cupy(x):
        out = x.get()
    elif isinstance(x, np.ndarray):
        out = x
    else:
        try:
            out = np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError, AttributeError):
            out = np.asarray(x)
    return out if out.dtype == np.bool_ else out.astype(np.float64)


def _kind(xp: Namespace, mask: Array, name: str) -> str:
    if mask.dtype == xp.bool:
        return "bool"
    if xp.isdtype(mask.dtype, "real floating"):
        return "float"
    raise TypeError(
        f"{name} must be a boolean mask (True where a key takes part) or a real floating "
        f"additive mask (0 to keep, -inf to drop, finite values as per-key biases); "
        f"got dtype {mask.dtype}"
    )


def check_bias_values(mask: Array, name: str) -> None:
    """An additive mask holds finite values or -inf (NaN and +inf have no meaning)."""
    if not _readable(mask):
        return
    values = to_host(mask)
    bad = np.isnan(values) | (values == np.inf)
    if bad.any():
        raise ValueError(
            f"{name} (an additive float mask) must hold finite values or -inf; "
            f"got {'NaN' if np.isnan(values).any() else '+inf'}"
        )


def _drop_level(xp: Namespace, mask: Array) -> float:
    """Additive values at or below this drop the key, as -inf does: half the dtype's
    minimum, the "masked" value of Hugging Face models (``finfo.min``) with room for
    rounding. exp of such a value is 0 in every dtype; as a bias it would add nothing."""
    return float(xp.finfo(mask.dtype).min) / 2


def kept_keys(mask: Array) -> Array:
    """Where a key mask keeps its key: True entries of a bool mask; entries of an additive
    float mask above the drop level (-inf and the dtype's minimum drop a key)."""
    xp = common_namespace(key_mask=mask)
    if mask.dtype == xp.bool:
        return mask
    return mask > _drop_level(xp, mask)


def _nonzero(x: Array) -> bool:
    """True unless the host can tell that ``x`` is all zero (a traced bias is kept)."""
    return not _readable(x) or bool(np.any(to_host(x) != 0))


def key_parts(
    xp: Namespace, mask: Array, k_len: int, name: str
) -> tuple[Array | None, Array | None]:
    """A key mask of shape (..., Lk), bool or additive float, as ``(key_mask,
    key_bias)`` of the same shape (either may be None). Its leading dimensions are
    batch dimensions: (B, 1, Lk) broadcasts over the heads of (B, H, L, d) inputs."""
    kind = _kind(xp, mask, name)
    if mask.ndim < 1 or mask.shape[-1] != k_len:
        raise ValueError(
            f"{name} must have shape (..., Lk) with Lk = {k_len} keys; "
            f"got shape {tuple(mask.shape)}"
        )
    if kind == "bool":
        return mask, None
    check_bias_values(mask, name)
    keep = kept_keys(mask)
    bias = xp.where(keep, mask, xp.zeros((), dtype=mask.dtype, device=device(mask)))
    if not _readable(mask):
        return keep, bias
    keep_host = to_host(keep)
    return (None if bool(np.all(keep_host)) else keep), (bias if _nonzero(bias) else None)


def split_mask(mask: Array, q_len: int, k_len: int, *, name: str = "attn_mask") -> MaskParts:
    """Decompose an attention mask into causal order, key mask and per-key bias.

    Parameters
    ----------
    mask : array, bool or real floating
        SDPA's conventions: bool True where a query may attend to a key, or an
        additive float mask (0 to keep, -inf to drop, any other finite value added
        to the scores; values at or below half the dtype's minimum drop a key like
        -inf, as Hugging Face's ``finfo.min`` means). Shape (..., Lk), (..., 1, Lk)
        (a key mask) or (..., Lq, Lk).
    q_len, k_len : int
        The numbers of queries Lq and keys Lk.
    name : str
        The argument's name in error messages.

    Returns
    -------
    MaskParts
        ``causal`` (queries aligned to the last keys when Lq < Lk), ``key_mask``
        (bool, (..., Lk)) and ``key_bias`` (float, (..., Lk)), whose leading
        dimensions are the mask's.

    Raises
    ------
    ValueError
        For a full mask that is not "causal and/or key padding plus per-key biases"
        (it cannot be computed in linear time), and for a full mask inside a traced
        program (its values cannot be inspected there).

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus.masks import split_mask
    >>> causal = np.tril(np.ones((4, 4), dtype=bool))
    >>> padding = np.array([True, True, True, False])
    >>> parts = split_mask(causal & padding, 4, 4)
    >>> parts.causal, parts.key_mask.tolist(), parts.key_bias
    (True, [True, True, True, False], None)
    """
    xp = common_namespace(**{name: mask})
    kind = _kind(xp, mask, name)
    shape = tuple(mask.shape)
    if mask.ndim == 0 or shape[-1] != k_len:
        raise ValueError(
            f"{name} must have shape (..., Lk), (..., 1, Lk) or (..., Lq, Lk) with "
            f"Lq = {q_len} queries and Lk = {k_len} keys; got shape {shape}"
        )
    if mask.ndim == 1 or shape[-2] == 1:
        key_mask, key_bias = key_parts(xp, mask if mask.ndim == 1 else mask[..., 0, :], k_len, name)
        return MaskParts(False, key_mask, key_bias)
    if shape[-2] != q_len:
        raise ValueError(
            f"{name} must have shape (..., Lk), (..., 1, Lk) or (..., Lq, Lk) with "
            f"Lq = {q_len} queries and Lk = {k_len} keys; got shape {shape}"
        )
    if not _readable(mask):
        raise ValueError(
            f"{name} of shape {shape} (one row per query) cannot be inspected inside a traced "
            "program (jax.jit, torch.compile, vmap): FAVOR+ can only compute masks that "
            "are causal and/or key padding in linear time. Pass key_mask (..., Lk) and "
            "causal=True instead"
        )
    if kind == "float":
        check_bias_values(mask, name)
    values = to_host(mask)
    allowed = values if kind == "bool" else values > _drop_level(xp, mask)
    rows = np.arange(q_len)[:, None]
    cols = np.arange(k_len)[None, :]
    tri = cols <= rows + (k_len - q_len)
    # The last query sees every key under either order: its row is the key pattern.
    keys = allowed[..., -1, :]
    causal = False
    if not np.array_equal(np.broadcast_to(keys[..., None, :], allowed.shape), allowed):
        causal = True
        if q_len > k_len or not np.array_equal(keys[..., None, :] & tri, allowed):
            raise ValueError(
                f"{name} is not computable by FAVOR+ in linear time: it must be the same "
                "for every query (a key mask), or causal (query i sees keys j <= i + Lk - Lq) "
                "combined with such a key mask, plus at most a per-key additive bias; got "
                f"another pattern of shape {shape}. Arbitrary (Lq, Lk) patterns need exact "
                "attention (favorplus.softmax_attention)"
            )
    bias = None
    if kind == "float":
        seen = np.where(allowed, values, -np.inf).max(axis=-2)  # per key, over its rows
        column = np.where(np.isfinite(seen), seen, 0.0)
        differ = allowed & (values != column[..., None, :])
        if np.any(differ):
            big = differ & (values <= -1e4)  # most likely meant as "masked"
            what = []
            if np.any(big):
                what.append(
                    f"large negative finite values (down to {float(values[big].min()):.3g}) "
                    "where other queries see the key: finite values are biases added to the "
                    "scores, not 'masked'. Write -inf (or the dtype's minimum) for masked "
                    "positions, or pass a bool mask or causal=True"
                )
            if np.any(differ & ~big):
                what.append(
                    "values that differ between queries (a per-query or relative-position bias)"
                )
            raise ValueError(
                f"{name} is not computable by FAVOR+ in linear time: its finite values must "
                f"be the same for every query that sees a key (a per-key bias); got "
                + "; and ".join(what)
            )
        if np.any(column != 0):
            bias = column
    dev = device(mask)
    key_mask = None if bool(keys.all()) else xp.asarray(keys, device=dev)
    key_bias = None if bias is None else xp.asarray(bias, dtype=mask.dtype, device=dev)
    return MaskParts(causal, key_mask, key_bias)


def combine(
    xp: Namespace,
    first: tuple[Array | None, Array | None],
    second: tuple[Array | None, Array | None],
) -> tuple[Array | None, Array | None]:
    """Two (key_mask, key_bias) pairs as one: masks and-ed, biases added."""
    (m1, b1), (m2, b2) = first, second
    mask = m1 if m2 is None else m2 if m1 is None else xp.logical_and(m1, m2)
    bias = b1 if b2 is None else b2 if b1 is None else b1 + b2
    return mask, bias


def resolve_masks(
    xp: Namespace,
    key_mask: Any,
    attn_mask: Any,
    q_len: int,
    k_len: int,
) -> MaskParts:
    """The ``key_mask`` and ``attn_mask`` arguments of the attention functions as one
    :class:`MaskParts` (causal from attn_mask's pattern only)."""
    causal = False
    pair: tuple[Array | None, Array | None] = (None, None)
    if key_mask is not None:
        common_namespace(key_mask=key_mask)
        pair = key_parts(xp, key_mask, k_len, "key_mask")
    if attn_mask is not None:
        parts = split_mask(attn_mask, q_len, k_len)
        causal = parts.causal
        pair = combine(xp, pair, (parts.key_mask, parts.key_bias))
    return MaskParts(causal, *pair)


def with_key_bias(xp: Namespace, parts: FeatureParts, key_bias: Array | None) -> FeatureParts:
    """Key features with ``exp(b_j)`` multiplied into row j: ``b_j`` is added to the
    row's log-features (before any stabilizer, so the stabilizers see it)."""
    if key_bias is None:
        return parts
    b = key_bias[..., None]
    if parts.log is None:
        return FeatureParts(sign=parts.sign, log=b, shared=True)
    return FeatureParts(sign=parts.sign, log=parts.log + b, shared=parts.shared)
