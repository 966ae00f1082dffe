"""Bidirectional FAVOR+ and exact attention on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_api_compat import device as device_of
from hypothesis import given
from hypothesis import strategies as st

import favorplus as fp

from . import reference as ref
from .strategies import problems

KERNELS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu"]


def run(b, p, *, kernel="softmax", causal=False, dtype="float64", **kw):
    w = fp.draw_projection(p.num_features, p.d, seed=p.seed)
    mask = None if p.key_mask is None else b.asarray(p.key_mask)
    out = fp.favor_attention(
        b.asarray(p.q, dtype),
        b.asarray(p.k, dtype),
        b.asarray(p.v, dtype),
        b.asarray(w, dtype),
        kernel=kernel,
        causal=causal,
        key_mask=mask,
        **kw,
    )
    return out, w


def expected(p, w, kernel, causal=False):
    scale = 1 / math.sqrt(p.d)
    fq = ref.features(p.q, w, kernel, scale)
    fk = ref.features(p.k, w, kernel, scale)
    return ref.quadratic_attention(fq, fk, p.v, key_mask=p.key_mask, causal=causal)


def close(got, want, rtol, scale=None):
    """|got - want| <= rtol * max(1, max|want|) elementwise."""
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0))) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic", "relu"])
@given(p=problems())
def test_equals_quadratic_form(xp, kernel, p):
    out, w = run(xp, p, kernel=kernel)
    close(xp.numpy(out), expected(p, w, kernel), 1e-9)


@given(p=problems(max_norm=0.8))
def test_trig_equals_quadratic_form(xp, p):
    # The trigonometric normaliser can be near zero: compare where it is not.
    out, w = run(xp, p, kernel="softmax_trig")
    fq = ref.features(p.q, w, "softmax_trig", 1 / math.sqrt(p.d))
    fk = ref.features(p.k, w, "softmax_trig", 1 / math.sqrt(p.d))
    a = fq @ np.swapaxes(fk, -1, -2)
    if p.key_mask is not None:
        a = np.where(p.key_mask[..., None, :], a, 0.0)
    den = np.abs(a.sum(-1))
    keep = den > 1e-3 * np.abs(a).sum(-1)
    got, want = xp.numpy(out), expected(p, w, "softmax_trig")
    got, want = np.broadcast_arrays(got, want)
    keep = np.broadcast_to(keep[..., None], got.shape)
    scale = np.abs(a).sum(-1, keepdims=True) / np.maximum(den[..., None], 1e-300)
    tol = 1e-9 * np.maximum(1.0, np.broadcast_to(scale, got.shape) * np.abs(p.v).max())
    assert np.all(np.abs(got - want)[keep] <= tol[keep])


@given(p=problems())
def test_float32_close_to_float64(xp, p):
    out32, w = run(xp, p, dtype="float32")
    out64, _ = run(xp, p, dtype="float64")
    assert out32.dtype == xp.dtype("float32")
    close(xp.numpy(out32), xp.numpy(out64), 2e-5 * max(1, p.num_features**0.5))


@given(p=problems(max_len=12), kernel=st.sampled_from(KERNELS))
def test_backend_agreement_with_numpy(xp, p, kernel):
    """Same seed and inputs: the same result as NumPy, in the caller's kind of array."""
    out, w = run(xp, p, kernel=kernel)
    mask = p.key_mask
    want = fp.favor_attention(p.q, p.k, p.v, w, kernel=kernel, key_mask=mask)
    assert type(out).__module__.split(".")[0] == type(xp.asarray(p.q)).__module__.split(".")[0]
    assert device_of(out) == device_of(xp.asarray(p.q))
    assert out.dtype == xp.dtype("float64")
    close(xp.numpy(out), want, 1e-10 if kernel != "softmax_trig" else 1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
def test_output_dtype_device_namespace(xp, dtype, causal):
    rng = np.random.default_rng(0)
    q, k, v = (xp.asarray(rng.standard_normal((2, 9, 4)), dtype) for _ in range(3))
    w = fp.draw_projection(16, 4, seed=0, like=q)
    out = fp.favor_attention(q, k, v, w, causal=causal)
    assert type(out) is type(v) and out.dtype == v.dtype and device_of(out) == device_of(v)
    assert out.shape == (2, 9, 4)
    exact = fp.softmax_attention(q, k, v, causal=causal)
    assert type(exact) is type(v) and exact.dtype == v.dtype and device_of(exact) == device_of(v)


@pytest.mark.parametrize("kernel", KERNELS)
@given(p=problems(with_mask=True), junk=st.sampled_from([1e30, -1e30, np.inf, np.nan, 0.0]))
def test_masked_keys_have_no_effect(xp, kernel, p, junk):
    out, w = run(xp, p, kernel=kernel)
    shape = np.broadcast_shapes(p.key_mask.shape, p.k.shape[:-1], p.v.shape[:-1])
    mask = np.broadcast_to(p.key_mask, shape)
    k2 = np.where(mask[..., None], np.broadcast_to(p.k, (*shape, p.d)), junk)
    v2 = np.where(mask[..., None], np.broadcast_to(p.v, (*shape, p.v.shape[-1])), -junk)
    p2 = type(p)(p.q, k2, v2, p.key_mask, p.num_features, p.seed)
    out2, _ = run(xp, p2, kernel=kernel)
    np.testing.assert_allclose(
        xp.numpy(out2), np.broadcast_to(xp.numpy(out), out2.shape), rtol=1e-12, atol=1e-12
    )


def test_fully_masked_rows_are_zero(xp):
    rng = np.random.default_rng(1)
    q, k, v = (xp.asarray(rng.standard_normal((2, 5, 3))) for _ in range(3))
    mask = xp.asarray(np.array([[False] * 5, [True, False, True, False, False]]))
    w = xp.asarray(fp.draw_projection(8, 3, seed=0))
    out = xp.numpy(fp.favor_attention(q, k, v, w, key_mask=mask))
    assert np.all(out[0] == 0) and np.all(np.isfinite(out))
    exact = xp.numpy(fp.softmax_attention(q, k, v, key_mask=mask))
    assert np.all(exact[0] == 0)


@pytest.mark.parametrize(("lq", "lk"), [(0, 0), (0, 4), (3, 0)])
def test_empty_sequences(xp, lq, lk):
    # No query: an empty output. No key: every row has no key to attend to, so 0, as
    # for fully masked rows. Batch shapes broadcast as usual (the mask adds one).
    rng = np.random.default_rng(2)
    q = xp.asarray(rng.standard_normal((1, 2, lq, 3)))
    k = xp.asarray(rng.standard_normal((2, 1, lk, 3)))
    v = xp.asarray(rng.standard_normal((1, 1, lk, 5)), "float32")
    mask = xp.asarray(np.ones((3, 1, 1, lk), dtype=bool))
    w = xp.asarray(fp.draw_projection(8, 3, seed=0))
    for causal in (False, True) if lq == lk else (False,):
        for kernel in KERNELS:
            out = fp.favor_attention(q, k, v, w, kernel=kernel, causal=causal, key_mask=mask)
            assert tuple(out.shape) == (3, 2, 2, lq, 5) and out.dtype == v.dtype
            assert np.all(xp.numpy(out) == 0)
        exact = fp.softmax_attention(q, k, v, causal=causal, key_mask=mask)
        assert tuple(exact.shape) == (3, 2, 2, lq, 5) and np.all(xp.numpy(exact) == 0)
    matrix = fp.favor_attention_matrix(q, k, w, key_mask=mask)
    assert tuple(matrix.shape) == (3, 2, 2, lq, lk)


@given(p=problems(max_norm=3.0))
def test_softmax_attention_matches_reference(xp, p):
    mask = None if p.key_mask is None else xp.asarray(p.key_mask)
    for causal in (False, True):
        if causal and p.q.shape[-2] != p.k.shape[-2]:
            continue
        out = fp.softmax_attention(
            xp.asarray(p.q), xp.asarray(p.k), xp.asarray(p.v), key_mask=mask, causal=causal
        )
        want = ref.exact_attention(p.q, p.k, p.v, key_mask=p.key_mask, causal=causal)
        close(xp.numpy(out), want, 1e-12)


@given(p=problems(), kernel=st.sampled_from(["softmax", "softmax_hyperbolic", "relu"]))
def test_attention_matrix_is_the_implicit_matrix(xp, p, kernel):
    w = fp.draw_projection(p.num_features, p.d, seed=p.seed)
    mask = None if p.key_mask is None else xp.asarray(p.key_mask)
    a = fp.favor_attention_matrix(
        xp.asarray(p.q), xp.asarray(p.k), xp.asarray(w), kernel=kernel, key_mask=mask
    )
    out, _ = run(xp, p, kernel=kernel)
    v = p.v if p.key_mask is None else np.where(p.key_mask[..., None], p.v, 0)
    close(xp.numpy(a) @ v, xp.numpy(out), 1e-9)
    rows = xp.numpy(a).sum(-1)
    assert np.all((np.abs(rows - 1) < 1e-9) | (rows == 0))


def test_generalized_kernels(xp):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((3, 7, 5)) for _ in range(3))
    w = fp.draw_projection(11, 5, seed=2)
    scale = 1 / math.sqrt(5)

    def elu1(u):
        return xp.xp.where(u > 0, u + 1.0, xp.xp.exp(xp.xp.minimum(u, 0.0)))

    got = fp.favor_attention(
        xp.asarray(q), xp.asarray(k), xp.asarray(v), xp.asarray(w), kernel=elu1
    )
    u = lambda x: (x * math.sqrt(scale)) @ w.T  # noqa: E731
    f = lambda t: np.where(t > 0, t + 1, np.exp(np.minimum(t, 0)))  # noqa: E731
    close(xp.numpy(got), ref.quadratic_attention(f(u(q)), f(u(k)), v), 1e-10)
    det = fp.favor_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), None, kernel="relu")
    fq, fk = ref.features(q, None, "relu", scale), ref.features(k, None, "relu", scale)
    close(xp.numpy(det), ref.quadratic_attention(fq, fk, v), 1e-10)


def test_error_shrinks_like_inverse_sqrt_m_and_orthogonal_beats_iid(xp):
    """Convergence to exact attention on moderate inputs (L = 64, d = 16, |x'| ~ 0.6).

    Mean relative error over 12 seeds at m = 16 and m = 1024: the ratio should be
    about sqrt(64) = 8 for an O(1/sqrt(m)) error; we require 4 to 16. Orthogonal
    features must beat iid on average at every m.
    """
    rng = np.random.default_rng(11)
    L, d = 64, 16
    q, k = (rng.standard_normal((2, L, d)) * 0.3 for _ in range(2))
    v = rng.standard_normal((2, L, d))
    exact = ref.exact_attention(q, k, v)
    qb, kb, vb = xp.asarray(q), xp.asarray(k), xp.asarray(v)
    errors = {}
    for kind in ("iid", "orthogonal"):
        for m in (16, 64, 256, 1024):
            e = []
            for seed in range(12):
                w = fp.draw_projection(m, d, kind=kind, seed=1000 * m + seed, like=qb)
                out = xp.numpy(fp.favor_attention(qb, kb, vb, w))
                e.append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
            errors[kind, m] = float(np.mean(e))
    ratio = errors["iid", 16] / errors["iid", 1024]
    assert 4 < ratio < 16, errors
    slope = np.polyfit(
        np.log([16, 64, 256, 1024]), np.log([errors["iid", m] for m in (16, 64, 256, 1024)]), 1
    )[0]
    assert -0.65 < slope < -0.35, (slope, errors)
    for m in (16, 64, 256, 1024):
        assert errors["orthogonal", m] < errors["iid", m], errors


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic"])
@given(data=st.data())
def test_float32_large_norms_finite_and_accurate(xp, causal, kernel, data):
    """No inf or NaN for finite float32 inputs with scaled norms up to 10 (and far beyond).

    Compared with the same estimator in float64 (same features): the float32 error
    is rounding only. Adversarial layouts: antiparallel queries and keys, one huge key.
    """
    d = data.draw(st.sampled_from([4, 16, 64]))
    L = data.draw(st.integers(1, 40))
    norm = data.draw(st.sampled_from([1.0, 5.0, 10.0, 30.0]))
    layout = data.draw(st.sampled_from(["random", "antiparallel", "one_huge_key"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(rng.standard_normal((2, L, d)))
    k = unit(rng.standard_normal((2, L, d)))
    if layout == "antiparallel":
        k = -q
    q, k = q * norm * d**0.25, k * norm * d**0.25
    if layout == "one_huge_key":
        k[:, L // 2] *= 1e3
    v = rng.standard_normal((2, L, 3))
    w = fp.draw_projection(64, d, seed=5)
    out32 = fp.favor_attention(
        xp.asarray(q, "float32"),
        xp.asarray(k, "float32"),
        xp.asarray(v, "float32"),
        xp.asarray(w, "float32"),
        kernel=kernel,
        causal=causal,
    )
    o32 = xp.numpy(out32)
    assert np.all(np.isfinite(o32))
    if norm <= 10 and layout != "one_huge_key":
        # The same estimator in float64 on the same (rounded) inputs: only rounding differs.
        q32, k32 = (a.astype(np.float32).astype(np.float64) for a in (q, k))
        w32 = w.astype(np.float32).astype(np.float64)
        v32 = v.astype(np.float32).astype(np.float64)
        o64 = fp.favor_attention(q32, k32, v32, w32, kernel=kernel, causal=causal)
        # exp turns the float32 rounding of W x' (|W x'| up to ~ |w| |x'| ~ norm sqrt(d))
        # into a relative error of about norm sqrt(d) * 2**-24 per feature.
        tol = 2e-6 * max(1.0, norm * math.sqrt(d))
        close(o32, o64, tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_half_inputs_compute_in_float32(xp, dtype, causal):
    """Norms at which exp overflows float16 (|x'|^2 / 2 > 11): finite, close to float32."""
    rng = np.random.default_rng(4)
    L, d = 33, 16
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(rng.standard_normal((2, L, d))) * 6 * d**0.25
    k = unit(rng.standard_normal((2, L, d))) * 6 * d**0.25
    v = rng.standard_normal((2, L, 4))
    w = fp.draw_projection(32, d, seed=1)
    half = [xp.asarray(a, dtype) for a in (q, k, v, w)]
    out = fp.favor_attention(*half, causal=causal)
    assert out.dtype == xp.dtype(dtype)
    got = xp.numpy(out)
    assert np.all(np.isfinite(got))
    back = [xp.numpy(a) for a in half]  # the same rounded inputs, in float64
    want = fp.favor_attention(*back, causal=causal)
    eps = {"float16": 2**-10, "bfloat16": 2**-7}[dtype]
    close(got, want, 4 * eps)


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic", "relu"])
@given(p=problems(max_len=40), tokens=st.integers(1, 7))
def test_cpu_blocks_equal_one_pass(xp, kernel, p, tokens):
    """On a CPU long inputs run in blocks (running key maximum, rescaled state): same result."""
    import favorplus._backend.blocking as backend

    one, w = run(xp, p, kernel=kernel)
    batch = np.broadcast_shapes(p.q.shape[:-2], p.k.shape[:-2], p.v.shape[:-2])
    if p.key_mask is not None:
        batch = np.broadcast_shapes(batch, p.key_mask.shape[:-1])
    features = (2 if kernel == "softmax_hyperbolic" else 1) * p.num_features
    saved = backend.BLOCK_NUMBERS
    backend.BLOCK_NUMBERS = tokens * max(1, int(np.prod(batch))) * features
    try:
        many, _ = run(xp, p, kernel=kernel)
    finally:
        backend.BLOCK_NUMBERS = saved
    close(xp.numpy(many), xp.numpy(one), 1e-10)
    close(xp.numpy(many), expected(p, w, kernel), 1e-9)
