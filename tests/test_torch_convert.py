"""Checkpoints both ways, copies and their redraws, and performerize / deperformerize."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import favorplus as fp  # noqa: E402
from favorplus.torch import (  # noqa: E402
    FavorAttention,
    deperformerize,
    exact_state_dict,
    performerize,
    redraw_projections,
)

nn = torch.nn


def _transformer(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(dim_feedforward=32, dropout=0.0, batch_first=True, dtype=torch.float64)
    options.update(kwargs)
    return nn.Transformer(16, 4, 2, 1, **options)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    tgt = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    return src, tgt, pad


def _run(model):
    src, tgt, pad = _data()
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    with torch.no_grad():
        return model.eval()(
            src, tgt, tgt_mask=mask, src_key_padding_mask=pad, memory_key_padding_mask=pad
        )


def _projections(model):
    return [m.projection for m in model.modules() if isinstance(m, FavorAttention)]


# --- checkpoints ------------------------------------------------------------------------


def test_exact_checkpoint_loads_strictly_into_the_performer_model():
    exact = _transformer(seed=0)
    buffer = io.BytesIO()
    torch.save(exact.state_dict(), buffer)
    buffer.seek(0)
    favor = performerize(_transformer(seed=99), num_features=64, seed=3)  # other weights
    drawn = [p.clone() for p in _projections(favor)]
    result = favor.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(drawn, _projections(favor), strict=True))
    # The same as converting the exact model itself (same weights, same seed).
    converted = performerize(copy.deepcopy(exact), num_features=64, seed=3)
    assert torch.equal(_run(favor), _run(converted))
    assert not torch.allclose(_run(favor), _run(exact), atol=1e-4)


def test_performer_checkpoint_loads_into_the_exact_model_after_one_step():
    favor = performerize(_transformer(seed=0), num_features=8, seed=0)
    with torch.no_grad():
        for p in favor.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "fine-tuned"
    exact = _transformer(seed=5)
    with pytest.raises(RuntimeError, match="projection"):
        exact.load_state_dict(favor.state_dict(), strict=True)
    exact.load_state_dict(exact_state_dict(favor), strict=True)
    for (name, p), (other, q) in zip(
        favor.named_parameters(), exact.named_parameters(), strict=True
    ):
        assert name == other and torch.equal(p, q)
    # save_projection=False: the state_dict is the exact model's, nothing to strip.
    lean = performerize(_transformer(seed=0), num_features=8, seed=0, save_projection=False)
    assert set(lean.state_dict()) == set(_transformer().state_dict())
    _transformer(seed=7).load_state_dict(lean.state_dict(), strict=True)


def test_performer_checkpoint_restores_its_projections():
    favor = performerize(_transformer(seed=0), num_features=8, seed=0)
    redraw_projections(favor)  # the projections are no longer the seeded draws
    buffer = io.BytesIO()
    torch.save(favor.state_dict(), buffer)
    buffer.seek(0)
    other = performerize(_transformer(seed=1), num_features=8, seed=1)
    other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(_run(other), _run(favor))


def test_deperformerize_gives_back_the_exact_model():
    exact = _transformer(seed=0)
    expected = _run(exact)
    model = performerize(copy.deepcopy(exact), num_features=8, seed=0)
    assert not torch.allclose(_run(model), expected, atol=1e-4)
    model = deperformerize(model)
    assert not _projections(model)
    assert sum(isinstance(m, nn.MultiheadAttention) for m in model.modules()) == 4
    assert model.encoder.use_nested_tensor == exact.encoder.use_nested_tensor
    torch.testing.assert_close(_run(model), expected, rtol=0, atol=0)


# --- performerize -------------------------------------------------------------------------


def test_performerize_keeps_the_parameters_and_touches_no_global_rng():
    model = _transformer(seed=0)
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = torch.get_rng_state()
    assert performerize(model, num_features=8, seed=0) is model
    assert torch.equal(torch.get_rng_state(), state)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    attn = model.encoder.layers[0].self_attn
    assert isinstance(attn, FavorAttention) and attn.batch_first
    assert attn.in_proj_weight.dtype == torch.float64 and attn.projection.dtype == torch.float64
    assert not model.encoder.use_nested_tensor
    src, tgt, _ = _data()
    before = attn.in_proj_weight.clone()
    model.train()(src, tgt).square().sum().backward()
    optimizer.step()  # the optimizer built before the conversion trains the new model
    assert not torch.equal(attn.in_proj_weight, before)


def test_performerize_draws_distinct_reproducible_projections():
    a = performerize(_transformer(), num_features=8, seed=4)
    b = performerize(_transformer(), num_features=8, seed=4)
    c = performerize(_transformer(), num_features=8, seed=5)
    pa, pb, pc = _projections(a), _projections(b), _projections(c)
    assert len(pa) == 4
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert all(not torch.equal(x, y) for x, y in zip(pa, pc, strict=True))
    assert all(not torch.equal(pa[i], pa[j]) for i in range(4) for j in range(i))
    redraw_projections(a)
    redraw_projections(b)
    pa, pb = _projections(a), _projections(b)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert all(not torch.equal(pa[i], pa[j]) for i in range(4) for j in range(i))


def test_performerize_user_models_shared_modules_and_filters():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, kdim=6, vdim=5, add_bias_kv=True)
            self.cross = self.attn  # the same module used twice
            self.norm = nn.LayerNorm(16)
            self.other = nn.MultiheadAttention(16, 4, bias=False, batch_first=True)

        def forward(self, x, memory):
            return self.norm(x + self.attn(x, memory[..., :6], memory[..., :5])[0])

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    x, memory = torch.randn(9, 2, 16), torch.randn(11, 2, 16)
    performerize(model, include=lambda name, m: not name.endswith("other"), seed=1)
    block = model[0]
    assert isinstance(block.attn, FavorAttention) and block.cross is block.attn
    assert isinstance(block.other, nn.MultiheadAttention)
    assert block.attn.kdim == 6 and block.attn.bias_k is not None
    out = block(x, memory)
    assert out.shape == (9, 2, 16) and torch.isfinite(out).all()

    lone = nn.MultiheadAttention(16, 4)
    layer = performerize(lone, seed=0)
    assert isinstance(layer, FavorAttention) and layer.in_proj_weight is lone.in_proj_weight


def test_from_multihead_attention_draws_the_seeded_projection():
    mha = nn.MultiheadAttention(32, 4, dtype=torch.float64)
    layer = FavorAttention.from_multihead_attention(mha, num_features=20, seed=7)
    np.testing.assert_array_equal(layer.projection.numpy(), fp.draw_projection(20, 8, seed=7))
    assert not any(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    with pytest.raises(TypeError, match=r"mha must be a torch\.nn\.MultiheadAttention"):
        FavorAttention.from_multihead_attention(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        performerize("model")


# --- copies -----------------------------------------------------------------------------


def test_deepcopies_compute_the_same_then_redraw_their_own_matrices():
    layer = FavorAttention(16, 4, num_features=8, seed=0)
    twin = copy.deepcopy(layer)
    x = torch.randn(5, 2, 16)
    assert torch.equal(layer(x)[0], twin(x)[0])  # a copy is a copy
    layer.redraw_projection()
    twin.redraw_projection()
    assert not torch.equal(layer.projection, twin.projection)
    # Reproducible: the same seed and the same copies give the same redraws.
    again = FavorAttention(16, 4, num_features=8, seed=0)
    again_twin = copy.deepcopy(again)
    again.redraw_projection()
    again_twin.redraw_projection()
    assert torch.equal(again.projection, layer.projection)
    assert torch.equal(again_twin.projection, twin.projection)
    # Shared redraws when asked for.
    shared = FavorAttention(16, 4, num_features=8, seed=0, share_redraws=True)
    shared_twin = copy.deepcopy(shared)
    shared.redraw_projection()
    shared_twin.redraw_projection()
    assert torch.equal(shared.projection, shared_twin.projection)


def test_transformer_encoder_clones_get_distinct_redraws():
    def build():
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        layer.self_attn = FavorAttention(16, 4, batch_first=True, num_features=8, seed=0)
        return nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    encoder = build()
    first = _projections(encoder)
    assert all(torch.equal(first[0], p) for p in first)  # clones start as copies
    redraw_projections(encoder)
    drawn = _projections(encoder)
    assert all(not torch.equal(drawn[i], drawn[j]) for i in range(3) for j in range(i))
    other = build()
    redraw_projections(other)
    assert all(torch.equal(a, b) for a, b in zip(drawn, _projections(other), strict=True))


def test_performerize_passes_the_favor_options_on():
    model = performerize(
        _transformer(), num_features=12, kernel="relu", causal=True, redraw_interval=5,
        chunk_size=16, save_projection=False, seed=0,
    )  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, FavorAttention)]
    assert len(layers) == 4
    for layer in layers:
        assert (layer.num_features, layer.kernel, layer.causal) == (12, "relu", True)
        assert (layer.redraw_interval, layer.chunk_size) == (5, 16)
        assert "projection" not in layer.state_dict()
