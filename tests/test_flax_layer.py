"""favorplus.flax: the Flax NNX multi-head layer."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import favorplus as fp  # noqa: E402
from favorplus.flax import FavorAttention, FeatureProjection, redraw_projections  # noqa: E402


def _x(shape, seed=0, scale=0.5, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype=dtype) * scale


def _projection(layer):
    return np.asarray(layer.projection.get_value())


def _manual(layer, x, y, causal=False, key_mask=None):
    """The layer's computation written out: projections, heads, the core function, out."""

    def dense(mod, a):
        kern = mod.kernel.get_value()
        return jnp.einsum("...i,ihd->...hd", a, kern) + mod.bias.get_value()

    q, k, v = (
        jnp.swapaxes(dense(m, a), -3, -2)
        for m, a in ((layer.query, x), (layer.key, y), (layer.value, y))
    )
    out = fp.favor_attention(
        q, k, v, layer.projection.get_value(), causal=causal, key_mask=key_mask
    )
    out = jnp.swapaxes(out, -3, -2)
    return (
        jnp.einsum("...hd,hdo->...o", out, layer.out.kernel.get_value())
        + layer.out.bias.get_value()
    )


@pytest.mark.parametrize("causal", [False, True])
def test_layer_output_equals_core_function(causal):
    layer = FavorAttention(4, 32, seed=0, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    x = _x((3, 21, 32), dtype=jnp.float64)
    y = x if causal else _x((3, 17, 32), seed=1, dtype=jnp.float64)
    keep = np.ones((3, 1, y.shape[-2]), dtype=bool)
    keep[0, :, -5:] = False
    mask = jnp.asarray(keep)[:, :, None, :]  # (batch, 1, 1, S), the nnx convention
    out = layer(x, y, mask=mask, is_causal=causal)
    expected = _manual(layer, x, y, causal, jnp.asarray(keep))
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_state_round_trip_keeps_outputs_identical():
    layer = FavorAttention(3, 24, causal=True, rngs=nnx.Rngs(1))
    x = _x((2, 13, 24))
    before = layer(x)
    state = jax.tree.map(np.asarray, nnx.state(layer))  # to host, as a checkpoint would
    other = FavorAttention(3, 24, causal=True, rngs=nnx.Rngs(2))
    assert not np.array_equal(_projection(other), _projection(layer))
    nnx.update(other, jax.tree.map(jnp.asarray, state))
    np.testing.assert_array_equal(other(x), before)
    assert "projection" in nnx.state(layer, FeatureProjection)
    assert "projection" not in nnx.state(layer, nnx.Param)


def test_seeded_projection_is_the_host_draw_and_keys_are_reproducible():
    layer = FavorAttention(2, 16, num_features=40, seed=7, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_projection(layer), fp.draw_projection(40, 8, seed=7), rtol=1e-6)
    a = FavorAttention(2, 16, rngs=nnx.Rngs(5))
    b = FavorAttention(2, 16, rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(_projection(a), _projection(b))


def test_training_never_redraws_and_redraws_happen_when_asked():
    layer = FavorAttention(2, 16, causal=True, rngs=nnx.Rngs(0))
    first = _projection(layer)
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    x = _x((2, 9, 16))

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(3):
        step(layer, optimizer, x)
    np.testing.assert_array_equal(_projection(layer), first)  # not a trained parameter
    layer.redraw_projection(jax.random.key(3))
    redrawn = _projection(layer)
    assert not np.array_equal(redrawn, first)
    layer.redraw_projection(jax.random.key(3))
    np.testing.assert_array_equal(_projection(layer), redrawn)  # same key, same draw
    step(layer, optimizer, x)  # the jitted step picks the new projection up
    model = nnx.List([layer, FavorAttention(4, 16, rngs=nnx.Rngs(1))])
    assert redraw_projections(model, jax.random.key(4)) == 2
    assert not np.array_equal(_projection(layer), redrawn)


def test_gradients_reach_input_and_output_projections():
    layer = FavorAttention(2, 16, causal=True, rngs=nnx.Rngs(0))
    x = _x((2, 12, 16))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    leaves = nnx.to_flat_state(grads)
    names = {"/".join(map(str, path)) for path, _ in leaves}
    for mod in ("query", "key", "value", "out"):
        assert f"{mod}/kernel" in names
    for path, var in leaves:
        g = np.asarray(var.get_value())
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, path
    assert "projection" not in names


def test_bfloat16_computation_is_finite_and_close_to_float32():
    layer = FavorAttention(4, 64, causal=True, rngs=nnx.Rngs(0))
    low_layer = FavorAttention(4, 64, causal=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = _x((2, 128, 64), scale=1.0)
    ref = layer(x)
    low = low_layer(x.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(low)))
    # bfloat16 keeps 8 significant bits (unit roundoff 2**-8): the in- and output
    # projections round their inputs and results, the attention runs in float32, so
    # the relative error is a few roundoffs; 8 * 2**-8 bounds it.
    rel = float(jnp.linalg.norm(low.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert rel < 8 * 2.0**-8, rel


def test_loads_multihead_attention_parameters():
    mha = nnx.MultiHeadAttention(4, 32, rngs=nnx.Rngs(0), decode=False)
    layer = FavorAttention(4, 32, num_features=2048, rngs=nnx.Rngs(1))
    nnx.update(layer, nnx.state(mha, nnx.Param))
    # Small inputs: the FAVOR+ estimate is close to exact attention; a transposed or
    # misplaced weight would give an error of order 1. The estimator's accuracy is
    # tested statistically in test_attention.py.
    x = _x((2, 64, 32), scale=0.3)
    ref = mha(x)
    assert float(jnp.linalg.norm(layer(x) - ref) / jnp.linalg.norm(ref)) < 0.05


def test_errors_name_the_argument():
    layer = FavorAttention(2, 16, rngs=nnx.Rngs(0))
    x = _x((2, 5, 16))
    with pytest.raises(ValueError, match="linear time"):
        layer(x, mask=jnp.eye(5, dtype=bool)[None, None])
    with pytest.raises(ValueError, match="mask must broadcast"):
        layer(x, mask=jnp.ones((2, 1, 1, 4)))
    with pytest.raises(ValueError, match="divisible"):
        FavorAttention(3, 16, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="key"):
        layer.redraw_projection("seed")
    with pytest.raises(TypeError, match=r"key.*bool"):
        layer.redraw_projection(True)
    with pytest.raises(ValueError, match="key must be a non-negative int; got -1"):
        layer.redraw_projection(-1)
    with pytest.raises(TypeError, match="is_causal must be a bool; got str"):
        layer(x, is_causal="False")

    @jax.jit
    def inside(key):
        layer.redraw_projection(key)
        return key

    with pytest.raises(TypeError, match="outside"):
        inside(jax.random.key(0))
