"""The scanned forms of traced JAX programs on a CPU (one ``lax.scan`` over chunks or
blocks): the same results as NumPy, gradients as torch's, no leak, a program whose size
does not grow with the length.

The other test files run these forms too (every JAX call is a jitted program), but on
short sequences: the bidirectional form scans only beyond 2 x 256 tokens, so the lengths
here are longer than the suite's usual ones (few distinct shapes: each one compiles).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import favorplus as fp
from favorplus import attention, causal

jax = pytest.importorskip("jax")
jnp = jax.numpy

if jax.default_backend() != "cpu":  # pragma: no cover - GPU machines
    pytest.skip("the scanned forms are the CPU forms", allow_module_level=True)

D, M = 8, 16
L_BI = 2 * attention.SCANNED_BLOCK + 300  # a first block, a scan of two, a shorter last one


def _inputs(length: int, seed: int = 0, heads: int = 2) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((heads, length, D)) * 0.5 for _ in range(2))
    v = rng.standard_normal((heads, length, D))
    return q, k, v


def _proj() -> np.ndarray:
    return fp.draw_projection(M, D, seed=3)


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("causal_flag", [False, True])
def test_matches_numpy_with_masks_and_biases(causal_flag):
    """Long sequences (several chunks or blocks, a shorter last one), a boolean key mask
    with a fully masked stretch, and per-key biases: float64 JAX equals float64 NumPy."""
    q, k, v = _inputs(L_BI)
    w = _proj()
    mask = np.ones((2, L_BI), dtype=bool)
    mask[0, 100:400] = False  # more than a whole block masked
    mask[1, ::3] = False
    bias = np.where(mask, np.linspace(-2.0, 1.0, L_BI), -np.inf)
    for key_mask in (mask, bias):
        want = fp.favor_attention(q, k, v, w, causal=causal_flag, key_mask=key_mask)
        got = fp.favor_attention(
            *(jnp.asarray(a) for a in (q, k, v, w)),
            causal=causal_flag,
            key_mask=jnp.asarray(key_mask),
        )
        _close(got, want, 1e-10)


@pytest.mark.parametrize("causal_flag", [False, True])
def test_gradients_match_torch(causal_flag):
    """jax.grad through the scans equals torch autograd of the eager path (float64)."""
    torch = pytest.importorskip("torch")
    length = L_BI if not causal_flag else 3 * causal.SCANNED_CHUNK + 10
    q, k, v = _inputs(length, seed=1)
    w = _proj()
    g = np.random.default_rng(2).standard_normal((2, length, D))

    def loss(q, k, v):
        out = fp.favor_attention(q, k, v, jnp.asarray(w), causal=causal_flag)
        return jnp.sum(out * jnp.asarray(g))

    got = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(a) for a in (q, k, v)))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out = fp.favor_attention(tq, tk, tv, torch.tensor(w), causal=causal_flag)
    (out * torch.tensor(g)).sum().backward()
    for a, t in zip(got, (tq, tk, tv)):
        _close(a, t.grad.numpy(), 1e-9)


@pytest.mark.parametrize("future", ["huge_keys", "inf_values", "nan_keys", "huge_queries"])
def test_no_leak_bit_for_bit(future):
    """float32 outputs before position t are the same bits whatever comes at t and later
    (within t's chunk and in later chunks)."""
    length = 3 * causal.SCANNED_CHUNK + 20
    t = causal.SCANNED_CHUNK + 17  # inside the second chunk
    q, k, v = (a.astype(np.float32) for a in _inputs(length, seed=4))
    w = _proj().astype(np.float32)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    if future == "huge_keys":
        k2[:, t:] = 1e30
    elif future == "inf_values":
        v2[:, t:] = np.inf
        v2[1, t + 1 :] = -np.inf
    elif future == "nan_keys":
        k2[:, t:] = np.nan
    else:
        q2[:, t:] = 1e30
    a = fp.favor_attention(*(jnp.asarray(x) for x in (q, k, v, w)), causal=True)
    b = fp.favor_attention(*(jnp.asarray(x) for x in (q2, k2, v2, w)), causal=True)
    a, b = np.asarray(a)[:, :t], np.asarray(b)[:, :t]
    assert np.all(np.isfinite(a))
    assert a.tobytes() == b.tobytes()


def _instructions(fn, length: int) -> int:
    q, k, v = (jnp.zeros((2, length, D), jnp.float32) for _ in range(3))
    w = jnp.zeros((M, D), jnp.float32)
    text = jax.jit(fn).lower(q, k, v, w).compile().as_text()
    return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", text, flags=re.M))


@pytest.mark.parametrize("causal_flag", [False, True])
def test_program_size_does_not_grow_with_length(causal_flag):
    """The compiled program has as many instructions at 4x the length (one scan)."""

    def fn(q, k, v, w):
        return fp.favor_attention(q, k, v, w, causal=causal_flag)

    step = attention.SCANNED_BLOCK if not causal_flag else causal.SCANNED_CHUNK
    short, long = 3 * step + 5, 12 * step + 5
    assert _instructions(fn, short) == _instructions(fn, long)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_compute_in_float32(dtype):
    """Half-precision inputs give the float32 result rounded to their dtype."""
    length = 2 * causal.SCANNED_CHUNK + 9
    q, k, v = (a * 3.0 for a in _inputs(length, seed=5))  # exp(|x|^2 / 2) would overflow fp16
    w = _proj()
    half = [jnp.asarray(a, dtype=dtype) for a in (q, k, v, w)]
    full = [a.astype(jnp.float32) for a in half]
    for flag in (False, True):
        got = fp.favor_attention(*half, causal=flag)
        assert got.dtype == jnp.dtype(dtype)
        want = fp.favor_attention(*full, causal=flag).astype(dtype)
        assert np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("kernel", ["softmax_hyperbolic", "softmax_trig", "relu"])
def test_bidirectional_kernels_match_numpy(kernel):
    """The other kernels' key passes (shared or no log-features) across several blocks."""
    q, k, v = _inputs(L_BI, seed=6, heads=1)
    w = _proj()
    want = fp.favor_attention(q, k, v, w, kernel=kernel)
    got = fp.favor_attention(*(jnp.asarray(a) for a in (q, k, v, w)), kernel=kernel)
    _close(got, want, 1e-9)
