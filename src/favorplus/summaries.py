"""Shard summaries: the state a block of keys hands to every query (sequence parallelism).

FAVOR+ attention of a query reads the keys only through a small summary of size
m x (dv + 1), whatever their number (FAVOR-NOTES section 9). This module owns that
summary and its algebra; every engine that splits a sequence (JAX meshes,
``torch.distributed`` process groups, dask chunks, or one you write yourself) composes
the same four steps:

1. per shard of keys, its summary: :func:`key_summary` (bidirectional) or
   :func:`causal_summary` (causal);
2. merge summaries: :func:`merge_summaries` / :func:`merge_causal_states`, rescaled by
   their stabilizer levels so that no exponent is positive (associative and
   commutative up to float rounding: any tree, scan or all-reduce gives the same
   result); for causal attention, :func:`exclusive_prefix` gives each shard the merge
   of the shards before it;
3. read out: :func:`read_summary` (bidirectional queries against the merged summary),
   or :func:`favorplus.favor_attention_step` with that prefix state (a causal shard);
4. concatenate the shards' outputs.

Bidirectional: ``S = sum_j exp(u_j - c) [v_j, 1]^T`` with ``c`` the per-feature
maximum of the keys' log-features ``u_j`` (``-inf`` where a shard has no key); the
queries are stabilized against the merged ``c`` exactly as on one device. Causal: the
:class:`favorplus.CausalState` after a shard, whose level is one number per row
(FAVOR-NOTES section 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from ._backend import Array, Namespace, broadcast_shapes, common_namespace, exp, require
from ._inputs import _cast_inputs, _key_state, _read_state, to_batch
from ._stabilize import NEG_INF, below, query_features
from ._validation import check_attention_inputs
from .causal import CausalState, _floor, _level
from .features import Kernel, KernelLike, feature_parts, resolve_kernel
from .masks import key_parts, with_key_bias

__all__ = [
    "KeySummary",
    "causal_summary",
    "exclusive_prefix",
    "key_summary",
    "merge_causal_states",
    "merge_summaries",
    "read_summary",
]


class KeySummary(NamedTuple):
    """Bidirectional summary of a block of keys (a tuple of two arrays, a JAX pytree).

    Attributes
    ----------
    state : array, shape (..., M, dv + 1)
        ``sum_j exp(u_j - level) [v_j, 1]^T`` over the block's unmasked keys (the last
        column is the normaliser's state).
    level : array, shape (..., 1, M)
        The per-feature maximum of the keys' log-features (the same for all features
        when the kernel's exponent is shared by a row, 0 for kernels without one);
        ``-inf`` where the block has no unmasked key (its state is then 0).
    """

    state: Array
    level: Array


def _finite(xp: Namespace, x: Array) -> Array:
    return xp.where(xp.isfinite(x), x, 0.0)


def _stop(x: Array) -> Array:
    from ._backend import stop_gradient

    return stop_gradient(x)


# --- array-level pieces (inputs already checked, in the compute dtype) -----------------


def local_summary(
    xp: Namespace,
    kc: Array,
    vc: Array,
    w: Array | None,
    key_mask: Array | None,
    key_bias: Array | None,
    kern: Kernel,
    scale: float,
    batch: tuple[int, ...],
) -> KeySummary:
    """The bidirectional summary of keys and values in the compute dtype (masked keys and
    values already zeroed), broadcast to ``batch``."""
    if kc.shape[-2] == 0:
        num = kern.num_features(w.shape[0] if w is not None else kc.shape[-1])
        return _empty_summary(xp, kc, vc, batch, num)
    kparts = with_key_bias(
        xp, feature_parts(xp, kc, w, kern, scale, row_constants=True, role="key"), key_bias
    )
    mask = None if key_mask is None else key_mask[..., None]
    if kparts.log is None:
        kf = kparts.sign if mask is None else xp.where(mask, kparts.sign, 0.0)
        level = xp.zeros((*batch, 1, kf.shape[-1]), dtype=kf.dtype, device=_device(kf))
        if mask is not None:
            # A block without any key has level -inf, like the other kernels' blocks.
            anyk = xp.any(to_batch(xp, key_mask, batch, 1), axis=-1)[..., None, None]
            level = xp.where(anyk, level, NEG_INF)
    else:
        masked = kparts.log if mask is None else xp.where(mask, kparts.log, NEG_INF)
        level = xp.max(_stop(masked), axis=-2, keepdims=True)
        kf = exp(xp, below(xp, masked, _finite(xp, level), owned=True), owned=True)
        if kparts.sign is not None:
            kf = kparts.sign * kf
        # Always (..., 1, M), so that every shard's summary has the same shape.
        level = xp.broadcast_to(level, (*batch, 1, kf.shape[-1]))
    state = to_batch(xp, _key_state(xp, kf, vc), batch, 2)
    return KeySummary(state, level)


def _empty_summary(
    xp: Namespace, kc: Array, vc: Array, batch: tuple[int, ...], num: int
) -> KeySummary:
    """The summary of no key (state 0, level -inf), connected to k and v for autodiff."""
    zero = xp.sum(kc) * 0.0 + xp.sum(vc) * 0.0
    state = xp.zeros((*batch, num, vc.shape[-1] + 1), dtype=kc.dtype, device=_device(kc)) + zero
    level = xp.full((*batch, 1, num), NEG_INF, dtype=kc.dtype, device=_device(kc))
    return KeySummary(state, level)


def _device(x: Array) -> Any:
    from ._backend import device

    return device(x)


def merge_stacked(xp: Namespace, summary: KeySummary, axis: int = 0) -> KeySummary:
    """Merge summaries stacked along ``axis`` (of both arrays; non-negative)."""
    level = _stop(xp.max(summary.level, axis=axis))
    factor = _factor(xp, xp.moveaxis(summary.level, axis, 0), level)  # (W, ..., 1, M)
    states = xp.moveaxis(summary.state, axis, 0)
    return KeySummary(xp.sum(states * xp.matrix_transpose(factor), axis=0), level)


def _factor(xp: Namespace, old: Array, new: Array) -> Array:
    """``exp(old - new)`` (<= 1) where ``old`` is finite, else 0 (no NaN, no gradient)."""
    old, new = _stop(old), _stop(new)
    return xp.where(xp.isfinite(old), xp.exp(_finite(xp, old) - _finite(xp, new)), 0.0)


def rescale(xp: Namespace, summary: KeySummary, level: Array) -> Array:
    """The summary's state relative to ``level`` (>= its own, elementwise)."""
    return summary.state * xp.matrix_transpose(_factor(xp, summary.level, level))


def readout(
    xp: Namespace,
    qc: Array,
    summary: KeySummary,
    w: Array | None,
    kern: Kernel,
    scale: float,
) -> Array:
    """Outputs of queries in the compute dtype against a (merged) summary."""
    qparts = feature_parts(xp, qc, w, kern, scale, row_constants=False, role="query")
    # Added to every feature of a query row, a level shared by all features cancels.
    qf = query_features(xp, qparts, _finite(xp, _stop(summary.level)))
    return _read_state(xp, qf, summary.state)


def local_causal_summary(
    xp: Namespace,
    kc: Array,
    vc: Array,
    w: Array | None,
    key_mask: Array | None,
    key_bias: Array | None,
    kern: Kernel,
    scale: float,
    batch: tuple[int, ...],
) -> CausalState:
    """The causal state after a block of keys (from the empty state), computed in one
    pass: ``S = sum_j exp(u_j - c) [v_j, 1]^T`` with ``c`` the rounded maximum of the
    block's log-features, exactly the state the chunked recurrence ends with (up to
    rounding)."""
    if kc.shape[-2] == 0:
        num = kern.num_features(w.shape[0] if w is not None else kc.shape[-1])
        empty = _empty_summary(xp, kc, vc, batch, num)
        floor = xp.full(batch, _floor(xp, kc.dtype), dtype=kc.dtype, device=_device(kc))
        return CausalState(empty.state, floor)
    kparts = with_key_bias(
        xp, feature_parts(xp, kc, w, kern, scale, row_constants=True, role="key"), key_bias
    )
    floor = _floor(xp, kc.dtype)
    mask = None if key_mask is None else key_mask[..., None]
    if kparts.log is None:
        kf = kparts.sign if mask is None else xp.where(mask, kparts.sign, 0.0)
        top = xp.zeros((*batch, 1, 1), dtype=kf.dtype, device=_device(kf))
        if key_mask is not None:
            anyk = xp.any(to_batch(xp, key_mask, batch, 1), axis=-1)[..., None, None]
            top = xp.where(anyk, top, floor)
        c = top[..., 0, 0]
    else:
        masked = kparts.log if mask is None else xp.where(mask, kparts.log, NEG_INF)
        top = xp.max(xp.max(_stop(masked), axis=-1), axis=-1)  # (...)
        c = xp.where(xp.isfinite(top), xp.maximum(_level(xp, top), floor), floor)
        c = to_batch(xp, c, batch, 0)
        kf = exp(xp, below(xp, masked, c[..., None, None], owned=True), owned=True)
        if kparts.sign is not None:
            kf = kparts.sign * kf
    state = to_batch(xp, _key_state(xp, kf, vc), batch, 2)
    return CausalState(state, c)


def merge_causal_stacked(
    xp: Namespace, states: CausalState, axis: int = 0, upto: Array | None = None
) -> CausalState:
    """Merge causal states stacked along ``axis``; with ``upto`` (an integer array),
    only those at indices ``< upto`` along it take part: the others are selected away
    (whatever they hold, even inf or NaN, nothing of them reaches the result)."""
    num = xp.moveaxis(states.numerator, axis, 0)
    lev = xp.moveaxis(states.log_scale, axis, 0)
    floor = _floor(xp, lev.dtype)
    if upto is not None:
        idx = xp.arange(lev.shape[0], device=_device(lev))
        take = idx < upto
        lev = xp.where(xp.reshape(take, (-1,) + (1,) * (lev.ndim - 1)), lev, floor)
        num = xp.where(xp.reshape(take, (-1,) + (1,) * (num.ndim - 1)), num, 0.0)
    lev = _stop(lev)
    c = xp.max(lev, axis=0)
    factor = xp.exp(lev - c)[..., None, None]
    return CausalState(xp.sum(num * factor, axis=0), c)


# --- public API --------------------------------------------------------------------------


def _check_keys(
    k: Array,
    v: Array,
    projection: Array | None,
    kern: Kernel,
    key_mask: Array | None,
    scale: float | None,
) -> tuple[Namespace, Any, float, tuple[int, ...], Array | None, Array | None]:
    chk = check_attention_inputs(k, k, v, None, scale, projection=projection, kernel=kern)
    xp = chk.xp
    mask = bias = None
    batch = chk.batch
    if key_mask is not None:
        common_namespace(k=k, key_mask=key_mask)
        mask, bias = key_parts(xp, key_mask, k.shape[-2], "key_mask")
        for part in (mask, bias):
            if part is not None:
                batch = broadcast_shapes(batch, part.shape[:-1], names=["k and v", "key_mask"])
    return xp, chk.dtype, chk.scale, batch, mask, bias


def key_summary(
    k: Array,
    v: Array,
    projection: Array | None,
    *,
    kernel: KernelLike = "softmax",
    key_mask: Array | None = None,
    scale: float | None = None,
) -> KeySummary:
    """The bidirectional summary of a block (shard, chunk) of keys and values.

    Parameters
    ----------
    k : array, shape (..., Lk, d)
    v : array, shape (..., Lk, dv)
        One block of the key sequence (any length, 0 included).
    projection : array, shape (m, d), or None
        The projection every block and query uses (as in :func:`favorplus.favor_attention`).
    kernel, key_mask, scale
        As in :func:`favorplus.favor_attention` (``key_mask``: the block's part, shape
        (..., Lk), bool or additive float). ``scale`` defaults to ``1 / sqrt(d)``.

    Returns
    -------
    KeySummary
        In the compute dtype (float32 for float16 / bfloat16 inputs).

    Examples
    --------
    The summaries of two halves, merged, read out as all the keys at once:

    >>> import numpy as np
    >>> from favorplus import (draw_projection, favor_attention, key_summary,
    ...                        merge_summaries, read_summary)
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 64, 8)) for _ in range(3))
    >>> w = draw_projection(32, 8, seed=0)
    >>> s = merge_summaries(key_summary(k[:, :40], v[:, :40], w),
    ...                     key_summary(k[:, 40:], v[:, 40:], w))
    >>> s.state.shape, s.level.shape
    ((2, 32, 9), (2, 1, 32))
    >>> bool(np.allclose(read_summary(q, s, w), favor_attention(q, k, v, w)))
    True
    """
    kern = resolve_kernel(kernel)
    xp, dtype, sc, batch, mask, bias = _check_keys(k, v, projection, kern, key_mask, scale)
    _, kc, vc, w = _cast_inputs(xp, dtype, k, k, v, projection, mask)
    bias = None if bias is None else xp.astype(bias, dtype, copy=False)
    return local_summary(xp, kc, vc, w, mask, bias, kern, sc, batch)


def merge_summaries(*summaries: KeySummary) -> KeySummary:
    """Merge bidirectional summaries: the summary of all their keys together.

    ``level = max_s level_s`` and ``state = sum_s exp(level_s - level) state_s``: every
    factor is at most 1, so nothing overflows; blocks without any key contribute 0.
    Associative and commutative up to float rounding. Leading dimensions broadcast.

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import draw_projection, key_summary, merge_summaries
    >>> rng = np.random.default_rng(1)
    >>> k, v = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    >>> w = draw_projection(16, 4, seed=0)
    >>> parts = [key_summary(k[i:i + 10], v[i:i + 10], w) for i in (0, 10, 20)]
    >>> a = merge_summaries(merge_summaries(*parts[:2]), parts[2])
    >>> b = merge_summaries(parts[0], merge_summaries(*parts[1:]))
    >>> bool(np.allclose(a.state, b.state)), bool(np.allclose(a.state, key_summary(k, v, w).state))
    (True, True)
    """
    if not summaries:
        raise ValueError("merge_summaries needs at least one summary; got none")
    summaries = tuple(_as_summary(s, i) for i, s in enumerate(summaries))
    if len(summaries) == 1:
        return summaries[0]
    _check_alike(
        [s.state for s in summaries],
        [f"summaries[{i}].state" for i in range(len(summaries))],
        "summaries",
    )
    xp = common_namespace(**{f"summaries[{i}].state": s.state for i, s in enumerate(summaries)})
    levels = [s.level for s in summaries]
    level = levels[0]
    for other in levels[1:]:
        level = xp.maximum(level, other)
    level = _stop(level)
    state = rescale(xp, summaries[0], level)
    for s in summaries[1:]:
        state = state + rescale(xp, s, level)
    return KeySummary(state, level)


def _check_alike(arrays: Sequence[Array], names: Sequence[str], what: str) -> None:
    """Summaries or states to merge: the same (M, dv + 1) and batch shapes that broadcast."""
    if len({tuple(a.shape[-2:]) for a in arrays}) > 1:
        listed = ", ".join(f"{n}: {tuple(a.shape)}" for n, a in zip(names, arrays))
        raise ValueError(
            f"the {what} to merge must have the same last two axes (M features, dv + 1): "
            f"blocks of one projection and one value width; got {listed}"
        )
    broadcast_shapes(*(a.shape[:-2] for a in arrays), names=names)


def _check_states_alike(states: Sequence[CausalState]) -> None:
    names = [f"states[{i}].numerator" for i in range(len(states))]
    _check_alike([s.numerator for s in states], names, "states")


def _as_summary(s: Any, i: int) -> KeySummary:
    if not (isinstance(s, tuple) and len(s) == 2):
        raise TypeError(
            f"summaries[{i}] must be a KeySummary (state, level); got {type(s).__name__}"
        )
    state, level = s
    require(**{f"summaries[{i}].state": state, f"summaries[{i}].level": level})
    common_namespace(**{f"summaries[{i}].state": state, f"summaries[{i}].level": level})
    if state.ndim < 2 or level.ndim != state.ndim or level.shape[-2] != 1:
        raise ValueError(
            f"summaries[{i}] must hold state (..., M, dv + 1) and level (..., 1, M); got "
            f"shapes {tuple(state.shape)} and {tuple(level.shape)}"
        )
    return KeySummary(state, level)


def read_summary(
    q: Array,
    summary: KeySummary,
    projection: Array | None,
    *,
    kernel: KernelLike = "softmax",
    scale: float | None = None,
) -> Array:
    """Bidirectional FAVOR+ outputs of queries against the summary of all the keys.

    Queries are stabilized against the summary's level exactly as on one device, so
    ``read_summary(q, key_summary(k, v, w), w)`` equals ``favor_attention(q, k, v, w)``
    up to float rounding (whatever way the summary was split and merged).

    Parameters
    ----------
    q : array, shape (..., Lq, d)
    summary : KeySummary
        Of all the keys (merged), from the same projection, kernel and scale.
    projection, kernel, scale
        As in :func:`key_summary`.

    Returns
    -------
    array, shape (..., Lq, dv)
        In the summary's dtype. Rows with no key at all return 0.

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import draw_projection, favor_attention, key_summary, read_summary
    >>> rng = np.random.default_rng(2)
    >>> q, k, v = (rng.standard_normal((20, 4)) for _ in range(3))
    >>> w = draw_projection(16, 4, seed=0)
    >>> out = read_summary(q[:5], key_summary(k, v, w), w)
    >>> bool(np.allclose(out, favor_attention(q, k, v, w)[:5]))
    True
    """
    kern = resolve_kernel(kernel)
    require(q=q)
    summary = _as_summary(summary, 0)
    xp = common_namespace(q=q, **{"summary.state": summary.state})
    dv = summary.state.shape[-1] - 1
    fake_v = xp.zeros((*q.shape[:-1], dv), dtype=q.dtype, device=_device(q))
    chk = check_attention_inputs(q, q, fake_v, None, scale, projection=projection, kernel=kern)
    num = kern.num_features(projection.shape[0] if projection is not None else q.shape[-1])
    if summary.state.shape[-2] != num or summary.level.shape[-1] not in (1, num):
        raise ValueError(
            f"summary must have {num} features for this projection and kernel; got state "
            f"shape {tuple(summary.state.shape)} and level shape {tuple(summary.level.shape)}"
        )
    dtype = summary.state.dtype
    qc = xp.astype(q, dtype, copy=False)
    w = None if projection is None else xp.astype(projection, dtype, copy=False)
    return readout(xp, qc, summary, w, kern, chk.scale)


def causal_summary(
    k: Array,
    v: Array,
    projection: Array | None,
    *,
    kernel: KernelLike = "softmax",
    key_mask: Array | None = None,
    scale: float | None = None,
) -> CausalState:
    """The causal state a block of keys hands to every later position.

    The same state as :func:`favorplus.favor_attention_step` returns after the block
    (from the empty state), up to rounding, in one pass and without queries. Merge the
    states of earlier blocks with :func:`merge_causal_states` (or
    :func:`exclusive_prefix`) and pass the result as ``state`` to
    ``favor_attention_step`` for a block's causal outputs.

    Parameters
    ----------
    k, v, projection, kernel, key_mask, scale
        As in :func:`key_summary`.

    Returns
    -------
    CausalState
        numerator (..., M, dv + 1) and log_scale (...), in the compute dtype.

    Examples
    --------
    Causal attention of the second half of a sequence from the first half's summary:

    >>> import numpy as np
    >>> from favorplus import (causal_summary, draw_projection, favor_attention,
    ...                        favor_attention_step)
    >>> rng = np.random.default_rng(3)
    >>> q, k, v = (rng.standard_normal((2, 64, 8)) for _ in range(3))
    >>> w = draw_projection(32, 8, seed=0)
    >>> before = causal_summary(k[:, :32], v[:, :32], w)
    >>> out, _ = favor_attention_step(q[:, 32:], k[:, 32:], v[:, 32:], w, before)
    >>> bool(np.allclose(out, favor_attention(q, k, v, w, causal=True)[:, 32:]))
    True
    """
    kern = resolve_kernel(kernel)
    xp, dtype, sc, batch, mask, bias = _check_keys(k, v, projection, kern, key_mask, scale)
    _, kc, vc, w = _cast_inputs(xp, dtype, k, k, v, projection, mask)
    bias = None if bias is None else xp.astype(bias, dtype, copy=False)
    return local_causal_summary(xp, kc, vc, w, mask, bias, kern, sc, batch)


def _as_state(s: Any, i: int) -> CausalState:
    if not (isinstance(s, tuple) and len(s) == 2):
        raise TypeError(
            f"states[{i}] must be a CausalState (numerator, log_scale); got {type(s).__name__}"
        )
    num, lev = s
    require(**{f"states[{i}].numerator": num, f"states[{i}].log_scale": lev})
    common_namespace(**{f"states[{i}].numerator": num, f"states[{i}].log_scale": lev})
    if num.ndim < 2 or tuple(lev.shape) != tuple(num.shape[:-2]):
        raise ValueError(
            f"states[{i}] must hold numerator (..., M, dv + 1) and log_scale (...); got "
            f"shapes {tuple(num.shape)} and {tuple(lev.shape)}"
        )
    return CausalState(num, lev)


def merge_causal_states(*states: CausalState) -> CausalState:
    """Merge causal states of consecutive blocks: the state after all of them.

    ``c = max_s c_s`` and ``S = sum_s exp(c_s - c) S_s`` (each factor <= 1; the empty
    state contributes 0). Associative and commutative up to float rounding.

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import causal_summary, draw_projection, merge_causal_states
    >>> rng = np.random.default_rng(4)
    >>> k, v = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    >>> w = draw_projection(16, 4, seed=0)
    >>> a, b = causal_summary(k[:10], v[:10], w), causal_summary(k[10:], v[10:], w)
    >>> st = merge_causal_states(a, b)
    >>> bool(np.allclose(st.numerator, causal_summary(k, v, w).numerator))
    True
    """
    if not states:
        raise ValueError("merge_causal_states needs at least one state; got none")
    states = tuple(_as_state(s, i) for i, s in enumerate(states))
    if len(states) == 1:
        return states[0]
    _check_states_alike(states)
    xp = common_namespace(**{f"states[{i}].numerator": s.numerator for i, s in enumerate(states)})
    c = states[0].log_scale
    for s in states[1:]:
        c = xp.maximum(c, s.log_scale)
    c = _stop(c)
    num = None
    for s in states:
        part = s.numerator * xp.exp(_stop(s.log_scale) - c)[..., None, None]
        num = part if num is None else num + part
    return CausalState(num, c)


def exclusive_prefix(states: Sequence[CausalState]) -> list[CausalState]:
    """For each block, the merged state of the blocks before it (the first gets the
    empty state): what its causal attention needs (LASP-2's prefix merge).

    Examples
    --------
    >>> import numpy as np
    >>> from favorplus import (causal_summary, draw_projection, exclusive_prefix,
    ...                        favor_attention, favor_attention_step)
    >>> rng = np.random.default_rng(5)
    >>> q, k, v = (rng.standard_normal((48, 4)) for _ in range(3))
    >>> w = draw_projection(16, 4, seed=0)
    >>> cuts = [slice(0, 16), slice(16, 40), slice(40, 48)]
    >>> prefix = exclusive_prefix([causal_summary(k[s], v[s], w) for s in cuts])
    >>> outs = [favor_attention_step(q[s], k[s], v[s], w, p)[0] for s, p in zip(cuts, prefix)]
    >>> bool(np.allclose(np.concatenate(outs), favor_attention(q, k, v, w, causal=True)))
    True
    """
    states = [_as_state(s, i) for i, s in enumerate(states)]
    if not states:
        return []
    _check_states_alike(states)
    xp = common_namespace(**{f"states[{i}].numerator": s.numerator for i, s in enumerate(states)})
    first = states[0]
    floor = _floor(xp, first.log_scale.dtype)
    empty = CausalState(xp.zeros_like(first.numerator), xp.full_like(first.log_scale, floor))
    out = [empty]
    for s in states[:-1]:
        out.append(merge_causal_states(out[-1], s))
    return out


# --- sequence-parallel attention over any engine's collectives ---------------------------


class Collectives:
    """What a sequence-parallel engine provides (see ``_jax_collectives`` and
    ``_torch_collectives``): this shard's position and two collectives over the shards.

    ``gather(x)`` stacks every shard's ``x`` (the same shape on each) along a new
    leading axis, in shard order, differentiably; ``merge(summary)`` is the
    bidirectional merge over all shards (default: :func:`merge_stacked` of the gathered
    summaries; JAX uses a max and a sum instead).
    """

    def index(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def gather(self, x: Array) -> Array:  # pragma: no cover - interface
        raise NotImplementedError

    def merge(self, xp: Namespace, summary: KeySummary) -> KeySummary:
        return merge_stacked(xp, KeySummary(self.gather(summary.state), self.gather(summary.level)))
