"""Flax NNX layer: multi-head FAVOR+ attention with the layout of ``nnx.MultiHeadAttention``.

The attention is :func:`favorplus.favor_attention` (the array API core; nothing of
the mathematics is repeated here). The random projection is a non-trainable
:class:`FeatureProjection` variable: in the model's state, skipped by optimizers that
update ``nnx.Param`` only, and redrawn on request from an explicit JAX key or seed.
Importing this module imports jax and flax.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._validation import check_flag
from .attention import favor_attention
from .features import KernelLike
from .projection import default_num_features, draw_projection, host_generator

__all__ = ["FavorAttention", "FeatureProjection", "redraw_projections"]


class FeatureProjection(nnx.Variable):
    """The random projection of a FAVOR+ layer: model state, but not a trainable parameter."""


def _host_generator(source: Any) -> np.random.Generator:
    """A NumPy generator from an int seed, a Generator, or a JAX PRNG key (new-style or raw)."""
    if isinstance(source, np.random.Generator) or (
        isinstance(source, numbers.Integral) and not isinstance(source, bool)
    ):
        return host_generator(source, "key")
    if isinstance(source, jax.Array):
        if isinstance(source, jax.core.Tracer):
            raise TypeError(
                "the key must be a concrete JAX PRNG key, not a traced value: the projection "
                "is drawn on the host, so redraw outside jax.jit / nnx.jit"
            )
        data = source
        if jnp.issubdtype(source.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(source)
        words = np.asarray(data).astype(np.uint64).ravel().tolist()
        return np.random.default_rng(words)
    raise TypeError(
        "key must be a JAX PRNG key, an int seed or a numpy.random.Generator; got "
        f"{type(source).__name__}"
    )


class FavorAttention(nnx.Module):
    """Multi-head FAVOR+ attention for Flax NNX.

    The submodules ``query``, ``key``, ``value`` and ``out`` are laid out as in
    :class:`flax.nnx.MultiHeadAttention`, so its parameters can be copied over
    (``nnx.update(layer, nnx.state(mha, nnx.Param))``).

    Parameters
    ----------
    num_heads, in_features, qkv_features, out_features, in_kv_features, use_bias,
    dtype, param_dtype
        As in :class:`flax.nnx.MultiHeadAttention`.
    num_features : int, optional
        Random features m per head; default ``round(d log d)`` for head size d.
    kernel, kind, norms
        The feature map (:func:`favorplus.favor_attention`) and the projection's law
        (:func:`favorplus.draw_projection`).
    causal : bool
        Always causal (``__call__(is_causal=True)`` also makes one call causal).
    seed : int, optional
        Draw the first projection from this host seed (the same matrix as
        ``favorplus.draw_projection(m, d, seed=seed)`` and as the torch layer with the
        same seed); default: from a key of ``rngs.params()``.
    chunk_size : int, optional
        Causal chunk length.
    rngs : nnx.Rngs

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from favorplus.flax import FavorAttention
    >>> layer = FavorAttention(4, 64, causal=True, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 100, 64))
    >>> layer(x).shape
    (2, 100, 64)
    >>> old = layer.projection.get_value()
    >>> layer.redraw_projection(jax.random.key(2))
    >>> bool(jnp.any(layer.projection.get_value() != old))
    True
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        in_kv_features: int | None = None,
        *,
        num_features: int | None = None,
        kernel: KernelLike = "softmax",
        kind: str = "orthogonal",
        norms: str = "chi",
        causal: bool = False,
        use_bias: bool = True,
        seed: int | None = None,
        chunk_size: int | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        in_kv_features = in_features if in_kv_features is None else in_kv_features
        if qkv_features % num_heads:
            raise ValueError(
                f"qkv_features must be divisible by num_heads; got qkv_features={qkv_features} "
                f"and num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = qkv_features
        self.out_features = out_features
        self.head_dim = qkv_features // num_heads
        self.kernel = kernel
        self.kind = kind
        self.norms = norms
        self.causal = check_flag("causal", causal)
        self.chunk_size = chunk_size
        self.num_features = (
            default_num_features(self.head_dim) if num_features is None else num_features
        )
        heads = (num_heads, self.head_dim)
        common = {
            "use_bias": use_bias,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "kernel_init": nnx.initializers.lecun_normal(),
            "rngs": rngs,
        }
        self.query = nnx.LinearGeneral(in_features, heads, **common)
        self.key = nnx.LinearGeneral(in_kv_features, heads, **common)
        self.value = nnx.LinearGeneral(in_kv_features, heads, **common)
        self.out = nnx.LinearGeneral(heads, out_features, axis=(-2, -1), **common)
        source = seed if seed is not None else rngs.params()
        self.projection = FeatureProjection(self._draw(_host_generator(source), param_dtype))

    def _draw(self, rng: np.random.Generator, dtype: Any) -> jax.Array:
        w = draw_projection(
            self.num_features,
            self.head_dim,
            kind=self.kind,  # type: ignore[arg-type]
            norms=self.norms,  # type: ignore[arg-type]
            seed=rng,
        )
        return jnp.asarray(w, dtype=dtype)

    def redraw_projection(self, key: Any) -> None:
        """Draw a new projection (outside ``jit``: the draw runs on the host).

        Parameters
        ----------
        key : JAX PRNG key, int or numpy.random.Generator
        """
        self.projection.set_value(
            self._draw(_host_generator(key), self.projection.get_value().dtype)
        )

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
    ) -> jax.Array:
        """Attention of ``inputs_q`` (..., L, in_features) over ``inputs_k``/``inputs_v``.

        Parameters
        ----------
        inputs_q : array, shape (..., L, in_features)
        inputs_k : array, shape (..., S, in_kv_features); default ``inputs_q``
        inputs_v : array, shape (..., S, in_kv_features); default ``inputs_k``
        mask : bool array, optional
            As in ``nnx.MultiHeadAttention`` (True: attend), broadcastable to
            (..., heads, L, S), but the same for every query: shape (..., 1, S) or
            (..., heads, 1, S). FAVOR+ removes keys; it cannot apply masks that
            differ between queries, except the causal one (``is_causal``).
        is_causal : bool
            Make this call causal.

        Returns
        -------
        array, shape (..., L, out_features)
        """
        if inputs_k is None:
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        # (..., L, heads, d) -> (..., heads, L, d)
        q, k, v = (
            jnp.swapaxes(f(x), -3, -2)
            for f, x in ((self.query, inputs_q), (self.key, inputs_k), (self.value, inputs_v))
        )
        key_mask = None
        if mask is not None:
            if mask.dtype != jnp.bool_:
                raise TypeError(f"mask must be a boolean array (True: attend); got {mask.dtype}")
            if mask.ndim < 2 or mask.shape[-2] != 1 or mask.shape[-1] not in (1, k.shape[-2]):
                raise ValueError(
                    f"mask must be a key mask of shape (..., 1, {k.shape[-2]}) (the same for "
                    f"every query); got shape {tuple(mask.shape)}: FAVOR+ removes keys, and "
                    "the causal mask is given by is_causal"
                )
            key_mask = jnp.broadcast_to(mask[..., 0, :], (*mask.shape[:-2], k.shape[-2]))
        out = favor_attention(
            q,
            k,
            v,
            self.projection.get_value(),
            kernel=self.kernel,
            causal=check_flag("is_causal", is_causal) or self.causal,
            key_mask=key_mask,
            chunk_size=self.chunk_size,
        )
        return self.out(jnp.swapaxes(out, -3, -2))


def redraw_projections(model: nnx.Module, key: Any) -> int:
    """Redraw every :class:`FavorAttention` in ``model`` from one key (outside ``jit``).

    Returns
    -------
    int
        How many layers were redrawn.
    """
    rng = _host_generator(key)
    count = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, FavorAttention):
            node.redraw_projection(rng)
            count += 1
    return count
