"""Causal FAVOR+ in linear memory, leak-free and overflow-safe, and incremental decoding.

The algorithm (FAVOR-NOTES section 5) is scalar-gated linear attention. Let ``u_j`` be
key j's log-features and ``c_j = max(c_{j-1}, level(max_r u_{j,r}))`` the running
maximum over the past (masked keys excluded) of the keys' largest log-features, each
rounded up to a multiple of 4 (``level``). Keys are used as
``k^_j = exp(u_j - c_j) <= 1`` and the state after t keys is
``S_t = sum_{j<=t} exp(c_j - c_t) k^_j [v_j, 1]^T``. Every quantity used for output
row i depends on positions ``<= i`` only, and every exponent is ``<= 0``: no leak
from the future, no overflow. (The rounding makes c change rarely: where it does not
change, the factors ``exp(c_j - c_i)`` are exactly 1 and are skipped on a CPU.)

The sequence is cut into chunks of C tokens. Inside a chunk, row i gets
``sum_{j<=i} (q^_i . k^_j) exp(c_j - c_i) [v_j, 1]`` through C x C matrices; across
chunks, the states before each chunk come from one linear scan over the chunks (not
the tokens), then ``exp(c_prev - c_i) q^_i S_prev``. Memory is
O(L (m + d) + L C + (L / C) m d); under torch autograd on a CPU, blocks of chunks are
recomputed in the backward pass, so that autograd keeps O(L (d + dv)) of them.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

from ._backend import (
    Array,
    Namespace,
    add,
    broadcast_shapes,
    call_core,
    chunk_loop,
    chunk_scan,
    cumulative_max,
    device,
    exp,
    host_readable,
    lower_triangle,
    multiply,
    needs_grad,
    on_accelerator,
    recompute,
    scanned_form,
    split,
    stop_gradient,
)
from ._inputs import (
    _no_pairs,
    _parts,
    block_length,
    core_inputs,
    nonfinite_prefix,
    safe_divide,
    to_batch,
)
from ._stabilize import NEG_INF, below, query_features
from .features import FeatureParts, KernelLike, resolve_kernel

__all__ = ["CausalState", "favor_attention_step", "init_causal_state"]

DEFAULT_CHUNK = 64
# Chunk length of the scanned form (traced JAX programs on a CPU; 32 to 128 measured
# within about 15% of each other for m = 256, d = 64 on the benchmark machine).
SCANNED_CHUNK = 64


class CausalState(NamedTuple):
    """Decoding state of causal FAVOR+ (a tuple of two arrays, a JAX pytree).

    Attributes
    ----------
    numerator : array, shape (..., M, dv + 1)
        ``sum_j exp(u_j - c) [v_j, 1]^T`` over the keys seen so far; the last column
        holds the normaliser's state.
    log_scale : array, shape (...)
        ``c``, the running maximum of the key log-features seen so far, rounded up
        to a multiple of 4 (the most negative finite number of the dtype before any
        key).
    """

    numerator: Array
    log_scale: Array


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(
            f"chunk_size must be a positive int or None; got {type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1; got {chunk_size}")
    return int(chunk_size)


def _floor(xp: Namespace, dtype: Any) -> float:
    return float(xp.finfo(dtype).min)


def _pad(xp: Namespace, x: Array, pad: int, axis: int, value: Any = 0) -> Array:
    shape = list(x.shape)
    shape[axis] = pad
    dev = device(x)
    filler = xp.full(tuple(shape), value, dtype=x.dtype, device=dev)
    return xp.concat([x, filler], axis=axis)


def _masked_running_max(xp: Namespace, x: Array, floor: float) -> Array:
    """Inclusive running maximum along the last axis (size n): the backend's own
    cumulative maximum where it has one, else an n x n masked max (same values: a
    maximum is exact)."""
    native = cumulative_max(x)
    if native is not None:
        return native
    n = x.shape[-1]
    idx = xp.arange(n, device=device(x))
    tri = idx[None, :] <= idx[:, None]
    return xp.max(xp.where(tri, x[..., None, :], floor), axis=-1)


LEVEL_STEP = 4.0


def _level(xp: Namespace, top: Array) -> Array:
    """``top`` rounded up to a multiple of LEVEL_STEP (exactly: a power of 2).

    The causal reference then changes only when a key rises above the current level,
    rarely after the first tokens, and a stretch without a change needs no rescaling
    at all (see ``flat`` in ``_causal_core``). Exponents stay <= 0; key features
    lose at most a factor exp(-LEVEL_STEP) of range before underflowing.
    """
    return xp.ceil(top / LEVEL_STEP) * LEVEL_STEP


def _running_max(xp: Namespace, x: Array, floor: float) -> Array:
    """Inclusive running maximum along the last axis, in O(n^1.5) memory.

    The backend's own cumulative maximum where it has one. The standard has none: the
    n values are cut into groups of
    about sqrt(n); a masked max gives the running maximum inside each group and
    another one the maximum of all earlier groups. A fixed number of operations,
    whatever n (so a traced program does not grow with the length).
    """
    native = cumulative_max(x)
    if native is not None:
        return native
    n = x.shape[-1]
    group = max(1, int(n**0.5 + 0.5))
    rows = -(-n // group)
    x = _pad(xp, x, rows * group - n, -1, floor)  # always (maybe by 0): a fixed program
    blocks = xp.reshape(x, (*x.shape[:-1], rows, group))
    inside = _masked_running_max(xp, blocks, floor)  # (..., rows, group)
    upto = _masked_running_max(xp, inside[..., -1], floor)  # (..., rows): through row r
    earlier = xp.concat(
        [
            xp.full((*upto.shape[:-1], 1), floor, dtype=x.dtype, device=device(x)),
            upto[..., :-1],
        ],
        axis=-1,
    )
    out = xp.maximum(inside, earlier[..., None])
    return xp.reshape(out, (*x.shape[:-1], rows * group))[..., :n]


def _is_flat(xp: Namespace, c: Array, before: Array) -> bool:
    """True when every token's reference equals that before its chunk (no new level in
    any chunk): all the rescaling factors are then exp(0) = 1, and skipping them changes
    no bit. Checked on eager CPU arrays only (elsewhere: False, one program for all)."""
    return host_readable(c) and bool(xp.all(c == before[..., None]))


def _causal_core(
    xp: Namespace,
    qf: Array,
    lk: Array | None,
    sk: Array | None,
    mask: Array | None,
    v: Array,
    state: CausalState,
    chunk: int,
) -> tuple[Array, CausalState]:
    """Chunked causal attention from stabilized query features and key parts.

    All arrays carry the full batch shape ``B``: qf (B, L, M), lk (B, L, M or 1) or
    None, sk (B, L, M) or None, mask (B, L) or None, v (B, L, dv); the state
    (B, M, dv + 1) and (B,).
    """
    *batch, length, _ = qf.shape
    dt = qf.dtype
    dev = device(qf)
    floor = _floor(xp, dt)
    size = max(1, min(chunk, length))
    n = -(-length // size)
    pad = n * size - length

    vp = xp.concat([v, xp.ones((*batch, length, 1), dtype=dt, device=dev)], axis=-1)
    if lk is None:
        lk = xp.zeros((*batch, length, 1), dtype=dt, device=dev)
    if pad:
        # Padding tokens are masked keys (and queries whose rows are dropped).
        if mask is None:
            mask = xp.ones((*batch, length), dtype=xp.bool, device=dev)
        mask = _pad(xp, mask, pad, -1, False)
        qf, lk, vp = (_pad(xp, a, pad, -2) for a in (qf, lk, vp))
        if sk is not None:
            sk = _pad(xp, sk, pad, -2)
    top = xp.max(stop_gradient(lk), axis=-1)
    top = xp.maximum(_level(xp, top), xp.asarray(floor, dtype=dt, device=dev))
    if mask is not None:
        top = xp.where(mask, top, floor)

    def chunks(x: Array) -> Array:
        return xp.reshape(x, (*batch, n, size, *x.shape[len(batch) + 1 :]))

    qc, lc, vc, ec = chunks(qf), chunks(lk), chunks(vp), chunks(top)
    mc = None if mask is None else chunks(mask)
    sc = None if sk is None else chunks(sk)

    cin = _masked_running_max(xp, ec, floor)  # (B, n, C): running max inside each chunk
    firsts = xp.concat([state.log_scale[..., None], cin[..., -1]], axis=-1)
    prefix = _running_max(xp, firsts, floor)  # (B, n + 1): reference before chunk i / at end
    before = prefix[..., :n]
    c = xp.maximum(cin, before[..., None])  # (B, n, C): running max at each token
    after = prefix[..., 1:]
    flat = _is_flat(xp, c, before)

    arg = below(xp, lc, c[..., None], owned=True)
    if mc is not None:
        arg = xp.where(mc[..., None], arg, NEG_INF)
    kh = exp(xp, arg, owned=True)
    if sc is not None:
        kh = sc * kh

    idx = xp.arange(size, device=dev)
    tri = idx[None, :] <= idx[:, None]
    scores = xp.matmul(qc, xp.matrix_transpose(kh))
    owned = not needs_grad(scores)
    if not flat:
        decay = xp.exp(xp.where(tri, c[..., None, :] - c[..., :, None], NEG_INF))
        scores = multiply(xp, scores, decay, owned=owned)
    # (a select, not a zero factor: future entries must not turn into NaN via inf * 0)
    weights = lower_triangle(xp, scores, owned=owned)
    split_values = nonfinite_prefix(xp, vc)
    if split_values is None:
        out = xp.matmul(weights, vc)
    else:  # inf / NaN values reach later rows of their chunk only (the state: raw values)
        finite, extra = split_values
        out = xp.matmul(weights, finite)
        out = add(xp, out, extra, owned=not needs_grad(out))

    scaled_v = vc if flat else vc * xp.exp(c - after[..., None])[..., None]
    updates = xp.matmul(xp.matrix_transpose(kh), scaled_v)  # (B, n, M, dv + 1)
    gates = None if flat else xp.exp(before - after)
    inter, final = chunk_scan(xp, gates, updates, state.numerator, qc)
    if not flat:
        factor = xp.exp(before[..., None] - c)[..., None]
        inter = multiply(xp, inter, factor, owned=not needs_grad(inter))
    out = add(xp, out, inter, owned=not needs_grad(out))
    out = xp.reshape(out, (*batch, n * size, vp.shape[-1]))[..., :length, :]
    return out, CausalState(final, prefix[..., n])


def _chunk_step(
    xp: Namespace,
    carry: CausalState,
    qn: Array,
    ln: Array | None,
    sn: Array | None,
    mn: Array | None,
    vn: Array,
    floor: float,
) -> tuple[CausalState, Array]:
    """One chunk of the traced causal recurrence: the outputs of its n rows (shape
    (B, n, dv + 1)) from stabilized query features qn (B, n, M), key parts ln (B, n, M or 1)
    or None, sn (B, n, M) or None, mask mn (B, n) or None and values vn (B, n, dv + 1)
    (ones in the last column), and the state after it."""
    s_prev, c_prev = carry
    *batch, n, _ = qn.shape
    dt, dev = qn.dtype, device(qn)
    if ln is None:
        ln = xp.zeros((*batch, n, 1), dtype=dt, device=dev)
    top = xp.max(stop_gradient(ln), axis=-1)
    top = xp.maximum(_level(xp, top), xp.asarray(floor, dtype=dt, device=dev))
    if mn is not None:
        top = xp.where(mn, top, floor)
    c = xp.maximum(_masked_running_max(xp, top, floor), c_prev[..., None])  # (B, n)
    c_end = c[..., -1]
    arg = below(xp, ln, c[..., None], owned=True)
    if mn is not None:
        arg = xp.where(mn[..., None], arg, NEG_INF)
    kh = xp.exp(arg)
    if sn is not None:
        kh = sn * kh
    idx = xp.arange(n, device=dev)
    tri = idx[None, :] <= idx[:, None]
    scores = xp.matmul(qn, xp.matrix_transpose(kh))
    decay = xp.exp(xp.where(tri, c[..., None, :] - c[..., :, None], NEG_INF))
    # (a select, not a zero factor: future entries must not turn into NaN via inf * 0)
    weights = xp.where(tri, scores * decay, 0.0)
    split_values = nonfinite_prefix(xp, vn)
    if split_values is None:
        out = xp.matmul(weights, vn)
    else:
        finite, extra = split_values
        out = xp.matmul(weights, finite) + extra
    out = out + xp.matmul(qn, s_prev) * xp.exp(c_prev[..., None] - c)[..., None]
    update = xp.matmul(xp.matrix_transpose(kh), vn * xp.exp(c - c_end[..., None])[..., None])
    s_next = s_prev * xp.exp(c_prev - c_end)[..., None, None] + update
    return CausalState(s_next, c_end), out


def _scanned_attention(
    xp: Namespace,
    q: Array,
    k: Array,
    v: Array,
    w: Array | None,
    key_mask: Array | None,
    key_bias: Array | None,
    state: CausalState | None,
    kern: Any,
    scale: float,
    batch: tuple[int, ...],
    chunk: int,
) -> tuple[Array, CausalState]:
    """Causal attention in a traced JAX program: one ``lax.scan`` over the chunks
    (:func:`chunk_loop`) whose step does all of a chunk's work, from the raw inputs'
    features to its state read and update, on chunk-sized temporaries: no (L x m)
    array is ever stored, nor the states of all chunks."""
    length = q.shape[-2]
    dt, dev = q.dtype, device(q)
    floor = _floor(xp, dt)
    num_features = kern.num_features(w.shape[0] if w is not None else q.shape[-1])
    if state is None:
        state = _empty_state(xp, batch, num_features, v.shape[-1], dt, dev)
    else:
        state = CausalState(
            to_batch(xp, state.numerator, batch, 2), to_batch(xp, state.log_scale, batch, 0)
        )

    def full(x: Array | None, tail: int) -> Array | None:
        return None if x is None else to_batch(xp, x, batch, tail)

    def step(carry: CausalState, chunks: list[Array | None]) -> tuple[CausalState, Array]:
        qn, kn, vn, mn, bn = chunks
        qparts, kparts = _parts(xp, scale, qn, kn, w, kern, bn)
        qf = full(query_features(xp, qparts), 2)
        vn = full(vn, 2)
        ones = xp.ones((*vn.shape[:-1], 1), dtype=dt, device=dev)
        vp = xp.concat([vn, ones], axis=-1)
        return _chunk_step(
            xp, carry, qf, full(kparts.log, 2), full(kparts.sign, 2), full(mn, 1), vp, floor
        )

    size = max(1, min(chunk, length))
    final, out = chunk_loop(step, state, [q, k, v, key_mask, key_bias], [-2, -2, -2, -1, -1], size)
    return safe_divide(xp, out[..., :-1], out[..., -1:]), final


def _auto_chunk(length: int, like: Array) -> int:
    """Chunk length: 64 on CPU (measured best for m = 256, d = 64 on the benchmark machine);
    on a GPU, longer chunks (up to 256; ~32 of them where that suffices), since each
    chunk costs a few kernel launches and large matrix products are cheap there."""
    if not on_accelerator(like):
        return DEFAULT_CHUNK
    target = -(-length // 32)
    return min(256, max(DEFAULT_CHUNK, 1 << max(0, target - 1).bit_length()))


def _empty_state(
    xp: Namespace,
    batch: tuple[int, ...],
    num_features: int,
    value_dim: int,
    dtype: Any,
    device: Any,
) -> CausalState:
    numerator = xp.zeros((*batch, num_features, value_dim + 1), dtype=dtype, device=device)
    log_scale = xp.full(batch, _floor(xp, dtype), dtype=dtype, device=device)
    return CausalState(numerator, log_scale)


def causal_from_parts(
    xp: Namespace,
    qparts: FeatureParts,
    kparts: FeatureParts,
    v: Array,
    key_mask: Array | None,
    state: CausalState | None,
    batch: tuple[int, ...],
    chunk: int,
) -> tuple[Array, CausalState]:
    """Broadcast to the full batch, build the state if needed and run the chunked core."""
    qf = query_features(xp, qparts)
    num_features = qf.shape[-1]

    def full(x: Array | None, tail: int) -> Array | None:
        return None if x is None else to_batch(xp, x, batch, tail)

    qf = full(qf, 2)
    lk = full(kparts.log, 2)
    sk = full(kparts.sign, 2)
    v = full(v, 2)
    mask = full(key_mask, 1)
    if state is None:
        state = _empty_state(xp, batch, num_features, v.shape[-1], qf.dtype, device(qf))
    else:
        state = CausalState(full(state.numerator, 2), full(state.log_scale, 0))
    out, new_state = _causal_core(xp, qf, lk, sk, mask, v, state, chunk)
    return safe_divide(xp, out[..., :-1], out[..., -1:]), new_state


def causal_attention(
    xp: Namespace,
    q: Array,
    k: Array,
    v: Array,
    w: Array | None,
    key_mask: Array | None,
    state: CausalState | None,
    kern: Any,
    scale: float,
    batch: tuple[int, ...],
    chunk_size: int | None,
    *,
    key_bias: Array | None = None,
) -> tuple[Array, CausalState]:
    """Causal attention of inputs already in the compute dtype (masked keys zeroed);
    ``key_bias`` (..., Lk): finite per-key biases added to the keys' log-features.

    On a CPU, blocks of whole chunks are processed one after the other, the state
    carried from block to block (exactly what decoding does); elsewhere (GPUs, traced
    JAX programs) the whole sequence is one block. Under torch autograd on a CPU each
    block keeps nothing for the backward pass but its inputs and is recomputed there
    (see :func:`favorplus._backend.recompute.recompute`): the memory autograd keeps is
    O(L (d + dv)), not O(L m).
    """
    length = q.shape[-2]
    if length == 0:
        # No token: an empty output, and the state unchanged (or the empty one).
        features = kern.num_features(w.shape[0] if w is not None else q.shape[-1])
        if state is None:
            state = _empty_state(xp, batch, features, v.shape[-1], q.dtype, device(q))
        else:
            state = CausalState(
                to_batch(xp, state.numerator, batch, 2), to_batch(xp, state.log_scale, batch, 0)
            )
        return _no_pairs(xp, q, k, v, batch), state
    if scanned_form(q):
        chunk = chunk_size if chunk_size is not None else SCANNED_CHUNK
        return _scanned_attention(
            xp, q, k, v, w, key_mask, key_bias, state, kern, scale, batch, chunk
        )
    chunk = chunk_size if chunk_size is not None else _auto_chunk(length, q)
    training = any(needs_grad(x) for x in (q, k, v, w))
    block = block_length(q, batch, kern, w, chunk, training=training) or length

    def run_block(
        qb: Array,
        kb: Array,
        vb: Array,
        mb: Array | None,
        bb: Array | None,
        st: CausalState | None,
        wb: Array | None,
    ) -> tuple[Array, CausalState]:
        # Every array it reads is an argument (none from the closure): recompute checks
        # that none of them changed in place before the backward pass.
        qparts, kparts = _parts(xp, scale, qb, kb, wb, kern, bb)
        return causal_from_parts(xp, qparts, kparts, vb, mb, st, batch, chunk)

    if block >= length:
        return run_block(q, k, v, key_mask, key_bias, state, w)
    outs = []
    nothing = [None] * -(-length // block)
    masks = nothing if key_mask is None else split(key_mask, block, -1)
    biases = nothing if key_bias is None else split(key_bias, block, -1)
    pieces = (split(q, block, -2), split(k, block, -2), split(v, block, -2), masks, biases)
    for qb, kb, vb, mb, bb in zip(*pieces):
        if training:
            out, state = recompute(run_block, qb, kb, vb, mb, bb, state, w, names=_BLOCK_ARGUMENTS)
        else:
            out, state = run_block(qb, kb, vb, mb, bb, state, w)
        outs.append(out)
    assert state is not None
    return xp.concat(outs, axis=-2), state  # (two blocks at least here)


_BLOCK_ARGUMENTS = (
    "q",
    "k",
    "v",
    "key_mask",
    "the key biases",
    "the causal state",
    "the projection",
)


def init_causal_state(
    projection: Array,
    value_dim: int,
    *,
    batch_shape: tuple[int, ...] | int = (),
    kernel: KernelLike = "softmax",
    dtype: Any = None,
) -> CausalState:
    """The empty decoding state for :func:`favor_attention_step`.

    Parameters
    ----------
    projection : array, shape (m, d)
        The projection the steps will use (gives the namespace and device).
    value_dim : int
        dv, the last dimension of the values.
    batch_shape : tuple of int, or int
        Leading dimensions of the state, e.g. ``(batch, heads)``; they broadcast
        with those of the steps' inputs.
    kernel : str or callable
        The kernel the steps will use (it sets the number of features).
    dtype : optional
        Dtype of the state; default float32 for float16 / bfloat16 projections,
        else the projection's dtype. Use the inputs' compute dtype.

    Examples
    --------
    >>> from favorplus import draw_projection, init_causal_state
    >>> st = init_causal_state(draw_projection(32, 8, seed=0), 8, batch_shape=(2, 4))
    >>> st.numerator.shape, st.log_scale.shape
    ((2, 4, 32, 9), (2, 4))
    """
    from ._backend import check_float, common_namespace, compute_dtype, require

    require(projection=projection)
    xp = common_namespace(projection=projection)
    check_float(xp, "projection", projection)
    if projection.ndim != 2 or projection.shape[0] < 1 or projection.shape[1] < 1:
        raise ValueError(
            "projection must have shape (m, d) with m >= 1 and d >= 1; "
            f"got shape {tuple(projection.shape)}"
        )
    if isinstance(value_dim, bool) or not isinstance(value_dim, numbers.Integral) or value_dim < 1:
        raise ValueError(f"value_dim must be a positive int; got {value_dim!r}")
    kern = resolve_kernel(kernel)
    dt = compute_dtype(xp, projection) if dtype is None else _check_state_dtype(xp, dtype)
    return _empty_state(
        xp,
        _check_batch_shape(batch_shape),
        kern.num_features(projection.shape[0]),
        int(value_dim),
        dt,
        device(projection),
    )


def _check_state_dtype(xp: Namespace, dtype: Any) -> Any:
    """``dtype`` if it is a real floating dtype of ``xp``, else a TypeError naming it."""
    try:
        ok = bool(xp.isdtype(dtype, "real floating"))
    except Exception:  # not a dtype of this namespace at all
        ok = False
    if not ok:
        raise TypeError(
            "dtype must be a real floating dtype of the projection's namespace (float32 or "
            f"float64: the inputs' compute dtype) or None; got {dtype!r}"
        )
    return dtype


def _check_batch_shape(batch_shape: Any) -> tuple[int, ...]:
    """``batch_shape`` as a tuple of ints >= 0 (an int n stands for (n,))."""
    if isinstance(batch_shape, numbers.Integral) and not isinstance(batch_shape, bool):
        batch_shape = (batch_shape,)
    if not isinstance(batch_shape, (tuple, list)) or not all(
        isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in batch_shape
    ):
        raise TypeError(f"batch_shape must be a tuple of ints; got {batch_shape!r}")
    if any(b < 0 for b in batch_shape):
        raise ValueError(f"batch_shape must not have negative sizes; got {tuple(batch_shape)}")
    return tuple(int(b) for b in batch_shape)


def favor_attention_step(
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    state: CausalState | None = None,
    *,
    kernel: KernelLike = "softmax",
    key_mask: Array | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> tuple[Array, CausalState]:
    """Causal FAVOR+ over the next token or block of tokens, given the state of the past.

    Feeding a sequence token by token, or in blocks of any sizes, gives the same
    outputs (up to float rounding) as one ``favor_attention(..., causal=True)`` call.
    Each token costs O(m d) per head.

    Parameters
    ----------
    q, k : array, shape (..., T, d)
    v : array, shape (..., T, dv)
        The next T tokens. T = 0 returns an empty output and the state unchanged.
    projection : array, shape (m, d)
    state : CausalState or None
        From :func:`init_causal_state` or a previous step; ``None`` starts afresh.
    kernel, key_mask, scale, chunk_size
        As in :func:`favor_attention` (key_mask: bool or additive float, shape (..., T)).

    Returns
    -------
    out : array, shape (..., T, dv)
        In v's dtype.
    state : CausalState
        The state after these tokens, in the compute dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import draw_projection, favor_attention, favor_attention_step
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((10, 4)) for _ in range(3))
    >>> w = draw_projection(16, 4, seed=0)
    >>> full = favor_attention(q, k, v, w, causal=True)
    >>> a, st = favor_attention_step(q[:3], k[:3], v[:3], w)
    >>> b, st = favor_attention_step(q[3:], k[3:], v[3:], w, st)
    >>> bool(np.allclose(np.concatenate([a, b]), full))
    True
    """
    from ._backend import common_namespace
    from ._validation import check_attention_inputs
    from .masks import key_parts

    kern = resolve_kernel(kernel)
    key_bias = None
    if key_mask is not None and k is not None and getattr(k, "ndim", 0) >= 2:
        xp = common_namespace(k=k, key_mask=key_mask)
        key_mask, key_bias = key_parts(xp, key_mask, k.shape[-2], "key_mask")
    chk = check_attention_inputs(
        q, k, v, key_mask, scale, projection=projection, kernel=kern, causal=True
    )
    xp = chk.xp
    batch = chk.batch
    if key_bias is not None:
        batch = broadcast_shapes(batch, key_bias.shape[:-1], names=["q, k, v", "key_mask"])
    if state is not None:
        state = _check_state(xp, state, q, v, projection, kern, chk.dtype)
        batch = broadcast_shapes(
            batch, state.log_scale.shape, names=["q, k, v and key_mask", "state.log_scale"]
        )
    statics = (xp, kern, chk.scale, chk.dtype, check_chunk_size(chunk_size), batch)
    arrays = (q, k, v, projection, key_mask, key_bias, state)
    if getattr(kern, "spec", None) is not None:  # OPRF / SADERF: favorplus.estimators
        from .estimators import LEAK, call_estimator

        return call_estimator(
            _step_core,
            arrays,
            statics,
            kern,
            xp=xp,
            scale=chk.scale,
            dtype=chk.dtype,
            batch=batch,
            refuse=f"in decoding {LEAK}",
        )
    return call_core(_step_core, arrays, statics)


def _step_core(
    q: Array,
    k: Array,
    v: Array,
    projection: Array | None,
    key_mask: Array | None,
    key_bias: Array | None,
    state: CausalState | None,
    xp: Namespace,
    kern: Any,
    scale: float,
    dtype: Any,
    chunk: int | None,
    batch: tuple[int, ...],
) -> tuple[Array, CausalState]:
    qc, kc, vc, w, bias = core_inputs(xp, dtype, q, k, v, projection, key_mask, key_bias)
    out, new_state = causal_attention(
        xp, qc, kc, vc, w, key_mask, state, kern, scale, batch, chunk, key_bias=bias
    )
    return xp.astype(out, v.dtype, copy=False), new_state


def _check_state(
    xp: Namespace, state: Any, q: Array, v: Array, w: Array | None, kern: Any, dtype: Any
) -> CausalState:
    if not (isinstance(state, tuple) and len(state) == 2):
        raise TypeError(
            f"state must be a CausalState (numerator, log_scale); got {type(state).__name__}"
        )
    numerator, log_scale = state
    from ._backend import check_float, common_namespace, require

    names = {"state.numerator": numerator, "state.log_scale": log_scale}
    require(**names)
    common_namespace(q=q, **names)
    for name, x in names.items():
        check_float(xp, name, x)
    num_features = kern.num_features(w.shape[0] if w is not None else q.shape[-1])
    expected = (num_features, v.shape[-1] + 1)
    if numerator.ndim < 2 or tuple(numerator.shape[-2:]) != expected:
        raise ValueError(
            f"state.numerator must have shape (..., {expected[0]}, {expected[1]}) for this "
            f"projection, kernel and value dimension; got {tuple(numerator.shape)}"
        )
    if tuple(log_scale.shape) != tuple(numerator.shape[:-2]):
        raise ValueError(
            f"state.log_scale must have shape {tuple(numerator.shape[:-2])}; "
            f"got {tuple(log_scale.shape)}"
        )
    if numerator.dtype != dtype or log_scale.dtype != dtype:
        numerator = xp.astype(numerator, dtype)
        log_scale = xp.astype(log_scale, dtype)
    return CausalState(numerator, log_scale)
