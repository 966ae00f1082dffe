"""The torch and Flax NNX layers with every projection kind and every estimator.

What is checked, for ``favorplus.torch.FavorAttention`` and ``favorplus.flax.FavorAttention``:

* every kind (iid, orthogonal, simplex) x kernel (positive, hyperbolic, OPRF, SADERF) in
  bidirectional, causal and decoding calls equals the functional API called with the same
  parameters (written out here from the layer's weights: in-projections, heads, the core,
  out-projection), with finite outputs and masked keys removed whatever their values;
* leak-freedom of the causal paths (training and evaluation calls, decoding): the outputs
  before position t are bit-identical whatever the later tokens hold (huge, inf, NaN);
* the running statistics of a data-driven estimator: zeros at first, replaced by the first
  training batch's statistics (computed here independently, in NumPy, from the projected
  queries and keys), then moved by the momentum; frozen in evaluation; the output of a
  training call uses the statistics from before the call;
* checkpoints: torch ``state_dict`` round trips (``strict=True``), states without the
  statistics (older checkpoints, an exact MultiheadAttention's) load and compute FAVOR+ in
  causal calls; the Flax state round trip (``nnx.state`` / ``nnx.update``).

Small shapes, float64; on JAX a few shapes only (each compiles).
"""

from __future__ import annotations

import numpy as np
import pytest

import favorplus as fp

KINDS = ["iid", "orthogonal", "simplex"]
KERNELS = ["softmax", "softmax_hyperbolic", "softmax_oprf", "softmax_saderf"]
ESTIMATORS = ["softmax_oprf", "softmax_saderf"]
E, H = 16, 2  # embed_dim, heads (head_dim 8)
N, L = 2, 10  # batch, length
T = 6  # the leak checks change the tokens from position T on


def _np_stats(q, k, keep=None):
    """Per-head statistics of (N, H, L, d) queries and keys, over the batch and the
    positions (NumPy; keep: (N, 1 or H, S) bool, True where a key takes part)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    qm, qs = q.mean((0, 2)), (q * q).mean((0, 2))
    if keep is None:
        keep = np.ones(k.shape[:-1], bool)
    w = np.broadcast_to(np.asarray(keep, np.float64)[..., None], k.shape)
    kz = np.where(w > 0, k, 0.0)
    km = (kz * w).sum((0, 2)) / w.sum((0, 2))
    ks = (kz * kz * w).sum((0, 2)) / w.sum((0, 2))
    return qm, qs, km, ks


def _poisoned(x, value):
    """``x`` with every token from position T on replaced by ``value`` (batch-first)."""
    y = np.array(x, copy=True)
    y[:, T:] = value
    return y


BAD = [1e4, np.inf, np.nan]


# ======================================================================================
# torch
# ======================================================================================


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _tlayer(torch, kernel="softmax_oprf", kind="simplex", seed=0, **kw):
    from favorplus.torch import FavorAttention

    return FavorAttention(
        E, H, batch_first=True, kernel=kernel, kind=kind, seed=seed, dtype=torch.float64, **kw
    )


def _tx(torch, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, L, E, generator=g, dtype=torch.float64) * scale


def _theads(layer, x):
    """The layer's queries, keys and values of self-attention over x, (N, H, L, d)."""
    e = layer.embed_dim
    w, b = layer.in_proj_weight, layer.in_proj_bias
    q, k, v = (x @ w[i * e : (i + 1) * e].T + b[i * e : (i + 1) * e] for i in range(3))
    n, length, _ = x.shape
    return [a.reshape(n, length, H, e // H).transpose(1, 2) for a in (q, k, v)]


def _tout(layer, heads):
    n, _, length, _ = heads.shape
    out = heads.transpose(1, 2).reshape(n, length, layer.embed_dim)
    return out @ layer.out_proj.weight.T + layer.out_proj.bias


def _trunning(torch, layer):
    return fp.FeatureStatistics(
        layer.running_query_mean,
        layer.running_query_sq_mean,
        layer.running_key_mean,
        layer.running_key_sq_mean,
    )


def _tstep_all(layer, x, splits=(4, 5)):
    import torch

    outs, state, start = [], None, 0
    for stop in (*splits, x.shape[1]):
        out, state = layer.step(x[:, start:stop], state=state)
        outs.append(out)
        start = stop
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_torch_every_kind_and_kernel(torch, kind, kernel):
    layer = _tlayer(torch, kernel, kind)
    x = _tx(torch)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, -3:] = True
    with torch.no_grad():
        layer(_tx(torch, seed=5), need_weights=False)  # a training call: statistics
        layer.eval()
        q, k, v = _theads(layer, x)
        w = layer.projection
        # Bidirectional: the layer's own kernel (data-driven: this call's statistics).
        out, weights = layer(x, key_padding_mask=pad, need_weights=True)
        want = fp.favor_attention(q, k, v, w, kernel=kernel, key_mask=~pad[:, None, :])
        torch.testing.assert_close(out, _tout(layer, want), rtol=1e-10, atol=1e-12)
        mat = fp.favor_attention_matrix(q, k, w, kernel=kernel, key_mask=~pad[:, None, :])
        torch.testing.assert_close(weights, mat.mean(1), rtol=1e-10, atol=1e-12)
        # Causal and decoding: the running statistics (an estimator built here from them).
        causal_kernel = kernel
        if kernel in ESTIMATORS:
            cls = fp.OPRF if kernel == "softmax_oprf" else fp.SADERF
            causal_kernel = cls(statistics=_trunning(torch, layer))
        outc, _ = layer(x, is_causal=True, need_weights=False)
        want_c = _tout(layer, fp.favor_attention(q, k, v, w, kernel=causal_kernel, causal=True))
        torch.testing.assert_close(outc, want_c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_tstep_all(layer, x), want_c, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(out).all() and torch.isfinite(outc).all()
        # Masked keys change nothing, whatever their values (and no statistics see them).
        x_bad = x.clone()
        x_bad[0, -3:] = float("nan")
        out_bad, _ = layer(x, x_bad, x_bad, key_padding_mask=pad, need_weights=False)
        torch.testing.assert_close(out_bad, out, rtol=1e-10, atol=1e-12)
    if kernel in ESTIMATORS:  # the training call moved the statistics off zero
        assert int(layer.num_batches_tracked) == 1
        assert float(layer.running_query_sq_mean.abs().sum()) > 0
    else:
        assert not hasattr(layer, "num_batches_tracked")


@pytest.mark.parametrize("kernel", [*ESTIMATORS, "softmax"])
def test_torch_causal_paths_leak_free(torch, kernel):
    """Training and evaluation causal calls and decoding: outputs before T are
    bit-identical whatever the later tokens hold."""
    x = _tx(torch, seed=1)
    base = _tlayer(torch, kernel)
    with torch.no_grad():
        base(_tx(torch, seed=2), need_weights=False)  # running statistics from the past
    state = base.state_dict()
    for bad in BAD:
        y = torch.asarray(_poisoned(x.numpy(), bad))
        for mode in ("train", "eval", "step"):
            outs = []
            for inp in (x, y):
                layer = _tlayer(torch, kernel)
                layer.load_state_dict(state, strict=True)
                with torch.no_grad():
                    if mode == "step":
                        out = _tstep_all(layer.eval(), inp, splits=(T - 1, T + 1))
                    else:
                        layer.train(mode == "train")
                        out, _ = layer(inp, is_causal=True, need_weights=False)
                outs.append(out)
            assert torch.equal(outs[0][:, :T], outs[1][:, :T]), (bad, mode)
            assert torch.isfinite(outs[0]).all(), (bad, mode)


def test_torch_running_statistics_update_and_freeze(torch):
    layer = _tlayer(torch, "softmax_saderf", statistics_momentum=0.25)
    for name in ("running_query_mean", "running_key_sq_mean"):
        assert torch.count_nonzero(getattr(layer, name)) == 0
    x1, x2, x3 = (_tx(torch, seed=s) for s in (1, 2, 3))
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[1, :4] = True
    with torch.no_grad():
        s1 = _np_stats(*_theads(layer, x1)[:2])
        q2, k2, _ = _theads(layer, x2)
        s2 = _np_stats(q2, k2, ~pad[:, None, :].numpy())
    out1, _ = layer(x1, is_causal=True, need_weights=False)  # training mode
    for got, want in zip(_trunning(torch, layer), s1):  # the first batch replaces the zeros
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    # Output 2 uses the statistics of batch 1 (from before the call), then they move.
    out2, _ = layer(x2, key_padding_mask=pad, is_causal=True, need_weights=False)
    with torch.no_grad():
        st1 = fp.FeatureStatistics(*(torch.asarray(s) for s in s1))
        want = fp.favor_attention(
            q2, k2, _theads(layer, x2)[2], layer.projection, kernel=fp.SADERF(statistics=st1),
            causal=True, key_mask=~pad[:, None, :],
        )  # fmt: skip
    torch.testing.assert_close(out2, _tout(layer, want), rtol=1e-10, atol=1e-12)
    for got, a, b in zip(_trunning(torch, layer), s1, s2):
        np.testing.assert_allclose(got.numpy(), 0.75 * a + 0.25 * b, rtol=1e-12, atol=1e-14)
    assert int(layer.num_batches_tracked) == 2
    (out1.square().sum() + out2.square().sum()).backward()  # the in-place update is safe
    assert layer.in_proj_weight.grad is not None
    assert all(not r.requires_grad for r in _trunning(torch, layer))
    # eval() freezes them; a bidirectional training call updates them too.
    frozen = [r.clone() for r in _trunning(torch, layer)]
    layer.eval()
    layer(x3, need_weights=False)
    layer(x3, is_causal=True, need_weights=False)
    for got, want in zip(_trunning(torch, layer), frozen):
        assert torch.equal(got, want)
    layer.train()
    layer(x3, need_weights=False)
    assert int(layer.num_batches_tracked) == 3
    # momentum=None: the average of all batches; non-finite statistics are skipped.
    avg = _tlayer(torch, "softmax_oprf", statistics_momentum=None)
    with torch.no_grad():
        for x in (x1, x2, x3):
            avg(x, need_weights=False)
        stats = [_np_stats(*_theads(avg, x)[:2]) for x in (x1, x2, x3)]
        for got, *each in zip(_trunning(torch, avg), *stats):
            # float64 rounding of a mean is relative to its terms, not to the mean: an
            # entry that cancels to ~1e-5 of terms ~0.1 differs in its last digits with
            # the summation order (torch's threads), hence atol at 1e-12 of the terms.
            scale = float(np.max(np.abs(each)))
            np.testing.assert_allclose(
                got.numpy(), np.mean(each, axis=0), rtol=1e-12, atol=1e-12 * scale
            )
        before = [r.clone() for r in _trunning(torch, avg)]
        avg(torch.full_like(x1, float("inf")), need_weights=False)
        for got, want in zip(_trunning(torch, avg), before):
            assert torch.equal(got, want)


def test_torch_state_dict_round_trip_and_older_checkpoints(torch):
    from favorplus.torch import exact_state_dict, performerize

    layer = _tlayer(torch, "softmax_saderf", kind="iid", seed=0)
    with torch.no_grad():
        layer(_tx(torch, seed=4), need_weights=False)
    layer.eval()
    x = _tx(torch)
    want, _ = layer(x, is_causal=True, need_weights=False)
    names = {
        "running_query_mean",
        "running_query_sq_mean",
        "running_key_mean",
        "running_key_sq_mean",
        "num_batches_tracked",
    }
    assert names <= set(layer.state_dict())
    other = _tlayer(torch, "softmax_saderf", kind="iid", seed=9).eval()
    other.load_state_dict(layer.state_dict(), strict=True)
    got, _ = other(x, is_causal=True, need_weights=False)
    assert torch.equal(got, want)
    # A checkpoint from before the layer kept statistics: loads with strict=True and
    # starts them afresh (zeros: A = 0, psi = 1, i.e. FAVOR+ in causal calls).
    old = {n: t for n, t in layer.state_dict().items() if n not in names}
    other.load_state_dict(old, strict=True)
    assert int(other.num_batches_tracked) == 0
    assert torch.count_nonzero(other.running_query_sq_mean) == 0
    favor = _tlayer(torch, "softmax", kind="iid", seed=9).eval()
    favor.load_state_dict(old, strict=True)
    got, _ = other(x, is_causal=True, need_weights=False)
    torch.testing.assert_close(got, favor(x, is_causal=True, need_weights=False)[0])
    # A partial set of statistics is an error, as any missing key.
    partial = dict(layer.state_dict())
    del partial["running_key_mean"]
    with pytest.raises(RuntimeError, match="running_key_mean"):
        other.load_state_dict(partial, strict=True)
    # The exact model's state and back; performerize passes the options on.
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    mha.load_state_dict(exact_state_dict(layer), strict=True)
    model = performerize(
        torch.nn.Sequential(mha), kernel="softmax_oprf", kind="simplex", statistics_momentum=0.5
    )
    assert model[0].tracks_statistics and model[0].statistics_momentum == 0.5
    assert model[0].running_key_mean.device == mha.out_proj.weight.device
    model[0].load_state_dict(mha.state_dict(), strict=True)


def test_torch_performerized_causal_encoder(torch):
    """A converted nn.TransformerEncoder with a causal mask (a float attn_mask, as torch
    builds it) and SADERF: training updates every layer's statistics; in evaluation the
    outputs before T do not depend on the later tokens."""
    from favorplus.torch import performerize

    torch.manual_seed(0)
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True),
        2,
        enable_nested_tensor=False,
    ).double()
    model = performerize(encoder, kernel="softmax_saderf", kind="simplex", seed=0)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    x = _tx(torch)
    model(x, mask=mask, is_causal=True).square().sum().backward()
    layers = [m.self_attn for m in model.layers]
    assert all(int(a.num_batches_tracked) == 1 for a in layers)
    model.eval()
    with torch.no_grad():
        out = model(x, mask=mask, is_causal=True)
        later = model(torch.asarray(_poisoned(x.numpy(), 1e4)), mask=mask, is_causal=True)
    assert torch.equal(out[:, :T], later[:, :T])
    assert all(int(a.num_batches_tracked) == 1 for a in layers)


def test_torch_fixed_estimators_and_refusals(torch):
    """Estimators with fixed values are used as they are (no statistics); bad options and
    states are refused with the argument's name."""
    st = fp.FeatureStatistics(*(torch.rand(H, E // H, dtype=torch.float64) for _ in range(4)))
    x = _tx(torch)
    for kernel in (fp.OPRF(a=-0.05), fp.SADERF(statistics=st)):
        layer = _tlayer(torch, kernel)
        assert not layer.tracks_statistics and "num_batches_tracked" not in layer.state_dict()
        with torch.no_grad():
            q, k, v = _theads(layer, x)
            out, _ = layer(x, is_causal=True, need_weights=False)
            want = fp.favor_attention(q, k, v, layer.projection, kernel=kernel, causal=True)
            torch.testing.assert_close(out, _tout(layer, want), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(_tstep_all(layer, x), out, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="statistics_momentum"):
        _tlayer(torch, statistics_momentum=0.0)
    with pytest.raises(TypeError, match="statistics_momentum"):
        _tlayer(torch, statistics_momentum="0.1")
    with pytest.raises(ValueError, match="kernel"):
        _tlayer(torch, kernel="softmax_nope")
    layer = _tlayer(torch)
    with pytest.raises(TypeError, match="state"):
        layer.step(x, state=(1, 2))
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer.step(x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))


# ======================================================================================
# Flax NNX
# ======================================================================================


@pytest.fixture(scope="module")
def nnx():
    pytest.importorskip("jax")
    return pytest.importorskip("flax.nnx")


def _flayer(nnx, kernel="softmax_oprf", kind="simplex", seed=0, **kw):
    import jax.numpy as jnp

    from favorplus.flax import FavorAttention

    return FavorAttention(
        H, E, kernel=kernel, kind=kind, seed=seed, rngs=nnx.Rngs(0), param_dtype=jnp.float64, **kw
    )


def _fx(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, L, E)) * scale


def _fheads(layer, x):
    """Queries, keys, values (N, H, L, d) of self-attention over x (NumPy weights)."""

    def dense(mod):
        kern = np.asarray(mod.kernel.get_value())
        return np.einsum("...i,ihd->...hd", x, kern) + np.asarray(mod.bias.get_value())

    return [np.swapaxes(dense(m), 1, 2) for m in (layer.query, layer.key, layer.value)]


def _fout(layer, heads):
    out = np.swapaxes(np.asarray(heads), 1, 2)
    kern = np.asarray(layer.out.kernel.get_value())
    return np.einsum("...hd,hdo->...o", out, kern) + np.asarray(layer.out.bias.get_value())


def _frunning(layer):
    return fp.FeatureStatistics(
        *(
            np.asarray(getattr(layer, n).get_value())
            for n in (
                "running_query_mean",
                "running_query_sq_mean",
                "running_key_mean",
                "running_key_sq_mean",
            )
        )
    )


def _fdecode(layer, x, splits=(L // 2,)):
    import jax.numpy as jnp

    layer.init_cache(x.shape, jnp.float64)
    outs, start = [], 0
    for stop in (*splits, x.shape[1]):
        outs.append(np.asarray(layer(jnp.asarray(x[:, start:stop]), decode=True)))
        start = stop
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_flax_every_kind_and_kernel(nnx, kind, kernel):
    import jax.numpy as jnp

    layer = _flayer(nnx, kernel, kind)
    x = _fx()
    keep = np.ones((N, L), bool)
    keep[0, -3:] = False
    mask = jnp.asarray(keep)[:, None, None, :]
    layer(jnp.asarray(_fx(seed=5)), mask=mask)  # a training call (use_running_average=False)
    layer.eval()
    q, k, v = _fheads(layer, x)
    w = np.asarray(layer.projection.get_value())
    out = np.asarray(layer(jnp.asarray(x), mask=mask))
    want = fp.favor_attention(q, k, v, w, kernel=kernel, key_mask=keep[:, None, :])
    np.testing.assert_allclose(out, _fout(layer, want), rtol=1e-10, atol=1e-12)
    causal_kernel = kernel
    if kernel in ESTIMATORS:
        cls = fp.OPRF if kernel == "softmax_oprf" else fp.SADERF
        causal_kernel = cls(statistics=_frunning(layer))
    outc = np.asarray(layer(jnp.asarray(x), is_causal=True))
    want_c = _fout(layer, fp.favor_attention(q, k, v, w, kernel=causal_kernel, causal=True))
    np.testing.assert_allclose(outc, want_c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_fdecode(layer, x), want_c, rtol=1e-10, atol=1e-12)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(outc))
    x_bad = x.copy()
    x_bad[0, -3:] = np.nan
    out_bad = layer(jnp.asarray(x), jnp.asarray(x_bad), mask=mask)
    np.testing.assert_allclose(np.asarray(out_bad), out, rtol=1e-10, atol=1e-12)
    if kernel in ESTIMATORS:
        assert int(layer.num_batches_tracked.get_value()) == 1
        assert np.abs(_frunning(layer).query_sq_mean).sum() > 0


@pytest.mark.parametrize("kernel", ESTIMATORS)
def test_flax_causal_paths_leak_free(nnx, kernel):
    import jax
    import jax.numpy as jnp

    x = _fx(seed=1)
    base = _flayer(nnx, kernel)
    base(jnp.asarray(_fx(seed=2)))  # running statistics from the past
    state = jax.tree.map(np.asarray, nnx.state(base))
    for bad in BAD:
        y = _poisoned(x, bad)
        for mode in ("train", "eval", "decode"):
            outs = []
            for inp in (x, y):
                layer = _flayer(nnx, kernel)
                nnx.update(layer, jax.tree.map(jnp.asarray, state))
                if mode == "decode":
                    out = _fdecode(layer, inp)  # blocks of 5: position 5 sees 6.. in its block
                else:
                    frozen = mode == "eval"
                    out = np.asarray(
                        layer(jnp.asarray(inp), is_causal=True, use_running_average=frozen)
                    )
                outs.append(out)
            assert np.array_equal(outs[0][:, :T], outs[1][:, :T]), (bad, mode)
            assert np.all(np.isfinite(outs[0])), (bad, mode)


def test_flax_running_statistics_update_freeze_and_jit(nnx):
    import jax
    import jax.numpy as jnp

    layer = _flayer(nnx, "softmax_saderf", statistics_momentum=0.25, num_kv_heads=1)
    assert np.count_nonzero(_frunning(layer).query_mean) == 0
    x1, x2, x3 = (_fx(seed=s) for s in (1, 2, 3))
    keep = np.ones((N, L), bool)
    keep[1, 3:6] = False  # (no query without keys: nnx gives those uniform weights)
    q1, k1, _ = _fheads(layer, x1)  # grouped: the one key head serves both query heads
    q2, k2, v2 = _fheads(layer, x2)
    s1, s2 = _np_stats(q1, k1), _np_stats(q2, k2, keep[:, None, :])
    layer(jnp.asarray(x1), is_causal=True)
    for got, want in zip(_frunning(layer), s1):
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-12, atol=1e-14)
    mask = jnp.asarray(keep)[:, None, None, :]

    @nnx.jit
    def train_step(model, x):
        return model(x, mask=mask, is_causal=True)

    out2 = np.asarray(train_step(layer, jnp.asarray(x2)))  # the statistics of batch 1
    st1 = fp.FeatureStatistics(*(np.broadcast_to(s, (H, E // H)) for s in s1))
    want = fp.favor_attention(
        q2, k2, v2, np.asarray(layer.projection.get_value()), kernel=fp.SADERF(statistics=st1),
        causal=True, key_mask=keep[:, None, :],
    )  # fmt: skip
    np.testing.assert_allclose(out2, _fout(layer, want), rtol=1e-10, atol=1e-12)
    for got, a, b in zip(_frunning(layer), s1, s2):
        np.testing.assert_allclose(got, np.broadcast_to(0.75 * a + 0.25 * b, got.shape), 1e-12)
    assert int(layer.num_batches_tracked.get_value()) == 2
    # Evaluation freezes them: model.eval(), nnx.view, the call's argument.
    frozen = jax.tree.map(np.asarray, nnx.state(layer, nnx.BatchStat))
    for call in (
        lambda: nnx.view(layer, use_running_average=True)(jnp.asarray(x3), is_causal=True),
        lambda: layer(jnp.asarray(x3), use_running_average=True),
    ):
        call()
        now = jax.tree.map(np.asarray, nnx.state(layer, nnx.BatchStat))
        assert jax.tree.all(jax.tree.map(np.array_equal, now, frozen))
    layer.eval()
    layer(jnp.asarray(x3), is_causal=True)
    layer(jnp.asarray(x3), use_running_average=False)  # the call's argument wins
    assert int(layer.num_batches_tracked.get_value()) == 3
    nnx.view(layer, use_running_average=False)(jnp.asarray(x3))  # a view shares the state
    assert int(layer.num_batches_tracked.get_value()) == 4


def test_flax_state_round_trip_and_older_states(nnx):
    import jax
    import jax.numpy as jnp

    layer = _flayer(nnx, "softmax_oprf", kind="orthogonal")
    layer(jnp.asarray(_fx(seed=4)))
    layer.eval()
    x = jnp.asarray(_fx())
    want = np.asarray(layer(x, is_causal=True))
    saved = jax.tree.map(np.asarray, nnx.state(layer))
    assert "running_key_sq_mean" in nnx.state(layer, nnx.BatchStat)
    other = _flayer(nnx, "softmax_oprf", kind="orthogonal", seed=3)
    nnx.update(other, jax.tree.map(jnp.asarray, saved))
    np.testing.assert_array_equal(np.asarray(other(x, is_causal=True)), want)
    # A state without the statistics (from before the layer kept them): the layer keeps
    # its zeros, which compute FAVOR+ (A = 0) in causal calls.
    from favorplus.flax import FeatureProjection

    params = jax.tree.map(jnp.asarray, nnx.state(layer, nnx.Any(nnx.Param, FeatureProjection)))
    fresh = _flayer(nnx, "softmax_oprf", kind="orthogonal", seed=3, use_running_average=True)
    favor = _flayer(nnx, "softmax", kind="orthogonal", seed=3)
    nnx.update(fresh, params)
    nnx.update(favor, params)
    np.testing.assert_allclose(
        np.asarray(fresh(x, is_causal=True)), np.asarray(favor(x, is_causal=True)), rtol=1e-10
    )


def test_flax_traced_simplex_projection_and_refusals(nnx):
    """A layer created inside nnx.vmap draws its projection with jax.random: simplex
    blocks (pairwise cosine -1/(d-1)) too."""
    import jax

    from favorplus.flax import FavorAttention

    @nnx.vmap(in_axes=0)
    def make(key):
        return FavorAttention(H, E, kind="simplex", num_features=16, rngs=nnx.Rngs(params=key))

    layers = make(jax.random.split(jax.random.key(0), 2))
    w = np.asarray(layers.projection.get_value(), np.float64)
    assert w.shape == (2, 16, E // H)
    d = E // H
    for block in (w[0, :d], w[1, d:]):
        u = block / np.linalg.norm(block, axis=-1, keepdims=True)
        cos = u @ u.T
        np.testing.assert_allclose(cos[~np.eye(d, dtype=bool)], -1 / (d - 1), atol=1e-5)
    assert not np.allclose(w[0], w[1])
    with pytest.raises(ValueError, match="statistics_momentum"):
        _flayer(nnx, statistics_momentum=1.5)
    layer = _flayer(nnx, use_running_average=None)
    import jax.numpy as jnp

    with pytest.raises(ValueError, match="use_running_average"):
        layer(jnp.asarray(_fx()))
    # make_attention_fn keeps no state: a data-driven estimator is refused in causal calls.
    from favorplus.flax import make_attention_fn

    fn = make_attention_fn(kernel="softmax_oprf", kind="simplex", causal=True)
    q = jnp.asarray(_fx()).reshape(N, L, H, E // H)
    with pytest.raises(ValueError, match="later tokens"):
        fn(q, q, q)


def test_torch_compile_fullgraph_updates_statistics(torch):
    """A training call under torch.compile(fullgraph=True) computes and updates as eager."""
    import copy

    from favorplus.torch import FavorAttention

    eager = FavorAttention(E, H, batch_first=True, kernel="softmax_saderf", seed=0)
    eager(torch.randn(N, L, E), need_weights=False)  # statistics from a first batch
    compiled_layer = copy.deepcopy(eager)
    step = torch.compile(
        lambda x: compiled_layer(x, is_causal=True, need_weights=False)[0], fullgraph=True
    )
    x = torch.randn(N, L, E)
    got = step(x)
    want, _ = eager(x, is_causal=True, need_weights=False)
    torch.testing.assert_close(got, want)
    for name in ("running_query_mean", "running_key_sq_mean", "num_batches_tracked"):
        torch.testing.assert_close(getattr(compiled_layer, name), getattr(eager, name))
    assert int(compiled_layer.num_batches_tracked) == 2
