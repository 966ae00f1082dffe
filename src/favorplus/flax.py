"""Flax NNX integration: FAVOR+ in place of ``nnx.MultiHeadAttention`` and its ``attention_fn``.

The attention is :func:`favorplus.favor_attention` (the array API core; nothing of
the mathematics is repeated here). This module owns the translation of Flax's
conventions into the core's arguments: the ``(batch..., length, heads, features)``
layout, grouped-query heads, Flax's multiplicative masks (``nnx.make_attention_mask``,
``nnx.make_causal_mask``, ``nnx.combine_masks``: nonzero = attend) decomposed into a
causal flag, a key mask and padded query rows, dropout drawn from ``nnx.Rngs``, and
an autoregressive cache that holds the causal state instead of keys and values.
The random projection is a non-trainable :class:`FeatureProjection` variable: in the
model's state, skipped by optimizers that update ``nnx.Param`` only, and redrawn on
request from an explicit JAX key or seed. Importing this module imports jax and flax.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

try:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
except ImportError as _error:  # the framework is an optional extra
    from ._optional import missing

    raise ImportError(missing("favorplus.flax", "flax", "JAX and Flax")) from _error
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes as _dtypes
from flax.nnx.nn.linear import default_kernel_init

from ._running import (
    STAT_NAMES,
    check_momentum,
    tracks_statistics,
    updated_statistics,
    with_statistics,
)
from ._validation import check_flag
from .attention import favor_attention, favor_attention_matrix
from .causal import CausalState, favor_attention_step, init_causal_state
from .estimators import FeatureStatistics, feature_statistics
from .features import KernelLike, resolve_kernel
from .projection import default_num_features, draw_projection, host_generator
from .simplex import simplex_directions

__all__ = [
    "FavorAttention",
    "FavorAttentionFunction",
    "FeatureProjection",
    "make_attention_fn",
    "redraw_projections",
]


# nnx's own default bias initializer (the same object, so that the defaults compare equal)
_DEFAULT_BIAS_INIT = (
    inspect.signature(nnx.MultiHeadAttention.__init__).parameters["bias_init"].default
)


class FeatureProjection(nnx.Variable):
    """The random projection of a FAVOR+ layer: model state, but not a trainable parameter."""


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _host_generator(source: Any) -> np.random.Generator:
    """A NumPy generator from an int seed, a Generator, or a JAX PRNG key (new-style or raw)."""
    if isinstance(source, np.random.Generator) or (
        isinstance(source, numbers.Integral) and not isinstance(source, bool)
    ):
        return host_generator(source, "key")
    if isinstance(source, jax.Array):
        if _is_traced(source):
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


def _traced_projection(
    key: jax.Array, num_features: int, dim: int, kind: str, norms: str, dtype: Any
) -> jax.Array:
    """The law of :func:`favorplus.draw_projection`, drawn with ``jax.random``.

    Only for keys that are traced values (a layer created inside ``nnx.vmap``, as
    scan-over-layers models do), where the host cannot read the key.
    """
    if kind not in ("orthogonal", "iid", "simplex"):
        raise ValueError(f"kind must be one of ('orthogonal', 'iid', 'simplex'); got {kind!r}")
    if norms not in ("chi", "sqrt_d"):
        raise ValueError(f"norms must be one of ('chi', 'sqrt_d'); got {norms!r}")
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    k_dir, k_len = jax.random.split(key)
    if kind == "iid":
        w = jax.random.normal(k_dir, (num_features, dim), jnp.float32)
        if norms == "sqrt_d":
            w = w / jnp.linalg.norm(w, axis=-1, keepdims=True) * math.sqrt(dim)
        return w.astype(dtype)
    blocks = -(-num_features // dim)
    g = jax.random.normal(k_dir, (blocks, dim, dim), jnp.float32)
    q, r = jnp.linalg.qr(g)
    signs = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
    q = q * jnp.where(signs == 0, 1.0, signs)[..., None, :]  # Haar (Mezzadri 2007)
    if kind == "simplex":  # the simplex's vertices, Haar-rotated (favorplus.simplex)
        q = jnp.einsum("ij,bjk->bik", jnp.asarray(simplex_directions(dim), jnp.float32), q)
    directions = q.reshape(blocks * dim, dim)[:num_features]
    if norms == "chi":
        lengths = jnp.linalg.norm(jax.random.normal(k_len, (num_features, dim)), axis=-1)
    else:
        lengths = jnp.full((num_features,), math.sqrt(dim), jnp.float32)
    return (directions * lengths[:, None]).astype(dtype)


# --------------------------------------------------------------------------------------
# Flax masks -> causal flag, key mask and padded query rows


def _bool_mask(mask: Any, name: str) -> jax.Array:
    """Flax's reading of a mask: nonzero (or True) = attend."""
    dtype = mask.dtype if isinstance(mask, jax.Array) else np.asarray(mask).dtype
    if dtype == np.bool_:
        return jnp.asarray(mask)
    if not (jnp.issubdtype(dtype, jnp.number)):
        raise TypeError(
            f"{name} must be a boolean or numeric array (nonzero = attend, as in "
            f"nnx.make_attention_mask); got dtype {dtype}"
        )
    return jnp.asarray(mask) != 0


def _split_heads(m: jax.Array, heads: int, kv_heads: int, name: str) -> jax.Array:
    """(..., H or 1, a, b) -> (..., Hkv or 1, G or 1, a, b), the grouped layout."""
    while m.ndim < 3:
        m = m[None]
    h = m.shape[-3]
    lead, tail = m.shape[:-3], m.shape[-2:]
    if h == 1:
        return m[..., None, :, :]
    if h != heads:
        raise ValueError(
            f"{name} must broadcast to (batch..., num_heads={heads}, q_length, kv_length); "
            f"got shape {tuple(m.shape)}"
        )
    return m.reshape(*lead, kv_heads, heads // kv_heads, *tail)


def _causal_pattern(lq: int, lk: int) -> jax.Array:
    """Bottom-right aligned causal pattern: query i is position ``i + lk - lq``."""
    return jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq)


def _raise_not_linear(ok: Any) -> None:
    if not bool(np.all(np.asarray(ok))):
        raise ValueError(_NOT_LINEAR)


_NOT_LINEAR = (
    "mask is neither key padding nor causal-and-key-padding (with padded query rows): "
    "FAVOR+ cannot compute an arbitrary (q_length, kv_length) pattern in linear time. "
    "Masks from nnx.make_attention_mask(query_valid, key_valid), nnx.make_causal_mask and "
    "their nnx.combine_masks are supported"
)


def _split_mask(
    mask: jax.Array, lq: int, lk: int, causal: bool
) -> tuple[bool | jax.Array, jax.Array, jax.Array]:
    """Decompose a boolean mask (..., 1 or Lq, 1 or Lk) exactly.

    Returns ``(causal, key_mask, query_valid)``: the mask equals
    ``query_valid[i] & key_mask[j] & (not causal or j <= i + lk - lq)``.
    ``causal`` is a Python bool, or a traced scalar when the mask is a traced value
    (then a runtime check raises if the pattern is neither). ``causal=True`` on
    entry: the call is causal anyway (the mask is combined with the causal pattern).
    """
    if mask.shape[-1] not in (1, lk) or mask.shape[-2] not in (1, lq):
        raise ValueError(
            f"mask must broadcast to (batch..., num_heads, {lq}, {lk}) (q_length, kv_length); "
            f"got shape {tuple(mask.shape)}"
        )
    lead = mask.shape[:-2]
    tri = _causal_pattern(lq, lk)
    if mask.shape[-2] == 1:  # the same for every query: a key mask
        key = jnp.broadcast_to(mask[..., 0, :], (*lead, lk))
        if causal:
            seen = jnp.cumsum(key, axis=-1) > 0  # any kept key at or before position j
            valid = seen[..., lk - lq :] if lk >= lq else jnp.zeros((*lead, lq), bool)
        else:
            valid = jnp.broadcast_to(jnp.any(key, axis=-1, keepdims=True), (*lead, lq))
        return causal, key, valid
    m = jnp.broadcast_to(mask, (*lead, lq, lk))
    if causal:
        m = m & tri
    valid = jnp.any(m, axis=-1)
    key = jnp.any(m, axis=-2)
    plain = valid[..., :, None] & key[..., None, :]
    is_plain = jnp.all(m == plain)
    is_causal = jnp.all(m == (plain & tri)) if lq <= lk else jnp.asarray(False)
    if not _is_traced(m):
        if causal or (not bool(is_plain) and bool(is_causal)):
            if not bool(is_causal):
                raise ValueError(_NOT_LINEAR)
            return True, key, valid
        if not bool(is_plain):
            raise ValueError(_NOT_LINEAR)
        return False, key, valid
    # A traced mask (built inside jit): the pattern is checked when the program runs,
    # and lax.cond runs the causal or the bidirectional computation.
    if causal:
        jax.debug.callback(_raise_not_linear, is_causal)
        return True, key, valid
    jax.debug.callback(_raise_not_linear, is_plain | is_causal)
    return is_causal & ~is_plain, key, valid


def _decode_key_mask(mask: jax.Array, steps: int, index: jax.Array, max_length: int) -> jax.Array:
    """The key mask of the new tokens from a decode-time mask (..., 1, T or max_length)."""
    m = mask
    while m.ndim < 2:
        m = m[None]
    if m.shape[-2] != 1:
        raise ValueError(
            "in decode mode, mask must be the same for every query (shape "
            f"(batch..., num_heads, 1, kv_length)); got shape {tuple(mask.shape)}"
        )
    m = m[..., 0, :]
    width = m.shape[-1]
    if width == max_length and width != steps:
        return jax.lax.dynamic_slice_in_dim(m, index, steps, axis=-1)
    if width in (1, steps):
        return jnp.broadcast_to(m, (*m.shape[:-1], steps))
    raise ValueError(
        f"in decode mode, mask's last axis must cover the new tokens ({steps}) or the "
        f"cache's max_length ({max_length}); got shape {tuple(mask.shape)}"
    )


# --------------------------------------------------------------------------------------
# The attention of projected heads, shared by the layer and the attention_fn


_EXACT_FUNCTIONS = (nnx.dot_product_attention, jax.nn.dot_product_attention)


def _heads_first(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[Any, ...]:
    """(..., L, H, d) -> grouped (..., Hkv, G, L, d) queries and (..., Hkv, 1, S, d) keys."""
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.ndim < 3:
            raise ValueError(
                f"{name} must have shape (batch..., length, num_heads, features); "
                f"got shape {tuple(x.shape)}"
            )
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if v.shape[-2] != kv_heads or heads % kv_heads:
        raise ValueError(
            "key and value must have the same number of heads, dividing the query's "
            f"(grouped-query attention); got query {tuple(q.shape)}, key {tuple(k.shape)}, "
            f"value {tuple(v.shape)}"
        )
    if k.shape[-3] != v.shape[-3]:
        raise ValueError(
            f"key and value must have the same length; got key {tuple(k.shape)} and "
            f"value {tuple(v.shape)}"
        )
    group = heads // kv_heads
    qh = jnp.swapaxes(q, -3, -2)
    qh = qh.reshape(*qh.shape[:-3], kv_heads, group, *qh.shape[-2:])
    kh = jnp.swapaxes(k, -3, -2)[..., None, :, :]
    vh = jnp.swapaxes(v, -3, -2)[..., None, :, :]
    return qh, kh, vh, heads, kv_heads


def _merge_heads(x: jax.Array) -> jax.Array:
    """(..., Hkv, G, L, f) -> (..., L, H, f)."""
    x = x.reshape(*x.shape[:-4], x.shape[-4] * x.shape[-3], *x.shape[-2:])
    return jnp.swapaxes(x, -3, -2)


def _favor_heads(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    projection: jax.Array,
    *,
    kernel: KernelLike,
    chunk_size: int | None,
    causal: bool,
    mask: Any = None,
    bias: Any = None,
    is_causal: bool = False,
    broadcast_dropout: bool = True,
    dropout_rng: Any = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    module: nnx.Module | None = None,
    statistics: FeatureStatistics | None = None,
    batch_statistics: bool = False,
) -> Any:
    """FAVOR+ over (batch..., L, heads, features) queries, keys and values, as nnx lays them.

    ``statistics`` (shape (num_heads, head_dim) each): the running statistics that a
    data-driven estimator ``kernel`` uses in causal calls. With ``batch_statistics``,
    returns ``(output, FeatureStatistics of this call, shape (num_heads, head_dim))``."""
    qh, kh, vh, heads, kv_heads = _heads_first(query, key, value)
    lq, lk = qh.shape[-2], kh.shape[-2]
    if check_flag("is_causal", is_causal) and lq != lk:
        raise ValueError(
            "is_causal=True needs as many queries as keys (nnx aligns its causal mask to the "
            f"top left); got q_length={lq} and kv_length={lk}. For cached decoding use "
            "decode=True, or pass the causal mask (aligned to the last keys) as mask"
        )
    forced = causal or bool(is_causal)
    use: bool | jax.Array = forced
    key_mask = valid = None
    if mask is not None:
        m = _split_heads(_bool_mask(mask, "mask"), heads, kv_heads, "mask")
        use, key_mask, valid = _split_mask(m, lq, lk, forced)
    extra: dict[str, Any] = {}
    if bias is not None:
        b = jnp.asarray(bias)
        b = _split_heads(b, heads, kv_heads, "bias")
        if b.shape[-2] != 1 or b.shape[-1] not in (1, lk):
            raise ValueError(
                "bias must be the same for every query, shape (batch..., num_heads, 1, "
                f"{lk}): a per-key bias is exact in linear time, a (q_length, kv_length) "
                f"one is not; got shape {tuple(jnp.shape(bias))}"
            )
        extra["attn_mask"] = b
    if dropout_rate and not deterministic:
        if dropout_rng is None:
            raise ValueError("dropout_rng must be a JAX PRNG key when dropout_rate > 0")
        shape = (lk,)
        if not broadcast_dropout:
            batch = jnp.broadcast_shapes(qh.shape[:-2], kh.shape[:-2])
            shape = (*batch, lk)
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, shape)
        extra["dropout_p"] = float(dropout_rate)
        extra["dropout_keep"] = keep
    w = projection
    if key_mask is not None:
        extra["key_mask"] = key_mask

    def run(c: bool) -> tuple[jax.Array, jax.Array | None]:
        kern = kernel
        if c and statistics is not None:  # causal: the running statistics, not this call's
            kern = with_statistics(kernel, _grouped(statistics, kv_heads))
        out = favor_attention(qh, kh, vh, w, kernel=kern, causal=c, chunk_size=chunk_size, **extra)
        weights = None
        if module is not None:
            masks = {n: extra[n] for n in ("key_mask", "attn_mask") if n in extra}
            weights = favor_attention_matrix(qh, kh, w, kernel=kern, causal=c, **masks)
        return out, weights

    if isinstance(use, bool):
        out, weights = run(use)
    else:
        out, weights = jax.lax.cond(use, lambda: run(True), lambda: run(False))
    if valid is not None:
        # nnx gives a query with no key to attend to uniform weights over all keys. In a
        # causal call those would include later keys (a leak from the future): there the
        # row is 0, as favor_attention and decode mode give it. ``use`` may be traced.
        row = valid[..., None]
        uniform = jnp.mean(vh, axis=-2, keepdims=True).astype(out.dtype)
        out = jnp.where(row, out, jnp.where(use, jnp.zeros_like(uniform), uniform))
        if weights is not None:
            fill = jnp.where(use, 0.0, 1.0 / lk).astype(weights.dtype)
            weights = jnp.where(row, weights, fill)
    if weights is not None and module is not None:
        weights = weights.reshape(*weights.shape[:-4], heads, lq, lk)
        module.sow(nnx.Intermediate, "attention_weights", weights)
    if batch_statistics:
        return _merge_heads(out), _head_statistics(qh, kh, key_mask, heads)
    return _merge_heads(out)


def _grouped(statistics: FeatureStatistics, kv_heads: int) -> FeatureStatistics:
    """(num_heads, d) statistics in the grouped layout (kv_heads, groups, d)."""
    return FeatureStatistics(
        *(jnp.reshape(s, (kv_heads, s.shape[0] // kv_heads, s.shape[-1])) for s in statistics)
    )


def _head_statistics(
    qh: jax.Array, kh: jax.Array, key_mask: jax.Array | None, heads: int
) -> FeatureStatistics:
    """Per-head statistics of grouped queries and keys, averaged over the batch dimensions
    and the positions (masked keys left out), as (num_heads, d) arrays."""
    nbatch = max(qh.ndim, kh.ndim, 0 if key_mask is None else key_mask.ndim + 1) - 2
    axes = tuple(range(nbatch - 2)) or None
    batch = feature_statistics(qh, kh, key_mask=key_mask, axis=axes)
    dim = qh.shape[-1]
    lead = (*qh.shape[-4:-2],)  # (kv_heads, groups)
    return FeatureStatistics(
        *(jnp.broadcast_to(s, (*s.shape[:-3], *lead, dim)).reshape(heads, dim) for s in batch)
    )


@functools.lru_cache(maxsize=64)
def _seeded_projection(num_features: int, dim: int, kind: str, norms: str, seed: int) -> Any:
    w = draw_projection(num_features, dim, kind=kind, norms=norms, seed=seed)  # type: ignore[arg-type]
    w.setflags(write=False)
    return w


class FavorAttentionFunction:
    """FAVOR+ with the signature of ``nnx.dot_product_attention``; see :func:`make_attention_fn`."""

    def __init__(
        self,
        projection: Any = None,
        *,
        num_features: int | None = None,
        kernel: KernelLike = "softmax",
        kind: str = "orthogonal",
        norms: str = "chi",
        seed: int = 0,
        causal: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        resolve_kernel(kernel)
        if projection is not None:
            projection = jnp.asarray(projection)
            if projection.ndim != 2:
                raise ValueError(
                    f"projection must have shape (num_features, head_dim); got shape "
                    f"{tuple(projection.shape)}"
                )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int; got {seed!r}")
        self.projection = projection
        self.num_features = num_features
        self.kernel = kernel
        self.kind = kind
        self.norms = norms
        self.seed = int(seed)
        self.causal = check_flag("causal", causal)
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return (
            f"FavorAttentionFunction(num_features={self.num_features}, kernel={self.kernel!r}, "
            f"seed={self.seed}, causal={self.causal})"
        )

    def projection_for(self, head_dim: int, dtype: Any) -> jax.Array:
        """The projection used for heads of size ``head_dim``."""
        if self.projection is not None:
            return self.projection
        m = default_num_features(head_dim) if self.num_features is None else self.num_features
        w = _seeded_projection(int(m), int(head_dim), self.kind, self.norms, self.seed)
        return jnp.asarray(w, dtype=dtype)

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: nnx.Module | None = None,
        promote_dtype: Callable[..., Any] = _dtypes.promote_dtype,
        is_causal: bool = False,
    ) -> jax.Array:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
        w = self.projection_for(query.shape[-1], jnp.result_type(query.dtype, jnp.float32))
        return _favor_heads(
            query,
            key,
            value,
            w,
            kernel=self.kernel,
            chunk_size=self.chunk_size,
            causal=self.causal,
            mask=mask,
            bias=bias,
            is_causal=is_causal,
            broadcast_dropout=broadcast_dropout,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            module=module,
        )


def make_attention_fn(
    projection: Any = None,
    *,
    num_features: int | None = None,
    kernel: KernelLike = "softmax",
    kind: str = "orthogonal",
    norms: str = "chi",
    seed: int = 0,
    causal: bool = False,
    chunk_size: int | None = None,
) -> FavorAttentionFunction:
    """FAVOR+ as an ``attention_fn`` for ``nnx.MultiHeadAttention`` (or a direct call).

    The returned function has the signature of :func:`flax.nnx.dot_product_attention`
    (``query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
    deterministic, dtype, precision, module, promote_dtype, is_causal``), arrays of
    shape (batch..., length, heads, features), grouped-query keys and values
    included. Masks are read as Flax reads them (nonzero = attend) and must be
    causal and/or key padding, with padded query rows; ``bias`` must be per key,
    shape (..., 1, kv_length). ``precision`` is ignored.

    The projection is a constant of the function, not model state: ``projection``
    (shape (m, head_dim)) or, by default, ``draw_projection(m, head_dim, seed=seed)``
    for the head size of the first call. To redraw, assign a new function (under
    ``nnx.jit`` the program is then recompiled). :class:`FavorAttention` keeps the
    projection in the model's state instead.

    Examples
    --------
    >>> import jax
    >>> from flax import nnx
    >>> from favorplus.flax import make_attention_fn
    >>> mha = nnx.MultiHeadAttention(
    ...     4, 32, attention_fn=make_attention_fn(seed=0), decode=False, rngs=nnx.Rngs(0))
    >>> mha(jax.random.normal(jax.random.key(0), (2, 10, 32))).shape
    (2, 10, 32)
    """
    return FavorAttentionFunction(
        projection,
        num_features=num_features,
        kernel=kernel,
        kind=kind,
        norms=norms,
        seed=seed,
        causal=causal,
        chunk_size=chunk_size,
    )


# --------------------------------------------------------------------------------------
# The layer


class FavorAttention(nnx.MultiHeadAttention):
    """Multi-head FAVOR+ attention: ``nnx.MultiHeadAttention`` with FAVOR+ inside.

    The constructor and the call are those of :class:`flax.nnx.MultiHeadAttention`
    (same positional order, defaults and submodules ``query``, ``key``, ``value``,
    ``query_ln``, ``key_ln``, ``out``), so that the layer replaces it in model code
    and its parameters copy over with ``nnx.update(layer, nnx.state(mha, nnx.Param))``.
    The layer is a subclass of ``nnx.MultiHeadAttention``; favorplus's own arguments
    are keyword-only. What differs from exact attention:

    - ``mask`` (nonzero = attend) must be causal and/or key padding, with padded query
      rows (what ``nnx.make_attention_mask``, ``nnx.make_causal_mask`` and
      ``nnx.combine_masks`` build); other patterns raise ``ValueError`` (inside
      ``jit``, when the program runs). Query rows with no key get uniform weights
      over all keys, as in nnx, in a bidirectional call; in a causal call they are 0
      (nnx's uniform weights would reach later keys), as in decode mode.
    - ``dropout_rate`` drops keys (shared by all queries of a head, numerator only,
      kept keys scaled by ``1 / (1 - rate)``): the expectation is the undropped
      output, as with nnx's dropout of the weights.
    - ``decode=True`` keeps the causal state (:func:`favorplus.init_causal_state`) in
      the cache instead of keys and values: constant memory per token.
    - ``sow_weights=True`` sows the implicit FAVOR+ weights
      (:func:`favorplus.favor_attention_matrix`, quadratic memory; not in decode mode).
    - ``precision`` applies to the projections only; ``decode`` defaults to False.

    Parameters
    ----------
    num_heads, in_features, qkv_features, out_features, num_kv_heads, in_kv_features
        As in :class:`flax.nnx.MultiHeadAttention` (``num_kv_heads < num_heads``:
        grouped-query attention).
    dtype, param_dtype, broadcast_dropout, dropout_rate, deterministic, precision,
    kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias, decode,
    normalize_qk, qkv_promote_dtype, out_promote_dtype, ln_promote_dtype,
    qkv_dot_general, out_dot_general, qkv_dot_general_cls, out_dot_general_cls,
    rngs, keep_rngs, kernel_metadata, out_kernel_metadata, bias_metadata,
    out_bias_metadata, query_ln_scale_metadata, key_ln_scale_metadata
        As in :class:`flax.nnx.MultiHeadAttention`.
    attention_fn : callable, optional
        Default (None): FAVOR+ with this layer's projection. A callable with the
        signature of ``nnx.dot_product_attention`` replaces it (not in decode mode);
        exact attention functions are refused.
    num_features : int, optional
        Random features m per head; default ``round(d log d)`` for head size d.
    kernel : str or estimator
        The feature map (:func:`favorplus.favor_attention`): ``"softmax"`` (FAVOR+),
        ``"softmax_hyperbolic"``, ..., or an estimator: ``"softmax_oprf"`` /
        :class:`~favorplus.OPRF` (FAVOR++), ``"softmax_saderf"`` /
        :class:`~favorplus.SADERF` (FAVOR#). An estimator with fixed parameters or given
        statistics is used as it is in every call; a data-driven one (the strings,
        ``OPRF()``, ``SADERF()``) makes the layer keep running statistics (see
        **Estimators** below).
    kind, norms
        The projection's law (:func:`favorplus.draw_projection`): ``kind`` is
        ``"orthogonal"``, ``"iid"`` or ``"simplex"``.
    causal : bool
        Always causal (queries aligned to the last keys when fewer).
    use_running_average : bool or None
        As nnx.BatchNorm's: False (training) updates the running statistics of a
        data-driven estimator at every call, True (evaluation: ``model.eval()``,
        ``nnx.view(model, use_running_average=True)``) freezes them; the call's own
        argument overrides it.
    statistics_momentum : float or None
        The running statistics' momentum (``running += momentum (batch - running)``,
        after a first batch that replaces the initial zeros; note that nnx.BatchNorm's
        ``momentum`` is the complement, the weight of the old value); None: the average
        of all training batches.
    seed : int, numpy.random.Generator or JAX key, optional
        Draw the first projection from this seed (an int gives the same matrix as
        ``favorplus.draw_projection(m, d, seed=seed)`` and as the torch layer);
        default: from a key of ``rngs.params()`` (drawn with ``jax.random`` when that
        key is traced, as inside ``nnx.vmap``).
    chunk_size : int, optional
        Causal chunk length.

    Notes
    -----
    **Estimators** (``kernel="softmax_oprf"``, ``"softmax_saderf"``, ``OPRF()``,
    ``SADERF()``). OPRF's A and SADERF's psi depend on the queries' and keys'
    statistics. The layer keeps them per head like nnx.BatchNorm's running mean, as
    ``nnx.BatchStat`` variables ``running_query_mean``, ``running_query_sq_mean``,
    ``running_key_mean``, ``running_key_sq_mean`` (shape (num_heads, head_dim), zeros at
    first, which give A = 0 and psi = 1: FAVOR+) and ``num_batches_tracked``:

    - a *bidirectional* call takes A (and psi) from its own queries and keys, per
      sequence and head, masked keys left out, as constants for autodiff (the functional
      ``OPRF()``), in training and evaluation alike;
    - a *causal* call takes them from the running statistics as they were before the
      call (no token sees statistics of its own sequence);
    - with ``use_running_average=False`` every call then updates the running statistics
      from its queries and keys (per head, averaged over the batch and the positions,
      masked keys left out, under ``stop_gradient``), *after* computing its output;
      ``use_running_average=True`` freezes them;
    - ``decode=True`` uses the running statistics as they were at :meth:`init_cache`
      (kept in the cache, so that the whole sequence uses one estimator) and never
      updates them.

    A custom ``attention_fn`` receives no statistics.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from favorplus.flax import FavorAttention
    >>> layer = FavorAttention(4, 64, decode=False, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 100, 64))
    >>> layer(x, mask=nnx.make_causal_mask(x[..., 0])).shape
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
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        out_kernel_init: Any = None,
        bias_init: Any = _DEFAULT_BIAS_INIT,
        out_bias_init: Any = None,
        use_bias: bool = True,
        attention_fn: Callable[..., jax.Array] | None = None,
        decode: bool | None = None,
        normalize_qk: bool = False,
        qkv_promote_dtype: Any = _dtypes.promote_dtype,
        out_promote_dtype: Any = _dtypes.promote_dtype,
        ln_promote_dtype: Any = _dtypes.promote_dtype,
        qkv_dot_general: Any = None,
        out_dot_general: Any = None,
        qkv_dot_general_cls: Any = None,
        out_dot_general_cls: Any = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        out_kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        out_bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        query_ln_scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        key_ln_scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        num_features: int | None = None,
        kernel: KernelLike = "softmax",
        kind: str = "orthogonal",
        norms: str = "chi",
        causal: bool = False,
        use_running_average: bool | None = False,
        statistics_momentum: float | None = 0.1,
        seed: Any = None,
        chunk_size: int | None = None,
    ) -> None:
        if attention_fn is not None:
            if not callable(attention_fn):
                raise TypeError(
                    f"attention_fn must be callable or None; got {type(attention_fn).__name__}"
                )
            if attention_fn in _EXACT_FUNCTIONS:
                raise ValueError(
                    "attention_fn is exact dot-product attention: FavorAttention would not "
                    "compute FAVOR+. Leave attention_fn=None (FAVOR+ with this layer's "
                    "projection), or use nnx.MultiHeadAttention for exact attention"
                )
        qkv = in_features if qkv_features is None else qkv_features
        heads_kv = num_heads if num_kv_heads is None else num_kv_heads
        if qkv % num_heads:
            raise ValueError(
                f"qkv_features must be divisible by num_heads; got qkv_features={qkv} "
                f"and num_heads={num_heads}"
            )
        if num_heads % heads_kv:
            raise ValueError(
                f"num_heads must be divisible by num_kv_heads; got num_heads={num_heads} "
                f"and num_kv_heads={heads_kv}"
            )
        super().__init__(
            num_heads,
            in_features,
            qkv_features,
            out_features,
            num_kv_heads,
            in_kv_features,
            dtype=dtype,
            param_dtype=param_dtype,
            broadcast_dropout=broadcast_dropout,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            precision=precision,
            kernel_init=kernel_init,
            out_kernel_init=out_kernel_init,
            bias_init=bias_init,
            out_bias_init=out_bias_init,
            use_bias=use_bias,
            attention_fn=attention_fn,  # type: ignore[arg-type]
            decode=decode,
            normalize_qk=normalize_qk,
            qkv_promote_dtype=qkv_promote_dtype,
            out_promote_dtype=out_promote_dtype,
            ln_promote_dtype=ln_promote_dtype,
            qkv_dot_general=qkv_dot_general,
            out_dot_general=out_dot_general,
            qkv_dot_general_cls=qkv_dot_general_cls,
            out_dot_general_cls=out_dot_general_cls,
            rngs=rngs,
            keep_rngs=keep_rngs,
            kernel_metadata=kernel_metadata,
            out_kernel_metadata=out_kernel_metadata,
            bias_metadata=bias_metadata,
            out_bias_metadata=out_bias_metadata,
            query_ln_scale_metadata=query_ln_scale_metadata,
            key_ln_scale_metadata=key_ln_scale_metadata,
        )
        resolve_kernel(kernel)
        self.kernel = kernel
        self.kind = kind
        self.norms = norms
        self.causal = check_flag("causal", causal)
        self.chunk_size = chunk_size
        self.num_features = (
            default_num_features(self.head_dim) if num_features is None else num_features
        )
        source = seed if seed is not None else rngs.params()
        if isinstance(source, jax.Array) and _is_traced(source):
            w = _traced_projection(
                source, self.num_features, self.head_dim, kind, norms, param_dtype
            )
        else:
            w = self._draw(_host_generator(source), param_dtype)
        self.projection = FeatureProjection(w)
        self.cached_numerator: nnx.Cache[jax.Array] | None = nnx.data(None)
        self.cached_log_scale: nnx.Cache[jax.Array] | None = nnx.data(None)
        self.cached_statistics: nnx.Cache[jax.Array] | None = nnx.data(None)
        self.use_running_average = (
            None
            if use_running_average is None
            else check_flag("use_running_average", use_running_average)
        )
        self.statistics_momentum = check_momentum(statistics_momentum)
        self.tracks_statistics = tracks_statistics(kernel)
        if self.tracks_statistics:
            dt = jnp.promote_types(param_dtype, jnp.float32)
            for name in STAT_NAMES:
                setattr(self, name, nnx.BatchStat(jnp.zeros((num_heads, self.head_dim), dt)))
            self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    @property
    def running_statistics(self) -> FeatureStatistics | None:
        """The running :class:`~favorplus.FeatureStatistics` (arrays of shape (num_heads,
        head_dim)), or None when the kernel keeps none."""
        if not self.tracks_statistics:
            return None
        return FeatureStatistics(*(getattr(self, n)[...] for n in STAT_NAMES))

    def call_kernel(self, causal: bool) -> Any:
        """The kernel a call uses, in the grouped layout of the heads (kv_heads, groups):
        the layer's, or for a data-driven estimator in a causal call, the estimator with
        the running statistics as they are now."""
        running = self.running_statistics
        if running is None or not causal:
            return self.kernel
        return with_statistics(self.kernel, _grouped(running, self.num_kv_heads))

    def _update_statistics(self, batch: FeatureStatistics) -> None:
        running = self.running_statistics
        assert running is not None
        new, count = updated_statistics(
            tuple(running), self.num_batches_tracked[...], tuple(batch), self.statistics_momentum
        )
        for name, value in zip(STAT_NAMES, new):
            getattr(self, name)[...] = jax.lax.stop_gradient(value)
        self.num_batches_tracked[...] = count

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

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def init_cache(self, input_shape: Any, dtype: Any = jnp.float32) -> None:
        """Start decoding: an empty causal state for inputs of shape ``input_shape``.

        As ``nnx.MultiHeadAttention.init_cache``, but the cache holds the causal state
        (``cached_numerator`` of shape (batch..., kv_heads, groups, m, head_dim + 1),
        ``cached_log_scale``) and ``cache_index``, not keys and values: its size does
        not depend on ``input_shape[-2]`` (the maximum length), and every decoded
        token costs the same time and memory. With a data-driven estimator, the cache
        also keeps the running statistics as they are now (``cached_statistics``): the
        sequence is decoded with them.

        Parameters
        ----------
        input_shape : tuple of int
            (batch..., max_length, in_features), as for nnx.
        dtype
            The state's dtype (use the computation's: float32 for bfloat16 models).
        """
        shape = tuple(int(s) for s in input_shape)
        if len(shape) < 2:
            raise ValueError(
                f"input_shape must be (batch..., max_length, features); got {tuple(input_shape)}"
            )
        state = init_causal_state(
            self.projection.get_value(),
            self.head_dim,
            batch_shape=(*shape[:-2], self.num_kv_heads, self.num_groups),
            kernel=self.kernel,
            dtype=dtype,
        )
        self.max_length = shape[-2]
        self.cached_numerator = nnx.Cache(state.numerator)
        self.cached_log_scale = nnx.Cache(state.log_scale)
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))
        running = self.running_statistics
        if running is not None:  # the estimator of the whole sequence: fixed here
            self.cached_statistics = nnx.Cache(jnp.stack(running))

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | tuple[int, ...] | None = None,
        max_length: int | None = None,
        use_running_average: bool | None = None,
    ) -> None:
        """Used by ``nnx.view``: set ``deterministic`` / ``decode`` /
        ``use_running_average``; a first ``decode=True`` view with ``batch_size`` and
        ``max_length`` initialises the cache."""
        if deterministic is not None:
            self.deterministic = deterministic
        if use_running_average is not None:
            self.use_running_average = use_running_average
        if decode is not None:
            self.decode = decode
            if decode and self.cached_numerator is None:
                if batch_size is None or max_length is None:
                    raise TypeError(
                        "'batch_size' and 'max_length' must be provided when initializing the cache"
                    )
                batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
                dt = jnp.promote_types(
                    self.param_dtype if self.dtype is None else self.dtype, jnp.float32
                )
                self.init_cache((*batch, max_length, self.in_features), dt)

    def __call__(  # type: ignore[override]
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
        use_running_average: bool | None = None,
    ) -> jax.Array:
        """Attention of ``inputs_q`` over ``inputs_k`` / ``inputs_v``, as nnx's layer.

        Parameters
        ----------
        inputs_q : array, shape (batch..., L, in_features)
        inputs_k : array, shape (batch..., S, in_kv_features); default ``inputs_q``
        inputs_v : array, shape (batch..., S, in_kv_features); default ``inputs_k``
        mask : array, optional
            Broadcastable to (batch..., num_heads, L, S), nonzero (True) = attend:
            key padding, causal, padded query rows and their combinations.
        deterministic : bool, optional
            No dropout; overrides the constructor's.
        rngs : nnx.Rngs or nnx.RngStream, optional
            Dropout randomness (the ``dropout`` stream); default the layer's own.
        sow_weights : bool
            Sow the implicit FAVOR+ weights (batch..., num_heads, L, S) into
            ``nnx.Intermediate`` as ``attention_weights`` (quadratic memory).
        decode : bool, optional
            Autoregressive decoding from the causal state (:meth:`init_cache` first):
            the inputs are the next token(s), one or more at a time.
        is_causal : bool
            Make this call causal (needs L = S).
        out_sharding, qkv_sharding
            Passed to the output / input projections as in nnx.
        use_running_average : bool, optional
            Overrides the layer's: True freezes the running statistics of a data-driven
            estimator, False updates them after this call's output.

        Returns
        -------
        array, shape (batch..., L, out_features)
        """
        if rngs is None:
            rngs = self.rngs
        elif isinstance(rngs, nnx.Rngs):
            rngs = rngs.dropout
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError(
                    "inputs_k cannot be None if inputs_v is not None (pass the same array "
                    "as inputs_k and leave inputs_v as None)"
                )
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs_q must have {self.in_features} features (in_features); got shape "
                f"{tuple(inputs_q.shape)}"
            )
        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            assert self.query_ln is not None and self.key_ln is not None
            query = self.query_ln(query)
            key = self.key_ln(key)

        decode = self.decode if decode is None else decode
        decode = False if decode is None else check_flag("decode", decode)
        if self.dropout_rate > 0.0:
            deterministic = first_from(
                deterministic,
                self.deterministic,
                error_msg="No `deterministic` argument was provided to FavorAttention as "
                "either a __call__ argument, class attribute, or nnx.flag.",
            )
            if not deterministic:
                if rngs is None:
                    raise ValueError(
                        "'rngs' must be provided to __call__ when FavorAttention is defined "
                        "with keep_rngs=False and dropout_rate > 0"
                    )
                dropout_rng = rngs()
            else:
                dropout_rng = None
        else:
            deterministic = True
            dropout_rng = None

        if decode:
            x = self._decode(query, key, value, mask, dropout_rng, sow_weights)
        elif self.attention_fn is not None:
            x = self.attention_fn(
                query,
                key,
                value,
                mask=mask,
                dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate,
                broadcast_dropout=self.broadcast_dropout,
                deterministic=deterministic,
                dtype=self.dtype,
                precision=self.precision,
                module=self if sow_weights else None,
                is_causal=is_causal,
            )
        else:
            update = False
            if self.tracks_statistics:
                frozen = first_from(
                    use_running_average,
                    self.use_running_average,
                    error_msg="No `use_running_average` argument was provided to FavorAttention "
                    "(its kernel keeps running statistics): pass it to the constructor or "
                    "the call, or use model.train() / model.eval() or nnx.view.",
                )
                update = not check_flag("use_running_average", frozen)
            x = _favor_heads(
                query,
                key,
                value,
                self.projection.get_value(),
                kernel=self.kernel,
                chunk_size=self.chunk_size,
                causal=self.causal,
                mask=mask,
                is_causal=is_causal,
                broadcast_dropout=self.broadcast_dropout,
                dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate,
                deterministic=bool(deterministic),
                module=self if sow_weights else None,
                statistics=self.running_statistics,
                batch_statistics=update,
            )
            if update:  # after the output: no output sees its own call's statistics
                x, batch = x
                self._update_statistics(batch)
        return self.out(x, out_sharding=out_sharding)

    def _decode(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: Any,
        dropout_rng: Any,
        sow_weights: bool,
    ) -> jax.Array:
        if self.cached_numerator is None or self.cached_log_scale is None:
            raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
        if self.attention_fn is not None:
            raise ValueError(
                "decode=True runs FAVOR+ from the causal state; it cannot call a custom "
                "attention_fn"
            )
        if dropout_rng is not None:
            raise ValueError(
                "decode=True does not apply dropout: call with deterministic=True when decoding"
            )
        if sow_weights:
            raise ValueError(
                "sow_weights=True needs the keys, which the decoding cache (the causal state) "
                "does not keep; sow the weights of a full causal call instead"
            )
        qh, kh, vh, _, _ = _heads_first(query, key, value)
        numerator = self.cached_numerator[...]
        log_scale = self.cached_log_scale[...]
        steps = qh.shape[-2]
        if tuple(qh.shape[:-2]) != tuple(log_scale.shape) or kh.shape[-2] != steps:
            batch = log_scale.shape[:-2]
            raise ValueError(
                "Autoregressive cache shape error: the cache was initialised for inputs of "
                f"shape {(*batch, '<tokens>', self.in_features)}; got queries of shape "
                f"{tuple(query.shape)} and keys of shape {tuple(key.shape)}"
            )
        key_mask = None
        if mask is not None:
            m = _split_heads(_bool_mask(mask, "mask"), self.num_heads, self.num_kv_heads, "mask")
            key_mask = _decode_key_mask(
                m, steps, self.cache_index[...], getattr(self, "max_length", steps)
            )
        kernel = self.kernel
        if self.tracks_statistics:
            if self.cached_statistics is None:
                raise ValueError(
                    "the cache holds no running statistics (it was initialised before "
                    "this layer kept them): call init_cache again"
                )
            snapshot = FeatureStatistics(*self.cached_statistics[...])
            kernel = with_statistics(kernel, _grouped(snapshot, self.num_kv_heads))
        out, state = favor_attention_step(
            qh,
            kh,
            vh,
            self.projection.get_value(),
            CausalState(numerator, log_scale),
            kernel=kernel,
            key_mask=key_mask,
            chunk_size=self.chunk_size,
        )
        self.cached_numerator[...] = state.numerator.astype(numerator.dtype)
        self.cached_log_scale[...] = state.log_scale.astype(log_scale.dtype)
        self.cache_index[...] += steps
        return _merge_heads(out)


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
