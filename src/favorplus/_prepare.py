"""One call's checked inputs: shapes, namespace and scale checked, the masks resolved into
causal order, a bool key mask and a per-key bias, and the dropout keep mask drawn or
checked. Shared by the attention entry point and the engines it hands off to (dask)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from ._backend import (
    Array,
    Namespace,
    broadcast_shapes,
    common_namespace,
    device,
    host_readable,
    on_accelerator,
)
from ._validation import Checked, check_attention_inputs, check_flag
from .features import Kernel
from .masks import resolve_masks
from .projection import host_generator


@dataclass(frozen=True)
class Prepared:
    """Checked attention inputs with their masks resolved (see :func:`prepare`)."""

    chk: Checked
    causal: bool
    key_mask: Array | None
    key_bias: Array | None
    keep: Array | None
    keep_scale: float


def prepare(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None,
    attn_mask: Array | None,
    scale: float | None,
    *,
    projection: Array | None = None,
    kernel: Kernel | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    dropout_rng: Any = None,
    dropout_keep: Array | None = None,
) -> Prepared:
    """Check the inputs; resolve ``key_mask`` and ``attn_mask`` into causal order, a
    bool key mask and a per-key bias (:mod:`favorplus.masks`); draw or check the
    dropout keep mask. Causal calls need Lq <= Lk (queries aligned to the last keys)."""
    causal = check_flag("causal", causal)
    chk = check_attention_inputs(q, k, v, None, scale, projection=projection, kernel=kernel)
    xp = chk.xp
    common_namespace(q=q, key_mask=key_mask, attn_mask=attn_mask, dropout_keep=dropout_keep)
    lq, lk = q.shape[-2], k.shape[-2]
    parts = resolve_masks(xp, key_mask, attn_mask, lq, lk)
    causal = causal or parts.causal
    if causal and lq > lk:
        raise ValueError(
            f"causal attention needs at most as many queries as keys (the queries are the "
            f"last Lq of the Lk positions); got q.shape={tuple(q.shape)} and "
            f"k.shape={tuple(k.shape)}"
        )
    shapes = [chk.batch]
    names = ["q, k and v"]
    if parts.key_mask is not None:
        shapes.append(parts.key_mask.shape[:-1])
        names.append("key_mask" if attn_mask is None else "the key masks")
    if parts.key_bias is not None:
        shapes.append(parts.key_bias.shape[:-1])
        names.append("the key biases")
    batch = broadcast_shapes(*shapes, names=names)
    keep = _dropout_keep(xp, q, dropout_p, dropout_rng, dropout_keep, batch, lk)
    if keep is not None:
        batch = broadcast_shapes(batch, keep.shape[:-1], names=["the inputs", "dropout_keep"])
    return Prepared(
        Checked(xp=xp, batch=batch, scale=chk.scale, dtype=chk.dtype),
        causal,
        parts.key_mask,
        parts.key_bias,
        keep,
        1.0 / (1.0 - float(dropout_p)),
    )


def check_dropout_p(p: Any) -> float:
    """``dropout_p`` as a float in [0, 1), else a TypeError / ValueError naming it."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1); got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {p!r}")
    return p


def _dropout_keep(
    xp: Namespace,
    like: Array,
    p: float,
    rng: Any,
    keep: Array | None,
    batch: tuple[int, ...],
    k_len: int,
) -> Array | None:
    """Per-key numerator weights, 0 for dropped keys and 1 / (1 - p) for kept ones."""
    p = check_dropout_p(p)
    if keep is None:
        if p == 0.0:
            return None
        if not host_readable(like) and not on_accelerator(like):
            raise ValueError(
                "dropout_p > 0 inside a traced program (jax.jit, torch.compile, vmap) needs "
                "dropout_keep drawn with the framework's own random numbers: a host draw "
                "would be one fixed mask baked into the program"
            )
        gen = host_generator(rng, "dropout_rng")
        drawn = gen.random((*batch, k_len)) >= p
        keep = xp.asarray(drawn, device=device(like))
    else:
        if rng is not None:
            raise ValueError("pass dropout_rng or dropout_keep, not both")
        if keep.dtype != xp.bool:
            raise TypeError(
                f"dropout_keep must be a boolean array (True where a key is kept); "
                f"got dtype {keep.dtype}"
            )
        if keep.ndim < 1 or keep.shape[-1] != k_len:
            raise ValueError(
                f"dropout_keep must have shape (..., Lk) with Lk = {k_len} keys; "
                f"got shape {tuple(keep.shape)}"
            )
    return keep
