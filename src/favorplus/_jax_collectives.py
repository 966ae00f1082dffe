"""JAX collectives for sequence-parallel FAVOR+ (``favor_attention(..., axis_name=...)``).

Inside ``jax.shard_map`` (or ``vmap`` / ``pmap`` with a named axis) each shard holds a
contiguous piece of the sequence, in the order of the named mesh axis. Bidirectional:
a ``pmax`` of the per-feature levels and a ``psum`` of the rescaled key states (one
all-reduce of m (dv + 1) numbers per row). Causal: an ``all_gather`` of the per-shard
causal states (W x m (dv + 1) numbers per row, independent of the length) and an
exclusive prefix merge on every shard (LASP-2). Gradients flow through ``psum`` and
``all_gather`` (their transposes are JAX's own).
"""

from __future__ import annotations

from typing import Any

from .summaries import Collectives, KeySummary

__all__ = ["JaxAxis"]


class JaxAxis(Collectives):
    """The named mesh axis (or tuple of axes) the sequence is sharded over."""

    def __init__(self, axis_name: Any) -> None:
        from jax import lax

        try:
            self.size = lax.axis_size(axis_name)
        except NameError as err:
            raise ValueError(
                f"axis_name={axis_name!r} is not bound here: call favor_attention with "
                f"axis_name inside jax.shard_map (or vmap / pmap) over a mesh that has "
                f"that axis, with the sequence axis of q, k and v sharded over it "
                f"({err})"
            ) from None
        self.name = axis_name

    def index(self) -> Any:
        from jax import lax

        return lax.axis_index(self.name)

    def gather(self, x: Any) -> Any:
        from jax import lax

        return lax.all_gather(x, self.name, axis=0, tiled=False)

    def merge(self, xp: Any, summary: KeySummary) -> KeySummary:
        from jax import lax

        from .summaries import rescale

        level = lax.stop_gradient(lax.pmax(lax.stop_gradient(summary.level), self.name))
        return KeySummary(lax.psum(rescale(xp, summary, level), self.name), level)


def _spec(x: Any) -> tuple[Any, ...] | None:
    """The explicit sharding spec of a JAX array's type, one entry per axis (None where
    the axis is not sharded over explicit mesh axes); None for a non-JAX value."""
    import jax

    try:
        sharding = getattr(jax.typeof(x), "sharding", None)
    except TypeError:
        return None
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    entries = tuple(spec)
    return entries + (None,) * (x.ndim - len(entries))


def explicit_sequence_axis(k: Any) -> Any:
    """The explicit mesh axes that the sequence axis (-2) of ``k`` is sharded over
    (``jax.jit`` on a mesh of ``Explicit`` axes, JAX's default), or None."""
    spec = _spec(k)
    if spec is None or k.ndim < 2:
        return None
    return spec[k.ndim - 2]


def _check_key_aligned(
    hint: str, name: str, x: Any, spec: tuple[Any, ...], k: Any, sk: tuple[Any, ...], axis: Any
) -> None:
    """A key mask (shape ``(..., Lk)``) sharded like k: its last axis over ``axis``, each
    leading axis either of size 1 (broadcast, not sharded) or of k's size and spec (its
    leading axes align with k's from the right and do not extend k's batch). Each shard
    then holds the mask of its own keys, batch rows and heads."""
    from jax.sharding import PartitionSpec as P

    n = x.ndim - 1
    off = k.ndim - 2 - n  # x's leading axis i is k's axis off + i
    aligned = (
        off >= 0
        and spec[-1] == axis
        and all(
            spec[i] is None
            if x.shape[i] == 1
            else (x.shape[i] == k.shape[off + i] and spec[i] == sk[off + i])
            for i in range(n)
        )
    )
    if not aligned:
        raise ValueError(
            f"{hint}, which needs {name} sharded like k: its last (key) axis over {axis!r}, "
            f"each leading axis of size 1 or of k's size and sharded like k's (k.shape="
            f"{tuple(k.shape)}, spec {P(*sk)}); got {name}.shape={tuple(x.shape)} with the "
            f"spec {P(*spec)}"
        )


def sequence_shard_map(call: Any, axis: Any, arrays: dict[str, Any]) -> Any:
    """``call(axis_name=axis, **arrays)`` inside ``jax.shard_map`` over the explicit mesh
    of the arrays' types: what a sequence-sharded ``favor_attention`` under ``jax.jit``
    needs, since the one-device algorithm would contract the sharded sequence axis.

    Every array keeps its sharding: q, k and v must share their leading (batch, heads)
    shapes and specs and the sequence axis of k and v; key masks are sharded along the
    keys' sequence axis like k; the projection is replicated. Else a ValueError that
    says what to change (or to call ``jax.shard_map`` with ``axis_name=`` directly)."""
    import jax
    from jax.sharding import PartitionSpec as P

    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    specs = {name: _spec(x) for name, x in arrays.items()}
    hint = (
        f"favor_attention on inputs whose sequence axis is sharded over the explicit mesh "
        f"axes {axis!r} runs inside jax.shard_map with axis_name={axis!r}"
    )
    for name, x in arrays.items():
        if specs[name] is None:
            raise TypeError(f"{hint}: {name} must be a JAX array too; got {type(x).__name__}")
    lead = q.ndim - 2
    if not (q.ndim == k.ndim == v.ndim and q.shape[:lead] == k.shape[:lead] == v.shape[:lead]):
        raise ValueError(
            f"{hint}, which needs q, k and v with the same leading dimensions; got "
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
        )
    sq, sk, sv = specs["q"], specs["k"], specs["v"]
    if not (sq[:lead] == sk[:lead] == sv[:lead] and sk[lead] == sv[lead]) or any(
        s[-1] is not None for s in (sq, sk, sv)
    ):
        raise ValueError(
            f"{hint}, which needs q, k and v sharded alike on their leading dimensions, "
            f"k and v alike on the sequence axis and none on the last axis; got the "
            f"specs q {P(*sq)}, k {P(*sk)}, v {P(*sv)}"
        )
    for name in ("key_mask", "dropout_keep"):
        if name in arrays:
            _check_key_aligned(hint, name, arrays[name], specs[name], k, sk, axis)
    if "projection" in arrays and any(e is not None for e in specs["projection"]):
        raise ValueError(
            f"{hint}, which needs the projection replicated; got the spec {P(*specs['projection'])}"
        )
    names = list(arrays)
    mesh = jax.typeof(k).sharding.mesh

    def body(*xs: Any) -> Any:
        return call(axis_name=axis, **dict(zip(names, xs)))

    in_specs = tuple(P(*specs[n]) for n in names)
    out_spec = P(*sq[:-1], None)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec)
    return mapped(*(arrays[n] for n in names))
