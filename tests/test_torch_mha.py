"""favorplus.torch.FavorAttention has nn.MultiheadAttention's signature and semantics.

Every case is checked against one independent float64 reference written out here:
MultiheadAttention's computation (projections, bias_k/bias_v and zero keys appended,
masks merged as torch merges them) with the kernel ``exp(q . k / sqrt(d))`` either
exact or replaced by the explicit positive random features ``phi(q) . phi(k)`` with the
layer's projection. With the exact kernel the reference must equal torch's own
MultiheadAttention (which checks the reference's reading of the masks); with the
random features it must equal FavorAttention.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from favorplus.torch import FavorAttention  # noqa: E402

F = torch.nn.functional
NEG_INF = float("-inf")


def _x(shape, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _phi(x, w):
    """Positive random features of already-scaled rows x (..., n, d): exp(W x - |x|^2/2)."""
    return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])


def reference(
    mha, query, key, value, key_padding_mask=None, attn_mask=None, *, w=None, keep=None, p=0.0
):
    """MultiheadAttention's forward written out (batch-first or not as ``mha``), float64.

    ``w`` None: exact softmax kernel; else the FAVOR+ kernel with projection ``w``.
    ``keep`` (N, H, S): key dropout in the numerator, scaled by 1 / (1 - p).
    Returns (output, per-head weights (N, H, L, S')).
    """
    batched = query.dim() == 3
    if not batched:
        query, key, value = query[None], key[None], value[None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    elif not mha.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    if mha.in_proj_weight is not None:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b = mha.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    n, length, source = q.shape[0], q.shape[1], k.shape[1]
    # The additive mask (N, H, L, S) of MultiheadAttention: bool True -> -inf.
    add = torch.zeros(n, h, length, source, dtype=torch.float64)
    if attn_mask is not None:
        m = attn_mask
        m = (
            torch.zeros_like(m, dtype=torch.float64).masked_fill(m, NEG_INF)
            if m.dtype == torch.bool
            else m
        )
        add = add + (m.reshape(n, h, length, source) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        m = key_padding_mask
        m = (
            torch.zeros_like(m, dtype=torch.float64).masked_fill(m, NEG_INF)
            if m.dtype == torch.bool
            else m
        )
        add = add + m[:, None, None, :]
    q, k, v = (x.reshape(n, x.shape[1], h, d).transpose(1, 2) for x in (q, k, v))
    extra_k, extra_v = [], []
    if mha.bias_k is not None:
        extra_k.append(mha.bias_k.reshape(1, h, 1, d).expand(n, h, 1, d))
        extra_v.append(mha.bias_v.reshape(1, h, 1, d).expand(n, h, 1, d))
    if mha.add_zero_attn:
        extra_k.append(torch.zeros(n, h, 1, d, dtype=k.dtype))
        extra_v.append(torch.zeros(n, h, 1, d, dtype=v.dtype))
    k, v = torch.cat([k, *extra_k], dim=2), torch.cat([v, *extra_v], dim=2)
    add = F.pad(add, (0, len(extra_k)))  # appended keys: attended by every query
    qs, ks = q * d**-0.25, k * d**-0.25
    kernel = (
        torch.exp(qs @ ks.transpose(-1, -2))
        if w is None
        else _phi(qs, w) @ _phi(ks, w).transpose(-1, -2)
    )
    a = kernel * torch.exp(add)
    weights = a / a.sum(-1, keepdim=True)
    if keep is not None:
        weights = weights * keep[:, :, None, :] / (1 - p)
    out = (weights @ v).transpose(1, 2).reshape(n, length, e)
    out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
    if not batched:
        return out[0], weights[0]
    if not mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _pair(*args, num_features=16, seed=0, **kwargs):
    """An exact MultiheadAttention and a FavorAttention with the same weights (float64)."""
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(*args, dtype=torch.float64, **kwargs)
    layer = FavorAttention(
        *args, dtype=torch.float64, num_features=num_features, seed=seed, **kwargs
    )
    layer.load_state_dict(mha.state_dict(), strict=True)
    return mha.eval(), layer.eval()


def _causal(length, source=None, dtype=torch.float64):
    source = length if source is None else source
    return torch.triu(torch.full((length, source), NEG_INF, dtype=dtype), 1 + source - length)


def _padding(n, source, dtype=torch.bool):
    pad = torch.zeros(n, source, dtype=torch.bool)
    pad[0, -3:] = True
    pad[-1, 1:3] = True  # key 0 stays: no query is left without keys (torch gives NaN)
    if dtype == torch.bool:
        return pad
    return torch.zeros(n, source, dtype=dtype).masked_fill(pad, NEG_INF)


MASKS = {
    "none": lambda n, h, length, source: {},
    "padding-bool": lambda n, h, length, source: {"key_padding_mask": _padding(n, source)},
    "padding-float": lambda n, h, length, source: {
        "key_padding_mask": _padding(n, source, torch.float64)
    },
    "key-bias-float": lambda n, h, length, source: {
        "key_padding_mask": _padding(n, source, torch.float64) + _x((n, source), 5)
    },
    "causal-float": lambda n, h, length, source: {"attn_mask": _causal(length, source)},
    "causal-bool": lambda n, h, length, source: {"attn_mask": _causal(length, source) < 0},
    "causal-hint": lambda n, h, length, source: {
        "attn_mask": _causal(length, source),
        "is_causal": True,
    },
    "causal+padding": lambda n, h, length, source: {
        "attn_mask": _causal(length, source) < 0,
        "key_padding_mask": _padding(n, source),
    },
    "per-head-3d": lambda n, h, length, source: {
        # causal and padding merged into one (N * H, L, S) float mask, plus per-key biases
        "attn_mask": (
            _causal(length, source)
            + _padding(n, source, torch.float64)[:, None, None, :]
            + _x((n, h, 1, source), 7)
        ).reshape(n * h, length, source)
    },
    "row-constant-2d": lambda n, h, length, source: {
        "attn_mask": (torch.arange(source) % 3 == 0).expand(length, source).clone()
    },
}

LAYOUTS = {
    "self-batch-first": dict(batch_first=True),
    "self-seq-first": dict(batch_first=False),
    "bias_kv+zero_attn": dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
    "zero_attn-no-bias": dict(batch_first=False, add_zero_attn=True, bias=False),
    "kdim-vdim": dict(batch_first=True, kdim=6, vdim=5),
}


def _inputs(layout, n, length, source, unbatched=False):
    kdim, vdim = layout.get("kdim", 16), layout.get("vdim", 16)
    shape = (
        (lambda s, f: (s, f))
        if unbatched
        else ((lambda s, f: (n, s, f)) if layout.get("batch_first") else (lambda s, f: (s, n, f)))
    )
    q = _x(shape(length, 16), 1)
    if kdim == vdim == 16 and length == source:
        return q, q, q
    return q, _x(shape(source, kdim), 2), _x(shape(source, vdim), 3)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mask", list(MASKS))
def test_layer_is_multihead_attention_with_favor_kernel(layout, mask):
    cfg = LAYOUTS[layout]
    mha, layer = _pair(16, 4, **cfg)
    n, h = 3, 4
    length = source = 7
    if layout == "kdim-vdim" and not mask.startswith("causal") and mask != "per-head-3d":
        source = 9  # cross-attention
    query, key, value = _inputs(cfg, n, length, source)
    masks = MASKS[mask](n, h, length, source)
    hint = masks.pop("is_causal", False)
    ref_masks = {k: v for k, v in masks.items()}

    # The reference reads masks as torch does: with the exact kernel it IS torch's MHA.
    exact, exact_w = mha(query, key, value, **masks, is_causal=hint, average_attn_weights=False)
    ref_exact, ref_exact_w = reference(mha, query, key, value, **ref_masks)
    torch.testing.assert_close(exact, ref_exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(exact_w, ref_exact_w, rtol=1e-9, atol=1e-12)

    out, weights = layer(query, key, value, **masks, is_causal=hint, average_attn_weights=False)
    ref, ref_w = reference(mha, query, key, value, **ref_masks, w=layer.projection)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(weights, ref_w, rtol=1e-9, atol=1e-12)
    # ... and it is not exact attention (16 random features for head size 4).
    assert (out - exact).abs().max() > 1e-3

    averaged, mean_w = layer(query, key, value, **masks, is_causal=hint)
    torch.testing.assert_close(averaged, out)
    torch.testing.assert_close(mean_w, ref_w.mean(dim=1), rtol=1e-9, atol=1e-12)
    no_w = layer(query, key, value, **masks, is_causal=hint, need_weights=False)
    assert no_w[1] is None
    torch.testing.assert_close(no_w[0], out, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mask", ["none", "padding-bool", "causal-float", "per-head-3d"])
def test_unbatched_inputs(mask):
    mha, layer = _pair(16, 4, add_bias_kv=True, batch_first=True)
    masks = MASKS[mask](1, 4, 6, 6)
    if "key_padding_mask" in masks:
        masks["key_padding_mask"] = masks["key_padding_mask"][0]
    x = _x((6, 16), 1)
    exact, exact_w = mha(x, x, x, **masks, average_attn_weights=False)
    ref_exact, ref_exact_w = reference(mha, x, x, x, **masks)
    torch.testing.assert_close(exact, ref_exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(exact_w, ref_exact_w, rtol=1e-9, atol=1e-12)
    out, weights = layer(x, x, x, **masks, average_attn_weights=False)
    ref, ref_w = reference(mha, x, x, x, **masks, w=layer.projection)
    assert out.shape == (6, 16) and weights.shape == (4, 6, 7)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(weights, ref_w, rtol=1e-9, atol=1e-12)
    assert layer(x, x, x, **masks)[1].shape == (6, 7)


def test_constructor_takes_multihead_attentions_signature():
    import inspect

    ours = inspect.signature(FavorAttention).parameters
    theirs = inspect.signature(torch.nn.MultiheadAttention).parameters
    positional = [p for p in ours.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == [
        (p.name, p.default) for p in theirs.values()
    ]
    call, mha_call = (
        inspect.signature(c.forward).parameters
        for c in (FavorAttention, torch.nn.MultiheadAttention)
    )
    assert [(n, p.default) for n, p in call.items() if n not in ("key", "value")] == [
        (n, p.default) for n, p in mha_call.items() if n not in ("key", "value")
    ]
    layer = FavorAttention(16, 4, 0.1, False, True, True, 6, 5, True, None, torch.float64)
    mha = torch.nn.MultiheadAttention(
        16, 4, 0.1, False, True, True, 6, 5, True, None, torch.float64
    )
    assert layer.dropout == 0.1 and layer.batch_first and layer.add_zero_attn
    assert [(n, p.shape, p.dtype) for n, p in layer.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in mha.named_parameters()
    ]
    assert set(layer.state_dict()) == set(mha.state_dict()) | {"projection"}


def test_dropout_is_key_dropout_in_training_only():
    p = 0.3
    mha, layer = _pair(16, 4, p, batch_first=True)
    x = _x((2, 9, 16), 1)
    plain, _ = layer(x, x, x)  # eval: no dropout
    ref, _ = reference(mha, x, x, x, w=layer.projection)
    torch.testing.assert_close(plain, ref, rtol=1e-9, atol=1e-12)

    layer.train()
    torch.manual_seed(123)
    out, weights = layer(x, x, x, average_attn_weights=False)
    torch.manual_seed(123)
    keep = torch.rand(2, 4, 9) >= p  # the layer's draw: one keep flag per (batch, head, key)
    assert 0 < keep.sum() < keep.numel()
    ref, ref_w = reference(mha, x, x, x, w=layer.projection, keep=keep, p=p)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(weights, ref_w, rtol=1e-9, atol=1e-12)

    # Its expectation is the undropped attention: the mean of 400 draws is within 4
    # standard errors (the draws' sample standard deviation / sqrt(400)) of it.
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([layer(x, x, x, need_weights=False)[0] for _ in range(400)])
    se = draws.std(dim=0) / math.sqrt(400)
    assert ((draws.mean(dim=0) - plain).abs() <= 4 * se + 1e-12).float().mean() > 0.99


@pytest.mark.parametrize(
    "call, error, words",
    [
        (
            dict(attn_mask=torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) > 0.5),
            ValueError,
            "linear time",
        ),
        (
            dict(attn_mask=torch.zeros(7, 6, dtype=torch.bool)),
            ValueError,
            "attn_mask must have shape",
        ),
        (dict(attn_mask=torch.zeros(3, 7, 7, dtype=torch.bool)), ValueError, r"\(8, 7, 7\)"),
        (dict(attn_mask=torch.zeros(7, 7, dtype=torch.int64)), TypeError, "attn_mask"),
        (
            dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)),
            ValueError,
            "key_padding_mask",
        ),
        (
            dict(key_padding_mask=torch.zeros(2, 7, dtype=torch.int32)),
            TypeError,
            "key_padding_mask",
        ),
        (dict(need_weights="yes"), TypeError, "need_weights must be a bool"),
        (dict(is_causal="False"), TypeError, "is_causal must be a bool"),
    ],
)
def test_call_errors_name_the_argument(call, error, words):
    layer = FavorAttention(16, 4, batch_first=True, seed=0)
    x = torch.randn(2, 7, 16)
    with pytest.raises(error, match=words):
        layer(x, x, x, **call)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(dropout=1.0), ValueError, "dropout must be in"),
        (dict(dropout="0.1"), TypeError, "dropout must be a float"),
        (dict(batch_first="yes"), TypeError, "batch_first must be a bool"),
        (dict(kdim=0), ValueError, "kdim"),
        (dict(add_bias_kv=1), TypeError, "add_bias_kv must be a bool"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words):
        FavorAttention(16, 4, **kwargs)
