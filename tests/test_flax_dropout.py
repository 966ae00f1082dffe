"""favorplus.flax dropout: nnx's arguments, key dropout in linear time, unbiased."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")

import jax.numpy as jnp  # noqa: E402

from favorplus.flax import FavorAttention  # noqa: E402

F64 = jnp.float64


def _layers(rate, **kw):
    plain = FavorAttention(4, 32, num_features=32, param_dtype=F64, rngs=nnx.Rngs(0))
    drop = FavorAttention(
        4, 32, num_features=32, dropout_rate=rate, param_dtype=F64, rngs=nnx.Rngs(0), **kw
    )
    nnx.update(drop, nnx.state(plain, nnx.Param))
    drop.projection.set_value(plain.projection.get_value())
    return plain, drop


def _x(batch=2):
    return 0.5 * jax.random.normal(jax.random.key(1), (batch, 12, 32), dtype=F64)


def test_dropout_is_unbiased_and_a_no_op_when_deterministic():
    plain, drop = _layers(0.3)
    x = _x()
    expected = plain(x)
    np.testing.assert_array_equal(drop(x, deterministic=True), expected)
    graph, state = nnx.split(drop)

    @jax.jit
    def sample(key):
        return nnx.merge(graph, state)(x, deterministic=False, rngs=nnx.Rngs(dropout=key))

    n = 400
    draws = np.stack([np.asarray(sample(k)) for k in jax.random.split(jax.random.key(2), n)])
    assert draws.std(axis=0).min() > 0  # every output entry is random
    # Key dropout keeps the expectation (kept keys scaled by 1 / (1 - p), numerator
    # only). Standard error of the mean of n draws: sample std / sqrt(n); |z| < 5 on
    # each of the 768 entries (a false alarm has probability < 768 * 6e-7).
    z = (draws.mean(axis=0) - np.asarray(expected)) / (draws.std(axis=0, ddof=1) / np.sqrt(n))
    assert np.abs(z).max() < 5, np.abs(z).max()
    # and it is not the undropped output
    assert np.abs(draws[0] - np.asarray(expected)).max() > 1e-3


@pytest.mark.parametrize("broadcast", [True, False])
def test_broadcast_dropout_shares_the_pattern_across_batch_entries(broadcast):
    _, drop = _layers(0.5, broadcast_dropout=broadcast)
    x = jnp.concatenate([_x(1), _x(1)])  # two identical batch entries
    y = drop(x, deterministic=False)
    assert np.allclose(y[0], y[1]) == broadcast
    y2 = drop(x, deterministic=False)  # the layer's dropout stream advances
    assert not np.allclose(y, y2)


def test_dropout_arguments_follow_nnx():
    _, drop = _layers(0.1)
    x = _x()
    with pytest.raises(ValueError, match="deterministic"):
        drop(x)  # as nnx: dropout_rate > 0 needs deterministic somewhere
    _, keyed = _layers(0.1, keep_rngs=False, deterministic=False)
    with pytest.raises(ValueError, match="rngs"):
        keyed(x)
    a = keyed(x, rngs=nnx.Rngs(dropout=3))
    np.testing.assert_array_equal(a, keyed(x, rngs=nnx.Rngs(dropout=3)))
    eval_view = nnx.view(keyed, deterministic=True)
    np.testing.assert_array_equal(eval_view(x), _layers(0.0)[0](x))
