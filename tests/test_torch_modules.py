"""torch's own transformer modules, performerized, run FAVOR+ in every mode.

nn.TransformerEncoderLayer / nn.TransformerEncoder take fused exact-attention fast
paths (torch._transformer_encoder_layer_fwd, nested tensors) in eval mode without
gradients. For every module, batch_first, mode and mask, the converted model must call
FavorAttention.forward, never a fused kernel, and give the output of an independent
FAVOR+ reference: the same torch module in training mode (dropout 0, so no fast path
can apply) with each attention replaced by a small module written here that computes
favorplus.favor_attention on hand-projected q/k/v with the same projection and the
masks that the test knows it passed (not the masks torch hands on).
"""

from __future__ import annotations

import contextlib
import copy

import pytest

torch = pytest.importorskip("torch")

import favorplus as fp  # noqa: E402
from favorplus.torch import FavorAttention, performerize  # noqa: E402

nn = torch.nn
E, H, FF = 16, 4, 32


class RefFavor(nn.Module):
    """FAVOR+ multi-head attention from an exact module's weights and a given projection."""

    def __init__(self, mha, projection, causal, padding):
        super().__init__()
        self.mha, self.w, self.causal, self.padding = mha, projection, causal, padding
        self.batch_first = mha.batch_first

    def forward(self, query, key, value, **ignored):
        m = self.mha
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        wq, wk, wv = m.in_proj_weight.chunk(3)
        bq, bk, bv = m.in_proj_bias.chunk(3)
        n = query.shape[0]

        def heads(x):
            return x.reshape(n, x.shape[1], H, E // H).transpose(1, 2)

        q, k, v = heads(query @ wq.T + bq), heads(key @ wk.T + bk), heads(value @ wv.T + bv)
        keep = None if self.padding is None else ~self.padding[:, None, :]
        out = fp.favor_attention(q, k, v, self.w, causal=self.causal, key_mask=keep)
        out = out.transpose(1, 2).reshape(n, query.shape[1], E) @ m.out_proj.weight.T
        out = out + m.out_proj.bias
        return (out if self.batch_first else out.transpose(0, 1)), None


def _encoder_layer(bf):
    return nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=bf, dtype=torch.float64)


def _decoder_layer(bf):
    return nn.TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=bf, dtype=torch.float64)


MODULES = {
    "EncoderLayer": lambda bf: _encoder_layer(bf),
    "Encoder": lambda bf: nn.TransformerEncoder(_encoder_layer(bf), 2),
    "DecoderLayer": lambda bf: _decoder_layer(bf),
    "Transformer": lambda bf: nn.Transformer(
        E, H, 1, 1, FF, dropout=0.0, batch_first=bf, dtype=torch.float64
    ),
}
MODES = {
    "train": lambda: contextlib.nullcontext(),
    "eval": lambda: contextlib.nullcontext(),
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}
N, S, T = 3, 7, 5  # batch, source length, target length


def _padding(length):
    pad = torch.zeros(N, length, dtype=torch.bool)
    pad[0, -2:] = True  # left aligned: the form nn.TransformerEncoder would nest
    pad[2, -1:] = True
    return pad


def _call(name, model, src, tgt, mask):
    """Run ``model`` as its users do; returns the output and the masks per attention role."""
    causal_s = nn.Transformer.generate_square_subsequent_mask(S, dtype=torch.float64)
    causal_t = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    pad_s = _padding(S) if "padding" in mask else None
    pad_t = _padding(T) if "padding" in mask else None
    causal = "causal" in mask
    if name in ("EncoderLayer", "Encoder"):
        kwargs = {"src_key_padding_mask": pad_s}
        if causal:
            kwargs["src_mask" if name == "EncoderLayer" else "mask"] = causal_s
        roles = {"self_attn": (causal, pad_s)}
        return model(src, **kwargs), roles
    if name == "DecoderLayer":
        out = model(
            tgt,
            src,
            tgt_mask=causal_t if causal else None,
            tgt_key_padding_mask=pad_t,
            memory_key_padding_mask=pad_s,
        )
        return out, {"self_attn": (causal, pad_t), "multihead_attn": (False, pad_s)}
    out = model(
        src,
        tgt,
        src_mask=causal_s if causal else None,
        tgt_mask=causal_t if causal else None,
        src_key_padding_mask=pad_s,
        tgt_key_padding_mask=pad_t,
        memory_key_padding_mask=pad_s,
    )
    roles = {
        "encoder": {"self_attn": (causal, pad_s)},
        "decoder": {"self_attn": (causal, pad_t), "multihead_attn": (False, pad_s)},
    }
    return out, roles


def _reference(name, favor_model, src, tgt, mask):
    """The FAVOR+ reference: a copy, attention swapped for RefFavor, in training mode."""
    ref = copy.deepcopy(favor_model)
    _, roles = _call(name, ref, src, tgt, mask)  # only to learn the roles' masks
    for module_name, module in list(ref.named_modules()):
        for attr in ("self_attn", "multihead_attn"):
            attn = getattr(module, attr, None)
            if not isinstance(attn, FavorAttention):
                continue
            role = roles
            if name == "Transformer":
                role = roles["encoder" if module_name.startswith("encoder") else "decoder"]
            causal, padding = role[attr]
            exact = attn.to_multihead_attention()
            setattr(module, attr, RefFavor(exact, attn.projection, causal, padding))
    ref.train()
    return _call(name, ref, src, tgt, mask)[0]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of FavorAttention.forward and of torch's fused attention kernels."""
    counts = {"favor": 0, "fused": 0}
    forward = FavorAttention.forward

    def counting_forward(self, *args, **kwargs):
        counts["favor"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FavorAttention, "forward", counting_forward)
    for kernel in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention"):
        original = getattr(torch, kernel)

        def counting(*args, _original=original, **kwargs):
            counts["fused"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, kernel, counting)
    return counts


@pytest.mark.parametrize("mask", ["none", "padding", "causal", "causal+padding"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_run_favor_attention_in_every_mode(name, batch_first, mode, mask, fused_calls):
    torch.manual_seed(0)
    exact = MODULES[name](batch_first)
    favor = performerize(copy.deepcopy(exact), num_features=8, seed=0)
    layers = sum(isinstance(m, FavorAttention) for m in favor.modules())
    assert layers == sum(isinstance(m, nn.MultiheadAttention) for m in exact.modules())
    g = torch.Generator().manual_seed(1)
    src = torch.randn(N, S, E, generator=g, dtype=torch.float64)
    tgt = torch.randn(N, T, E, generator=g, dtype=torch.float64)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)

    for model in (exact, favor):
        model.train(mode == "train")
    with MODES[mode]():
        fused_calls["fused"] = 0
        exact_out = _call(name, exact, src, tgt, mask)[0]
        exact_fused = fused_calls["fused"]
        fused_calls.update(favor=0, fused=0)
        out = _call(name, favor, src, tgt, mask)[0]
        assert fused_calls["fused"] == 0
        assert fused_calls["favor"] == layers
    expected = _reference(name, favor, src, tgt, mask)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(out, exact_out, rtol=1e-3, atol=1e-3)  # not exact attention
    if mode in ("no_grad", "inference_mode") and batch_first and "Encoder" in name:
        # The test reaches the dangerous path: the exact model ran a fused kernel there.
        if name == "EncoderLayer" or "padding" in mask:
            assert exact_fused > 0 or "causal" in mask


def test_encoder_built_before_the_swap_nests_and_still_runs_favor(fused_calls):
    """A FavorAttention assigned by hand into an existing nn.TransformerEncoder (which
    still converts padded inputs to nested tensors in eval mode) gets the nested tensor
    and computes FAVOR+ with the padding."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(_encoder_layer(True), 2).eval()
    assert encoder.use_nested_tensor
    for layer in encoder.layers:
        layer.self_attn = FavorAttention.from_multihead_attention(
            layer.self_attn, num_features=8, seed=0
        )
    src = torch.randn(N, S, E, dtype=torch.float64)
    pad = _padding(S)
    with torch.no_grad():
        out = encoder(src, src_key_padding_mask=pad)
    assert fused_calls["fused"] == 0 and fused_calls["favor"] >= 2
    expected = _reference("Encoder", encoder, src, None, "padding")
    valid = ~pad
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-9, atol=1e-10)
    assert torch.all(out[pad] == 0)  # torch's nested path leaves padded rows at zero


def test_float_padding_and_detected_causal_masks_from_the_modules():
    """The encoder canonicalises a bool padding mask to 0 / -inf floats and detects a
    float causal mask: FavorAttention receives exactly these forms."""
    torch.manual_seed(0)
    seen = []
    layer = performerize(_encoder_layer(True), num_features=8, seed=0)
    forward = layer.self_attn.forward

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return forward(*args, **kwargs)

    layer.self_attn.forward = spy
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    encoder(
        torch.randn(N, S, E, dtype=torch.float64),
        mask=causal.double(),
        src_key_padding_mask=_padding(S),
    )
    (kwargs,) = seen
    assert kwargs["key_padding_mask"].dtype == torch.float64 and kwargs["is_causal"] is True
    assert kwargs["need_weights"] is False
