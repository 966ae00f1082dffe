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
