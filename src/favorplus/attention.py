"""Exact softmax attention and bidirectional / causal FAVOR+ attention."""

from __future__ import annotations

from typing import Any

from ._backend import (
    Array,
    Namespace,
    broadcast_shapes,
    call_core,
    chunk_loop,
    common_namespace,
    device,
    exp,
    is_dask,
    is_jax,
    scanned_form,
    split,
    stop_gradient,
)
from ._fastpath import dispatch
from ._inputs import (
    _cast_inputs,
    _key_state,
    _no_pairs,
    _parts,
    _read_state,
    block_length,
    core_inputs,
    nonfinite_prefix,
    safe_divide,
    to_batch,
)
from ._prepare import prepare
from ._stabilize import NEG_INF, below, bidirectional_features, query_features
from ._validation import check_attention_inputs, check_flag
from .features import Kernel, KernelLike, feature_parts, resolve_kernel
from .masks import check_bias_values, with_key_bias

__all__ = ["favor_attention", "favor_attention_matrix", "softmax_attention"]

# Block length of the scanned bidirectional form (traced JAX programs on a CPU).
SCANNED_BLOCK = 256


def _favor_core(
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    key_mask: Array | None,
    key_bias: Array | None,
    keep: Array | None,
    xp: Namespace,
    kern: Kernel,
    scale: float,
    dtype: Any,
    causal: bool,
    chunk: int | None,
    batch: tuple[int, ...],
    keep_scale: float = 1.0,
) -> Array:
    qc, kc, vc, w, bias = core_inputs(
        xp, dtype, q, k, v, projection, key_mask, key_bias, keep, keep_scale
    )
    if qc.shape[-2] == 0 or kc.shape[-2] == 0:
        return xp.astype(_no_pairs(xp, qc, kc, vc, batch), v.dtype, copy=False)
    if causal:
        out = _causal_aligned(xp, qc, kc, vc, w, key_mask, bias, kern, scale, batch, chunk)
    else:
        block = block_length(qc, batch, kern, w)
        if scanned_form(qc):
            out = _scanned_bidirectional(
                xp, qc, kc, vc, w, key_mask, kern, scale, SCANNED_BLOCK, bias
            )
        elif block is None or block >= max(qc.shape[-2], kc.shape[-2]):
            qparts, kparts = _parts(xp, scale, qc, kc, w, kern, bias)
            qf, kf = bidirectional_features(xp, qparts, kparts, key_mask)
            out = _linear_attention(xp, qf, kf, vc)
        else:
            out = _blocked_attention(xp, qc, kc, vc, w, key_mask, kern, scale, block, bias)
    return xp.astype(out, v.dtype, copy=False)


def _causal_aligned(
    xp: Namespace,
    qc: Array,
    kc: Array,
    vc: Array,
    w: Array | None,
    key_mask: Array | None,
    bias: Array | None,
    kern: Kernel,
    scale: float,
    batch: tuple[int, ...],
    chunk: int | None,
) -> Array:
    """Causal attention with the Lq queries at the last Lq of the Lk key positions
    (bottom-right aligned): the first Lk - Lq keys only form the initial state."""
    from .causal import causal_attention

    before = kc.shape[-2] - qc.shape[-2]
    state = None
    if before:

        def head(x: Array | None, axis: int) -> Array | None:
            return None if x is None else _take(x, 0, before, axis)

        def tail(x: Array | None, axis: int) -> Array | None:
            return None if x is None else _take(x, before, kc.shape[-2], axis)

        # The prefix's own outputs are not needed: zero queries stand in for them.
        zq = xp.zeros((*qc.shape[:-2], before, qc.shape[-1]), dtype=qc.dtype, device=device(qc))
        _, state = causal_attention(
            xp, zq, head(kc, -2), head(vc, -2), w, head(key_mask, -1), None, kern, scale,
            batch, chunk, key_bias=head(bias, -1),
        )  # fmt: skip
        kc, vc, key_mask, bias = tail(kc, -2), tail(vc, -2), tail(key_mask, -1), tail(bias, -1)
    out, _ = causal_attention(
        xp, qc, kc, vc, w, key_mask, state, kern, scale, batch, chunk, key_bias=bias
    )
    return out


def _take(x: Array, start: int, stop: int, axis: int) -> Array:
    """``x[start:stop]`` along ``axis`` (negative)."""
    after = (slice(None),) * (-axis - 1)
    return x[(..., slice(start, stop), *after)]


def _key_block(
    xp: Namespace,
    w: Array | None,
    kern: Kernel,
    scale: float,
    kb: Array,
    vb: Array,
    mb: Array | None,
    bb: Array | None,
    top: Array | None,
    state: Array | None,
) -> tuple[Array | None, Array, bool]:
    """Fold one block of keys into (running per-feature maximum, state): the key pass
    of the blocked bidirectional form (``top`` and ``state`` None before the first
    block); returns the new maximum, state and whether the log-features are shared."""
    kparts = with_key_bias(
        xp, feature_parts(xp, kb, w, kern, scale, row_constants=True, role="key"), bb
    )
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
        kf = exp(xp, below(xp, masked, safe, owned=True), owned=True)
        if kparts.sign is not None:
            kf = kparts.sign * kf
    part = _key_state(xp, kf, vb)
    if state is not None:
        if factor is not None:
            state = state * xp.matrix_transpose(factor)
        part = state + part
    return top, part, kparts.shared


def _query_block(
    xp: Namespace,
    w: Array | None,
    kern: Kernel,
    scale: float,
    qb: Array,
    shift: Array | None,
    state: Array,
) -> Array:
    """Outputs of one block of queries from the final key state (the query pass)."""
    qparts = feature_parts(xp, qb, w, kern, scale, row_constants=False, role="query")
    return _read_state(xp, query_features(xp, qparts, shift), state)


def _final_shift(xp: Namespace, top: Array | None, shared: bool) -> Array | None:
    """The key pass's final maximum, moved onto the query side (None: nothing to move)."""
    if top is None or shared:
        return None
    return xp.where(xp.isfinite(top), top, 0.0)


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
    key_bias: Array | None = None,
) -> Array:
    """Bidirectional FAVOR+ over blocks of keys, then of queries (CPU fast path).

    The same estimator as one pass: the per-feature key maximum is kept as a running
    maximum, and the state ``[kf^T v, sum kf]`` is rescaled whenever it grows
    (online-softmax style), so every exponent stays <= 0; the final maximum is then
    moved onto the query side exactly as in one pass.
    """
    top = None  # running per-feature maximum of the key log-features, (..., 1, Mk)
    state = None  # (..., M, dv + 1), relative to top
    shared = False
    pieces = (split(k, block, -2), split(v, block, -2))
    nothing = [None] * len(pieces[0])
    masks = nothing if key_mask is None else split(key_mask, block, -1)
    biases = nothing if key_bias is None else split(key_bias, block, -1)
    for kb, vb, mb, bb in zip(*pieces, masks, biases):
        top, state, shared = _key_block(xp, w, kern, scale, kb, vb, mb, bb, top, state)
    assert state is not None
    shift = _final_shift(xp, top, shared)
    outs = [_query_block(xp, w, kern, scale, qb, shift, state) for qb in split(q, block, -2)]
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=-2)


def _explicit_sequence_call(
    seq_axis: Any,
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    *,
    attn_mask: Array | None,
    dropout_p: float,
    dropout_rng: Any,
    **options: Any,
) -> Array:
    """favor_attention on JAX arrays whose sequence axis is sharded over Explicit mesh
    axes (``jax.jit`` with a ``NamedSharding``): the sharded call inside ``jax.shard_map``
    with ``axis_name`` those axes (see ``_jax_collectives.sequence_shard_map``)."""
    from ._jax_collectives import sequence_shard_map

    where = f"on a sequence sharded over the explicit mesh axes {seq_axis!r}"
    if attn_mask is not None:
        raise ValueError(
            f"attn_mask is not supported {where}: pass key_mask (and causal=True) instead, "
            f"sharded like the keys"
        )
    if dropout_p and dropout_rng is not None:
        raise ValueError(
            f"dropout_rng is not supported {where}: pass dropout_keep, sharded like the keys"
        )
    arrays = {"q": q, "k": k, "v": v, "projection": projection}
    for name in ("key_mask", "dropout_keep"):
        if options[name] is not None:
            arrays[name] = options.pop(name)
    arrays = {n: x for n, x in arrays.items() if x is not None}

    def call(projection: Array | None = None, **parts: Any) -> Array:
        return favor_attention(
            parts.pop("q"), parts.pop("k"), parts.pop("v"), projection,
            dropout_p=dropout_p, **options, **parts,
        )  # fmt: skip

    return sequence_shard_map(call, seq_axis, arrays)


def _scanned_bidirectional(
    xp: Namespace,
    q: Array,
    k: Array,
    v: Array,
    w: Array | None,
    key_mask: Array | None,
    kern: Kernel,
    scale: float,
    block: int,
    key_bias: Array | None = None,
) -> Array:
    """:func:`_blocked_attention` in a traced JAX program on a CPU: each pass one
    ``lax.scan`` over blocks (:func:`chunk_loop`), whose temporaries stay block-sized
    (no L x m array stored)."""
    shared = []

    def key_step(carry: Any, chunks: list[Array | None]) -> tuple[Any, None]:
        top, state = (None, None) if carry is None else carry
        top, state, flag = _key_block(xp, w, kern, scale, *chunks, top, state)
        shared.append(flag)
        return (top, state), None

    (top, state), _ = chunk_loop(
        key_step, None, [k, v, key_mask, key_bias], [-2, -2, -1, -1], block
    )
    shift = _final_shift(xp, top, shared[0])

    def query_step(carry: Any, chunks: list[Array | None]) -> tuple[Any, Array]:
        return carry, _query_block(xp, w, kern, scale, chunks[0], shift, state)

    _, out = chunk_loop(query_step, (), [q], [-2], block)
    return out


def favor_attention(
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    *,
    kernel: KernelLike = "softmax",
    causal: bool = False,
    key_mask: Array | None = None,
    attn_mask: Array | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    dropout_p: float = 0.0,
    dropout_rng: Any = None,
    dropout_keep: Array | None = None,
    axis_name: Any = None,
    process_group: Any = None,
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
        Unidirectional attention: query i attends to keys j <= i + Lk - Lq (needs
        Lq <= Lk; with fewer queries than keys they are the last Lq positions, as in
        cached decoding or a prompt fed in pieces). Output row t depends on nothing
        after position t.
    key_mask : array, shape (..., Lk) or (..., 1, Lk), optional
        Boolean: True where a key takes part. A masked key changes neither numerator
        nor denominator, whatever its values. Real floating: an additive mask, 0 to
        keep a key, -inf to drop it (so does any value at or below half the dtype's
        minimum, Hugging Face's ``finfo.min``), any other finite value ``b_j`` added
        to every score of key j (exact: ``exp(b_j)`` multiplies its features). Rows with no
        key to attend to return 0 (also when Lk = 0; Lq = 0 gives an empty output).
    attn_mask : array, optional
        An attention mask with the conventions of SDPA (bool True where a query may
        attend to a key, or additive float), broadcastable to (..., Lq, Lk). A mask
        with one row for all queries is a key mask as above. A full (..., Lq, Lk)
        mask is recognised when it equals a key mask and/or the causal mask (which
        then makes the call causal) plus per-key biases, and computed exactly as
        such; any other pattern raises a ``ValueError`` (FAVOR+ cannot compute it
        in linear time), as does a full mask inside a traced program (``jax.jit``,
        ``torch.compile``), where its values cannot be read: pass ``key_mask`` and
        ``causal`` there. See :func:`favorplus.masks.split_mask`.
    scale : float, optional
        Inner-product scale, default ``1 / sqrt(d)``.
    chunk_size : int, optional
        Causal mode only: length of the chunks of the linear-memory algorithm
        (default: chosen from the length). Never changes the result beyond float
        rounding.
    dropout_p : float
        Attention dropout in linear time: each key is dropped with probability p,
        independently for every row of the leading (batch, heads) dimensions and
        shared by all its queries, from the numerator only; kept keys are scaled by
        ``1 / (1 - p)``. The expectation over the draw is the undropped output
        (the normaliser is left whole, so it is never 0 because of dropout).
    dropout_rng : int, numpy.random.Generator or None
        The host generator for the keep mask when ``dropout_p > 0`` (None: fresh
        entropy). Eager arrays only.
    dropout_keep : bool array, shape (..., Lk), optional
        Instead of ``dropout_rng``: the keep mask drawn by the caller with its own
        framework's random numbers (as the torch and Flax layers do); True where a
        key is kept, scaled by ``1 / (1 - dropout_p)``.
    axis_name : hashable, optional
        Sequence parallelism in JAX: inside ``jax.shard_map`` with the sequence axis of
        q, k, v (and of the key masks) sharded over this mesh axis (or tuple of axes),
        in order, every shard computes its own queries' outputs, exchanging only the
        key summaries (m x (dv + 1) numbers per row; see :mod:`favorplus.summaries`
        and the user guide's "Distributed" page). Causal shards need Lq = Lk. Under
        ``jax.jit`` on keys whose sequence axis is sharded over ``Explicit`` mesh axes
        (a ``NamedSharding``), leave it out: the call runs inside ``jax.shard_map`` with
        those axes by itself.
    process_group : torch.distributed ProcessGroup, DeviceMesh or (DeviceMesh, dim), optional
        The same for PyTorch: every rank of the group holds a contiguous piece of the
        sequence, in rank order (lengths may differ between ranks).

    Returns
    -------
    array, shape (..., Lq, dv)
        In v's namespace, device and dtype. float16 and bfloat16 inputs are
        computed in float32; float64 stays float64.

    Notes
    -----
    Dask arrays (q, k, v chunked along the sequence, any chunks; NumPy projection and
    masks beside them are fine) give a lazy dask array with q's chunks: nothing is
    computed during the call, and each task works on one chunk and a summary of
    m x (dv + 1) numbers per row (see the user guide's "Distributed" page).

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

    A full causal-and-padding mask, as model code builds it, is computed exactly as
    ``causal=True`` with a key mask:

    >>> pad = np.arange(128) < 100
    >>> full = np.tril(np.ones((128, 128), dtype=bool)) & pad
    >>> a = favor_attention(q, k, v, w, attn_mask=full)
    >>> b = favor_attention(q, k, v, w, causal=True, key_mask=pad)
    >>> bool(np.allclose(a, b))
    True
    """
    from .causal import check_chunk_size

    kern = resolve_kernel(kernel)
    if any(is_dask(x) for x in (q, k, v)):
        if axis_name is not None or process_group is not None:
            raise ValueError(
                "axis_name / process_group are for JAX arrays and torch tensors; dask arrays "
                "are already split along the sequence by their chunks: pass neither"
            )
        from ._dask import dask_attention

        return dask_attention(
            q, k, v, projection, kern=kern, causal=causal, key_mask=key_mask,
            attn_mask=attn_mask, scale=scale, chunk_size=chunk_size, dropout_p=dropout_p,
            dropout_rng=dropout_rng, dropout_keep=dropout_keep,
        )  # fmt: skip
    if axis_name is None and process_group is None and is_jax(k):
        from ._jax_collectives import explicit_sequence_axis

        seq_axis = explicit_sequence_axis(k)
        if seq_axis is not None:  # jax.jit on a sequence sharded over Explicit mesh axes
            return _explicit_sequence_call(
                seq_axis, q, k, v, projection, kernel=kernel, causal=causal,
                key_mask=key_mask, attn_mask=attn_mask, scale=scale, chunk_size=chunk_size,
                dropout_p=dropout_p, dropout_rng=dropout_rng, dropout_keep=dropout_keep,
            )  # fmt: skip
    prep = prepare(
        q, k, v, key_mask, attn_mask, scale, projection=projection, kernel=kern,
        causal=causal, dropout_p=dropout_p, dropout_rng=dropout_rng, dropout_keep=dropout_keep,
    )  # fmt: skip
    chk = prep.chk
    statics = (
        chk.xp,
        kern,
        chk.scale,
        chk.dtype,
        prep.causal,
        check_chunk_size(chunk_size),
        chk.batch,
        prep.keep_scale,
    )
    arrays = (q, k, v, projection, prep.key_mask, prep.key_bias, prep.keep)
    if axis_name is not None or process_group is not None:
        if getattr(kern, "spec", None) is not None:
            raise ValueError(
                "axis_name / process_group (sharded sequences) support the FAVOR+ kernels; "
                f"got the estimator {kern.name!r}, whose parameters would differ per shard"
            )
        from .sharded import sharded_call

        return sharded_call(arrays, statics, axis_name, process_group)
    if getattr(kern, "spec", None) is not None:  # OPRF / SADERF: favorplus.estimators
        from .estimators import LEAK, call_estimator

        refuse = f"in causal attention {LEAK}" if prep.causal else None
        return call_estimator(
            _favor_core,
            arrays,
            statics,
            kern,
            xp=chk.xp,
            scale=chk.scale,
            dtype=chk.dtype,
            batch=chk.batch,
            refuse=refuse,
        )
    fused = dispatch(
        q, k, v, projection, prep, kern, statics[5], lambda *a: _favor_core(*a, None, *statics)
    )
    if fused is not None:
        return fused  # the fused GPU kernels (see _fastpath.py)
    return call_core(_favor_core, arrays, statics)


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
    attn_mask: Array | None = None,
    scale: float | None = None,
) -> Array:
    """The row-normalised attention matrix that FAVOR+ implicitly uses (O(Lq Lk) memory).

    For diagnostics on small inputs, and for the ``need_weights`` /
    ``output_attentions`` of the framework layers: ``favor_attention_matrix(q, k, w)
    @ v`` equals ``favor_attention(q, k, v, w)`` up to float rounding, with the same
    ``kernel``, ``causal``, ``key_mask``, ``attn_mask`` and ``scale`` arguments (and
    the same refusals) as :func:`favor_attention`.

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
    prep = prepare(
        q, k, k, key_mask, attn_mask, scale, projection=projection, kernel=kern, causal=causal
    )
    chk, key_mask = prep.chk, prep.key_mask
    xp = chk.xp
    qc, kc, _, w = _cast_inputs(xp, chk.dtype, q, k, k, projection, key_mask)
    if qc.shape[-2] == 0 or kc.shape[-2] == 0:
        empty = to_batch(xp, xp.matmul(qc, xp.matrix_transpose(kc)), chk.batch, 2)  # no entry
        return xp.astype(empty, q.dtype, copy=False)
    bias = None if prep.key_bias is None else xp.astype(prep.key_bias, chk.dtype, copy=False)
    arrays = (qc, kc, w, key_mask, bias)
    statics = (xp, kern, chk.scale, prep.causal, q.dtype)
    if getattr(kern, "spec", None) is not None:  # OPRF / SADERF: favorplus.estimators
        from .estimators import LEAK, call_estimator

        refuse = f"even in the causal attention matrix {LEAK}" if prep.causal else None
        return call_estimator(
            _matrix_core,
            arrays,
            statics,
            kern,
            xp=xp,
            scale=chk.scale,
            dtype=chk.dtype,
            batch=chk.batch,
            refuse=refuse,
            mask_index=3,
        )
    return call_core(_matrix_core, arrays, statics)


def _matrix_core(
    qc: Array,
    kc: Array,
    w: Array | None,
    key_mask: Array | None,
    bias: Array | None,
    xp: Namespace,
    kern: Any,
    scale: float,
    causal: bool,
    out_dtype: Any,
) -> Array:
    """The attention matrix of inputs in the compute dtype (one compiled program on JAX)."""
    qparts, kparts = _parts(xp, scale, qc, kc, w, kern, bias)
    qf, kf = bidirectional_features(xp, qparts, kparts, key_mask)
    scores = xp.matmul(qf, xp.matrix_transpose(kf))
    if causal:
        scores = xp.where(_tril(xp, scores.shape[-2], scores.shape[-1], scores), scores, 0.0)
    den = xp.sum(scores, axis=-1, keepdims=True)
    return xp.astype(safe_divide(xp, scores, den), out_dtype, copy=False)


def _tril(xp: Namespace, rows: int, cols: int, like: Array) -> Array:
    """Query i (of the last ``rows`` positions) may see key j: j <= i + cols - rows."""
    dev = device(like)
    i = xp.arange(rows, device=dev)[:, None]
    j = xp.arange(cols, device=dev)[None, :]
    return j <= i + (cols - rows)


def softmax_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    key_mask: Array | None = None,
    attn_mask: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Exact, numerically stable ``softmax(scale * q @ k.T) @ v`` (O(Lq Lk) memory).

    Same conventions as :func:`favor_attention` (causal with Lq <= Lk: the queries
    are the last positions; ``key_mask`` bool or additive float); the reference for
    tests and benchmarks. Being quadratic anyway, it takes any ``attn_mask``
    (bool, True where a query may attend to a key, or additive float, broadcastable
    to (..., Lq, Lk)). Rows with no key to attend to return 0.

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import softmax_attention
    >>> q = np.zeros((1, 3, 4)); k = np.zeros((1, 3, 4)); v = np.arange(12.0).reshape(1, 3, 4)
    >>> softmax_attention(q, k, v, causal=True)[0, 1]
    array([2., 3., 4., 5.])
    """
    from .masks import key_parts

    causal = check_flag("causal", causal)
    chk = check_attention_inputs(q, k, v, None, scale)
    xp = chk.xp
    common_namespace(q=q, key_mask=key_mask, attn_mask=attn_mask)
    lq, lk = q.shape[-2], k.shape[-2]
    if causal and lq > lk:
        raise ValueError(
            f"causal attention needs at most as many queries as keys (the queries are the "
            f"last Lq of the Lk positions); got q.shape={tuple(q.shape)} and "
            f"k.shape={tuple(k.shape)}"
        )
    shapes, names = [chk.batch], ["q, k and v"]
    mask, bias = None, None
    if key_mask is not None:
        mask, bias = key_parts(xp, key_mask, lk, "key_mask")
        for part in (mask, bias):
            if part is not None:
                shapes.append(part.shape[:-1])
                names.append("key_mask")
    if attn_mask is not None:
        _check_full_mask(xp, attn_mask, lq, lk)
        shapes.append(attn_mask.shape[:-2])
        names.append("attn_mask")
    batch = broadcast_shapes(*shapes, names=names)
    statics = (xp, chk.scale, chk.dtype, causal, batch)
    return call_core(_softmax_core, (q, k, v, mask, bias, attn_mask), statics)


def _check_full_mask(xp: Namespace, mask: Array, lq: int, lk: int) -> None:
    """An attention mask for exact attention: bool or real float, broadcastable to
    (..., Lq, Lk)."""
    if mask.dtype != xp.bool and not xp.isdtype(mask.dtype, "real floating"):
        raise TypeError(
            f"attn_mask must be a boolean mask (True where a query may attend to a key) or "
            f"a real floating additive mask; got dtype {mask.dtype}"
        )
    shape = tuple(mask.shape)
    if len(shape) < 2 or shape[-1] not in (1, lk) or shape[-2] not in (1, lq):
        raise ValueError(
            f"attn_mask must have shape (..., Lq, Lk) or broadcast to it (Lq = {lq}, "
            f"Lk = {lk}); got shape {shape}"
        )
    if mask.dtype != xp.bool:
        check_bias_values(mask, "attn_mask")


def _softmax_core(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None,
    key_bias: Array | None,
    attn_mask: Array | None,
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
    if key_bias is not None:
        scores = scores + xp.astype(key_bias, dtype, copy=False)[..., None, :]
    if attn_mask is not None:
        if attn_mask.dtype == xp.bool:
            extra = attn_mask
        else:
            extra = attn_mask != float("-inf")
            scores = scores + xp.where(extra, xp.astype(attn_mask, dtype, copy=False), 0.0)
        allowed = extra if allowed is None else xp.logical_and(allowed, extra)
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
        # Query i is key position i + Lk - Lq (bottom-right): its row of the prefix.
        num = xp.matmul(weights, finite) + extra[..., extra.shape[-2] - weights.shape[-2] :, :]
    out = safe_divide(xp, num, den)
    return xp.astype(out, v.dtype, copy=False)
