"""FAVOR+ on dask arrays chunked along the sequence: lazy, chunk by chunk, out of core.

:func:`favorplus.favor_attention` hands dask inputs to :func:`dask_attention`, which
builds a dask graph from the shard summaries of :mod:`favorplus.summaries` and computes
nothing itself (no ``compute`` during the call):

* bidirectional: one task per key chunk computes its summary (:func:`local_summary`),
  a tree reduction (``dask.array.reduction``) merges them, and one task per query chunk
  reads its queries out against the merged summary;
* causal: one task per key chunk computes its causal state
  (:func:`local_causal_summary`), a chain of small tasks forms the exclusive prefix merge
  (chunk i gets the merge of chunks < i only, LASP-2), and one task per chunk runs the
  ordinary chunked causal recurrence from its prefix. A chunk's outputs depend on the
  chunks before it and itself only, bit for bit, whatever later chunks hold.

Each task sees one chunk of every input (NumPy, or whatever its blocks are: CuPy blocks
work the same) and a summary of m x (dv + 1) numbers per row, so the memory a task needs
does not grow with the length. The outputs keep the queries' chunks along the sequence
and the leading dimensions; the last axes (features) are made single chunks.

The summaries travel between tasks packed as one array per chunk, shape
``(..., 1, M, dv + 2)``: the state in columns ``:dv + 1`` and its stabilizer level in
the last column (per feature for bidirectional summaries, the row's log-scale repeated
on every feature for causal states).
"""

from __future__ import annotations

from itertools import product
from typing import Any

import numpy as np

from ._backend import Array
from .causal import CausalState
from .features import Kernel
from .summaries import (
    KeySummary,
    local_causal_summary,
    local_summary,
    merge_causal_states,
    merge_stacked,
    readout,
)

__all__ = ["dask_attention"]


# --- block functions (run inside dask tasks, on one chunk of every input) ----------------


def _ns(x: Array) -> Any:
    from array_api_compat import array_namespace

    return array_namespace(x)


def _batch_of(*pairs: tuple[Array | None, int]) -> tuple[int, ...]:
    """Broadcast leading shapes of the arrays present (``tail``: their trailing axes)."""
    shapes = [tuple(x.shape[: x.ndim - tail]) for x, tail in pairs if x is not None]
    return tuple(np.broadcast_shapes(*shapes))


def _inputs(
    xp: Any,
    dtype: Any,
    q: Array,
    k: Array,
    v: Array,
    w: Array | None,
    mask: Array | None,
    bias: Array | None,
    keep: Array | None,
    keep_scale: float,
) -> tuple[Array, Array, Array, Array | None, Array | None]:
    from ._inputs import core_inputs

    dtype = getattr(xp, np.dtype(dtype).name)
    return core_inputs(xp, dtype, q, k, v, w, mask, bias, keep, keep_scale)


def _pack(xp: Any, state: Array, level: Array) -> Array:
    """(..., M, dv + 1) state and (..., M, 1) level -> (..., 1, M, dv + 2)."""
    return xp.concat([state, level], axis=-1)[..., None, :, :]


def _summary_block(
    k: Array,
    v: Array,
    w: Array | None,
    mask: Array | None,
    bias: Array | None,
    keep: Array | None,
    *,
    kern: Kernel,
    scale: float,
    cdtype: Any,
    keep_scale: float,
    causal: bool,
) -> Array:
    """The packed summary (bidirectional) or causal state of one chunk of keys."""
    xp = _ns(k)
    batch = _batch_of((k, 2), (v, 2), (mask, 1), (bias, 1), (keep, 1))
    _, kc, vc, wc, bc = _inputs(xp, cdtype, k, k, v, w, mask, bias, keep, keep_scale)
    if causal:
        st = local_causal_summary(xp, kc, vc, wc, mask, bc, kern, scale, batch)
        level = xp.broadcast_to(st.log_scale[..., None, None], (*st.numerator.shape[:-1], 1))
        return _pack(xp, st.numerator, level)
    s = local_summary(xp, kc, vc, wc, mask, bc, kern, scale, batch)
    return _pack(xp, s.state, xp.matrix_transpose(s.level))


def _unpack(x: Array) -> KeySummary:
    """Packed (..., M, dv + 2) -> the bidirectional summary (state, level (..., 1, M))."""
    xp = _ns(x)
    return KeySummary(x[..., :-1], xp.matrix_transpose(x[..., -1:]))


def _unpack_causal(x: Array) -> CausalState:
    """Packed (..., 1, M, dv + 2) -> the causal state (numerator, log_scale (...))."""
    return CausalState(x[..., 0, :, :-1], x[..., 0, 0, -1])


def _merge_block(x: Array, axis: Any = None, keepdims: bool = True) -> Array:
    """Merge packed bidirectional summaries stacked along axis -3 (a reduction step)."""
    xp = _ns(x)
    s = merge_stacked(xp, _unpack(x), axis=x.ndim - 3)
    return _pack(xp, s.state, xp.matrix_transpose(s.level))


def _empty_causal(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The packed empty causal state (numerator 0, log-scale the dtype's floor)."""
    out = np.zeros(shape, dtype=dtype)
    out[..., -1] = np.finfo(dtype).min
    return out


def _merge_causal_block(before: Array, chunk: Array) -> Array:
    """The packed state after ``chunk`` given the packed state before it."""
    xp = _ns(chunk)
    st = merge_causal_states(_unpack_causal(before), _unpack_causal(chunk))
    level = xp.broadcast_to(st.log_scale[..., None, None], (*st.numerator.shape[:-1], 1))
    return _pack(xp, st.numerator, level)


def _read_block(
    q: Array, packed: Array, w: Array | None, *, kern: Kernel, scale: float, cdtype: Any,
    out_dtype: Any,
) -> Array:  # fmt: skip
    """Bidirectional outputs of one chunk of queries against the merged summary."""
    from ._inputs import to_batch

    xp = _ns(q)
    qc = xp.astype(q, getattr(xp, np.dtype(cdtype).name), copy=False)
    wc = None if w is None else xp.astype(w, qc.dtype, copy=False)
    summary = _unpack(packed[..., 0, :, :])
    batch = _batch_of((q, 2), (summary.state, 2))
    out = to_batch(xp, readout(xp, qc, summary, wc, kern, scale), batch, 2)
    return xp.astype(out, getattr(xp, np.dtype(out_dtype).name), copy=False)


def _causal_block(
    q: Array,
    k: Array,
    v: Array,
    w: Array | None,
    mask: Array | None,
    bias: Array | None,
    keep: Array | None,
    prefix: Array,
    *,
    kern: Kernel,
    scale: float,
    cdtype: Any,
    keep_scale: float,
    chunk: int | None,
) -> Array:
    """Causal outputs of one chunk, from the packed state of all the chunks before it."""
    from .causal import causal_attention

    xp = _ns(q)
    qc, kc, vc, wc, bc = _inputs(xp, cdtype, q, k, v, w, mask, bias, keep, keep_scale)
    state = _unpack_causal(prefix)
    batch = _batch_of((q, 2), (k, 2), (v, 2), (mask, 1), (bias, 1), (keep, 1), (state[0], 2))
    out, _ = causal_attention(xp, qc, kc, vc, wc, mask, state, kern, scale, batch, chunk,
                              key_bias=bc)  # fmt: skip
    return xp.astype(out, v.dtype, copy=False)


# --- the graph ---------------------------------------------------------------------------


def _as_dask(x: Any) -> Any:
    """NumPy arguments (a projection, masks) as one-chunk dask arrays; others unchanged."""
    import dask.array as da

    return da.from_array(x, chunks=-1) if isinstance(x, np.ndarray) else x


def _lead(x: Any, ndim: int) -> Any:
    """``x`` with leading axes of size 1 added up to ``ndim`` axes (None stays None)."""
    if x is None or x.ndim == ndim:
        return x
    return x[(None,) * (ndim - x.ndim)]


def _seq_chunks(x: Any, axis: int, chunks: tuple[int, ...]) -> Any:
    """``x`` rechunked to ``chunks`` along ``axis`` (no-op when it has them already)."""
    if x is None or x.chunks[axis] == chunks:
        return x
    return x.rechunk({x.ndim + axis if axis < 0 else axis: chunks})


def _exclusive_scan(summaries: Any) -> Any:
    """For each chunk along axis -3 of the packed causal states, the merged state of the
    chunks before it (the first gets the empty state): a chain of small tasks per row
    block, each of which depends on earlier chunks only."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    name = "favorplus-causal-prefix-" + tokenize(summaries)
    lead = summaries.ndim - 3
    n = summaries.numblocks[lead]
    dtype = summaries.dtype
    dsk: dict[Any, Any] = {}
    for idx in product(*(range(nb) for nb in summaries.numblocks[:lead])):
        shape = tuple(summaries.chunks[a][i] for a, i in enumerate(idx)) + summaries.shape[lead:]
        shape = (*shape[:lead], 1, *shape[lead + 1 :])
        dsk[(name, *idx, 0, 0, 0)] = (_empty_causal, shape, dtype)
        for i in range(1, n):
            before = (name, *idx, i - 1, 0, 0)
            dsk[(name, *idx, i, 0, 0)] = (_merge_causal_block, before,
                                          (summaries.name, *idx, i - 1, 0, 0))  # fmt: skip
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[summaries])
    return da.Array(graph, name, chunks=summaries.chunks, dtype=dtype, meta=summaries._meta)


def dask_attention(
    q: Any,
    k: Any,
    v: Any,
    projection: Any,
    *,
    kern: Kernel,
    causal: bool,
    key_mask: Any,
    attn_mask: Any,
    scale: float | None,
    chunk_size: int | None,
    dropout_p: float,
    dropout_rng: Any,
    dropout_keep: Any,
) -> Any:
    """:func:`favorplus.favor_attention` of dask arrays, as a lazy dask array.

    NumPy projections and masks are accepted beside dask q, k, v (they are wrapped as
    one-chunk dask arrays; a full NumPy attn_mask is decomposed on the host first). The
    sequence axis may have any chunks, uneven ones included; causal calls rechunk k, v
    and the key masks to the queries' chunks (and, with fewer queries than keys, put one
    chunk boundary where the queries start).
    """
    import dask.array as da

    from ._prepare import check_dropout_p, prepare
    from .causal import check_chunk_size

    if getattr(kern, "spec", None) is not None:
        raise ValueError(
            "dask arrays support the FAVOR+ kernels; got the estimator "
            f"{kern.name!r}, whose parameters would be fitted to all the data before any chunk"
        )
    lq = q.shape[-2]
    if isinstance(attn_mask, np.ndarray) and attn_mask.ndim >= 2 and attn_mask.shape[-2] == lq:
        # A full NumPy mask is read on the host now: the causal flag and a key mask.
        from .masks import split_mask

        parts = split_mask(attn_mask, lq, k.shape[-2])
        if parts.causal:
            causal = True
        attn_mask = parts.key_mask
        if parts.key_bias is not None:
            keep = True if parts.key_mask is None else parts.key_mask
            attn_mask = np.where(keep, parts.key_bias, -np.inf)
        if attn_mask is not None:
            attn_mask = np.asarray(attn_mask)[..., None, :]
    projection, key_mask, attn_mask, dropout_keep = (
        _as_dask(x) for x in (projection, key_mask, attn_mask, dropout_keep)
    )
    if attn_mask is not None and attn_mask.ndim >= 2 and attn_mask.shape[-2] == lq != 1:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} (one row per query) is a dask "
            "array, which cannot be inspected without computing it: pass a NumPy mask, or "
            "key_mask (..., Lk) and causal=True instead"
        )
    if dropout_keep is None and check_dropout_p(dropout_p) > 0.0:
        # A host draw, as for eager arrays (one bool per key and row), wrapped lazily.
        from .projection import host_generator

        base = prepare(q, k, v, key_mask, attn_mask, scale, projection=projection, kernel=kern,
                       causal=causal)  # fmt: skip
        gen = host_generator(dropout_rng, "dropout_rng")
        drawn = gen.random((*base.chk.batch, k.shape[-2])) >= float(dropout_p)
        dropout_keep, dropout_rng = da.from_array(drawn, chunks=-1), None
    prep = prepare(
        q, k, v, key_mask, attn_mask, scale, projection=projection, kernel=kern, causal=causal,
        dropout_p=dropout_p, dropout_rng=dropout_rng, dropout_keep=dropout_keep,
    )  # fmt: skip
    chk = prep.chk
    chunk = check_chunk_size(chunk_size)
    nb = len(chk.batch)
    q, k, v = (_lead(x, nb + 2).rechunk({nb + 1: -1}) for x in (q, k, v))
    mask, bias, keep = (_lead(x, nb + 1) for x in (prep.key_mask, prep.key_bias, prep.keep))
    w = None if projection is None else projection.rechunk(-1)
    dtype = np.dtype(chk.dtype)
    num = kern.num_features(w.shape[0] if w is not None else q.shape[-1])
    dv = v.shape[-1]
    lead = "".join(chr(ord("a") + i) for i in range(nb))
    seq, key, feat, vdim = "s", "t", "d", "e"
    lk = k.shape[-2]

    if prep.causal:
        before = lk - lq
        if before:
            # Chunks of the keys before the first query, then the queries' chunks.
            cuts = np.cumsum((0, *k.chunks[-2]))
            head = [int(c) for c in cuts if 0 < c < before] + [before]
            head_chunks = tuple(np.diff([0, *head]).tolist())
            key_chunks = head_chunks + q.chunks[-2]
        else:
            head_chunks, key_chunks = (), q.chunks[-2]
        k, v = (_seq_chunks(x, -2, key_chunks) for x in (k, v))
        mask, bias, keep = (_seq_chunks(x, -1, key_chunks) for x in (mask, bias, keep))
        key = seq
    kpairs = [
        (k, lead + key + feat),
        (v, lead + key + vdim),
        (w, "x" + feat) if w is not None else (None, None),
    ]
    kpairs += [(x, lead + key) if x is not None else (None, None) for x in (mask, bias, keep)]
    args = [a for pair in kpairs for a in pair]
    summaries = da.blockwise(
        _summary_block, lead + key + "MP", *args,
        new_axes={"M": num, "P": dv + 2}, adjust_chunks={key: lambda _: 1},
        meta=np.empty((0,) * (nb + 3), dtype=dtype), concatenate=True,
        kern=kern, scale=chk.scale, cdtype=dtype, keep_scale=prep.keep_scale,
        causal=prep.causal,
    )  # fmt: skip
    out_meta = np.empty((0,) * (nb + 2), dtype=v.dtype)
    if not prep.causal:
        merged = da.reduction(
            summaries, _merge_block, _merge_block, axis=nb, keepdims=True, dtype=dtype,
            concatenate=True, meta=np.empty((0,) * (nb + 3), dtype=dtype),
        )  # fmt: skip
        wpair = (w, "x" + feat) if w is not None else (None, None)
        return da.blockwise(
            _read_block, lead + seq + "f", q, lead + seq + feat, merged, lead + "yMP", *wpair,
            new_axes={"f": dv}, meta=out_meta, concatenate=True,
            kern=kern, scale=chk.scale, cdtype=dtype, out_dtype=v.dtype,
        )  # fmt: skip
    prefix = _exclusive_scan(summaries)
    nhead = len(head_chunks)
    if nhead:
        tail = lk - lq
        k, v = k[..., tail:, :], v[..., tail:, :]
        mask, bias, keep = (None if x is None else x[..., tail:] for x in (mask, bias, keep))
        prefix = prefix[..., nhead:, :, :]
    pairs = [(q, lead + seq + feat), (k, lead + seq + feat), (v, lead + seq + vdim)]
    pairs.append((w, "x" + feat) if w is not None else (None, None))
    pairs += [(x, lead + seq) if x is not None else (None, None) for x in (mask, bias, keep)]
    pairs.append((prefix, lead + seq + "MP"))
    # The prefix has one block of size 1 per chunk along the sequence: align the other
    # axes here, then match blocks by their index (the output takes q's chunks).
    pairs[-1] = (prefix, lead + "u" + "MP")
    _, arrays = da.core.unify_chunks(*(a for pair in pairs for a in pair))
    pairs = [(a, ind) for a, (_, ind) in zip(arrays, pairs)]
    pairs[-1] = (pairs[-1][0], lead + seq + "MP")
    args = [a for pair in pairs for a in pair]
    return da.blockwise(
        _causal_block, lead + seq + vdim, *args,
        meta=out_meta, concatenate=True, align_arrays=False, kern=kern, scale=chk.scale,
        cdtype=dtype, keep_scale=prep.keep_scale, chunk=chunk,
    )  # fmt: skip
