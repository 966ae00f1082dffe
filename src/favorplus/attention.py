"""Exact softmax attention and bidirectional / causal FAVOR+ attention."""

from __future__ import annotations

import math
from typing import Any

from ._backend import (
    Array,
    Namespace,
    call_core,
    cpu_block,
    device,
    exp,
    host_readable,
    split,
    stop_gradient,
    subtract,
)
from ._stabilize import NEG_INF, bidirectional_features, query_features
from ._validation import check_attention_inputs
from .features import FeatureParts, Kernel, KernelLike, feature_parts, resolve_kernel

__all__ = ["favor_attention", "favor_attention_matrix", "softmax_attention"]


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
    xp: Namespace, scale: float, qc: Array, kc: Array, w: Array | None, kern: Kernel
) -> tuple[FeatureParts, FeatureParts]:
    qparts = feature_parts(xp, qc, w, kern, scale, row_constants=False)
    kparts = feature_parts(xp, kc, w, kern, scale, row_constants=True)
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


def _favor_core(
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    key_mask: Array | None,
    xp: Namespace,
    kern: Kernel,
    scale: float,
    dtype: Any,
    causal: bool,
    chunk: int | None,
    batch: tuple[int, ...],
) -> Array:
    qc, kc, vc, w = _cast_inputs(xp, dtype, q, k, v, projection, key_mask)
    if qc.shape[-2] == 0 or kc.shape[-2] == 0:
        return xp.astype(_no_pairs(xp, qc, kc, vc, batch), v.dtype, copy=False)
    if causal:
        from .causal import causal_attention

        out, _ = causal_attention(xp, qc, kc, vc, w, key_mask, None, kern, scale, batch, chunk)
    else:
        block = block_length(qc, batch, kern, w)
        if block is None or block >= max(qc.shape[-2], kc.shape[-2]):
            qparts, kparts = _parts(xp, scale, qc, kc, w, kern)
            qf, kf = bidirectional_features(xp, qparts, kparts, key_mask)
            out = _linear_attention(xp, qf, kf, vc)
        else:
            out = _blocked_attention(xp, qc, kc, vc, w, key_mask, kern, scale, block)
    return xp.astype(out, v.dtype, copy=False)


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


def _blocked_attention(
    xp: Namespace,
    q: Array,
    k: Array,
    v: Array,
    w: Array | None,
    key_mask: Array | None,
    kern: Kernel,
    scale: float,
    block: int,
) -> Array:
    """Bidirectional FAVOR+ over blocks of keys, then of queries (CPU fast path).

    The same estimator as one pass: the per-feature key maximum is kept as a running
    maximum, and the state ``[kf^T v, sum kf]`` is rescaled whenever it grows
    (online-softmax style), so every exponent stays <= 0; the final maximum is then
    moved onto the query side exactly as in one pass.
    """

    def key_block(
        kb: Array, vb: Array, mb: Array | None, top: Array | None, state: Array | None
    ) -> tuple[Array | None, Array, bool]:
        """Fold one block of keys into (running maximum, state)."""
        kparts = feature_parts(xp, kb, w, kern, scale, row_constants=True)
        mask = None if mb is None else mb[..., None]
        factor = None
        if kparts.log is None:
            kf = kparts.sign if mask is None else xp.where(mask, kparts.sign, 0.0)
        else:
            masked = kparts.log if mask is None else xp.where(mask, kparts.log, NEG_INF)
            new = xp.max(stop_gradient(masked), axis=-2, keepdims=True)
            if top is not None:
                new = xp.maximum(new, top)
            safe = xp.where(xp.isfinite(new), new, 0.0)
            if top is not None:
                old = xp.where(xp.isfinite(top), top, 0.0)
                factor = xp.where(xp.isfinite(top), xp.exp(old - safe), 0.0)
            top = new
            kf = exp(xp, subtract(xp, masked, safe, owned=True), owned=True)
            if kparts.sign is not None:
                kf = kparts.sign * kf
        part = _key_state(xp, kf, vb)
        if state is not None:
            if factor is not None:
                state = state * xp.matrix_transpose(factor)
            part = state + part
        return top, part, kparts.shared

    def query_block(qb: Array, shift: Array | None, state: Array) -> Array:
        qparts = feature_parts(xp, qb, w, kern, scale, row_constants=False)
        return _read_state(xp, query_features(xp, qparts, shift), state)

    top = None  # running per-feature maximum of the key log-features, (..., 1, Mk)
    state = None  # (..., M, dv + 1), relative to top
    shared = False
    pieces = (split(k, block, -2), split(v, block, -2))
    masks = [None] * len(pieces[0]) if key_mask is None else split(key_mask, block, -1)
    for kb, vb, mb in zip(*pieces, masks):
        top, state, shared = key_block(kb, vb, mb, top, state)
    assert state is not None
    shift = None
    if top is not None and not shared:
        shift = xp.where(xp.isfinite(top), top, 0.0)
    outs = [query_block(qb, shift, state) for qb in split(q, block, -2)]
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=-2)


def favor_attention(
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    *,
    kernel: KernelLike = "softmax",
    causal: bool = False,
    key_mask: Array | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> Array:
    """FAVOR+ attention: an estimate of ``softmax(scale * q @ k.T) @ v`` in linear time.

    Parameters
    ----------
    q : array, shape (..., Lq, d)
    k : array, shape (..., Lk, d)
    v : array, shape (..., Lk, dv)
        Leading (batch, heads, ...) dimensions broadcast against each other.
    projection : array, shape (m, d), or None
        From :func:`favorplus.draw_projection`, same namespace and device as q.
        ``None`` only for generalized kernels (deterministic ``f(x)`` features).
    kernel : str or callable
        ``"softmax"`` (positive FAVOR+ features, the default), ``"softmax_hyperbolic"``
        (antithetic positive features, lower variance, 2m features),
        ``"softmax_trig"`` (the older trigonometric features; unbiased but the
        normaliser can approach zero or change sign: for comparison only),
        ``"relu"`` or a callable ``f`` applied elementwise to the projections
        (generalized attention, features ``f(W x)``).
    causal : bool
        Unidirectional attention: query i attends to keys j <= i (needs Lq = Lk).
        Output row t depends on nothing after position t.
    key_mask : bool array, shape (..., Lk), optional
        True where a key takes part. A masked key changes neither numerator nor
        denominator, whatever its values. Rows with no key to attend to return 0
        (also when Lk = 0; Lq = 0 gives an empty output).
    scale : float, optional
        Inner-product scale, default ``1 / sqrt(d)``.
    chunk_size : int, optional
        Causal mode only: length of the chunks of the linear-memory algorithm
        (default: chosen from the length). Never changes the result beyond float
        rounding.

    Returns
    -------
    array, shape (..., Lq, dv)
        In v's namespace, device and dtype. float16 and bfloat16 inputs are
        computed in float32; float64 stays float64.

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import draw_projection, favor_attention, softmax_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k = (rng.standard_normal((2, 128, 16)) * 0.3 for _ in range(2))
    >>> v = rng.standard_normal((2, 128, 16))
    >>> w = draw_projection(256, 16, seed=1)
    >>> out = favor_attention(q, k, v, w)
    >>> exact = softmax_attention(q, k, v)
    >>> out.shape
    (2, 128, 16)
    >>> bool(np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.05)
    True
    """
    from .causal import check_chunk_size

    kern = resolve_kernel(kernel)
    chk = check_attention_inputs(
        q, k, v, key_mask, scale, projection=projection, kernel=kern, causal=causal
    )
    statics = (
        chk.xp,
        kern,
        chk.scale,
        chk.dtype,
        bool(causal),
        check_chunk_size(chunk_size),
        chk.batch,
    )
    return call_core(_favor_core, (q, k, v, projection, key_mask), statics)


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


def _linear_attention(xp: Namespace, qf: Array, kf: Array, v: Array) -> Array:
    """``D^-1 qf (kf^T [v, 1])`` without any L x L array."""
    return _read_state(xp, qf, _key_state(xp, kf, v))


def favor_attention_matrix(
    q: Array,
    k: Array,
    projection: Array | None,
    *,
    kernel: KernelLike = "softmax",
    causal: bool = False,
    key_mask: Array | None = None,
    scale: float | None = None,
) -> Array:
    """The row-normalised attention matrix that FAVOR+ implicitly uses (O(Lq Lk) memory).

    For diagnostics on small inputs: ``favor_attention_matrix(q, k, w) @ v`` equals
    ``favor_attention(q, k, v, w)`` up to float rounding.

    Returns
    -------
    array, shape (..., Lq, Lk)
        Rows sum to 1 (rows with no key to attend to are 0).

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import draw_projection, favor_attention_matrix
    >>> x = np.random.default_rng(0).standard_normal((5, 8))
    >>> a = favor_attention_matrix(x, x, draw_projection(64, 8, seed=0), causal=True)
    >>> bool(np.allclose(a.sum(-1), 1.0)), bool(np.all(np.triu(a, 1) == 0))
    (True, True)
    """
    kern = resolve_kernel(kernel)
    chk = check_attention_inputs(
        q, k, k, key_mask, scale, projection=projection, kernel=kern, causal=causal
    )
    xp = chk.xp
    qc, kc, _, w = _cast_inputs(xp, chk.dtype, q, k, k, projection, key_mask)
    if qc.shape[-2] == 0 or kc.shape[-2] == 0:
        empty = to_batch(xp, xp.matmul(qc, xp.matrix_transpose(kc)), chk.batch, 2)  # no entry
        return xp.astype(empty, q.dtype, copy=False)
    qparts, kparts = _parts(xp, chk.scale, qc, kc, w, kern)
    qf, kf = bidirectional_features(xp, qparts, kparts, key_mask)
    scores = xp.matmul(qf, xp.matrix_transpose(kf))
    if causal:
        scores = xp.where(_tril(xp, scores.shape[-2], scores.shape[-1], scores), scores, 0.0)
    den = xp.sum(scores, axis=-1, keepdims=True)
    return xp.astype(safe_divide(xp, scores, den), q.dtype, copy=False)


def _tril(xp: Namespace, rows: int, cols: int, like: Array) -> Array:
    dev = device(like)
    i = xp.arange(rows, device=dev)[:, None]
    j = xp.arange(cols, device=dev)[None, :]
    return j <= i


def softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    key_mask: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Exact, numerically stable ``softmax(scale * q @ k.T) @ v`` (O(Lq Lk) memory).

    Same conventions as :func:`favor_attention`; the reference for tests and
    benchmarks. Rows with no key to attend to return 0.

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import softmax_attention
    >>> q = np.zeros((1, 3, 4)); k = np.zeros((1, 3, 4)); v = np.arange(12.0).reshape(1, 3, 4)
    >>> softmax_attention(q, k, v, causal=True)[0, 1]
    array([2., 3., 4., 5.])
    """
    chk = check_attention_inputs(q, k, v, key_mask, scale, causal=causal)
    statics = (chk.xp, chk.scale, chk.dtype, bool(causal), chk.batch)
    return call_core(_softmax_core, (q, k, v, key_mask), statics)


def _softmax_core(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None,
    xp: Namespace,
    scale: float,
    dtype: Any,
    causal: bool,
    batch: tuple[int, ...],
) -> Array:
    qc, kc, vc, _ = _cast_inputs(xp, dtype, q, k, v, None, key_mask)
    if qc.shape[-2] == 0 or kc.shape[-2] == 0:
        return xp.astype(_no_pairs(xp, qc, kc, vc, batch), v.dtype, copy=False)
    scores = xp.matmul(qc, xp.matrix_transpose(kc)) * scale
    allowed = None if key_mask is None else key_mask[..., None, :]
    if causal:
        tri = _tril(xp, scores.shape[-2], scores.shape[-1], scores)
        allowed = tri if allowed is None else xp.logical_and(tri, allowed)
    if allowed is not None:
        scores = xp.where(allowed, scores, float("-inf"))
    top = xp.max(scores, axis=-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    weights = xp.exp(scores - top)
    den = xp.sum(weights, axis=-1, keepdims=True)
    split_values = nonfinite_prefix(xp, vc) if causal else None
    if split_values is None:
        num = xp.matmul(weights, vc)
    else:  # later inf / NaN values reach later rows only (see nonfinite_prefix)
        finite, extra = split_values
        num = xp.matmul(weights, finite) + extra
    out = safe_divide(xp, num, den)
    return xp.astype(out, v.dtype, copy=False)
