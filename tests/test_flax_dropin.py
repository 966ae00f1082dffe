"""favorplus.flax as a drop-in for nnx.MultiHeadAttention: constructor, parameters, masks,
decoding, weights, attention_fn and transforms.

References are independent of the layer under test: the exact module's own submodules
project q, k and v (``mha.query`` ...), :func:`favorplus.favor_attention` attends, and
``mha.out`` projects back; nnx's exact output checks the accuracy.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")

import jax.numpy as jnp  # noqa: E402

import favorplus as fp  # noqa: E402
from favorplus.flax import FavorAttention, make_attention_fn  # noqa: E402

F64 = jnp.float64
B, L, FEAT, HEADS = 2, 12, 32, 4
LENGTHS = jnp.array([[L], [8]])  # the second sequence has 4 padded positions


def _x(shape=(B, L, FEAT), seed=0, scale=0.5):
    return jax.random.normal(jax.random.key(seed), shape, dtype=F64) * scale


def _pad():
    return jnp.arange(L)[None, :] < LENGTHS  # (B, L), True = a real token


def _pair(seed=0, num_features=64, **kw):
    """An exact module and a FavorAttention holding a copy of its parameters."""
    mha = nnx.MultiHeadAttention(
        HEADS, FEAT, decode=False, param_dtype=F64, rngs=nnx.Rngs(seed), **kw
    )
    fav = FavorAttention(
        HEADS, FEAT, num_features=num_features, param_dtype=F64, rngs=nnx.Rngs(seed + 1), **kw
    )
    nnx.update(fav, nnx.state(mha, nnx.Param))
    return mha, fav


def _project(mha, x, y):
    q, k, v = mha.query(x), mha.key(y), mha.value(y)
    if mha.normalize_qk:
        q, k = mha.query_ln(q), mha.key_ln(k)
    return q, k, v


def _reference(mha, w, x, y=None, *, causal=False, key_mask=None):
    """mha's projections, favorplus.favor_attention per head (GQA by repetition), mha.out."""
    y = x if y is None else y
    q, k, v = _project(mha, x, y)
    group = q.shape[-2] // k.shape[-2]
    k, v = jnp.repeat(k, group, axis=-2), jnp.repeat(v, group, axis=-2)
    heads = lambda a: jnp.swapaxes(a, -3, -2)  # noqa: E731
    out = fp.favor_attention(heads(q), heads(k), heads(v), w, causal=causal, key_mask=key_mask)
    return mha.out(jnp.swapaxes(out, -3, -2))


def _w(fav):
    return fav.projection.get_value()


# ------------------------------------------------------------------------ constructor


def test_constructor_and_call_take_multiheadattention_signature():
    ours = inspect.signature(FavorAttention.__init__).parameters
    theirs = inspect.signature(nnx.MultiHeadAttention.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].kind == p.kind, name
        if p.default is not inspect.Parameter.empty and name != "attention_fn":
            assert ours[name].default is p.default or ours[name].default == p.default, name
    positional = [n for n, p in theirs.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    extras = set(ours) - set(theirs)
    assert {"num_features", "kernel", "seed", "causal"} <= extras
    assert all(ours[n].kind == inspect.Parameter.KEYWORD_ONLY for n in extras)
    call = inspect.signature(FavorAttention.__call__).parameters
    for name, p in inspect.signature(nnx.MultiHeadAttention.__call__).parameters.items():
        assert name in call and call[name].kind == p.kind, name
    layer = FavorAttention(4, 32, 16, 8, 2, 24, rngs=nnx.Rngs(0))  # positional, as nnx
    assert (layer.qkv_features, layer.out_features) == (16, 8)
    assert (layer.num_kv_heads, layer.in_kv_features) == (2, 24)
    assert isinstance(layer, nnx.MultiHeadAttention)


CONFIGS = {
    "default": {},
    "gqa": {"num_kv_heads": 2},
    "mqa_normalize_qk": {"num_kv_heads": 1, "normalize_qk": True},
    "features_no_bias": {"qkv_features": 16, "out_features": 20, "use_bias": False},
    "cross": {"in_kv_features": 24},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_copied_parameters_give_exact_projections_and_the_core_result(config):
    kw = CONFIGS[config]
    mha, fav = _pair(**kw)
    x = _x()
    y = _x((B, 9, kw["in_kv_features"]), seed=1) if "in_kv_features" in kw else x
    for name in ("query", "key", "value"):
        inp = x if name == "query" else y
        np.testing.assert_array_equal(getattr(fav, name)(inp), getattr(mha, name)(inp))
    got = fav(x, y)
    np.testing.assert_allclose(got, _reference(mha, _w(fav), x, y), rtol=1e-10, atol=1e-12)
    assert got.shape == mha(x, y).shape


def test_whole_state_copies_from_a_module_with_dropout_rngs():
    mha = nnx.MultiHeadAttention(4, 32, dropout_rate=0.1, decode=False, rngs=nnx.Rngs(0))
    fav = FavorAttention(4, 32, dropout_rate=0.1, rngs=nnx.Rngs(5))
    nnx.update(fav, nnx.state(mha))  # Params and the dropout RngState
    x = _x().astype(jnp.float32)
    np.testing.assert_array_equal(fav.value(x), mha.value(x))
    assert fav.rngs is not None
    back = nnx.MultiHeadAttention(4, 32, dropout_rate=0.1, decode=False, rngs=nnx.Rngs(7))
    nnx.update(back, nnx.state(fav, nnx.Param))  # and back: the projection stays behind
    np.testing.assert_array_equal(back.out(fav.query(x)), fav.out(mha.query(x)))


@pytest.mark.parametrize("config", ["default", "gqa", "mqa_normalize_qk"])
def test_output_is_close_to_exact_attention_within_the_estimators_error(config):
    m = 1024
    mha, fav = _pair(num_features=m, **CONFIGS[config])
    if mha.normalize_qk:  # LayerNorm'd heads have norm sqrt(d): scale them down
        for ln in (mha.query_ln, mha.key_ln):
            ln.scale.set_value(ln.scale.get_value() * 0.3)
        nnx.update(fav, nnx.state(mha, nnx.Param))
    x = _x(scale=0.3)
    q, k, _ = _project(mha, x, x)
    d = q.shape[-1]
    z2 = float(jnp.max(jnp.sum(q**2, -1)) + jnp.max(jnp.sum(k**2, -1))) * 2 / math.sqrt(d)
    # Per pair, the positive estimator's relative standard error is
    # sqrt((exp(|q' + k'|^2) - 1) / m) (FAVOR-NOTES section 2), |q' + k'|^2 <= z2;
    # the output averages such pairs, so 4 of them bound its relative error.
    bound = 4 * math.sqrt(math.expm1(z2) / m)
    exact = mha(x)
    rel = float(jnp.linalg.norm(fav(x) - exact) / jnp.linalg.norm(exact))
    assert rel < bound, (rel, bound)


# ------------------------------------------------------------------------ masks


def _masks():
    pad = _pad()
    causal = nnx.make_causal_mask(jnp.ones((B, L)))
    return {
        "padding": (nnx.make_attention_mask(pad, pad), False),
        "key_padding_only": (nnx.make_attention_mask(jnp.ones((B, L)), pad), False),
        "causal": (causal, True),
        "causal_and_padding": (nnx.combine_masks(causal, nnx.make_attention_mask(pad, pad)), True),
        "bool_int_per_head": (jnp.broadcast_to(pad[:, None, None, :], (B, HEADS, 1, L)), False),
        "bool_causal": (causal.astype(bool), True),
        "int32": (nnx.make_attention_mask(pad, pad, dtype=jnp.int32), False),
    }


@pytest.mark.parametrize("name", list(_masks()))
def test_flax_masks_mean_what_nnx_says(name):
    mask, causal = _masks()[name]
    mha, fav = _pair(**CONFIGS["gqa"])
    x = _x()
    got = fav(x, mask=mask)
    pad = _pad()
    query_padded = name in ("padding", "causal_and_padding", "int32")
    key_mask = pad[:, None, :] if name != "causal" and name != "bool_causal" else None
    expected = _reference(mha, _w(fav), x, causal=causal, key_mask=key_mask)
    exact = mha(x, mask=mask)
    rows = pad if query_padded else jnp.ones_like(pad)
    np.testing.assert_allclose(got[rows], expected[rows], rtol=1e-10, atol=1e-12)
    if causal:
        # no key: 0 before the output projection (nnx's uniform weights would reach later
        # keys), as favor_attention gives it
        np.testing.assert_array_equal(
            got[~rows], jnp.broadcast_to(mha.out.bias[...], got[~rows].shape)
        )
    else:
        # nnx gives a query with no key uniform weights over all keys: the mean of the values
        # (nnx rounds somewhere in float32 here: 1e-6)
        np.testing.assert_allclose(got[~rows], exact[~rows], rtol=1e-6, atol=1e-7)
    jitted = nnx.jit(lambda mod, x, mask: mod(x, mask=mask))(fav, x, mask)  # traced mask
    np.testing.assert_allclose(jitted, got, rtol=1e-10, atol=1e-12)


def test_cross_attention_masks_with_fewer_queries_than_keys():
    mha, fav = _pair()
    x, y = _x((B, 6, FEAT)), _x((B, L, FEAT), seed=1)
    q_valid = jnp.arange(6)[None, :] < jnp.array([[6], [4]])
    pad = _pad()
    got = fav(x, y, mask=nnx.make_attention_mask(q_valid, pad))
    expected = _reference(mha, _w(fav), x, y, key_mask=pad[:, None, :])
    np.testing.assert_allclose(got[q_valid], expected[q_valid], rtol=1e-10, atol=1e-12)
    exact = mha(x, y, mask=nnx.make_attention_mask(q_valid, pad))
    np.testing.assert_allclose(got[~q_valid], exact[~q_valid], rtol=1e-6, atol=1e-7)
    # causal, the 6 queries being the last 6 of the 12 positions (chunked prefill)
    last = (jnp.arange(L)[None, :] <= jnp.arange(6)[:, None] + L - 6)[None, None]
    got = fav(x, y, mask=last)
    q, k, v = _project(mha, x, y)
    h = lambda a: jnp.swapaxes(a, -3, -2)  # noqa: E731
    rows = fp.favor_attention(  # the last 6 rows of the full causal call
        h(jnp.concatenate([k[:, :6], q], axis=1)), h(k), h(v), _w(fav), causal=True
    )[..., 6:, :]
    np.testing.assert_allclose(got, mha.out(h(rows)), rtol=1e-9, atol=1e-11)


def test_masks_built_inside_jit_choose_causal_or_not_at_run_time():
    _, fav = _pair()
    x = _x()

    @nnx.jit
    def forward(mod, x, pad):
        padding = nnx.make_attention_mask(pad, pad)
        causal = nnx.combine_masks(nnx.make_causal_mask(pad), padding)
        return mod(x, mask=padding), mod(x, mask=causal)

    a, b = forward(fav, x, _pad())
    pad = _pad()
    np.testing.assert_allclose(a, fav(x, mask=nnx.make_attention_mask(pad, pad)), atol=1e-12)
    causal = nnx.combine_masks(nnx.make_causal_mask(pad), nnx.make_attention_mask(pad, pad))
    np.testing.assert_allclose(b, fav(x, mask=causal), atol=1e-12)
    assert not np.allclose(a[0], b[0])


def test_masks_that_are_not_linear_time_are_refused():
    _, fav = _pair()
    x = _x()
    band = jnp.abs(jnp.arange(L)[:, None] - jnp.arange(L)[None, :]) <= 2  # local attention
    with pytest.raises(ValueError, match="linear time"):
        fav(x, mask=band[None, None])
    with pytest.raises(ValueError, match="linear time"):  # causal call with a non-causal hole
        fav(x, mask=jnp.ones((L, L)).at[5, 2].set(0), is_causal=True)
    with pytest.raises(Exception, match="linear time"):  # traced: checked when it runs
        jax.block_until_ready(nnx.jit(lambda m, x, k: m(x, mask=k))(fav, x, band[None, None]))
    with pytest.raises(ValueError, match="mask must broadcast"):
        fav(x, mask=jnp.ones((B, 1, 1, L + 1)))
    with pytest.raises(TypeError, match="mask"):
        fav(x, mask=np.full((B, 1, 1, L), "a"))


# ------------------------------------------------------------------------ decode


def test_decode_from_the_causal_state_matches_the_full_causal_call():
    mha, fav = _pair(**CONFIGS["mqa_normalize_qk"])
    x = _x()
    full = fav(x, is_causal=True)
    np.testing.assert_allclose(
        full, _reference(mha, _w(fav), x, causal=True), rtol=1e-10, atol=1e-12
    )
    fav.init_cache(x.shape, F64)  # the state in the computation's dtype
    sizes = jax.tree.map(jnp.size, nnx.state(fav, nnx.Cache))
    step = nnx.jit(lambda m, t: m(t, decode=True))
    tokens = [step(fav, x[:, i : i + 1]) for i in range(L)]
    np.testing.assert_allclose(jnp.concatenate(tokens, 1), full, rtol=1e-9, atol=1e-11)
    assert int(fav.cache_index[...]) == L
    fav.init_cache((B, 10 * L, FEAT), F64)  # the cache does not grow with the maximum length
    assert jax.tree.map(jnp.size, nnx.state(fav, nnx.Cache)) == sizes
    first = fav(x[:, :5], decode=True)  # a prompt in one block, then token by token
    rest = [fav(x[:, i : i + 1], decode=True) for i in range(5, L)]
    np.testing.assert_allclose(jnp.concatenate([first, *rest], 1), full, rtol=1e-9, atol=1e-11)


def test_decode_under_jax_jit_with_split_state_and_views():
    _, fav = _pair()
    x = _x()
    full = fav(x, mask=nnx.make_causal_mask(x[..., 0]))
    model = nnx.view(fav, decode=True, batch_size=B, max_length=L)
    graph, state = nnx.split(model)

    @jax.jit
    def step(state, token):
        m = nnx.merge(graph, state)
        return m(token), nnx.state(m)

    outs = []
    for i in range(L):
        y, state = step(state, x[:, i : i + 1])
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("traced", [False, True])
def test_causal_rows_without_keys_do_not_see_later_tokens_and_match_decoding(traced):
    # Left padding: with the causal mask, the first two (real) queries see no key.
    _, fav = _pair()
    x = _x()
    key_valid = jnp.broadcast_to(jnp.arange(L) >= 2, (B, L))
    mask = nnx.combine_masks(
        nnx.make_causal_mask(x[..., 0]), nnx.make_attention_mask(jnp.ones((B, L)), key_valid)
    )
    call = (
        nnx.jit(lambda m, x, mask: m(x, mask=mask))
        if traced
        else (lambda m, x, mask: m(x, mask=mask))
    )
    full = call(fav, x, mask)
    t = 5
    for later in (1e4, jnp.inf, jnp.nan):
        changed = call(fav, x.at[:, t + 1 :].set(later), mask)
        np.testing.assert_array_equal(changed[:, : t + 1], full[:, : t + 1])
    np.testing.assert_array_equal(
        full[:, :2], jnp.broadcast_to(fav.out.bias[...], full[:, :2].shape)
    )
    fav.init_cache(x.shape, F64)
    steps = [
        fav(x[:, i : i + 1], decode=True, mask=key_valid[:, None, None, i : i + 1])
        for i in range(L)
    ]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-9, atol=1e-11)


def test_decode_errors():
    _, fav = _pair()
    with pytest.raises(ValueError, match="init_cache"):
        fav(_x()[:, :1], decode=True)
    fav.init_cache((B, L, FEAT))
    with pytest.raises(ValueError, match="cache shape"):
        fav(_x((3, 1, FEAT)), decode=True)
    with pytest.raises(ValueError, match="sow_weights"):
        fav(_x()[:, :1], decode=True, sow_weights=True)


# ------------------------------------------------------------------------ weights


def test_sown_weights_are_the_implicit_favor_matrix():
    mha, fav = _pair(**CONFIGS["gqa"])
    x = _x()
    mask = nnx.make_causal_mask(x[..., 0])
    out = fav(x, mask=mask, sow_weights=True)
    (weights,) = nnx.pop(fav, nnx.Intermediate)["attention_weights"].get_value()
    assert weights.shape == (B, HEADS, L, L)
    q, k, v = _project(mha, x, x)
    k, v = jnp.repeat(k, 2, axis=-2), jnp.repeat(v, 2, axis=-2)
    h = lambda a: jnp.swapaxes(a, -3, -2)  # noqa: E731
    expected = fp.favor_attention_matrix(h(q), h(k), _w(fav), causal=True)
    np.testing.assert_allclose(weights, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mha.out(jnp.swapaxes(weights @ h(v), -3, -2)), out, atol=1e-10)
    fav(x)  # no sowing unless asked
    assert not nnx.state(fav, nnx.Intermediate)


# ------------------------------------------------------------------------ attention_fn


def test_attention_fn_inside_multiheadattention():
    mha, fav = _pair(**CONFIGS["gqa"])
    w = _w(fav)
    inner = nnx.MultiHeadAttention(
        HEADS,
        FEAT,
        num_kv_heads=2,
        attention_fn=make_attention_fn(w),
        decode=False,
        param_dtype=F64,
        rngs=nnx.Rngs(9),
    )
    nnx.update(inner, nnx.state(mha, nnx.Param))
    x = _x()
    pad = _pad()
    mask = nnx.make_attention_mask(jnp.ones((B, L)), pad)
    np.testing.assert_allclose(
        inner(x, mask=mask),
        _reference(mha, w, x, key_mask=pad[:, None, :]),
        rtol=1e-10,
        atol=1e-12,
    )
    causal = _reference(mha, w, x, causal=True)
    np.testing.assert_allclose(inner(x, is_causal=True), causal, rtol=1e-10, atol=1e-12)
    # nnx's own key/value cache with FAVOR+ over the cached keys: the causal rows
    inner.init_cache(x.shape, dtype=F64)
    steps = [inner(x[:, i : i + 1], decode=True) for i in range(L)]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), causal, rtol=1e-9, atol=1e-11)


def test_attention_fn_called_directly_like_dot_product_attention():
    q, k, v = (_x((B, L, HEADS, 8), seed=s) for s in range(3))
    fn = make_attention_fn(num_features=32, seed=3)
    w = fp.draw_projection(32, 8, seed=3)
    h = lambda a: jnp.swapaxes(a, -3, -2)  # noqa: E731
    expected = jnp.swapaxes(fp.favor_attention(h(q), h(k), h(v), jnp.asarray(w)), -3, -2)
    np.testing.assert_allclose(fn(q, k, v), expected, rtol=1e-10, atol=1e-12)
    pad = _pad()
    key_mask = pad[:, None, :]
    masked = jnp.swapaxes(
        fp.favor_attention(h(q), h(k), h(v), jnp.asarray(w), key_mask=key_mask), -3, -2
    )
    minus_inf = jnp.where(pad, 0.0, -jnp.inf)[:, None, None, :]  # an additive key mask
    np.testing.assert_allclose(fn(q, k, v, bias=minus_inf), masked, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        fn(q, k, v, mask=nnx.make_attention_mask(jnp.ones((B, L)), pad)),
        masked,
        rtol=1e-10,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="bias"):
        fn(q, k, v, bias=jnp.zeros((B, HEADS, L, L)))
    with pytest.raises(ValueError, match="exact"):
        FavorAttention(4, 32, attention_fn=nnx.dot_product_attention, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------ transforms


def test_scan_over_layers_created_with_vmap():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attn = FavorAttention(2, 16, decode=False, rngs=rngs)

        def __call__(self, x):
            return x + self.attn(x)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Block(rngs)

    blocks = create(nnx.Rngs(0))
    w = np.asarray(blocks.attn.projection.get_value())
    assert w.shape == (3, 17, 8) and not np.allclose(w[0], w[1])  # one projection per layer

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block, x):
        return block(x)

    x = _x((2, 8, 16)).astype(jnp.float32)
    loss = lambda b: jnp.sum(forward(b, x) ** 2)  # noqa: E731
    value, grads = nnx.jit(lambda b: nnx.value_and_grad(loss)(b))(blocks)
    graph, state = nnx.split(blocks)
    one = jax.jit(lambda st, x: nnx.merge(graph, st)(x))
    expected = x
    for i in range(3):  # the same layers one by one
        expected = one(jax.tree.map(lambda a, i=i: a[i], state), expected)
    np.testing.assert_allclose(value, jnp.sum(expected**2), rtol=1e-5)
    kernel = grads.attn.query.kernel.get_value()
    assert kernel.shape == (3, 16, 2, 8) and bool(jnp.all(jnp.isfinite(kernel)))
    assert float(jnp.abs(kernel).min()) >= 0 and float(jnp.abs(kernel).max()) > 0
