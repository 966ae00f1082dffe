"""PyTorch layers: a drop-in for ``nn.MultiheadAttention``, an SDPA-like function, and
the one-call conversion of torch models to FAVOR+ attention.

Everything numerical is the array API core (:func:`favorplus.favor_attention`,
:func:`favorplus.favor_attention_matrix`, :func:`favorplus.masks.split_mask`); this
module owns torch's conventions around it. Importing it imports torch.

* :class:`FavorAttention`: the constructor, parameters, ``state_dict`` keys and
  ``forward`` of :class:`torch.nn.MultiheadAttention`, plus the random projection (a
  buffer, redrawn on request or every N training calls). It always falls off torch's
  fused exact-attention fast paths (see the class docstring).
* :func:`performerize` / :func:`deperformerize`: swap every ``nn.MultiheadAttention``
  of a model for a :class:`FavorAttention` (and back) in place, keeping the very
  parameters.
* :func:`exact_state_dict`: a FAVOR+ model's ``state_dict`` without the projections,
  which loads into the exact model with ``strict=True``.
* :func:`redraw_projections`: redraw every :class:`FavorAttention` in a model.
* :func:`scaled_dot_product_attention`: the argument names of
  :func:`torch.nn.functional.scaled_dot_product_attention`, plus ``projection``.

All work under ``torch.compile(fullgraph=True)`` (with masks the compiled program can
use: key masks, ``is_causal``) and under ``torch.autocast``: the attention itself runs
with autocast disabled, in float32 for float16 and bfloat16 inputs, and returns the
input's dtype.
"""

from __future__ import annotations

import copy
import numbers
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

try:
    import torch
    from torch import Tensor, nn
except ImportError as _error:  # the framework is an optional extra
    from ._optional import missing

    raise ImportError(missing("favorplus.torch", "torch", "PyTorch")) from _error
from torch.nn import functional as F

from ._running import (
    STAT_NAMES,
    check_momentum,
    tracks_statistics,
    updated_statistics,
    with_statistics,
)
from ._torch_amp import autocast_off
from ._validation import check_flag
from .attention import favor_attention, favor_attention_matrix
from .causal import CausalState, favor_attention_step
from .estimators import FeatureStatistics, feature_statistics
from .features import KernelLike, resolve_kernel
from .masks import kept_keys, split_mask
from .projection import default_num_features, draw_projection, host_generator

__all__ = [
    "DecodingState",
    "FavorAttention",
    "deperformerize",
    "exact_state_dict",
    "performerize",
    "redraw_projections",
    "scaled_dot_product_attention",
]

Seed = int | np.random.Generator | None


class DecodingState(NamedTuple):
    """The state of :meth:`FavorAttention.step` between calls.

    Attributes
    ----------
    causal : CausalState
        The causal state of every (batch, head): O(m d) numbers, whatever the length.
    statistics : FeatureStatistics or None
        The running statistics the sequence is decoded with (a data-driven OPRF / SADERF
        kernel: fixed at the first step, so that every token of the sequence uses the
        same estimator); None for the other kernels.
    """

    causal: CausalState
    statistics: FeatureStatistics | None


def _check_dropout(name: str, p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1); got {type(p).__name__}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1) (kept keys are scaled by 1 / (1 - {name})); got {p!r}"
        )
    return float(p)


def _dropout_keep(p: float, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Keys kept (True) with probability 1 - p, drawn with torch's RNG (per call)."""
    return torch.rand(shape, device=device) >= p


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
    attn_mask : Tensor, optional
        SDPA's mask, broadcastable to (..., L, S): bool (True where a key takes part)
        or float (added to the scores). Computed exactly when it is a key mask or a
        per-key bias (shape (..., 1, S) or (..., S)), or a full (..., L, S) mask equal
        to "causal and/or key padding (plus per-key biases)"; any other pattern raises
        a ValueError (it cannot be computed in linear time). Under ``torch.compile``
        full masks cannot be inspected: pass key masks and ``is_causal``. Unlike SDPA,
        it may be combined with ``is_causal``.
    dropout_p : float
        Key dropout (as SDPA, applied whenever it is > 0): each key is dropped with
        probability ``dropout_p`` per (batch..., head) row, for all queries at once, in
        the numerator only, kept keys scaled by ``1 / (1 - dropout_p)``; its expectation
        is the undropped output. Drawn with torch's RNG.
    is_causal : bool
        Query i attends to keys j <= i + S - L (queries are the last L positions of the
        key sequence when L < S).
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
    p = _check_dropout("dropout_p", dropout_p)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None; got {type(attn_mask).__name__}")
    if enable_gqa:
        key, value = _repeat_kv_heads(query, key, value)
    keep = None
    if p > 0 and key.ndim >= 2:
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
        keep = _dropout_keep(p, (*batch, key.shape[-2]), key.device)
    with autocast_off(query.device):
        return favor_attention(
            query,
            key,
            value,
            projection,
            kernel=kernel,
            causal=check_flag("is_causal", is_causal),
            attn_mask=attn_mask,
            scale=scale,
            chunk_size=chunk_size,
            dropout_p=p if keep is not None else 0.0,
            dropout_keep=keep,
        )


def _spawn(rng: np.random.Generator) -> np.random.Generator:
    """An independent child stream of ``rng`` (reproducible from rng's seed and spawn count)."""
    try:
        return rng.spawn(1)[0]
    except (TypeError, ValueError, AttributeError):  # a bit generator without a SeedSequence
        return np.random.default_rng(int(rng.integers(2**63)))


def _mha_to_sdpa_mask(mask: Tensor) -> Tensor:
    """MultiheadAttention's mask (bool True: may NOT attend; float: added) in SDPA's sense."""
    return torch.logical_not(mask) if mask.dtype == torch.bool else mask


def _check_mask_dtype(name: str, mask: Any) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(mask).__name__}")
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise TypeError(
            f"{name} must be a bool tensor (True: not attended) or a float tensor (added to "
            f"the attention scores); got dtype {mask.dtype}"
        )
    return mask


def _qkv(query: Any, key: Any, value: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Key defaulting to the query and value to the key (self-attention), all tensors."""
    if key is None:
        key = query
    if value is None:
        value = key
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    return query, key, value


def _padding_mask(mask: Any, n: int, length: int, batched: bool, what: str) -> Tensor:
    """``key_padding_mask`` checked ((n, length), or (length,) unbatched) and shaped
    (n, 1, length): bool (True: not attended) or float (added to the scores)."""
    pad = _check_mask_dtype("key_padding_mask", mask)
    expected = (n, length) if batched else (length,)
    if tuple(pad.shape) != expected:
        raise ValueError(
            f"key_padding_mask must have shape {expected} (batch, {what}); got {tuple(pad.shape)}"
        )
    return pad.reshape(n, 1, length)


class FavorAttention(nn.Module):
    """Multi-head FAVOR+ attention, a drop-in for :class:`torch.nn.MultiheadAttention`.

    The constructor takes ``nn.MultiheadAttention``'s arguments, positional and keyword,
    with its defaults; then keyword-only FAVOR+ options. The parameters
    (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``,
    ``in_proj_bias``, ``bias_k``/``bias_v``, ``out_proj``) have the same names, shapes,
    registration order and initialisation, and ``forward`` has the same signature,
    defaults, masks and outputs. Every head's attention is
    :func:`favorplus.favor_attention` with one random projection shared by the heads:
    the ``projection`` buffer.

    **Checkpoints.** The projection is saved in the ``state_dict`` (a FAVOR+ checkpoint
    restores the very same attention). A ``state_dict`` without it, such as an exact
    ``nn.MultiheadAttention``'s, loads with ``strict=True`` and keeps the projection
    the layer has (drawn from ``seed``). The reverse needs one explicit step:
    :func:`exact_state_dict` (or ``save_projection=False``), or :func:`deperformerize`.

    **Copies.** ``copy.deepcopy`` (and so ``nn.TransformerEncoder``'s clones) copies the
    current projection, so the copy computes the same outputs, but gives the copy its
    own generator, a child of this layer's (``numpy.random.Generator.spawn``): later
    redraws differ between copies and are reproducible from the seed. Pass
    ``share_redraws=True`` for copies that redraw the same matrices.

    **torch's fast paths.** ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``
    run fused exact-attention kernels that read ``self_attn.in_proj_weight`` directly,
    without calling ``self_attn``, when ``self_attn._qkv_same_embed_dim`` is True (among
    other conditions). This layer reports ``_qkv_same_embed_dim = False`` (whatever its
    parameter layout), so those modules always call :meth:`forward`; nested tensors
    (which ``nn.TransformerEncoder`` may build from a padding mask) are accepted.

    Parameters
    ----------
    embed_dim, num_heads, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        As in :class:`torch.nn.MultiheadAttention`. The extra keys of ``add_bias_kv``
        and ``add_zero_attn`` are attended by every query, as there (also in causal
        calls).
    dropout : float
        Attention dropout in training mode, in linear time: each key is dropped with
        this probability per (batch, head), for all queries at once, in the numerator
        only; kept keys are scaled by ``1 / (1 - dropout)``. Its expectation is the
        undropped attention. Drawn with torch's RNG; a no-op in ``eval()`` mode.
    num_features : int, optional
        Random features m per head; default ``round(d log d)`` for head size d.
    kernel : str or estimator
        The feature map (:func:`favorplus.favor_attention`): ``"softmax"`` (FAVOR+),
        ``"softmax_hyperbolic"``, ..., or an estimator: ``"softmax_oprf"`` /
        :class:`~favorplus.OPRF` (FAVOR++), ``"softmax_saderf"`` /
        :class:`~favorplus.SADERF` (FAVOR#). An estimator with fixed parameters or given
        statistics is used as it is in every call. A data-driven one (the strings,
        ``OPRF()``, ``SADERF()``) makes the layer keep running statistics (see
        **Estimators** below).
    kind, norms
        The projection's law (:func:`favorplus.draw_projection`): ``kind`` is
        ``"orthogonal"``, ``"iid"`` or ``"simplex"``.
    causal : bool
        Always causal (``forward(is_causal=True)`` or a causal ``attn_mask`` also make
        one call causal).
    statistics_momentum : float or None
        The running statistics' momentum (as BatchNorm's: ``running += momentum
        (batch - running)``, after a first batch that replaces the initial zeros);
        None: the average of all training batches. Used only by data-driven estimators.
    redraw_interval : int, optional
        Redraw the projection every this many ``forward`` calls in training mode
        (before the call). Counted in Python: under ``torch.compile(fullgraph=True)``
        leave it None and call :func:`redraw_projections` from the training loop.
    seed : int, numpy.random.Generator or None
        The layer's host generator for the first draw and later redraws.
    chunk_size : int, optional
        Causal chunk length (:func:`favorplus.favor_attention`).
    save_projection : bool
        Whether the projection is in the ``state_dict`` (a persistent buffer). With
        False, the ``state_dict`` is exactly ``nn.MultiheadAttention``'s (plus the
        running statistics of a data-driven estimator) and a reload keeps the
        projection drawn from the seed.
    share_redraws : bool
        Copies keep this layer's generator state (and so redraw the same matrices)
        instead of spawning their own.

    Notes
    -----
    **Estimators** (``kernel="softmax_oprf"``, ``"softmax_saderf"``, ``OPRF()``,
    ``SADERF()``). OPRF's A and SADERF's psi depend on the queries' and keys' statistics.
    The layer keeps them per head like BatchNorm's running mean, in buffers
    ``running_query_mean``, ``running_query_sq_mean``, ``running_key_mean``,
    ``running_key_sq_mean`` (shape (num_heads, head_dim), zeros at first, which give
    A = 0 and psi = 1: FAVOR+) and ``num_batches_tracked``:

    - a *bidirectional* call takes A (and psi) from its own queries and keys, per
      sequence and head, masked keys left out, as constants for autodiff (the functional
      ``OPRF()``), in training and in ``eval()`` mode alike;
    - a *causal* call takes them from the running statistics as they were before the
      call (no token sees statistics of its own sequence);
    - in training mode (``self.training``), every call then updates the running
      statistics from its queries and keys (per head, averaged over the batch and the
      positions, masked keys left out, no gradient), *after* computing its output;
      ``eval()`` freezes them;
    - :meth:`step` (decoding) uses the running statistics at the sequence's first
      step for the whole sequence (they are kept in the decoding state) and never
      updates them.

    The buffers are in the ``state_dict`` (``strict=True`` loading needs them). A
    ``state_dict`` without any of them (from before this layer kept statistics, or an
    exact ``nn.MultiheadAttention``'s) loads with ``strict=True`` and resets them to
    zero: bidirectional calls are unchanged, causal ones compute FAVOR+ until the first
    training call.

    Examples
    --------
    >>> import torch
    >>> from favorplus.torch import FavorAttention
    >>> layer = FavorAttention(64, 4, 0.1, batch_first=True, causal=True, seed=0)
    >>> x = torch.randn(2, 100, 64)
    >>> out, weights = layer(x, x, x, need_weights=False)
    >>> out.shape, weights
    (torch.Size([2, 100, 64]), None)
    >>> layer.projection.shape
    torch.Size([44, 16])
    """

    bias_k: Tensor | None
    bias_v: Tensor | None
    projection: Tensor

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        num_features: int | None = None,
        kernel: KernelLike = "softmax",
        kind: str = "orthogonal",
        norms: str = "chi",
        causal: bool = False,
        statistics_momentum: float | None = 0.1,
        redraw_interval: int | None = None,
        seed: Seed = None,
        chunk_size: int | None = None,
        save_projection: bool = True,
        share_redraws: bool = False,
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
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None; got {value!r}")
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
        # The parameter layout (one packed in_proj_weight, as in MultiheadAttention).
        self._packed_in_proj = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = _check_dropout("dropout", dropout)
        self.batch_first = check_flag("batch_first", batch_first)
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = check_flag("add_zero_attn", add_zero_attn)
        resolve_kernel(kernel)
        self.kernel = kernel
        self.statistics_momentum = check_momentum(statistics_momentum)
        self.tracks_statistics = tracks_statistics(kernel)
        self.kind = kind
        self.norms = norms
        self.causal = check_flag("causal", causal)
        self.chunk_size = chunk_size
        self.redraw_interval = redraw_interval
        self.share_redraws = check_flag("share_redraws", share_redraws)
        self.num_features = (
            default_num_features(self.head_dim) if num_features is None else num_features
        )
        self._rng = host_generator(seed)
        self._training_calls = 0

        if self._packed_in_proj:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if check_flag("bias", bias):
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(
            embed_dim, embed_dim, bias=bias, **factory
        )
        if check_flag("add_bias_kv", add_bias_kv):
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
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
            persistent=check_flag("save_projection", save_projection),
        )
        if self.tracks_statistics:
            self._register_statistics(device, proj_dtype)
        self._reset_parameters()

    def _register_statistics(self, device: Any, dtype: Any) -> None:
        """The running statistics buffers, zero (A = 0, psi = 1: FAVOR+), no batch seen."""
        dtype = torch.promote_types(dtype, torch.float32)  # statistics in float32 at least
        shape = (self.num_heads, self.head_dim)
        for name in STAT_NAMES:
            self.register_buffer(name, torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer(
            "num_batches_tracked", torch.zeros((), device=device, dtype=torch.long)
        )

    @property
    def running_statistics(self) -> FeatureStatistics | None:
        """The running :class:`~favorplus.FeatureStatistics` (arrays of shape (num_heads,
        head_dim)), or None when the kernel keeps none."""
        if not self.tracks_statistics:
            return None
        return FeatureStatistics(*(getattr(self, name) for name in STAT_NAMES))

    def call_kernel(self, causal: bool) -> Any:
        """The kernel a call uses: the layer's, or for a data-driven estimator in a causal
        call, the estimator with the running statistics (as they are now).

        Parameters
        ----------
        causal : bool

        Returns
        -------
        str or estimator
            Pass it as ``kernel=`` to the functional API to reproduce a call.
        """
        running = self.running_statistics
        if running is None or not causal:
            return self.kernel
        return with_statistics(self.kernel, running)

    @torch.no_grad()
    def _update_statistics(self, q: Tensor, k: Tensor, key_mask: Tensor | None) -> None:
        """One training batch's per-head statistics into the running ones (no gradient)."""
        keep = None if key_mask is None else kept_keys(key_mask)
        batch = feature_statistics(q.detach(), k.detach(), key_mask=keep, axis=0)
        shape = (self.num_heads, self.head_dim)
        running = self.running_statistics
        assert running is not None
        new, count = updated_statistics(
            tuple(running),
            self.num_batches_tracked,
            tuple(b.reshape(shape) for b in batch),
            self.statistics_momentum,
        )
        for buffer, value in zip(running, new):
            buffer.copy_(value)
        self.num_batches_tracked.copy_(count)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # Read by nn.TransformerEncoderLayer / nn.TransformerEncoder before they run a
        # fused exact-attention kernel on self_attn's weights: False keeps them off it.
        return False

    def _reset_parameters(self) -> None:
        # The initialisation of torch.nn.MultiheadAttention.
        if self._packed_in_proj:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"num_features={self.num_features}, kernel={self.kernel!r}, kind={self.kind!r}, "
            f"causal={self.causal}, "
            f"batch_first={self.batch_first}, redraw_interval={self.redraw_interval}"
        )

    # --- checkpoints and copies -----------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # An exact MultiheadAttention's state has no projection: keep the one drawn.
        key = prefix + "projection"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)
        # A state without any running statistics (an older checkpoint, an exact
        # MultiheadAttention's): load it, and start the statistics afresh (zeros: FAVOR+
        # in causal calls until the first training call).
        if self.tracks_statistics:
            names = [prefix + n for n in (*STAT_NAMES, "num_batches_tracked")]
            if not any(n in state_dict for n in names):
                for n in names:
                    if n in missing_keys:
                        missing_keys.remove(n)
                with torch.no_grad():
                    for n in (*STAT_NAMES, "num_batches_tracked"):
                        getattr(self, n).zero_()

    def __deepcopy__(self, memo: dict[int, Any]) -> FavorAttention:
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            new.__dict__[name] = copy.deepcopy(value, memo)
        if not self.share_redraws:
            new.__dict__["_rng"] = _spawn(self._rng)
        return new

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, **kwargs: Any) -> FavorAttention:
        """A FAVOR+ layer with ``mha``'s configuration and its very parameters (shared).

        Parameters
        ----------
        mha : torch.nn.MultiheadAttention
        **kwargs
            The keyword-only FAVOR+ options of :class:`FavorAttention`.

        Returns
        -------
        FavorAttention
            On ``mha``'s device, in its dtype and training mode; its parameters are the
            ``nn.Parameter`` objects of ``mha`` (an optimizer built before keeps
            working). Torch's global RNG is not used.

        Examples
        --------
        >>> import torch
        >>> from favorplus.torch import FavorAttention
        >>> mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        >>> layer = FavorAttention.from_multihead_attention(mha, seed=0)
        >>> layer.in_proj_weight is mha.in_proj_weight
        True
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention; got {type(mha).__name__}")
        ref = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
        rng = host_generator(kwargs.pop("seed", None))
        state = copy.deepcopy(rng.bit_generator.state)
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.dropout,
            mha.in_proj_bias is not None,
            mha.bias_k is not None,
            mha.add_zero_attn,
            mha.kdim,
            mha.vdim,
            mha.batch_first,
            device="meta",
            dtype=ref.dtype,
            seed=rng,
            **kwargs,
        )
        rng.bit_generator.state = state  # the first draw again, now on the real device
        layer.projection = draw_projection(
            layer.num_features,
            layer.head_dim,
            kind=layer.kind,  # type: ignore[arg-type]
            norms=layer.norms,  # type: ignore[arg-type]
            seed=rng,
            xp=torch,
            device=ref.device,
            dtype=ref.dtype,
        )
        if layer.tracks_statistics:
            layer._register_statistics(ref.device, ref.dtype)
        _move_parameters(mha, layer)
        return layer.train(mha.training)

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """The exact ``nn.MultiheadAttention`` with this layer's very parameters (shared).

        Returns
        -------
        torch.nn.MultiheadAttention
            Same configuration, device, dtype and training mode; the projection and the
            FAVOR+ options are dropped.
        """
        ref = self.in_proj_weight if self.in_proj_weight is not None else self.q_proj_weight
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            self.dropout,
            self.in_proj_bias is not None,
            self.bias_k is not None,
            self.add_zero_attn,
            self.kdim,
            self.vdim,
            self.batch_first,
            device="meta",
            dtype=ref.dtype,
        )
        _move_parameters(self, mha)
        return mha.train(self.training)

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

    # --- the call ---------------------------------------------------------------------

    def _in_projections(
        self, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if self._packed_in_proj:
            w = self.in_proj_weight
            wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _batch_first(
        self, query: Tensor, key: Tensor, value: Tensor, batched: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """query, key and value as (batch, length, features), their feature sizes checked."""
        if not batched:
            query, key, value = query[None], key[None], value[None]
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        for name, x, size in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if x.shape[-1] != size:
                raise ValueError(
                    f"{name} must have {size} features (last axis); got shape {tuple(x.shape)}"
                )
        return query, key, value

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention``'s.

        Parameters
        ----------
        query : Tensor, shape (L, N, E), (N, L, E) if batch_first, or unbatched (L, E)
            A nested tensor (batch-first) is accepted too, without masks.
        key : Tensor, shape (S, N, kdim), (N, S, kdim) or (S, kdim); default ``query``
        value : Tensor, shape (S, N, vdim), (N, S, vdim) or (S, vdim); default ``key``
        key_padding_mask : Tensor, shape (N, S) or unbatched (S,), optional
            bool: True where a key is padding and is ignored; float: added to the
            scores of each key (0 keeps, -inf or the dtype's minimum drops, other values
            are per-key biases, computed exactly).
        need_weights : bool
            Also return the attention weights: the implicit FAVOR+ weights
            (:func:`favorplus.favor_attention_matrix`, with this call's masks and
            dropout), which take O(L S) memory, unlike the output. torch's transformer
            modules pass False.
        attn_mask : Tensor, shape (L, S), or (N * num_heads, L, S) / unbatched (num_heads, L, S)
            bool (True: may not attend) or float (added to the scores). FAVOR+ computes
            the masks that are linear in time exactly: a causal mask, key padding, and
            per-key biases, in any combination; the mask is inspected (eager mode) and
            any other pattern raises a ValueError.
        average_attn_weights : bool
            Average the returned weights over the heads (else per head).
        is_causal : bool
            As in torch, a hint that ``attn_mask`` is the causal mask: with L = S it is
            then not inspected (needed under ``torch.compile``). Without ``attn_mask``
            it makes the call causal (queries aligned to the last L keys when L < S).

        Returns
        -------
        output : Tensor
            Shaped like ``query`` with ``embed_dim`` features.
        weights : Tensor or None
            (N, L, S), (N, num_heads, L, S) with ``average_attn_weights=False``, or
            without N for unbatched inputs; None unless ``need_weights``.
        """
        query, key, value = _qkv(query, key, value)
        need_weights = check_flag("need_weights", need_weights)
        average_attn_weights = check_flag("average_attn_weights", average_attn_weights)
        is_causal = check_flag("is_causal", is_causal)
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        if self.redraw_interval is not None and self.training:
            self._count_training_call()

        batched = query.ndim == 3
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                "query, key and value must all be batched (3-D) or all unbatched (2-D); got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        query, key, value = self._batch_first(query, key, value, batched)
        if key.shape[:2] != value.shape[:2] or query.shape[0] != key.shape[0]:
            raise ValueError(
                "query, key and value must have the same batch size, and key and value the "
                f"same length; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                f"value {tuple(value.shape)} (batch_first={self.batch_first})"
            )
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q, k, v = self._in_projections(query, key, value)
        q, k, v = (x.reshape(n, x.shape[1], h, d).transpose(1, 2) for x in (q, k, v))

        causal, key_mask = self._masks(
            key_padding_mask, attn_mask, is_causal, batched, n, length, source
        )
        # add_bias_kv / add_zero_attn: keys every query attends, placed FIRST here (a
        # causal call treats keys before the last L as visible to all queries); the
        # weights put them back last, where MultiheadAttention has them.
        prefix_k, prefix_v = [], []
        if self.bias_k is not None and self.bias_v is not None:
            prefix_k.append(self.bias_k.reshape(1, h, 1, d).expand(n, h, 1, d).to(k.dtype))
            prefix_v.append(self.bias_v.reshape(1, h, 1, d).expand(n, h, 1, d).to(v.dtype))
        if self.add_zero_attn:
            prefix_k.append(k.new_zeros(n, h, 1, d))
            prefix_v.append(v.new_zeros(n, h, 1, d))
        extra = len(prefix_k)
        if extra:
            k = torch.cat([*prefix_k, k], dim=2)
            v = torch.cat([*prefix_v, v], dim=2)
            if key_mask is not None:
                key_mask = key_mask.expand(
                    *torch.broadcast_shapes(key_mask.shape[:-1], (n, h)), source
                )
                fill = True if key_mask.dtype == torch.bool else 0.0
                key_mask = torch.cat(
                    [key_mask.new_full((*key_mask.shape[:-1], extra), fill), key_mask], dim=-1
                )
        keep = None
        if self.training and self.dropout > 0:
            keep = _dropout_keep(self.dropout, (n, h, k.shape[2]), k.device)

        kernel = self.call_kernel(causal)
        with autocast_off(q.device):
            out = favor_attention(
                q,
                k,
                v,
                self.projection,
                kernel=kernel,
                causal=causal,
                key_mask=key_mask,
                chunk_size=self.chunk_size,
                dropout_p=self.dropout if keep is not None else 0.0,
                dropout_keep=keep,
            )
            weights = None
            if need_weights:
                weights = favor_attention_matrix(
                    q, k, self.projection, kernel=kernel, causal=causal, key_mask=key_mask
                )
                if keep is not None:
                    weights = weights * keep[..., None, :] / (1.0 - self.dropout)
                if extra:
                    weights = torch.cat([weights[..., extra:], weights[..., :extra]], dim=-1)
                if average_attn_weights:
                    weights = weights.mean(dim=1)
                if not batched:
                    weights = weights[0]
        if self.tracks_statistics and self.training:
            # After the output: this call's outputs never see its own statistics.
            self._update_statistics(q, k, key_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def step(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        state: DecodingState | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, DecodingState]:
        """Causal decoding: the output of the next token(s) of a sequence, from the state.

        Feeding a sequence token by token (or in blocks) gives the outputs of one causal
        :meth:`forward` call over it (up to float rounding), in O(m d) time and memory
        per token and head. The extra keys of ``add_bias_kv`` / ``add_zero_attn`` are
        fed at the first step. No dropout is applied and the running statistics are not
        updated (a data-driven estimator uses them as they are at the first step, for
        the whole sequence: they are kept in the state).

        Parameters
        ----------
        query : Tensor, shape (T, N, E), (N, T, E) if batch_first, or unbatched (T, E)
            The next T tokens' queries.
        key, value : Tensor, optional
            Their keys (kdim) and values (vdim), shaped as ``query``; default ``query``.
        state : DecodingState, optional
            From the previous step; None starts a sequence.
        key_padding_mask : Tensor, shape (N, T) or unbatched (T,), optional
            bool (True: the new key is padding and is left out) or float (added to the
            scores of each key).

        Returns
        -------
        output : Tensor
            Shaped like ``query`` with ``embed_dim`` features.
        state : DecodingState

        Examples
        --------
        >>> import torch
        >>> from favorplus.torch import FavorAttention
        >>> layer = FavorAttention(32, 4, batch_first=True, seed=0).eval()
        >>> x = torch.randn(2, 10, 32)
        >>> full, _ = layer(x, is_causal=True, need_weights=False)
        >>> first, state = layer.step(x[:, :6])
        >>> rest, state = layer.step(x[:, 6:], state=state)
        >>> torch.allclose(torch.cat([first, rest], dim=1), full, atol=1e-5)
        True
        """
        query, key, value = _qkv(query, key, value)
        batched = query.ndim == 3
        same = key.shape[:-1] == query.shape[:-1] == value.shape[:-1]
        if query.ndim not in (2, 3) or not same:
            raise ValueError(
                "query, key and value must have the same (T, N), (N, T) or (T,) leading shape "
                f"(the next tokens); got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                f"value {tuple(value.shape)}"
            )
        query, key, value = self._batch_first(query, key, value, batched)
        n, steps = query.shape[0], query.shape[1]
        h, d = self.num_heads, self.head_dim
        q, k, v = self._in_projections(query, key, value)
        q, k, v = (x.reshape(n, steps, h, d).transpose(1, 2) for x in (q, k, v))
        key_mask = None
        if key_padding_mask is not None:
            pad = _padding_mask(key_padding_mask, n, steps, batched, "new tokens")
            key_mask = torch.logical_not(pad) if pad.dtype == torch.bool else pad
        with autocast_off(q.device):
            if state is None:
                statistics = None
                if self.tracks_statistics:
                    running = self.running_statistics
                    assert running is not None
                    statistics = FeatureStatistics(*(r.detach().clone() for r in running))
                kernel = self._decoding_kernel(statistics)
                causal_state = self._first_state(n, q, kernel)
            else:
                if not isinstance(state, DecodingState):
                    raise TypeError(
                        "state must be the DecodingState of a previous step or None; got "
                        f"{type(state).__name__}"
                    )
                statistics, causal_state = state.statistics, state.causal
                kernel = self._decoding_kernel(statistics)
            out, causal_state = favor_attention_step(
                q,
                k,
                v,
                self.projection,
                causal_state,
                kernel=kernel,
                key_mask=key_mask,
                chunk_size=self.chunk_size,
            )
        out = self.out_proj(out.transpose(1, 2).reshape(n, steps, self.embed_dim))
        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, DecodingState(causal_state, statistics)

    def _decoding_kernel(self, statistics: FeatureStatistics | None) -> Any:
        return self.kernel if statistics is None else with_statistics(self.kernel, statistics)

    def _first_state(self, n: int, q: Tensor, kernel: Any) -> CausalState | None:
        """The state before a sequence: None, or the one holding the extra keys of
        ``add_bias_kv`` / ``add_zero_attn`` (attended by every query)."""
        h, d = self.num_heads, self.head_dim
        prefix_k, prefix_v = [], []
        if self.bias_k is not None and self.bias_v is not None:
            prefix_k.append(self.bias_k.reshape(1, h, 1, d).expand(n, h, 1, d).to(q.dtype))
            prefix_v.append(self.bias_v.reshape(1, h, 1, d).expand(n, h, 1, d).to(q.dtype))
        if self.add_zero_attn:
            prefix_k.append(q.new_zeros(n, h, 1, d))
            prefix_v.append(q.new_zeros(n, h, 1, d))
        if not prefix_k:
            return None
        k, v = torch.cat(prefix_k, dim=2), torch.cat(prefix_v, dim=2)
        _, state = favor_attention_step(
            torch.zeros_like(k), k, v, self.projection, kernel=kernel, chunk_size=self.chunk_size
        )
        return state

    def _masks(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        batched: bool,
        n: int,
        length: int,
        source: int,
    ) -> tuple[bool, Tensor | None]:
        """MultiheadAttention's masks as (causal, one key mask for the core).

        The key mask is bool (True: take part) or float additive (-inf: drop),
        broadcastable to (N, num_heads, S).
        """
        causal = self.causal
        keep: Tensor | None = None
        bias: Tensor | None = None
        if key_padding_mask is not None:
            pad = _padding_mask(key_padding_mask, n, source, batched, "keys")
            if pad.dtype == torch.bool:
                keep = torch.logical_not(pad)
            else:
                bias = pad
        if attn_mask is not None:
            mask = _check_mask_dtype("attn_mask", attn_mask)
            heads = self.num_heads
            full = (n * heads, length, source) if batched else (heads, length, source)
            if tuple(mask.shape) not in ((length, source), full):
                raise ValueError(
                    f"attn_mask must have shape {(length, source)} or {full}; got "
                    f"{tuple(mask.shape)}"
                )
            if is_causal and length == source:
                causal = True  # torch's hint: attn_mask is the causal mask
            else:
                if mask.ndim == 3:
                    mask = mask.reshape(n, heads, length, source)
                parts = split_mask(_mha_to_sdpa_mask(mask), length, source)
                causal = causal or parts.causal
                if parts.key_mask is not None:
                    keep = parts.key_mask if keep is None else keep & parts.key_mask
                if parts.key_bias is not None:
                    bias = parts.key_bias if bias is None else bias + parts.key_bias
        elif is_causal:
            causal = True
        if bias is None:
            return causal, keep
        if keep is not None:
            bias = torch.where(keep, bias, float("-inf"))
        return causal, bias

    def _forward_nested(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Nested (batch-first, ragged) inputs: padded, computed with key padding, re-nested."""
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError(
                "key_padding_mask and attn_mask must be None with nested-tensor inputs (the "
                "nested tensor holds the padding)"
            )

        def unpack(x: Tensor) -> tuple[Tensor, Tensor | None]:
            if not x.is_nested:
                return x, None
            padded = torch.nested.to_padded_tensor(x, 0.0)
            lengths = torch.tensor([t.shape[0] for t in x.unbind()], device=padded.device)
            return padded, torch.arange(padded.shape[1], device=padded.device) < lengths[:, None]

        (q, q_valid), (k, k_valid), (v, _) = unpack(query), unpack(key), unpack(value)
        if not self.batch_first:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        padding = None if k_valid is None else torch.logical_not(k_valid)
        out, weights = self.forward(
            q,
            k,
            v,
            key_padding_mask=padding,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if not self.batch_first:
            out = out.transpose(0, 1)
        if q_valid is not None:
            lengths = q_valid.sum(dim=-1).tolist()
            out = torch.nested.as_nested_tensor(
                [o[:size] for o, size in zip(out, lengths, strict=True)], layout=query.layout
            )
        return out, weights


def _move_parameters(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the very parameters (and out_proj module) of ``source``."""
    for name in (
        "in_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "in_proj_bias",
        "bias_k",
        "bias_v",
    ):
        value = getattr(source, name)
        if value is not None:
            setattr(target, name, value)
    target.out_proj = source.out_proj


def _swap(
    model: nn.Module,
    match: Callable[[nn.Module], bool],
    convert: Callable[[str, nn.Module], nn.Module],
) -> tuple[nn.Module, int]:
    """Replace every submodule that ``match``es (shared ones once) by ``convert(name, it)``."""
    if match(model):
        return convert("", model), 1
    done: dict[int, nn.Module] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):  # shared children: every name
            if child is None or not match(child):
                continue
            if id(child) not in done:
                full = f"{parent_name}.{name}" if parent_name else name
                done[id(child)] = convert(full, child)
            setattr(parent, name, done[id(child)])
    return model, len(done)


def _encoders(model: nn.Module) -> list[nn.TransformerEncoder]:
    return [m for m in model.modules() if isinstance(m, nn.TransformerEncoder)]


def performerize(
    model: nn.Module,
    *,
    num_features: int | None = None,
    seed: Seed = 0,
    kernel: KernelLike = "softmax",
    kind: str = "orthogonal",
    norms: str = "chi",
    causal: bool | None = None,
    statistics_momentum: float | None = 0.1,
    redraw_interval: int | None = None,
    chunk_size: int | None = None,
    save_projection: bool = True,
    include: Callable[[str, nn.MultiheadAttention], bool] | None = None,
) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` of ``model`` for a :class:`FavorAttention`, in place.

    Each new layer keeps its module's very parameters (the same ``nn.Parameter``
    objects: an optimizer built before keeps working), configuration, device, dtype,
    ``batch_first`` and training mode (:meth:`FavorAttention.from_multihead_attention`);
    the model's forward code, masks and checkpoints work unchanged. Every layer gets its
    own projection, drawn from a child of ``seed`` (reproducible: the same model and seed
    give the same projections). ``nn.TransformerEncoder``'s nested-tensor conversion is
    switched off where its layers now hold FAVOR+ attention (it would only pad again).

    Parameters
    ----------
    model : torch.nn.Module
        Any model (an ``nn.Transformer*``, a user model holding MultiheadAttention
        modules), or a single ``nn.MultiheadAttention``.
    num_features, kernel, kind, norms, statistics_momentum, redraw_interval, chunk_size,
    save_projection
        The FAVOR+ options of :class:`FavorAttention`, for every layer.
    seed : int, numpy.random.Generator or None
        The layers' generators are its children (``Generator.spawn``), in
        ``model.named_modules()`` order.
    causal : bool or None
        None or False: causality comes from each call, as in the exact model (masks,
        ``is_causal``); True: every converted layer is always causal.
    include : callable, optional
        ``include(name, module) -> bool`` picks the modules to convert (default: all).

    Returns
    -------
    torch.nn.Module
        ``model`` itself, converted; a new :class:`FavorAttention` if ``model`` is a
        MultiheadAttention.

    Examples
    --------
    >>> import torch
    >>> from favorplus.torch import FavorAttention, performerize
    >>> model = torch.nn.Transformer(32, 4, 1, 1, 64, batch_first=True)
    >>> model = performerize(model, num_features=64, seed=0)
    >>> sum(isinstance(m, FavorAttention) for m in model.modules())
    3
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if causal is not None:
        causal = check_flag("causal", causal)
    rng = host_generator(seed)
    options = {
        "num_features": num_features,
        "kernel": kernel,
        "kind": kind,
        "norms": norms,
        "causal": bool(causal),
        "statistics_momentum": statistics_momentum,
        "redraw_interval": redraw_interval,
        "chunk_size": chunk_size,
        "save_projection": save_projection,
    }

    def match(m: nn.Module) -> bool:
        return isinstance(m, nn.MultiheadAttention)

    def convert(name: str, mha: nn.Module) -> nn.Module:
        if include is not None and not include(name, mha):  # type: ignore[arg-type]
            return mha
        return FavorAttention.from_multihead_attention(
            mha,  # type: ignore[arg-type]
            seed=_spawn(rng),
            **options,  # type: ignore[arg-type]
        )

    model, _ = _swap(model, match, convert)
    for encoder in _encoders(model):
        layers = list(encoder.layers)
        attn = getattr(layers[0], "self_attn", None) if layers else None
        if isinstance(attn, FavorAttention) and getattr(encoder, "use_nested_tensor", False):
            encoder._favorplus_use_nested_tensor = True
            encoder.use_nested_tensor = False
    return model


def deperformerize(model: nn.Module) -> nn.Module:
    """Swap every :class:`FavorAttention` of ``model`` back for an exact ``nn.MultiheadAttention``.

    The reverse of :func:`performerize`, in place: the same parameters
    (:meth:`FavorAttention.to_multihead_attention`); the projections are dropped.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        ``model`` itself; a new ``nn.MultiheadAttention`` if ``model`` is a
        FavorAttention.

    Examples
    --------
    >>> import torch
    >>> from favorplus.torch import deperformerize, performerize
    >>> model = performerize(torch.nn.TransformerEncoderLayer(32, 4), seed=0)
    >>> type(deperformerize(model).self_attn).__name__
    'MultiheadAttention'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")

    def match(m: nn.Module) -> bool:
        return isinstance(m, FavorAttention)

    model, _ = _swap(model, match, lambda _, m: m.to_multihead_attention())  # type: ignore[attr-defined]
    for encoder in _encoders(model):
        if getattr(encoder, "_favorplus_use_nested_tensor", False):
            encoder.use_nested_tensor = True
            del encoder._favorplus_use_nested_tensor
    return model


def exact_state_dict(model: nn.Module, *, keep_vars: bool = False) -> OrderedDict[str, Any]:
    """``model.state_dict()`` without the FAVOR+ projections (and running statistics).

    It loads with ``strict=True`` into the exact model (the same model with
    ``nn.MultiheadAttention`` in place of every :class:`FavorAttention`).

    Parameters
    ----------
    model : torch.nn.Module
    keep_vars : bool
        As in :meth:`torch.nn.Module.state_dict`.

    Returns
    -------
    OrderedDict

    Examples
    --------
    >>> import torch
    >>> from favorplus.torch import exact_state_dict, performerize
    >>> exact = torch.nn.TransformerEncoderLayer(32, 4)
    >>> favor = performerize(torch.nn.TransformerEncoderLayer(32, 4), seed=0)
    >>> exact.load_state_dict(exact_state_dict(favor), strict=True)
    <All keys matched successfully>
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    state = model.state_dict(keep_vars=keep_vars)
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FavorAttention):
            for key in ("projection", *STAT_NAMES, "num_batches_tracked"):
                state.pop(f"{name}.{key}" if name else key, None)
    return state


def redraw_projections(module: nn.Module, seed: Seed = None) -> int:
    """Redraw the projection of every :class:`FavorAttention` in ``module``.

    Call it from the training loop, outside a compiled step (the draw runs on the
    host), e.g. every N optimizer steps. Different layers get different matrices
    (copies of a layer included: each has its own generator).

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

    Examples
    --------
    >>> import torch
    >>> from favorplus.torch import FavorAttention, redraw_projections
    >>> encoder = torch.nn.TransformerEncoder(
    ...     torch.nn.TransformerEncoderLayer(32, 4), 2, enable_nested_tensor=False)
    >>> encoder.layers[0].self_attn = FavorAttention(32, 4, seed=0)
    >>> redraw_projections(encoder)
    1
    """
    rng = None if seed is None else host_generator(seed)
    count = 0
    for layer in module.modules():
        if isinstance(layer, FavorAttention):
            layer.redraw_projection(rng)
            count += 1
    return count
