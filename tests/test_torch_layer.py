"""favorplus.torch: the multi-head layer and the SDPA-like function (CPU, and CUDA if present)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import favorplus as fp  # noqa: E402
from favorplus.torch import (  # noqa: E402
    FavorAttention,
    redraw_projections,
    scaled_dot_product_attention,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def dev(request):
    return request.param


def _x(shape, seed=0, scale=0.5, dev="cpu", dtype=None):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype or torch.float32) * scale).to(dev)


def _manual(layer, query, key, value, key_padding_mask=None, causal=False):
    """The layer's computation written out: projections, heads, the core function, out_proj.

    Batch-first inputs (N, L, E).
    """
    e, h = layer.embed_dim, layer.num_heads
    w, b = layer.in_proj_weight, layer.in_proj_bias
    q = query @ w[:e].T + b[:e]
    k = key @ w[e : 2 * e].T + b[e : 2 * e]
    v = value @ w[2 * e :].T + b[2 * e :]

    def heads(x):
        n, length, _ = x.shape
        return x.reshape(n, length, h, e // h).transpose(1, 2)

    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, :]
    out = fp.favor_attention(
        heads(q), heads(k), heads(v), layer.projection, causal=causal, key_mask=mask
    )
    out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], e)
    return out @ layer.out_proj.weight.T + layer.out_proj.bias


# --- the layer is the core function ---------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_layer_output_equals_core_function(dev, causal):
    layer = FavorAttention(32, 4, batch_first=True, seed=3, device=dev, dtype=torch.float64)
    x = _x((3, 21, 32), dev=dev, dtype=torch.float64)
    y = _x((3, 17, 32), seed=1, dev=dev, dtype=torch.float64)
    pad = torch.zeros(3, 21 if causal else 17, dtype=torch.bool, device=dev)
    pad[0, -5:] = True
    pad[2, :3] = True
    keys = x if causal else y
    out, weights = layer(x, keys, keys, key_padding_mask=pad, is_causal=causal, need_weights=False)
    assert weights is None
    expected = _manual(layer, x, keys, keys, pad, causal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_sequence_first_unbatched_and_kdim_vdim_layouts(dev):
    layer = FavorAttention(16, 2, seed=0, device=dev)  # batch_first=False, like MHA
    x = _x((9, 4, 16), dev=dev)  # (L, N, E)
    out, _ = layer(x)
    first = FavorAttention(16, 2, seed=0, batch_first=True, device=dev)
    first.load_state_dict(layer.state_dict())
    out_bf, _ = first(x.transpose(0, 1))
    torch.testing.assert_close(out, out_bf.transpose(0, 1))
    single, _ = layer(x[:, 1])  # unbatched (L, E)
    torch.testing.assert_close(single, out[:, 1], rtol=1e-5, atol=1e-6)

    cross = FavorAttention(16, 2, kdim=6, vdim=5, batch_first=True, seed=0, device=dev)
    assert cross.in_proj_weight is None and cross.k_proj_weight.shape == (16, 6)
    out, _ = cross(_x((2, 7, 16), dev=dev), _x((2, 11, 6), dev=dev), _x((2, 11, 5), dev=dev))
    assert out.shape == (2, 7, 16)


def test_padding_keys_change_nothing(dev):
    layer = FavorAttention(16, 4, batch_first=True, seed=0, device=dev)
    x = _x((2, 10, 16), dev=dev)
    pad = torch.zeros(2, 10, dtype=torch.bool, device=dev)
    pad[:, 7:] = True
    noisy = x.clone()
    noisy[:, 7:] = 1e4
    a, _ = layer(x[:, :7], x, x, key_padding_mask=pad)
    b, _ = layer(x[:, :7], noisy, noisy, key_padding_mask=pad)
    c, _ = layer(x[:, :7], x[:, :7], x[:, :7])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# --- state_dict, buffers, redraws -----------------------------------------------------


def test_state_dict_round_trip_keeps_outputs_identical(dev):
    layer = FavorAttention(24, 3, batch_first=True, causal=True, seed=1, device=dev)
    x = _x((2, 13, 24), dev=dev)
    before, _ = layer(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = FavorAttention(24, 3, batch_first=True, causal=True, seed=2, device=dev)
    assert not torch.equal(other.projection, layer.projection)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    after, _ = other(x)
    assert torch.equal(before, after)
    assert "projection" in layer.state_dict()
    assert "projection" not in dict(layer.named_parameters())


def test_projection_moves_with_the_module_and_is_the_seeded_draw():
    layer = FavorAttention(32, 4, num_features=50, seed=7, dtype=torch.float64)
    expected = fp.draw_projection(50, 8, seed=7)
    np.testing.assert_array_equal(layer.projection.numpy(), expected)
    layer.to(torch.float32)
    assert layer.projection.dtype == torch.float32
    if torch.cuda.is_available():
        layer.cuda()
        assert layer.projection.device.type == "cuda"
        layer.redraw_projection()
        assert layer.projection.device.type == "cuda"


def test_redraws_only_when_asked():
    layer = FavorAttention(16, 2, batch_first=True, seed=0)
    x = _x((1, 5, 16))
    first = layer.projection.clone()
    layer.train()
    for _ in range(3):
        layer(x)[0].sum().backward()
    assert torch.equal(layer.projection, first)  # no interval: never redrawn by forward
    ref = layer.projection
    layer.redraw_projection()
    assert layer.projection is not ref  # a new buffer: pending backward passes keep ref
    assert layer.projection.dtype == ref.dtype and layer.projection.device == ref.device
    assert not torch.equal(layer.projection, first)
    layer.redraw_projection(seed=11)
    np.testing.assert_allclose(
        layer.projection.numpy(), fp.draw_projection(layer.num_features, 8, seed=11), rtol=1e-6
    )


def test_redraw_interval_counts_training_calls():
    layer = FavorAttention(16, 2, batch_first=True, redraw_interval=3, seed=0)
    x = _x((1, 5, 16))
    seen = []
    layer.train()
    for _ in range(7):
        layer(x)
        seen.append(layer.projection.clone())
    # Calls 1-3 use draw 0, calls 4-6 draw 1, call 7 draw 2.
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[3], seen[5])
    assert not torch.equal(seen[2], seen[3]) and not torch.equal(seen[5], seen[6])
    layer.eval()
    for _ in range(5):
        layer(x)
    assert torch.equal(layer.projection, seen[6])  # evaluation never redraws


def test_redraw_projections_reaches_every_layer():
    model = torch.nn.Sequential(
        FavorAttention(16, 2, seed=0), torch.nn.Linear(16, 16), FavorAttention(16, 4, seed=0)
    )
    before = [model[0].projection.clone(), model[2].projection.clone()]
    assert redraw_projections(model, seed=5) == 2
    assert not torch.equal(before[0], model[0].projection)
    assert not torch.equal(before[1], model[2].projection)


# --- gradients, compile, autocast ------------------------------------------------------


def test_gradients_reach_input_and_output_projections(dev):
    layer = FavorAttention(16, 2, batch_first=True, causal=True, seed=0, device=dev)
    x = _x((2, 12, 16), dev=dev).requires_grad_()
    out, _ = layer(x)
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.projection.grad is None


def test_bfloat16_autocast_is_finite_and_close_to_float32(dev):
    layer = FavorAttention(64, 4, batch_first=True, causal=True, seed=0, device=dev)
    x = _x((2, 128, 64), dev=dev, scale=1.0)
    ref, _ = layer(x)
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
        low, _ = layer(x)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    # bfloat16 keeps 8 significant bits (unit roundoff 2**-8): the in- and output
    # projections each round their inputs and results, the attention itself runs in
    # float32, so the relative error is a few roundoffs; 8 * 2**-8 bounds it.
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert rel < 8 * 2.0**-8, rel


def test_compiles_fullgraph_and_follows_redraws(dev):
    layer = FavorAttention(16, 2, batch_first=True, seed=0, device=dev)
    x = _x((2, 24, 16), dev=dev)
    compiled = torch.compile(layer, fullgraph=True)
    for causal in (False, True):
        torch.testing.assert_close(
            compiled(x, is_causal=causal)[0], layer(x, is_causal=causal)[0], rtol=1e-5, atol=1e-6
        )
    redraw_projections(layer, seed=1)  # outside the compiled step; a new buffer, no recompile
    torch.testing.assert_close(compiled(x)[0], layer(x)[0], rtol=1e-5, atol=1e-6)
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
        low = compiled(x)[0]
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


def test_compiles_fullgraph_with_the_masks_torch_modules_pass():
    # What nn.TransformerEncoderLayer hands on: a float padding mask and the causal
    # mask with the is_causal hint; plus a zero key and dropout in training mode.
    layer = FavorAttention(16, 2, 0.2, add_zero_attn=True, batch_first=True, seed=0).eval()
    x = _x((2, 12, 16))
    pad = torch.zeros(2, 12).masked_fill(torch.arange(12) >= 9, float("-inf"))
    causal = torch.nn.Transformer.generate_square_subsequent_mask(12)
    kwargs = dict(key_padding_mask=pad, attn_mask=causal, is_causal=True, need_weights=False)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(
        compiled(x, x, x, **kwargs)[0], layer(x, x, x, **kwargs)[0], rtol=1e-5, atol=1e-6
    )
    layer.train()
    out = compiled(x, x, x, **kwargs)[0]  # dropout drawn inside the compiled program
    assert torch.isfinite(out).all()


def test_loads_a_multihead_attention_state_dict():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    layer = FavorAttention(32, 4, batch_first=True, num_features=2048, seed=0)
    drawn = layer.projection.clone()
    layer.load_state_dict(mha.state_dict(), strict=True)  # no projection in it: kept
    assert torch.equal(layer.projection, drawn)
    # Small inputs: the FAVOR+ estimate is then close to the exact attention; this only
    # checks that the weights are used as MultiheadAttention uses them (a transposed or
    # misplaced block would give an error of order 1). The estimator's accuracy is
    # tested statistically in test_attention.py.
    x = _x((2, 64, 32), scale=0.3)
    ref, _ = mha(x, x, x, need_weights=False)
    out, _ = layer(x, x, x, need_weights=False)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


# --- the SDPA-like function -----------------------------------------------------------


def test_sdpa_maps_onto_the_core_function(dev):
    q, k, v = (_x((2, 3, 10, 8), seed=s, dev=dev) for s in range(3))
    w = fp.draw_projection(32, 8, seed=0, like=q)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool, device=dev)
    keep[0, ..., 6:] = False
    out = scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=True, projection=w)
    expected = fp.favor_attention(q, k, v, w, causal=True, key_mask=keep[:, :, 0, :])
    torch.testing.assert_close(out, expected)
    scaled = scaled_dot_product_attention(q, k, v, scale=0.1, projection=w)
    torch.testing.assert_close(scaled, fp.favor_attention(q, k, v, w, scale=0.1))


def test_sdpa_key_mask_means_what_it_means_in_torch():
    q, k, v = (_x((2, 2, 12, 8), seed=s, scale=0.2) for s in range(3))
    keep = torch.rand(2, 1, 1, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    w = fp.draw_projection(4096, 8, seed=0)
    w = torch.asarray(w, dtype=torch.float32)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=keep, projection=w)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    # m = 4096 features and |q|, |k| ~ 0.6: the estimate is within a few percent.
    assert ((ours - exact).norm() / exact.norm()).item() < 0.05
    flipped = scaled_dot_product_attention(q, k, v, attn_mask=~keep, projection=w)
    assert ((flipped - exact).norm() / exact.norm()).item() > 0.2


def test_sdpa_grouped_query_heads():
    q = _x((2, 6, 10, 8))
    k, v = _x((2, 2, 10, 8), seed=1), _x((2, 2, 10, 4), seed=2)
    w = fp.draw_projection(16, 8, seed=0, like=q)
    out = scaled_dot_product_attention(q, k, v, enable_gqa=True, projection=w)
    rep = fp.favor_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), w)
    torch.testing.assert_close(out, rep)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"dropout_p": "0.1"}, TypeError, "dropout_p"),
        ({"attn_mask": "int"}, TypeError, "attn_mask"),
        ({"attn_mask": "per-query"}, ValueError, "attn_mask"),
        ({"attn_mask": "wrong-length"}, ValueError, "attn_mask"),
        ({"enable_gqa": True, "kv_heads": 4}, ValueError, "enable_gqa"),
        ({"is_causal": "False"}, TypeError, "is_causal must be a bool"),
    ],
)
def test_sdpa_errors_name_the_argument(kwargs, error, words):
    q = _x((2, 6, 10, 8))
    kv_heads = kwargs.pop("kv_heads", 6)
    k, v = _x((2, kv_heads, 10, 8)), _x((2, kv_heads, 10, 8))
    masks = {
        "int": torch.zeros(2, 1, 1, 10, dtype=torch.int64),
        # a pattern that differs between queries and is neither causal nor padding
        "per-query": torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(0)) > 0.5,
        "wrong-length": torch.ones(2, 1, 1, 9, dtype=torch.bool),
    }
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = masks[kwargs["attn_mask"]]
    w = fp.draw_projection(16, 8, seed=0, like=q)
    with pytest.raises(error, match=words):
        scaled_dot_product_attention(q, k, v, projection=w, **kwargs)


def test_sdpa_float_masks_and_dropout_follow_the_core():
    q, k, v = (_x((2, 3, 10, 8), seed=s) for s in range(3))
    w = fp.draw_projection(32, 8, seed=0, like=q)
    bias = _x((2, 1, 1, 10), seed=4)
    bias[0, ..., 7:] = float("-inf")
    out = scaled_dot_product_attention(q, k, v, attn_mask=bias, projection=w)
    torch.testing.assert_close(out, fp.favor_attention(q, k, v, w, key_mask=bias[:, :, 0, :]))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, attn_mask=causal, projection=w),
        fp.favor_attention(q, k, v, w, causal=True),
    )
    torch.manual_seed(5)
    dropped = scaled_dot_product_attention(q, k, v, dropout_p=0.25, projection=w)
    torch.manual_seed(5)
    keep = torch.rand(2, 3, 10) >= 0.25
    expected = fp.favor_attention(q, k, v, w, dropout_p=0.25, dropout_keep=keep)
    torch.testing.assert_close(dropped, expected)


def test_layer_errors_name_the_argument():
    layer = FavorAttention(16, 2, batch_first=True, seed=0)
    x = _x((2, 5, 16))
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        layer(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="features"):
        layer(_x((2, 5, 12)))
    with pytest.raises(ValueError, match="divisible"):
        FavorAttention(10, 3)
    with pytest.raises(ValueError, match="redraw_interval"):
        FavorAttention(16, 2, redraw_interval=0)
    with pytest.raises(TypeError, match="seed"):
        FavorAttention(16, 2, seed=1.5)
    with pytest.raises(ValueError, match="seed must be a non-negative int; got -3"):
        FavorAttention(16, 2, seed=-3)
    with pytest.raises(TypeError, match="causal must be a bool; got str"):
        FavorAttention(16, 2, causal="False")
    with pytest.raises(TypeError, match="is_causal must be a bool; got str"):
        layer(x, is_causal="False")


def test_default_number_of_features():
    for d in (1, 2, 8, 16, 64, 128):
        layer = FavorAttention(d * 2, 2, seed=0)
        expected = max(d, round(d * math.log(d))) if d > 1 else 1
        assert layer.num_features == expected >= d


def test_meta_tensors_give_shapes_without_reading_values():
    """Shape inference on torch's meta device (no values: nothing may be read on the host)."""
    q = k = v = torch.empty(2, 3, 10, 4, device="meta", dtype=torch.float64)
    w = torch.empty(16, 4, device="meta", dtype=torch.float64)
    for causal in (False, True):
        out = fp.favor_attention(
            q, k, v, w, causal=causal, key_mask=torch.ones(10, dtype=torch.bool, device="meta")
        )
        assert (out.shape, out.device.type, out.dtype) == ((2, 3, 10, 4), "meta", torch.float64)
    out, state = fp.favor_attention_step(q, k, v, w)
    assert out.shape == (2, 3, 10, 4) and state.numerator.device.type == "meta"
    layer = FavorAttention(8, 2, batch_first=True, device="meta")
    y, _ = layer(
        *(torch.empty(2, 10, 8, device="meta"),) * 3,
        is_causal=True,
        need_weights=False,
        attn_mask=None,
    )
    assert (y.shape, y.device.type) == ((2, 10, 8), "meta")
