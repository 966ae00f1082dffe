"""What the attention algorithms share: their inputs in the compute dtype with masked
keys zeroed, the factored features of queries and keys (per-key biases included), the
CPU block length, broadcasting to the batch shape, the guarded normaliser division and
the handling of non-finite values in causal products.

Both :mod:`favorplus.attention` (bidirectional FAVOR+, exact attention, the public
functions) and :mod:`favorplus.causal` (the causal algorithm) build on this module, which
imports neither of them.
"""

from __future__ import annotations

import math
from typing import Any

from ._backend import Array, Namespace, cpu_block, device, host_readable
from .features import FeatureParts, Kernel, feature_parts
from .masks import with_key_bias


def _apply_key_mask(xp: Namespace, x: Array, key_mask: Array | None) -> Array:
    """Zero masked keys or values so that nothing of them (not even NaN) can leak."""
    if key_mask is None:
        return x
    return xp.where(key_mask[..., None], x, 0.0)


def safe_divide(xp: Namespace, num: Array, den: Array) -> Array:
    """``num / den``, and 0 on rows whose normaliser is exactly 0 (no key to attend to).

    There the divisor becomes inf (finite / inf = 0): one select on the small ``den``,
    none on the output; other rows are divided exactly as by ``den``.
    """
    return num / xp.where(den == 0, float("inf"), den)


def nonfinite_prefix(xp: Namespace, v: Array) -> tuple[Array, Array] | None:
    """For causal products ``weights @ v`` whose weights above the diagonal are 0.

    A product would turn those zeros times a later inf or NaN value into NaN in
    earlier rows (a leak from the future). Returns ``(finite, extra)``: v with its
    non-finite entries set to 0, and what they add to each row i of the product,
    ``-0.0`` (adds nothing, bit for bit) or the inf / NaN that the arithmetic of positive
    weights gives from the values at positions <= i along axis -2: +inf, -inf, or NaN
    (NaN, or infinities of both signs). ``weights @ finite + extra`` is then the
    product with the future left out. None where v is all finite, checked on eager CPU
    arrays; elsewhere (traced programs, GPUs) always computed: two running counts and a
    few selects over v, O(L dv), against the products' O(L m d).
    """
    if host_readable(v) and bool(xp.all(xp.isfinite(v))):
        return None
    nan = xp.isnan(v)
    up = xp.logical_or(v == float("inf"), nan)
    down = xp.logical_or(v == float("-inf"), nan)
    up = xp.cumulative_sum(xp.astype(up, xp.int32), axis=v.ndim - 2) > 0
    down = xp.cumulative_sum(xp.astype(down, xp.int32), axis=v.ndim - 2) > 0
    dt, dev = v.dtype, device(v)

    def const(x: float) -> Array:
        return xp.asarray(x, dtype=dt, device=dev)

    extra = xp.where(
        up,
        xp.where(down, const(float("nan")), const(float("inf"))),
        xp.where(down, const(float("-inf")), const(-0.0)),
    )
    return xp.where(xp.isfinite(v), v, const(0.0)), extra


def _cast_inputs(
    xp: Namespace,
    dtype: Any,
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    key_mask: Array | None,
) -> tuple[Array, Array, Array, Array | None]:
    """Inputs in the compute dtype; masked keys and values zeroed."""
    qc = xp.astype(q, dtype, copy=False)
    kc = _apply_key_mask(xp, xp.astype(k, dtype, copy=False), key_mask)
    vc = _apply_key_mask(xp, xp.astype(v, dtype, copy=False), key_mask)
    w = None if projection is None else xp.astype(projection, dtype, copy=False)
    return qc, kc, vc, w


def _parts(
    xp: Namespace,
    scale: float,
    qc: Array,
    kc: Array,
    w: Array | None,
    kern: Kernel,
    key_bias: Array | None = None,
) -> tuple[FeatureParts, FeatureParts]:
    qparts = feature_parts(xp, qc, w, kern, scale, row_constants=False, role="query")
    kparts = with_key_bias(
        xp, feature_parts(xp, kc, w, kern, scale, row_constants=True, role="key"), key_bias
    )
    return qparts, kparts


def to_batch(xp: Namespace, x: Array, batch: tuple[int, ...], tail: int) -> Array:
    """``x`` broadcast to ``(*batch, *x.shape[-tail:])`` (x itself if it has that shape)."""
    target = (*batch, *x.shape[x.ndim - tail :])
    return x if tuple(x.shape) == target else xp.broadcast_to(x, target)


def _no_pairs(xp: Namespace, q: Array, k: Array, v: Array, batch: tuple[int, ...]) -> Array:
    """Attention of inputs without a query or without a key: ``(q @ k^T) @ v``, which
    is then empty, or exactly 0 (rows with no key to attend to return 0). Built from
    the inputs, so that autodiff graphs stay connected (their gradients are 0)."""
    return to_batch(xp, xp.matmul(xp.matmul(q, xp.matrix_transpose(k)), v), batch, 2)


def block_length(
    x: Array,
    batch: tuple[int, ...],
    kern: Kernel,
    w: Array | None,
    multiple: int = 1,
    *,
    training: bool = False,
) -> int | None:
    """Tokens per CPU block for inputs like ``x`` (None: no blocking, see cpu_block)."""
    features = kern.num_features(w.shape[0] if w is not None else x.shape[-1])
    return cpu_block(x, max(1, math.prod(batch)) * features, multiple, training=training)


def _key_state(xp: Namespace, kf: Array, v: Array) -> Array:
    """``kf^T [v, 1]``, shape (..., M, dv + 1): the numerator and normaliser states."""
    kv = xp.matmul(xp.matrix_transpose(kf), v)
    ksum = xp.sum(kf, axis=-2)[..., None]
    batch = kv.shape[:-2]
    if ksum.shape[:-2] != batch:
        ksum = xp.broadcast_to(ksum, (*batch, *ksum.shape[-2:]))
    return xp.concat([kv, ksum], axis=-1)


def _read_state(xp: Namespace, qf: Array, state: Array) -> Array:
    """``D^-1 qf state``: outputs from query features and a key state."""
    out = xp.matmul(qf, state)
    return safe_divide(xp, out[..., :-1], out[..., -1:])


def core_inputs(
    xp: Namespace,
    dtype: Any,
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    key_mask: Array | None,
    key_bias: Array | None = None,
    keep: Array | None = None,
    keep_scale: float = 1.0,
) -> tuple[Array, Array, Array, Array | None, Array | None]:
    """What every attention core starts from: q, k, v and the projection in the compute
    dtype with masked keys zeroed (:func:`_cast_inputs`), the key biases in the compute
    dtype, and the dropout keep mask applied to the values (dropped keys leave the
    numerator only, by a select: nothing of them leaks)."""
    qc, kc, vc, w = _cast_inputs(xp, dtype, q, k, v, projection, key_mask)
    bias = None if key_bias is None else xp.astype(key_bias, dtype, copy=False)
    if keep is not None:
        vc = xp.where(keep[..., None], vc * keep_scale, 0.0)
    return qc, kc, vc, w, bias
