"""Sequence-parallel FAVOR+: the attention of one shard of a sequence, composed from the
shard summaries (:mod:`favorplus.summaries`) with the collectives of an engine (JAX
``lax`` collectives over an ``axis_name``, torch.distributed over a process group)."""

from __future__ import annotations

from typing import Any

from ._backend import Array, Namespace
from ._inputs import core_inputs, to_batch
from .causal import CausalState
from .features import Kernel
from .summaries import (
    Collectives,
    local_causal_summary,
    local_summary,
    merge_causal_stacked,
    readout,
)


def sharded_core(
    comm: Collectives,
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
    """FAVOR+ attention of this shard's queries, keys and values (the sequence split
    over shards in order): bidirectional, this shard's queries against the merge of
    every shard's summary; causal, this shard's causal attention from the merge of the
    summaries of the shards before it (an all-gather and an exclusive prefix merge)."""
    from .causal import causal_attention

    qc, kc, vc, w, bias = core_inputs(
        xp, dtype, q, k, v, projection, key_mask, key_bias, keep, keep_scale
    )
    if causal:
        local = local_causal_summary(xp, kc, vc, w, key_mask, bias, kern, scale, batch)
        gathered = CausalState(comm.gather(local.numerator), comm.gather(local.log_scale))
        prefix = merge_causal_stacked(xp, gathered, 0, upto=comm.index())
        if qc.shape[-2] == 0:
            # No token here; the output still depends on the gathered states, so that
            # every shard runs the gather's backward (a collective) too.
            link = xp.sum(prefix.numerator) * 0.0
            return xp.astype(to_batch(xp, vc, batch, 2) + link, v.dtype, copy=False)
        out, _ = causal_attention(
            xp, qc, kc, vc, w, key_mask, prefix, kern, scale, batch, chunk, key_bias=bias
        )
    else:
        merged = comm.merge(xp, local_summary(xp, kc, vc, w, key_mask, bias, kern, scale, batch))
        out = to_batch(xp, readout(xp, qc, merged, w, kern, scale), batch, 2)
    return xp.astype(out, v.dtype, copy=False)


def sharded_call(
    arrays: tuple[Any, ...], statics: tuple[Any, ...], axis_name: Any, process_group: Any
) -> Array:
    """:func:`sharded_core` with the collectives of ``axis_name`` (JAX) or
    ``process_group`` (torch.distributed), after checking that they fit the arrays."""
    from ._backend import is_jax, is_torch

    q, k = arrays[:2]
    causal = statics[4]
    if axis_name is not None and process_group is not None:
        raise ValueError("pass axis_name (JAX) or process_group (PyTorch), not both")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"sharded causal attention needs as many queries as keys on each shard; got "
            f"q.shape={tuple(q.shape)} and k.shape={tuple(k.shape)}"
        )
    comm: Collectives
    if axis_name is not None:
        if not is_jax(q):
            raise TypeError(
                f"axis_name is for JAX arrays inside jax.shard_map; got {type(q).__name__} "
                f"(PyTorch: pass process_group)"
            )
        from ._jax_collectives import JaxAxis

        comm = JaxAxis(axis_name)
    else:
        if not is_torch(q):
            raise TypeError(
                f"process_group is for torch tensors; got {type(q).__name__} (JAX: pass "
                f"axis_name inside jax.shard_map)"
            )
        from ._torch_collectives import TorchGroup, call_settings

        group = TorchGroup(process_group)
        names = ("q", "k", "v", "projection", "key_mask", "key_bias", "dropout_keep")
        shapes = {n: None if a is None else tuple(a.shape) for n, a in zip(names, arrays)}
        shapes["batch"] = tuple(statics[6])
        group.check_agreement(q.device, shapes, call_settings(arrays[3], *statics))
        comm = group
    return sharded_core(comm, *arrays, *statics)
