"""PyTorch layers: a drop-in multi-head attention module and an SDPA-like function.

Both call the array API core (:func:`favorplus.favor_attention`); nothing of the
mathematics is repeated here. Importing this module imports torch.

* :func:`scaled_dot_product_attention` takes the argument names of
  :func:`torch.nn.functional.scaled_dot_product_attention`, plus the random
  ``projection``.
* :class:`FavorAttention` has the parameters, the call signature and the
  ``state_dict`` layout of :class:`torch.nn.MultiheadAttention`, plus the random
  projection as a registered buffer, redrawn on request or every N training calls.
* :func:`redraw_projections` redraws every :class:`FavorAttention` in a model (for
  training loops, compiled or not).

Both work under ``torch.compile(fullgraph=True)`` and under ``torch.autocast``: the
attention itself runs with autocast disabled, in float32 for float16 and bfloat16
inputs, and returns the input's dtype.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._validation import check_flag
from .attention import favor_attention
from .features import KernelLike
from .projection import default_num_features, draw_projection, host_generator

__all__ = ["FavorAttention", "redraw_projections", "scaled_dot_product_attention"]

Seed = int | np.random.Generator | None


def _key_mask_from_attn_mask(attn_mask: Tensor, key_length: int) -> Tensor:
    """SDPA's boolean ``attn_mask`` (True: take part), constant over queries, as a key mask."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None; got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            "attn_mask must be a boolean key mask (True where a key takes part); got dtype "
            f"{attn_mask.dtype}: FAVOR+ can remove keys but cannot add a bias to the "
            "attention scores, so float (additive) masks are not supported"
        )
    shape = tuple(attn_mask.shape)
    if attn_mask.ndim == 0 or shape[-1] not in (1, key_length):
        raise ValueError(
            f"attn_mask must broadcast to (..., L, S) with S = {key_length} keys; got shape {shape}"
        )
    if attn_mask.ndim >= 2 and shape[-2] != 1:
        raise ValueError(
            "attn_mask must be the same for every query, shape (..., 1, S): FAVOR+ supports "
            f"key masks (and causal masks through is_causal) only; got shape {shape}"
        )
    mask = attn_mask[..., 0, :] if attn_mask.ndim >= 2 else attn_mask
    if mask.shape[-1] != key_length:
        mask = mask.expand(*mask.shape[:-1], key_length)
    return mask


def _repeat_kv_heads(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: repeat key/value heads to the number of query heads."""
    if query.ndim < 3 or key.ndim < 3 or value.ndim < 3:
        raise ValueError(
            "enable_gqa needs a heads dimension (..., heads, length, features); got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if value.shape[-3] != kv_heads or heads % kv_heads:
        raise ValueError(
            "enable_gqa needs key and value heads that divide the query heads; got "
            f"{heads} query heads, {kv_heads} key heads and {value.shape[-3]} value heads"
        )
    groups = heads // kv_heads
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    projection: Tensor | None,
    kernel: KernelLike = "softmax",
    chunk_size: int | None = None,
) -> Tensor:
    """FAVOR+ with the argument names of :func:`torch.nn.functional.scaled_dot_product_attention`.

    Parameters
    ----------
    query : Tensor, shape (..., L, E)
    key : Tensor, shape (..., S, E)
    value : Tensor, shape (..., S, Ev)
    attn_mask : bool Tensor, optional
        A key mask, broadcastable to (..., 1, S) (or shape (..., S) / (S,)): True
        where a key takes part, as in SDPA. Masks that differ between queries and
        float (additive) masks raise: FAVOR+ can only remove keys. Unlike SDPA, it
        may be combined with ``is_causal``.
    dropout_p : float
        Must be 0: FAVOR+ never forms the attention weights that dropout would drop.
    is_causal : bool
        Query i attends to keys j <= i (needs L = S).
    scale : float, optional
        Default ``1 / sqrt(E)``.
    enable_gqa : bool
        Grouped-query attention: key and value heads (axis -3) are repeated to the
        number of query heads.
    projection : Tensor, shape (m, E), or None
        The random projection (:func:`favorplus.draw_projection`, or a
        :class:`FavorAttention`'s ``projection`` buffer).
    kernel, chunk_size
        As in :func:`favorplus.favor_attention`.

    Returns
    -------
    Tensor, shape (..., L, Ev)
        In value's dtype. Computed with autocast disabled, in float32 for float16 and
        bfloat16 inputs.

    Examples
    --------
    >>> import torch
    >>> import favorplus as fp
    >>> from favorplus.torch import scaled_dot_product_attention
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = (torch.randn(2, 4, 64, 16, generator=g) * 0.3 for _ in range(2))
    >>> v = torch.randn(2, 4, 64, 16, generator=g)
    >>> w = fp.draw_projection(256, 16, seed=0, like=q)
    >>> out = scaled_dot_product_attention(q, k, v, is_causal=True, projection=w)
    >>> exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> bool((out - exact).norm() / exact.norm() < 0.05)
    True
    """
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float; got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise ValueError(
            f"dropout_p must be 0 for FAVOR+ attention (it never forms the attention "
            f"weights that dropout would drop); got {dropout_p}"
        )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if enable_gqa:
        key, value = _repeat_kv_heads(query, key, value)
    key_mask = None
    if attn_mask is not None:
        key_mask = _key_mask_from_attn_mask(attn_mask, key.shape[-2] if key.ndim >= 2 else 0)
    with torch.autocast(device_type=query.device.type, enabled=False):
        return favor_attention(
            query,
            key,
            value,
            projection,
            kernel=kernel,
            causal=check_flag("is_causal", is_causal),
            key_mask=key_mask,
            scale=scale,
            chunk_size=chunk_size,
        )


class FavorAttention(nn.Module):
    """Multi-head FAVOR+ attention, a drop-in for :class:`torch.nn.MultiheadAttention`.

    The same constructor arguments, parameters (``in_proj_weight`` or
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``, ``in_proj_bias``,
    ``out_proj``), ``state_dict`` keys and ``forward`` signature, so a trained
    ``MultiheadAttention`` state loads with ``load_state_dict(..., strict=False)``.
    The attention of every head is :func:`favorplus.favor_attention` with one random
    projection shared by the heads, the ``projection`` buffer (saved in the
    ``state_dict``, moved by ``.to()``).

    Parameters
    ----------
    embed_dim, num_heads, bias, kdim, vdim, batch_first, device, dtype
        As in :class:`torch.nn.MultiheadAttention`.
    num_features : int, optional
        Random features m per head; default ``round(d log d)`` for head size d.
    kernel, kind, norms
        The feature map (:func:`favorplus.favor_attention`) and the projection's
        law (:func:`favorplus.draw_projection`).
    causal : bool
        Always causal (``forward(is_causal=True)`` also makes one call causal).
    redraw_interval : int, optional
        Redraw the projection every this many ``forward`` calls in training mode
        (before the call). Counted in Python: under ``torch.compile(fullgraph=True)``
        leave it None and call :meth:`redraw_projection` or
        :func:`redraw_projections` from the training loop.
    seed : int, numpy.random.Generator or None
        The layer's host generator for the first draw and later redraws.
    chunk_size : int, optional
        Causal chunk length (:func:`favorplus.favor_attention`).

    Examples
    --------
    >>> import torch
    >>> from favorplus.torch import FavorAttention
    >>> layer = FavorAttention(64, 4, batch_first=True, causal=True, seed=0)
    >>> x = torch.randn(2, 100, 64)
    >>> out, weights = layer(x, x, x)
    >>> out.shape, weights
    (torch.Size([2, 100, 64]), None)
    >>> layer.projection.shape
    torch.Size([44, 16])
    """

    projection: Tensor

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_features: int | None = None,
        kernel: KernelLike = "softmax",
        kind: str = "orthogonal",
        norms: str = "chi",
        causal: bool = False,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        redraw_interval: int | None = None,
        seed: Seed = None,
        chunk_size: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads; got embed_dim={embed_dim} "
                f"and num_heads={num_heads}"
            )
        if redraw_interval is not None and (
            isinstance(redraw_interval, bool)
            or not isinstance(redraw_interval, numbers.Integral)
            or redraw_interval < 1
        ):
            raise ValueError(
                f"redraw_interval must be a positive int or None; got {redraw_interval!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.kernel = kernel
        self.kind = kind
        self.norms = norms
        self.causal = check_flag("causal", causal)
        self.chunk_size = chunk_size
        self.redraw_interval = redraw_interval
        self.num_features = (
            default_num_features(self.head_dim) if num_features is None else num_features
        )
        self._rng = host_generator(seed)
        self._training_calls = 0

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        proj_dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.register_buffer(
            "projection",
            draw_projection(
                self.num_features,
                self.head_dim,
                kind=kind,  # type: ignore[arg-type]
                norms=norms,  # type: ignore[arg-type]
                seed=self._rng,
                xp=torch,
                device=device,
                dtype=proj_dtype,
            ),
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The initialisation of torch.nn.MultiheadAttention.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_features={self.num_features}, kernel={self.kernel!r}, causal={self.causal}, "
            f"batch_first={self.batch_first}, redraw_interval={self.redraw_interval}"
        )

    @torch.no_grad()
    def redraw_projection(self, seed: Seed = None) -> None:
        """Draw a new projection and make it the ``projection`` buffer (same dtype and device).

        The buffer is replaced by a new tensor, never changed in place: a backward pass
        still pending for an earlier call keeps, and differentiates, the projection that
        call used.

        Parameters
        ----------
        seed : int, numpy.random.Generator or None
            Draw from this seed or generator; None: from the layer's own generator.
        """
        rng = self._rng if seed is None else host_generator(seed)
        new = draw_projection(
            self.num_features,
            self.head_dim,
            kind=self.kind,  # type: ignore[arg-type]
            norms=self.norms,  # type: ignore[arg-type]
            seed=rng,
        )
        old = self.projection
        self.projection = torch.from_numpy(new).to(dtype=old.dtype, device=old.device)

    @torch.compiler.disable
    def _count_training_call(self) -> None:
        if self._training_calls and self._training_calls % self.redraw_interval == 0:
            self.redraw_projection()
        self._training_calls += 1

    def _in_projections(
        self, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """Attention of ``query`` over ``key``/``value`` (both default to ``query``).

        Parameters
        ----------
        query : Tensor, shape (L, N, E), (N, L, E) if batch_first, or unbatched (L, E)
        key : Tensor, shape (S, N, kdim) or (N, S, kdim); default ``query``
        value : Tensor, shape (S, N, vdim) or (N, S, vdim); default ``key``
        key_padding_mask : bool Tensor, shape (N, S) or (S,), optional
            True where a key is padding and must be ignored (the
            ``nn.MultiheadAttention`` convention).
        need_weights : bool
            Must be False: FAVOR+ never forms the attention weights (see
            :func:`favorplus.favor_attention_matrix` for diagnostics).
        attn_mask : Tensor, optional
            Only the causal mask, with ``is_causal=True`` (which then ignores it);
            anything else raises.
        average_attn_weights : bool
            Ignored (no weights are returned).
        is_causal : bool
            Make this call causal.

        Returns
        -------
        (Tensor, None)
            The output, shaped like ``query`` with ``embed_dim`` features, and None in
            place of the weights.
        """
        if need_weights:
            raise ValueError(
                "need_weights must be False: FAVOR+ never forms the attention weights "
                "(favorplus.favor_attention_matrix computes them for diagnostics)"
            )
        causal = check_flag("is_causal", is_causal) or self.causal
        if attn_mask is not None and not is_causal:
            raise ValueError(
                "attn_mask is not supported by FAVOR+ attention except as the causal mask "
                "with is_causal=True; use key_padding_mask to remove keys, or causal=True"
            )
        if key is None:
            key = query
        if value is None:
            value = key
        if self.redraw_interval is not None and self.training:
            self._count_training_call()

        batched = query.ndim == 3
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                "query, key and value must all be batched (3-D) or all unbatched (2-D); got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if not batched:
            query, key, value = query[:, None], key[:, None], value[:, None]
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        # Now (length, batch, features).
        for name, x, size in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if x.shape[-1] != size:
                raise ValueError(f"{name} must have {size} features; got shape {tuple(x.shape)}")
        q, k, v = self._in_projections(query, key, value)
        length, batch = q.shape[0], q.shape[1]
        h, d = self.num_heads, self.head_dim
        q, k, v = (x.reshape(x.shape[0], batch, h, d).permute(1, 2, 0, 3) for x in (q, k, v))

        mask = None
        if key_padding_mask is not None:
            mask = self._key_mask(key_padding_mask, batch, k.shape[-2], batched)
        out = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            projection=self.projection,
            kernel=self.kernel,
            chunk_size=self.chunk_size,
        )
        out = out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            return out[:, 0], None
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    @staticmethod
    def _key_mask(padding: Tensor, batch: int, length: int, batched: bool) -> Tensor:
        """``nn.MultiheadAttention``'s key_padding_mask (True: ignore) as SDPA's (N, 1, 1, S)."""
        if not isinstance(padding, Tensor) or padding.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a boolean tensor (True where a key is padding); got "
                f"{getattr(padding, 'dtype', type(padding).__name__)}"
            )
        expected = (batch, length) if batched else (length,)
        if tuple(padding.shape) != expected:
            raise ValueError(
                f"key_padding_mask must have shape {expected}; got {tuple(padding.shape)}"
            )
        keep = torch.logical_not(padding)
        return keep.reshape(batch, 1, 1, length)


def redraw_projections(module: nn.Module, seed: Seed = None) -> int:
    """Redraw the projection of every :class:`FavorAttention` in ``module``.

    Call it from the training loop, outside a compiled step (the draw runs on the
    host), e.g. every N optimizer steps.

    Parameters
    ----------
    module : torch.nn.Module
    seed : int, numpy.random.Generator or None
        One generator, drawn from layer after layer in ``module.modules()`` order;
        None: each layer's own generator.

    Returns
    -------
    int
        How many layers were redrawn.
    """
    rng = None if seed is None else host_generator(seed)
    count = 0
    for layer in module.modules():
        if isinstance(layer, FavorAttention):
            layer.redraw_projection(rng)
            count += 1
    return count
