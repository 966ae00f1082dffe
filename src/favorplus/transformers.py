"""Hugging Face transformers integration: FAVOR+ as the attention implementation "favorplus".

Importing this module registers (idempotently, also by :func:`register`) an attention
function in transformers' ``AttentionInterface`` and its mask function in
``AttentionMaskInterface``, so that every model written against the attention
interface (BERT, RoBERTa, GPT-2, Llama, Qwen2, Mistral, ViT, ...) runs FAVOR+ with
``attn_implementation="favorplus"`` or ``model.set_attn_implementation("favorplus")``.
The attention itself is :func:`favorplus.favor_attention` (the array API core);
nothing of the mathematics is repeated here. Importing this module imports torch and
transformers.

* The mask function hands the attention a :class:`FavorMask`: a boolean key mask of
  shape (batch, keys) and a causal flag with the query and key offsets, never an
  (Lq, Lk) array. Mask patterns FAVOR+ cannot compute in linear time (sliding
  windows longer than the sequence, packed sequences, chunked or blockwise
  attention, arbitrary 4-D masks) raise a ``ValueError`` that says so.
* Each attention module keeps its random projection as the non-persistent buffer
  ``favorplus_projection`` (moved by ``.to()``, not in checkpoints: exact and FAVOR+
  checkpoints stay interchangeable), drawn on first use from the model config's
  ``favorplus_seed`` and the module's layer index; :func:`redraw_projections`
  redraws them.
* :class:`FavorplusCache` keeps the causal FAVOR+ state of every layer instead of
  keys and values: decoding memory and time per token do not grow with the length.
* The config's ``favorplus_projection_kind`` chooses the projections' law and
  ``favorplus_kernel`` may name the data-driven estimators ``"softmax_oprf"`` /
  ``"softmax_saderf"``: each attention module then keeps running statistics
  (persistent buffers, the shared logic of :mod:`favorplus._running`) with the
  semantics of :class:`favorplus.torch.FavorAttention`: bidirectional calls use their
  own statistics, causal calls and decoding the running ones from before the call,
  training calls update them after the output, ``eval()`` freezes them.
* :func:`performerize` converts a loaded model in place, keeping its weights;
  :func:`from_pretrained` loads a checkpoint saved from a FAVOR+ model as one, with
  its running statistics.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable
from itertools import count
from typing import Any

try:
    import numpy as np
    import torch
    from torch import Tensor, nn
    from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
except ImportError as _error:  # the framework is an optional extra
    from ._optional import missing

    raise ImportError(
        missing("favorplus.transformers", "transformers", "PyTorch and Hugging Face transformers")
    ) from _error
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from ._running import (
    STAT_NAMES,
    check_momentum,
    tracks_statistics,
    updated_statistics,
    with_statistics,
)
from ._torch_amp import autocast_off
from .attention import favor_attention, favor_attention_matrix
from .causal import CausalState, favor_attention_step
from .estimators import FeatureStatistics, feature_statistics
from .features import KERNELS
from .masks import kept_keys
from .projection import default_num_features, draw_projection

__all__ = [
    "NAME",
    "FavorMask",
    "FavorplusCache",
    "FavorplusCacheLayer",
    "favorplus_attention_forward",
    "favorplus_mask",
    "from_pretrained",
    "performerize",
    "redraw_projections",
    "register",
]

NAME = "favorplus"
BUFFER = "favorplus_projection"
# Config attributes read by the attention function (set them on the config, or use
# performerize); defaults: round(d ln d) features, seed 0, the positive softmax kernel.
NUM_FEATURES_ATTR = "favorplus_num_features"
SEED_ATTR = "favorplus_seed"
KERNEL_ATTR = "favorplus_kernel"
KIND_ATTR = "favorplus_projection_kind"
MOMENTUM_ATTR = "favorplus_statistics_momentum"
# The data-driven estimators (running statistics per attention module) besides KERNELS.
ESTIMATORS = ("softmax_oprf", "softmax_saderf")
KINDS = ("orthogonal", "iid", "simplex")
_DEFAULT_KIND = "orthogonal"
_DEFAULT_MOMENTUM = 0.1
_COUNT = "num_batches_tracked"
_HOOKED_ATTR = "_favorplus_statistics_hook"
_INDEX_ATTR = "_favorplus_index"
_CACHE_KWARG = "favorplus_cache_layer"
_DEFAULT_SEED = 0
_DEFAULT_KERNEL = "softmax"
# Query rows evaluated at once when a mask pattern must be identified (bounds memory).
_PATTERN_CELLS = 1 << 22


# ----------------------------------------------------------------------------------
# Masks


_METADATA = frozenset(
    {
        "shape",
        "ndim",
        "device",
        "dtype",
        "layout",
        "is_cuda",
        "is_meta",
        "is_sparse",
        "is_nested",
        "is_quantized",
        "requires_grad",
        "grad_fn",
        "is_leaf",
        "names",
    }
)
_METHODS = frozenset(
    {
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "is_floating_point",
        "is_complex",
        "element_size",
        "get_device",
        "__len__",
        "is_contiguous",
    }
)


class FavorMask(Tensor):
    """What transformers' attention mask means, in the form FAVOR+ computes exactly.

    The mask function :func:`favorplus_mask` returns one in place of the
    (batch, 1, Lq, Lk) boolean tensor that SDPA gets. It is a tensor of that shape
    (so transformers passes it through as a prepared 4-D mask), but a zero-copy view
    of the key padding: the causal pattern lives in its attributes. It reports its
    shape, dtype and device, ``.contiguous()`` and ``.to()`` keep it a FavorMask, and
    every other operation raises a TypeError, so that no code can compute with it as
    if it were the full mask. Query i has absolute position ``q_offset + i``, key j
    has ``kv_offset + j``.

    Attributes
    ----------
    key_mask : bool Tensor, shape (batch, Lk), or None
        True where key j takes part (padding is False); None: every key does.
    causal : bool
        Query i attends to the keys at absolute positions up to its own.
    q_offset : int or 0-d Tensor
        Absolute position of the first query (a tensor for static caches).
    kv_offset : int
        Absolute position of the first key.
    q_length, kv_length : int
        Numbers of queries and keys the mask was built for.
    """

    key_mask: Tensor | None
    causal: bool
    q_offset: int | Tensor
    kv_offset: int
    q_length: int
    kv_length: int

    @staticmethod
    def __new__(
        cls,
        key_mask: Tensor | None,
        causal: bool,
        q_offset: int | Tensor,
        kv_offset: int,
        batch_size: int,
        q_length: int,
        kv_length: int,
        device: Any = None,
    ) -> FavorMask:
        if key_mask is None:
            base = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        else:
            base = key_mask[:, None, None, :]
        view = base.expand(batch_size, 1, q_length, kv_length)
        self = Tensor._make_subclass(cls, view)
        self.key_mask = key_mask
        self.causal = bool(causal)
        self.q_offset = q_offset
        self.kv_offset = int(kv_offset)
        self.q_length = int(q_length)
        self.kv_length = int(kv_length)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        km = None if self.key_mask is None else tuple(self.key_mask.shape)
        offset = self.q_offset
        offset = int(offset) if not isinstance(offset, Tensor) else int(offset.item())
        return (
            f"FavorMask(causal={self.causal}, key_mask={km}, q_offset={offset}, "
            f"kv_offset={self.kv_offset}, q_length={self.q_length}, kv_length={self.kv_length})"
        )

    def _moved(self, *args: Any, **kwargs: Any) -> FavorMask:
        def move(x: Any) -> Any:
            if not isinstance(x, Tensor):
                return x
            with torch._C.DisableTorchFunctionSubclass():
                moved = x.to(*args, **kwargs)
            return moved.to(dtype=x.dtype)  # device moves only: a mask stays boolean

        key_mask = move(self.key_mask)
        with torch._C.DisableTorchFunctionSubclass():
            device = Tensor.to(torch.empty(0, device=self.device), *args, **kwargs).device
        return FavorMask(
            key_mask,
            self.causal,
            move(self.q_offset),
            self.kv_offset,
            self.shape[0],
            self.q_length,
            self.kv_length,
            device,
        )

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", "")
            if name in _METADATA:
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
        elif name in _METHODS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        elif name == "contiguous":
            return args[0]
        elif name == "to":
            return args[0]._moved(*args[1:], **kwargs)
        raise TypeError(
            f"a favorplus FavorMask (key padding and a causal flag, not a dense mask) does "
            f"not support {name or func}: only favorplus attention reads it. Pass "
            "attention masks to the model as 2-D padding masks"
        )


def _pattern(
    mask_function: Callable,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor,
    kv_offset: int,
    use_vmap: bool,
    device: Any,
) -> bool:
    """Which of causal (True) or bidirectional (False) ``mask_function`` equals for these
    positions (evaluated by query blocks, padding left out), or a ValueError."""
    causal_ok = bidirectional_ok = True
    block = max(1, _PATTERN_CELLS // max(1, batch_size * kv_length))
    kv_abs = torch.arange(kv_length, device=device) + kv_offset
    for start in range(0, q_length, block):
        rows = min(block, q_length - start)
        dense = sdpa_mask(
            batch_size=batch_size,
            q_length=rows,
            kv_length=kv_length,
            q_offset=q_offset + start,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=None,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            use_vmap=use_vmap,
            device=device,
        )
        q_abs = torch.arange(rows, device=device) + q_offset + start
        tri = kv_abs[None, :] <= q_abs[:, None]
        causal_ok = causal_ok and bool(torch.equal(dense, tri.expand_as(dense)))
        bidirectional_ok = bidirectional_ok and bool(dense.all())
        if not (causal_ok or bidirectional_ok):
            break
    if causal_ok:
        return True
    if bidirectional_ok:
        return False
    raise ValueError(
        "favorplus attention cannot compute this attention mask in linear time: its pattern "
        "is neither causal nor bidirectional (with key padding). Sliding windows shorter "
        "than the sequence, chunked or blockwise attention and packed sequences (several "
        "sequences in one row, detected from position_ids) restrict each query to its own "
        "set of keys. Use full attention (e.g. config.sliding_window=None or "
        "config.use_sliding_window=False), one sequence per row with an attention_mask, or "
        'another attn_implementation such as "sdpa"'
    )


def favorplus_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    device: Any = "cpu",
    **kwargs: Any,
) -> FavorMask:
    """The mask function of the "favorplus" implementation (``AttentionMaskInterface``).

    Called by transformers' ``create_causal_mask`` / ``create_bidirectional_mask``
    (and their sliding-window variants) with the same arguments as its ``sdpa_mask``.
    Plain causal and bidirectional patterns are recognised at once; any other
    ``mask_function`` (sliding window, chunked, packed sequences, custom overlays) is
    evaluated once without padding and accepted only where it equals one of them for
    these positions (e.g. a sliding window longer than the sequence), else refused.

    Returns
    -------
    FavorMask
        The key padding (batch, kv_length) and the causal flag, in linear memory.
    """
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        causal = _pattern(
            mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, use_vmap, device
        )
    if isinstance(q_offset, Tensor):
        # A static cache's own length counter, advanced in place by cache.update before
        # the attention runs: keep its value now.
        q_offset = q_offset.detach().clone()
    key_mask = None
    if padding is not None:
        key_mask = padding[:, kv_offset : kv_offset + kv_length].to(device=device, dtype=torch.bool)
    return FavorMask(key_mask, causal, q_offset, kv_offset, batch_size, q_length, kv_length, device)


# ----------------------------------------------------------------------------------
# Projections


_COUNTERS: dict[int, count] = {}


def _next_index(config: Any) -> int:
    """Next index for a module without a layer index, counted per model config."""
    key = id(config)
    if key not in _COUNTERS:
        _COUNTERS[key] = count()
        if config is not None:
            weakref.finalize(config, _COUNTERS.pop, key, None)
    return next(_COUNTERS[key])


def _module_index(module: nn.Module) -> tuple[int, int]:
    """The module's place in the seed: (0, 2 * layer_idx + cross) where it has an int
    ``layer_idx`` (cross-attention apart from self-attention), else (1, n) with n
    counted in order of first use (or of ``performerize``'s walk)."""
    index = getattr(module, _INDEX_ATTR, None)
    if index is None:
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
            cross = bool(getattr(module, "is_cross_attention", False)) or (
                "cross" in type(module).__name__.lower()
            )
            index = (0, 2 * int(layer) + int(cross))
        else:
            index = (1, _next_index(getattr(module, "config", None)))
        object.__setattr__(module, _INDEX_ATTR, index)
    return index


def _setting(module: nn.Module, attr: str, default: Any) -> Any:
    value = getattr(getattr(module, "config", None), attr, None)
    return default if value is None else value


def _check_num_features(value: Any, name: str = "num_features") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int or None; got {value!r}")
    return int(value)


def _check_seed(value: Any, name: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    return int(value)


def _check_kernel(value: Any, name: str = "kernel") -> str:
    allowed = (*KERNELS, *ESTIMATORS)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{name} must be one of {allowed} (a name, so that it is saved with the config); "
            f"got {value!r}"
        )
    return value


def _check_kind(value: Any, name: str = "kind") -> str:
    if not isinstance(value, str) or value not in KINDS:
        raise ValueError(f"{name} must be one of {KINDS}; got {value!r}")
    return value


def _check_momentum(value: Any, name: str = "statistics_momentum") -> float | None:
    try:
        return check_momentum(value)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("statistics_momentum", name, 1)) from None


def _momentum(module: nn.Module) -> float | None:
    """The config's momentum: absent means 0.1, None means the cumulative average."""
    config = getattr(module, "config", None)
    value = getattr(config, MOMENTUM_ATTR, _DEFAULT_MOMENTUM)
    return _check_momentum(value, f"config.{MOMENTUM_ATTR}")


def _kernel(module: nn.Module) -> str:
    return _check_kernel(_setting(module, KERNEL_ATTR, _DEFAULT_KERNEL), f"config.{KERNEL_ATTR}")


def _draw(module: nn.Module, num_features: int, dim: int, device: Any) -> Tensor:
    seed = _check_seed(_setting(module, SEED_ATTR, _DEFAULT_SEED), f"config.{SEED_ATTR}")
    kind = _check_kind(_setting(module, KIND_ATTR, _DEFAULT_KIND), f"config.{KIND_ATTR}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, *_module_index(module)]))
    return draw_projection(
        num_features,
        dim,
        kind=kind,  # type: ignore[arg-type]
        seed=rng,
        xp=torch,
        device=device,
        dtype=torch.float32,
    )


def _projection(module: nn.Module, query: Tensor) -> Tensor:
    """The module's projection buffer, drawn (and registered) on first use."""
    dim = query.shape[-1]
    wanted = _check_num_features(
        _setting(module, NUM_FEATURES_ATTR, None), f"config.{NUM_FEATURES_ATTR}"
    )
    num_features = default_num_features(dim) if wanted is None else wanted
    w = module._buffers.get(BUFFER) if isinstance(module, nn.Module) else None
    if w is None or tuple(w.shape) != (num_features, dim):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"favorplus attention needs the attention nn.Module as its first argument, "
                f"to keep the projection; got {type(module).__name__}"
            )
        # A normal tensor even when first drawn under torch.inference_mode(), so that
        # later training calls can use it.
        with torch.inference_mode(False):
            w = _draw(module, num_features, dim, query.device)
        module.register_buffer(BUFFER, w, persistent=False)
    elif w.device != query.device:
        raise ValueError(
            f"the favorplus projection of {type(module).__name__} is on {w.device} but the "
            f"queries are on {query.device}: move the whole model with .to()"
        )
    return w


# ----------------------------------------------------------------------------------
# Running statistics of the data-driven estimators (OPRF, SADERF)


def _fill_missing_statistics(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Load pre-hook: a state without any of the module's running statistics (an older
    checkpoint, or one of another kernel) loads, also with ``strict=True``, and resets
    them to zero (A = 0, psi = 1: FAVOR+ in causal calls until the first training call),
    as :class:`favorplus.torch.FavorAttention` does."""
    names = [prefix + n for n in (*STAT_NAMES, _COUNT)]
    if any(n in state_dict for n in names):
        return
    for name, full in zip((*STAT_NAMES, _COUNT), names):
        buffer = module._buffers.get(name)
        if buffer is not None:
            state_dict[full] = torch.zeros_like(buffer)


def _register_statistics(module: nn.Module, heads: int, dim: int, device: Any) -> None:
    """The module's running statistics buffers (persistent), zero, no batch seen."""
    with torch.inference_mode(False):
        for name in STAT_NAMES:
            module.register_buffer(
                name, torch.zeros((heads, dim), device=device, dtype=torch.float32)
            )
        module.register_buffer(_COUNT, torch.zeros((), device=device, dtype=torch.long))
    if not getattr(module, _HOOKED_ATTR, False):
        module._register_load_state_dict_pre_hook(_fill_missing_statistics, with_module=True)
        object.__setattr__(module, _HOOKED_ATTR, True)


def _positive_int(candidates: tuple[tuple[Any, str], ...]) -> int | None:
    """The first of ``owner.attr`` that is a positive int (not a bool), else None."""
    for owner, attr in candidates:
        value = getattr(owner, attr, None)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def _statistics_shape(module: nn.Module) -> tuple[int, int] | None:
    """(query heads, head size) of an attention module, from its attributes and config."""
    config = getattr(module, "config", None)
    heads = _positive_int(
        ((module, "num_heads"), (module, "num_attention_heads"), (config, "num_attention_heads"))
    )
    dim = _positive_int(
        ((module, "head_dim"), (module, "attention_head_size"), (config, "head_dim"))
    )
    hidden = getattr(config, "hidden_size", None)
    if dim is None and heads and isinstance(hidden, numbers.Integral) and hidden % heads == 0:
        dim = int(hidden) // heads
    return None if heads is None or dim is None else (heads, dim)


def _running(module: nn.Module, heads: int, dim: int, device: Any) -> FeatureStatistics:
    """The module's running statistics, registered (zero) on first use."""
    buffers = [module._buffers.get(name) for name in STAT_NAMES]
    if any(b is None for b in buffers) or module._buffers.get(_COUNT) is None:
        _register_statistics(module, heads, dim, device)
        buffers = [module._buffers[name] for name in STAT_NAMES]
    if tuple(buffers[0].shape) != (heads, dim):
        raise ValueError(
            f"the running statistics of {type(module).__name__} have shape "
            f"{tuple(buffers[0].shape)}, but the attention has {heads} heads of size {dim}"
        )
    if buffers[0].device != device:
        raise ValueError(
            f"the running statistics of {type(module).__name__} are on {buffers[0].device} but "
            f"the queries are on {device}: move the whole model with .to()"
        )
    return FeatureStatistics(*buffers)


@torch.no_grad()
def _update_statistics(
    module: nn.Module, query: Tensor, key: Tensor, key_mask: Tensor | None
) -> None:
    """One training call's per-head statistics into the module's running ones."""
    heads, dim = query.shape[1], query.shape[-1]
    running = _running(module, heads, dim, query.device)
    keep = None if key_mask is None else kept_keys(key_mask)
    batch = feature_statistics(query.detach(), key.detach(), key_mask=keep, axis=0)
    new, count = updated_statistics(
        tuple(running),
        module._buffers[_COUNT],
        tuple(b.reshape(heads, dim) for b in batch),
        _momentum(module),
    )
    for buffer, value in zip(running, new):
        buffer.copy_(value)
    module._buffers[_COUNT].copy_(count)


def redraw_projections(model: nn.Module, seed: int | None = None) -> int:
    """Redraw the projection of every FAVOR+ attention module of a transformers model.

    The new seed is stored as ``config.favorplus_seed`` of every config in the model
    (saved with ``save_pretrained``), so the new projections can be drawn again;
    projections not drawn yet (modules not called yet) will be drawn from it.

    Parameters
    ----------
    model : torch.nn.Module
        A model using ``attn_implementation="favorplus"``.
    seed : int, optional
        The new seed; None draws one from fresh entropy.

    Returns
    -------
    int
        How many projections were redrawn.

    Examples
    --------
    >>> import torch, transformers
    >>> import favorplus.transformers as fpt
    >>> cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
    ...                               num_attention_heads=2, intermediate_size=64)
    >>> model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    >>> _ = fpt.performerize(model, seed=0)
    >>> _ = model(torch.randint(0, 100, (1, 8)))
    >>> fpt.redraw_projections(model, seed=1), model.config.favorplus_seed
    (2, 1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if seed is None:
        seed = int(np.random.default_rng().integers(2**63 - 1))
    seed = _check_seed(seed)
    for config in _configs(model):
        setattr(config, SEED_ATTR, seed)
    redrawn = 0
    for module in model.modules():
        w = module._buffers.get(BUFFER)
        if w is not None:
            # A new tensor replaces the buffer (never an in-place copy): a backward pass
            # still pending keeps the projection its forward pass used.
            with torch.inference_mode(False):
                new = _draw(module, w.shape[0], w.shape[1], w.device)
                module._buffers[BUFFER] = new.to(dtype=w.dtype)
            redrawn += 1
    return redrawn


# ----------------------------------------------------------------------------------
# The attention function


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return (
        x[:, :, None]
        .expand(batch, heads, groups, length, dim)
        .reshape(batch, heads * groups, length, dim)
    )


_REFUSED_KWARGS = {
    "softcap": "a soft cap on the attention scores (tanh of each score; e.g. Gemma 2's "
    "config.attn_logit_softcapping, which can be set to None)",
    "s_aux": "attention sinks (an extra logit per head)",
    "sinks": "attention sinks (an extra logit per head)",
    "position_bias": "a per-pair position bias (B, H, Lq, Lk) added to the scores",
    "head_mask": "a head mask applied to the attention weights",
}


def _recording_attentions() -> bool:
    """Whether transformers' output recorder collects attention weights in this forward
    (models such as GPT-2 take ``output_attentions`` themselves, not in the kwargs)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - other transformers versions
        return False
    collected = _active_collector.get()
    return bool(collected) and any("attentions" in key for key in collected)


def favorplus_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: FavorMask | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The attention function of the "favorplus" implementation (``AttentionInterface``).

    Parameters
    ----------
    module : torch.nn.Module
        The calling attention module: it keeps the projection buffer (and the running
        statistics of a data-driven estimator); its ``config`` gives
        ``favorplus_num_features`` / ``favorplus_seed`` / ``favorplus_kernel`` /
        ``favorplus_projection_kind`` / ``favorplus_statistics_momentum`` and its
        ``is_causal`` the causality when no mask is given.
    query : Tensor, shape (batch, heads, Lq, d)
    key, value : Tensor, shape (batch, kv_heads, Lk, d)
        Grouped-query attention when kv_heads divides heads.
    attention_mask : FavorMask, Tensor or None
        From :func:`favorplus_mask`; a tensor (a 4-D mask a user passed, bool or
        additive float) is computed exactly where it means key padding and/or
        causality, else refused.
    dropout : float
        Attention dropout (transformers passes 0 in eval): FAVOR+'s linear-time key
        dropout, drawn with torch's RNG.
    scaling : float, optional
        Score scale, default ``1 / sqrt(d)``.
    is_causal : bool, optional
        Overrides ``module.is_causal`` when no mask is given.
    **kwargs
        ``output_attentions=True`` also returns the implicit FAVOR+ weights
        (:func:`favorplus.favor_attention_matrix`, O(Lq Lk) memory). Score
        modifications FAVOR+ cannot apply (``softcap``, attention sinks,
        ``position_bias``) raise.

    Returns
    -------
    out : Tensor, shape (batch, Lq, heads, dv)
    weights : Tensor, shape (batch, heads, Lq, Lk), or None
    """
    for name, what in _REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"favorplus attention cannot apply {name} ({what}): FAVOR+ never forms the "
                "attention scores; use another attn_implementation for this model"
            )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(
                f"favorplus attention needs {name} of shape (batch, heads, length, dim); got "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
    heads, kv_heads = query.shape[1], key.shape[1]
    if value.shape[1] != kv_heads or heads % kv_heads:
        raise ValueError(
            "favorplus attention needs key and value heads that divide the query heads; got "
            f"{heads} query heads, {kv_heads} key heads and {value.shape[1]} value heads"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a float in [0, 1); got {dropout!r}")
    groups = heads // kv_heads
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    w = _projection(module, query)
    kernel: Any = _kernel(module)
    tracking = tracks_statistics(kernel)
    want_weights = bool(kwargs.get("output_attentions", False)) or _recording_attentions()
    cache_layer = kwargs.get(_CACHE_KWARG)
    with autocast_off(query.device):
        if cache_layer is not None:
            if tracking:
                # Decoding: the running statistics as the sequence starts, for all of it.
                if cache_layer.statistics is None or cache_layer.seen == query.shape[-2]:
                    running = _running(module, heads, query.shape[-1], query.device)
                    cache_layer.statistics = FeatureStatistics(
                        *(r.detach().clone() for r in running)
                    )
                kernel = with_statistics(kernel, cache_layer.statistics)
            out = cache_layer.attend(
                query, key, value, w, attention_mask, kernel, scaling, dropout, want_weights
            )
            return out.transpose(1, 2).contiguous(), None
        sliding = kwargs.get("sliding_window")
        if (
            sliding is not None
            and not isinstance(attention_mask, FavorMask)
            and key.shape[-2] > sliding
        ):
            raise ValueError(
                f"favorplus attention cannot compute sliding-window attention (window "
                f"{sliding} < {key.shape[-2]} keys) in linear time; set the config's "
                "sliding_window to None for full attention"
            )
        causal_call = _causal_call(module, attention_mask, is_causal)
        query, key, value, masks = _resolve_mask(
            module, query, key, value, attention_mask, is_causal
        )
        if tracking and (causal_call or _in_decoder(module)):
            # No output may see its own sequence's statistics: the running ones, as they
            # are before this call (a copy, so that the update below cannot reach them).
            # Also in a decoder's cross-attention, bidirectional over the encoder's keys,
            # but whose queries are the decoder's tokens in order: statistics over all of
            # them would let each see the later ones.
            running = _running(module, heads, query.shape[-1], query.device)
            kernel = with_statistics(kernel, FeatureStatistics(*(r.clone() for r in running)))
        call = dict(kernel=kernel, scale=scaling, **masks)
        if dropout > 0:
            keep = torch.rand(key.shape[:-1], device=key.device) >= dropout
            out = favor_attention(
                query, key, value, w, dropout_p=float(dropout), dropout_keep=keep, **call
            )
        else:
            out = favor_attention(query, key, value, w, **call)
        weights = None
        if want_weights:
            weights = favor_attention_matrix(query, key, w, **call).to(query.dtype)
        decoding = causal_call and key.shape[-2] > query.shape[-2]  # past keys of a cache
        if tracking and getattr(module, "training", False) and not decoding:
            # After the output: this call's outputs never see its own statistics.
            _update_statistics(module, query, key, masks.get("key_mask"))
    return out.transpose(1, 2).contiguous(), weights


def _in_decoder(module: nn.Module) -> bool:
    """Whether a module belongs to a decoder (its queries are tokens in order):
    transformers' ``is_decoder`` on the module (Bart, Whisper, ...) or its config (BERT
    as a decoder)."""
    config = getattr(module, "config", None)
    return bool(getattr(module, "is_decoder", False) or getattr(config, "is_decoder", False))


def _causal_call(
    module: nn.Module, mask: FavorMask | Tensor | None, is_causal: bool | None
) -> bool:
    """Whether a call is causal for the running statistics: a causal FavorMask, no mask
    and a causal module, or any other tensor mask (never a leak)."""
    if isinstance(mask, FavorMask):
        return mask.causal
    if mask is None:
        return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    return True


def _resolve_mask(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: FavorMask | Tensor | None,
    is_causal: bool | None,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Keys, values and the core's mask arguments (causal, key_mask or attn_mask)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if causal and q_len == 1:
            causal = False  # one query, the last position: it sees every key
        if causal and q_len > k_len:
            raise ValueError(
                f"causal attention needs at least as many keys as queries; got {q_len} queries "
                f"and {k_len} keys"
            )
        return query, key, value, {"causal": causal}
    if not isinstance(mask, FavorMask):
        if isinstance(mask, Tensor):
            # (the dtype's minimum, transformers' "masked", drops a key like -inf)
            return query, key, value, {"attn_mask": mask}
        raise TypeError(
            "favorplus attention takes the mask of favorplus_mask (a FavorMask), a tensor or "
            f"None; got {type(mask).__name__}"
        )
    if (mask.q_length, mask.kv_length) != (q_len, k_len):
        raise ValueError(
            f"the attention mask was built for {mask.q_length} queries and {mask.kv_length} "
            f"keys, but the attention got {q_len} queries and {k_len} keys (a cache that "
            "returns other keys than it announced?)"
        )
    key_mask = mask.key_mask
    causal = mask.causal
    if causal and q_len == 1:
        # One query at absolute position q_offset: a key mask (traceable, no host read).
        positions = torch.arange(k_len, device=key.device) + mask.kv_offset
        visible = positions <= mask.q_offset
        key_mask = visible[None, :] if key_mask is None else key_mask & visible
        causal = False
    elif causal:
        if isinstance(mask.q_offset, Tensor) and torch.compiler.is_compiling():
            raise ValueError(
                "favorplus attention reads the query offset of a static cache on the host for "
                "causal attention over several queries: run the prefill outside torch.compile"
            )
        # Keys after the last query are seen by no query (a static cache's empty slots):
        # drop them, then the queries are the last ones of the keys (bottom-right causal).
        used = int(mask.q_offset) + q_len - mask.kv_offset
        if used < q_len or used > k_len:
            raise ValueError(
                f"favorplus attention cannot align {q_len} causal queries at position "
                f"{int(mask.q_offset)} with {k_len} keys from position {mask.kv_offset}"
            )
        if used < k_len:
            key, value = key[..., :used, :], value[..., :used, :]
            key_mask = None if key_mask is None else key_mask[:, :used]
    masks: dict[str, Any] = {"causal": causal}
    if key_mask is not None:
        masks["key_mask"] = key_mask[:, None, :]  # broadcast over heads
    return query, key, value, masks


# ----------------------------------------------------------------------------------
# The favorplus cache: the causal state instead of keys and values


class FavorplusCacheLayer(CacheLayerMixin):
    """One layer of :class:`FavorplusCache`: the causal FAVOR+ state of that layer.

    ``update`` stores nothing but hands the new keys and values, and itself, to the
    favorplus attention function, which advances :attr:`state` with
    :func:`favorplus.favor_attention_step`.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.state: CausalState | None = None
        self.seen = 0
        self._pending = False
        # The running statistics of a data-driven estimator, fixed at the first call.
        self.statistics: FeatureStatistics | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self,
        key_states: Tensor,
        value_states: Tensor,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        **extra: Any,
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending:
            raise RuntimeError(
                "FavorplusCache: the previous tokens of this layer never reached favorplus "
                'attention; use the cache with attn_implementation="favorplus" only'
            )
        if not isinstance(kwargs, dict):
            raise RuntimeError(
                "FavorplusCache needs a model that passes its attention kwargs to cache.update "
                "(cache.update(k, v, layer_idx, kwargs=kwargs)), as transformers' models do; "
                f"this one passed {type(kwargs).__name__}"
            )
        kwargs[_CACHE_KWARG] = self
        self._pending = True
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        projection: Tensor,
        mask: FavorMask | Tensor | None,
        kernel: Any,
        scaling: float | None,
        dropout: float,
        want_weights: bool,
    ) -> Tensor:
        """Causal FAVOR+ of the new tokens given the state of the past; advances it."""
        self._pending = False
        q_len, k_len = query.shape[-2], key.shape[-2]
        if want_weights:
            raise ValueError(
                "output_attentions=True is not available with FavorplusCache: it keeps no "
                "keys to form the weights with; use DynamicCache for that"
            )
        if dropout > 0:
            raise ValueError("FavorplusCache is for inference: call model.eval() (dropout > 0)")
        if q_len != k_len:
            raise ValueError(
                f"FavorplusCache attends new queries to their own keys; got {q_len} queries "
                f"and {k_len} keys"
            )
        key_mask = None
        if isinstance(mask, FavorMask):
            if not mask.causal:
                raise ValueError(
                    "FavorplusCache keeps a causal state: it serves causal attention only, "
                    "and this mask is bidirectional"
                )
            if mask.kv_length != self.seen or mask.kv_offset != 0:
                raise ValueError(
                    f"the mask covers {mask.kv_length} keys, the cache has seen {self.seen}"
                )
            if mask.key_mask is not None:
                key_mask = mask.key_mask[:, -k_len:][:, None, :]
        elif mask is not None:
            raise ValueError(
                "FavorplusCache takes the padding from the model's 2-D attention_mask; a "
                f"{type(mask).__name__} mask cannot be applied to a causal state"
            )
        out, self.state = favor_attention_step(
            query,
            key,
            value,
            projection,
            self.state,
            kernel=kernel,
            key_mask=key_mask,
            scale=scaling,
        )
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None
        self.seen = 0
        self._pending = False
        self.statistics = None

    def _map_state(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.state is not None:
            self.state = CausalState(fn(self.state.numerator), fn(self.state.log_scale))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_state(lambda x: x[indices, ...])

    def offload(self) -> None:
        self._map_state(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        device = getattr(self, "device", None)
        if device is not None:
            self._map_state(lambda x: x.to(device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "FavorplusCache cannot remove tokens: its state is a sum over every past key "
            "(assisted decoding and contrastive search need DynamicCache)"
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the state."""
        if self.state is None:
            return 0
        return sum(x.numel() * x.element_size() for x in self.state)


class FavorplusCache(Cache):
    """A decoding cache of FAVOR+ states: O(1) memory and time per new token.

    Where ``DynamicCache`` keeps every past key and value (memory and time per token
    grow with the length), this cache keeps, per layer, the causal FAVOR+ state
    (:class:`favorplus.CausalState`, (batch, heads, m, dv + 1) numbers) and advances
    it with :func:`favorplus.favor_attention_step`. For models using
    ``attn_implementation="favorplus"``; it gives the tokens ``DynamicCache`` gives
    (up to float rounding). Tokens cannot be removed again (no ``crop``).

    Examples
    --------
    >>> import torch, transformers
    >>> import favorplus.transformers as fpt
    >>> cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="favorplus")
    >>> ids = torch.randint(0, 100, (1, 6))
    >>> out = model.generate(ids, max_new_tokens=4, do_sample=False, cache=fpt.FavorplusCache())
    >>> out.shape
    torch.Size([1, 10])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(layer_class_to_replicate=FavorplusCacheLayer)

    @property
    def nbytes(self) -> int:
        """Bytes held by the states of all layers."""
        return sum(layer.nbytes for layer in self.layers)


# ----------------------------------------------------------------------------------
# Registration and conversion


def register() -> None:
    """Register "favorplus" with transformers (done on import; calling again is a no-op).

    Adds :func:`favorplus_attention_forward` to ``AttentionInterface`` and
    :func:`favorplus_mask` to ``AttentionMaskInterface`` under the name ``"favorplus"``.
    """
    AttentionInterface.register(NAME, favorplus_attention_forward)
    AttentionMaskInterface.register(NAME, favorplus_mask)


def _configs(model: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct config in the model (the top one, sub-models', modules')."""
    found: dict[int, PreTrainedConfig] = {}

    def add(config: Any) -> None:
        if isinstance(config, PreTrainedConfig) and id(config) not in found:
            found[id(config)] = config
            for name in getattr(config, "sub_configs", {}) or {}:
                add(getattr(config, name, None))

    for module in model.modules():
        add(getattr(module, "config", None))
    return list(found.values())


def performerize(
    model: PreTrainedModel,
    *,
    num_features: int | None = None,
    seed: int = 0,
    kernel: str = "softmax",
    kind: str = "orthogonal",
    statistics_momentum: float | None = 0.1,
) -> PreTrainedModel:
    """Make a loaded transformers model use FAVOR+ attention, in place, keeping its weights.

    Sets ``favorplus_num_features``, ``favorplus_seed``, ``favorplus_kernel``,
    ``favorplus_projection_kind`` and ``favorplus_statistics_momentum`` on every config
    of the model (saved with it), switches the model and its sub-models to
    ``attn_implementation="favorplus"`` and drops projections drawn before (they are
    drawn again on first use from the new settings). With a data-driven estimator
    (``"softmax_oprf"``, ``"softmax_saderf"``) it registers the running statistics
    buffers of every attention module (zero; kept where the module has them already),
    so that they are in the ``state_dict`` from the start; with another kernel it
    removes them.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    num_features : int, optional
        Random features m per head; default ``round(d ln d)`` for head size d.
    seed : int
        Seed of the projections; layer i's is drawn from ``(seed, i)``.
    kernel : str
        One of :data:`favorplus.KERNELS`, or the estimators ``"softmax_oprf"`` (FAVOR++)
        and ``"softmax_saderf"`` (FAVOR#), which keep running statistics per module.
    kind : str
        The projection's law: ``"orthogonal"``, ``"iid"`` or ``"simplex"``.
    statistics_momentum : float or None
        Momentum of the running statistics (as BatchNorm's); None: the average of all
        training calls.

    Returns
    -------
    transformers.PreTrainedModel
        The same model.

    Examples
    --------
    >>> import torch, transformers
    >>> import favorplus.transformers as fpt
    >>> cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> _ = fpt.performerize(model, num_features=64, seed=0)
    >>> model.config._attn_implementation
    'favorplus'
    >>> _ = model(torch.randint(0, 100, (1, 8)))
    >>> model.transformer.h[0].attn.favorplus_projection.shape
    torch.Size([64, 8])
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"model must be a transformers.PreTrainedModel; got {type(model).__name__} "
            "(for torch.nn modules see favorplus.torch)"
        )
    num_features = _check_num_features(num_features)
    seed = _check_seed(seed)
    kernel = _check_kernel(kernel)
    kind = _check_kind(kind)
    statistics_momentum = _check_momentum(statistics_momentum)
    register()
    for config in _configs(model):
        setattr(config, NUM_FEATURES_ATTR, num_features)
        setattr(config, SEED_ATTR, seed)
        setattr(config, KERNEL_ATTR, kernel)
        setattr(config, KIND_ATTR, kind)
        setattr(config, MOMENTUM_ATTR, statistics_momentum)
    model.set_attn_implementation(NAME)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation != NAME:
            raise ValueError(
                f"{type(module).__name__} does not take attn_implementation={NAME!r} (it does not "
                "use transformers' AttentionInterface), so performerize cannot convert it"
            )
    walk = count()
    for module in model.modules():
        module._buffers.pop(BUFFER, None)
        if hasattr(module, _INDEX_ATTR):
            object.__delattr__(module, _INDEX_ATTR)
    for module in model.modules():
        # Modules without a layer index are numbered in model order, not first-use order.
        if _calls_attention_interface(module) and not isinstance(
            getattr(module, "layer_idx", None), numbers.Integral
        ):
            object.__setattr__(module, _INDEX_ATTR, (1, next(walk)))
    tracking = tracks_statistics(kernel)
    for module in model.modules():
        if not tracking:
            for name in (*STAT_NAMES, _COUNT):
                module._buffers.pop(name, None)
        elif _calls_attention_interface(module) and module._buffers.get(_COUNT) is None:
            shape = _statistics_shape(module)
            if shape is not None:  # else registered on the first call
                ref = next(module.parameters(), None)
                _register_statistics(module, *shape, None if ref is None else ref.device)
    return model


def _saved_settings(config: Any, source: Any) -> dict[str, Any]:
    """The favorplus settings a checkpoint's config carries, checked, as
    :func:`performerize`'s keyword arguments."""
    present = [
        a
        for a in (NUM_FEATURES_ATTR, SEED_ATTR, KERNEL_ATTR, KIND_ATTR, MOMENTUM_ATTR)
        if hasattr(config, a)
    ]
    if not present:
        raise ValueError(
            f"the config of {source!r} has no favorplus settings (favorplus_kernel, "
            "favorplus_seed, ...): it was not saved from a FAVOR+ model. Load it with the "
            "class's own from_pretrained and convert it with favorplus.transformers.performerize"
        )
    momentum = getattr(config, MOMENTUM_ATTR, _DEFAULT_MOMENTUM)
    seed = getattr(config, SEED_ATTR, None)
    return {
        "num_features": _check_num_features(
            getattr(config, NUM_FEATURES_ATTR, None), f"config.{NUM_FEATURES_ATTR}"
        ),
        "seed": _check_seed(_DEFAULT_SEED if seed is None else seed, f"config.{SEED_ATTR}"),
        "kernel": _check_kernel(
            getattr(config, KERNEL_ATTR, None) or _DEFAULT_KERNEL, f"config.{KERNEL_ATTR}"
        ),
        "kind": _check_kind(
            getattr(config, KIND_ATTR, None) or _DEFAULT_KIND, f"config.{KIND_ATTR}"
        ),
        "statistics_momentum": _check_momentum(momentum, f"config.{MOMENTUM_ATTR}"),
    }


def _statistics_loader(cls: type) -> type:
    """A subclass of ``cls`` whose ``post_init`` registers the running statistics buffers
    of every attention module when the config names a data-driven estimator, so that
    transformers' own loading (local or hub, sharded, any device map) fills them from the
    checkpoint. Used only while loading: the model's class is set back to ``cls``."""

    def post_init(self: PreTrainedModel) -> None:
        cls.post_init(self)
        if getattr(self.config, KERNEL_ATTR, None) not in ESTIMATORS:
            return
        for module in self.modules():
            if _calls_attention_interface(module) and module._buffers.get(_COUNT) is None:
                shape = _statistics_shape(module)
                if shape is not None:  # else registered on the first call
                    _register_statistics(module, *shape, None)

    return type(cls.__name__, (cls,), {"post_init": post_init, "__module__": cls.__module__})


def _reset_missing_statistics(model: nn.Module, missing: set[str]) -> set[str]:
    """Zero the statistics a checkpoint lacks (an older one, or one saved with another
    kernel): all of a module's or none, as with ``load_state_dict``. Returns the keys
    handled, which are then no longer reported as missing."""
    handled: set[str] = set()
    names = (*STAT_NAMES, _COUNT)
    for prefix, module in model.named_modules():
        if module._buffers.get(_COUNT) is None:
            continue
        keys = [f"{prefix}.{n}" if prefix else n for n in names]
        absent = [k for k in keys if k in missing]
        if not absent:
            continue
        if len(absent) != len(keys):
            raise ValueError(
                f"the checkpoint has part of the running statistics of {prefix!r}: "
                f"{sorted(set(keys) - set(absent))} but not {absent}; a checkpoint must have "
                "all of a module's statistics or none"
            )
        old = module._buffers[STAT_NAMES[0]]
        device = old.device if old.device.type != "meta" else torch.device("cpu")
        _register_statistics(module, *old.shape, device)  # zero, no batch seen
        handled.update(absent)
    return handled


def from_pretrained(
    model_class: Any, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any
) -> Any:
    """Load a checkpoint saved from a FAVOR+ model as a FAVOR+ model, running statistics
    included.

    ``model_class.from_pretrained`` alone builds the model's attention modules before
    any favorplus buffer exists, so the running statistics of the data-driven
    estimators (``"softmax_oprf"``, ``"softmax_saderf"``) in the checkpoint would be
    dropped as unexpected keys, and the model would use the class's default attention.
    This function loads through transformers' own ``from_pretrained`` (local folders or
    the hub, sharded checkpoints, ``dtype``, ``device_map`` and every other argument
    pass through) with those buffers registered, then applies :func:`performerize` with
    the settings saved in the config (``favorplus_kernel``, ``favorplus_seed``, ...):
    the projections are drawn again from the saved seed, identical to the saved model's.

    Parameters
    ----------
    model_class : type
        A transformers model class (``GPT2LMHeadModel``) or auto class
        (``AutoModelForCausalLM``).
    pretrained_model_name_or_path : str or os.PathLike
        What ``model_class.from_pretrained`` takes.
    *model_args, **kwargs
        Passed to ``model_class.from_pretrained``; with ``output_loading_info=True`` the
        loading information is returned too, without the statistics that were loaded
        or reset.

    Returns
    -------
    transformers.PreTrainedModel
        The model (of ``model_class``'s class, not a subclass), using
        ``attn_implementation="favorplus"``; ``(model, loading_info)`` with
        ``output_loading_info=True``.

    Raises
    ------
    ValueError
        If the checkpoint's config has no favorplus settings (use ``from_pretrained``
        and :func:`performerize` for a model saved with another attention), or it has
        only part of an attention module's statistics.

    Notes
    -----
    A checkpoint without any statistics (one saved before training, or with another
    kernel) loads with them reset to zero (A = 0, psi = 1), as ``load_state_dict`` does;
    transformers' loading report lists them as missing.

    Examples
    --------
    >>> import tempfile, torch, transformers
    >>> import favorplus.transformers as fpt
    >>> cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4)
    >>> model = fpt.performerize(transformers.GPT2LMHeadModel(cfg), kernel="softmax_oprf")
    >>> _ = model.train()(torch.randint(0, 100, (2, 8)))      # updates the statistics
    >>> with tempfile.TemporaryDirectory() as path:
    ...     model.save_pretrained(path)
    ...     loaded = fpt.from_pretrained(transformers.AutoModelForCausalLM, path)
    >>> type(loaded).__name__, loaded.config._attn_implementation
    ('GPT2LMHeadModel', 'favorplus')
    >>> int(loaded.transformer.h[0].attn.num_batches_tracked)
    1
    """
    cls = model_class
    if isinstance(cls, type) and not issubclass(cls, PreTrainedModel):
        mapping = getattr(cls, "_model_mapping", None)
        if mapping is None:
            cls = None
        else:  # an auto class: the concrete class from the checkpoint's config
            from transformers import AutoConfig
            from transformers.models.auto.auto_factory import _get_model_class

            config = kwargs.get("config")
            if not isinstance(config, PreTrainedConfig):
                config_kwargs = {
                    k: kwargs[k]
                    for k in (
                        "cache_dir",
                        "revision",
                        "subfolder",
                        "token",
                        "local_files_only",
                        "trust_remote_code",
                    )
                    if k in kwargs
                }
                config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
                kwargs["config"] = config
            cls = _get_model_class(config, mapping)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise TypeError(
            "model_class must be a transformers model class (a PreTrainedModel subclass such "
            f"as GPT2LMHeadModel) or an auto class; got {model_class!r}"
        )
    want_info = bool(kwargs.pop("output_loading_info", False))
    model, info = _statistics_loader(cls).from_pretrained(
        pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
    )
    model.__class__ = cls
    settings = _saved_settings(model.config, pretrained_model_name_or_path)
    missing = set(info.get("missing_keys", ()))
    info["missing_keys"] = missing - _reset_missing_statistics(model, missing)
    performerize(model, **settings)
    return (model, info) if want_info else model


_CALLS: dict[type, bool] = {}


def _calls_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward dispatches through ALL_ATTENTION_FUNCTIONS."""
    cls = type(module)
    if cls not in _CALLS:
        import inspect

        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _CALLS[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _CALLS[cls]


register()
