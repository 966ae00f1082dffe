"""Masks as libraries pass them, per-key biases, bottom-right causal and key dropout."""

from __future__ import annotations

import math

import numpy as np
import pytest

import favorplus as fp

from . import reference as ref

KERNELS = ["softmax", "softmax_hyperbolic", "relu"]


def _inputs(rng, batch=(2, 3), lq=12, lk=12, d=8, dv=5, norm=0.4):
    q = rng.standard_normal((*batch, lq, d)) * norm
    k = rng.standard_normal((*batch, lk, d)) * norm
    v = rng.standard_normal((*batch, lk, dv))
    return q, k, v


def _favor_reference(q, k, v, w, kernel, *, keep=None, bias=None, causal=False):
    """The same estimator from the definitions: phi(k_j) multiplied by exp(b_j),
    masked keys removed, causal with the queries at the last positions."""
    scale = 1 / math.sqrt(q.shape[-1])
    fq = ref.features(q, w, kernel, scale)
    fk = ref.features(k, w, kernel, scale)
    if bias is not None:
        fk = fk * np.exp(bias)[..., None]
    a = fq @ np.swapaxes(fk, -1, -2)
    lq, lk = q.shape[-2], k.shape[-2]
    allowed = np.ones((lq, lk), dtype=bool)
    if causal:
        allowed = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq)
    if keep is not None:
        allowed = allowed & keep[..., None, :]
    a = np.where(allowed, a, 0.0)
    den = a.sum(-1, keepdims=True)
    return np.where(den == 0, 0.0, (a @ v) / np.where(den == 0, 1.0, den))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_full_masks_are_recognised(xp, kernel, causal):
    """A full (B, 1, Lq, Lk) mask that is key padding (and causal) gives the result of
    key_mask (and causal=True), bool and additive float alike, against the reference."""
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng)
    w = fp.draw_projection(32, 8, seed=2)
    keep = rng.random((2, 1, 12)) > 0.3
    keep[..., -1] = True
    pattern = np.broadcast_to(keep[..., None, :], (2, 1, 12, 12)).copy()
    if causal:
        pattern = pattern & np.tril(np.ones((12, 12), dtype=bool))
    expected = _favor_reference(q, k, v, w, kernel, keep=keep, causal=causal)
    args = [xp.asarray(a) for a in (q, k, v, w)]
    for mask in (pattern, np.where(pattern, 0.0, -np.inf)):
        out = fp.favor_attention(*args, kernel=kernel, attn_mask=xp.asarray(mask))
        np.testing.assert_allclose(xp.numpy(out), expected, rtol=1e-9, atol=1e-12)


def test_key_masks_of_every_form(xp):
    """bool / float key_mask (..., Lk), and attn_mask (..., 1, Lk) or (Lk,)."""
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng)
    w = fp.draw_projection(32, 8, seed=4)
    keep = rng.random((2, 1, 12)) > 0.4
    expected = _favor_reference(q, k, v, w, "softmax", keep=keep)
    args = [xp.asarray(a) for a in (q, k, v, w)]
    additive = np.where(keep, 0.0, -np.inf)
    for kw in (
        {"key_mask": keep},
        {"key_mask": additive},
        {"attn_mask": keep[..., None, :]},
        {"attn_mask": additive[..., None, :]},
    ):
        out = fp.favor_attention(*args, **{n: xp.asarray(m) for n, m in kw.items()})
        np.testing.assert_allclose(xp.numpy(out), expected, rtol=1e-9, atol=1e-12)
    one = keep[0, 0]
    out = fp.favor_attention(*args, attn_mask=xp.asarray(one))
    ref_one = _favor_reference(q, k, v, w, "softmax", keep=one)
    np.testing.assert_allclose(xp.numpy(out), ref_one, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_per_key_bias_is_exact(xp, causal):
    """A finite additive per-key bias b_j multiplies key j's features by exp(b_j);
    combined with -inf entries (masked keys). Large biases do not overflow."""
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng)
    w = fp.draw_projection(32, 8, seed=6)
    bias = rng.standard_normal((2, 1, 12)) * 3
    bias[..., 0] = 300.0  # exp(300) overflows nothing: it goes into the stabilizer
    keep = rng.random((2, 1, 12)) > 0.3
    keep[..., 0] = True  # every causal row has a key (the reference below needs one)
    additive = np.where(keep, bias, -np.inf)
    expected = _favor_reference(q, k, v, w, "softmax", keep=keep, bias=bias, causal=causal)
    args = [xp.asarray(a) for a in (q, k, v, w)]
    out = fp.favor_attention(*args, key_mask=xp.asarray(additive), causal=causal)
    np.testing.assert_allclose(xp.numpy(out), expected, rtol=1e-8, atol=1e-12)
    full = np.broadcast_to(additive[..., None, :], (2, 1, 12, 12))
    if causal:
        full = np.where(np.tril(np.ones((12, 12), dtype=bool)), full, -np.inf)
    out = fp.favor_attention(*args, attn_mask=xp.asarray(np.ascontiguousarray(full)))
    np.testing.assert_allclose(xp.numpy(out), expected, rtol=1e-8, atol=1e-12)
    exact = fp.softmax_attention(*args[:3], key_mask=xp.asarray(additive), causal=causal)
    s = (q @ np.swapaxes(k, -1, -2)) / math.sqrt(8) + np.where(keep, bias, -np.inf)[..., None, :]
    if causal:
        s = np.where(np.tril(np.ones((12, 12), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(xp.numpy(exact), (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-9)


@pytest.mark.parametrize("lq", [1, 5, 11])
def test_causal_with_fewer_queries_than_keys(xp, lq):
    """Queries are the last Lq positions: the last rows of the full causal call, for
    FAVOR+, its implicit matrix and exact attention; key masks in the prefix count."""
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, lq=12)
    w = fp.draw_projection(32, 8, seed=8)
    keep = rng.random((2, 1, 12)) > 0.3
    a = [xp.asarray(x) for x in (q, k, v, w)]
    m = xp.asarray(keep)
    full = xp.numpy(fp.favor_attention(*a, causal=True, key_mask=m, chunk_size=4))
    tail = fp.favor_attention(
        xp.asarray(q[..., -lq:, :]), *a[1:], causal=True, key_mask=m, chunk_size=4
    )
    np.testing.assert_allclose(xp.numpy(tail), full[..., -lq:, :], rtol=1e-9, atol=1e-12)
    expected = _favor_reference(q[..., -lq:, :], k, v, w, "softmax", keep=keep, causal=True)
    np.testing.assert_allclose(xp.numpy(tail), expected, rtol=1e-9, atol=1e-12)
    matrix = fp.favor_attention_matrix(xp.asarray(q[..., -lq:, :]), a[1], a[3], causal=True)
    np.testing.assert_allclose(
        xp.numpy(matrix) @ v,
        _favor_reference(q[..., -lq:, :], k, v, w, "softmax", causal=True),
        rtol=1e-9,
        atol=1e-12,
    )
    exact = fp.softmax_attention(xp.asarray(q[..., -lq:, :]), *a[1:3], causal=True, key_mask=m)
    exact_full = ref.exact_attention(q, k, v, key_mask=keep, causal=True)
    np.testing.assert_allclose(xp.numpy(exact), exact_full[..., -lq:, :], rtol=1e-9, atol=1e-12)
    # The bottom-right causal mask as a full mask says the same.
    br = np.arange(12)[None, :] <= np.arange(lq)[:, None] + (12 - lq)
    out = fp.favor_attention(
        xp.asarray(q[..., -lq:, :]), *a[1:], attn_mask=xp.asarray(br & keep[..., None, :])
    )
    np.testing.assert_allclose(xp.numpy(out), full[..., -lq:, :], rtol=1e-9, atol=1e-12)


def test_fewer_queries_non_finite_values_stay_in_their_rows(xp):
    """Exact causal attention with Lq < Lk: a later inf / NaN value reaches the rows at
    or after its position only, aligned bottom-right (the last rows of the full call)."""
    rng = np.random.default_rng(17)
    q, k, v = (rng.standard_normal((2, 12, 4)) for _ in range(3))
    v[:, 3, 0] = np.inf
    v[:, 8, 1] = np.nan
    a = [xp.asarray(x) for x in (q, k, v)]
    full = ref.exact_attention(q, k, v, causal=True)
    for lq in (1, 5, 11):
        tail = xp.numpy(fp.softmax_attention(xp.asarray(q[:, -lq:]), *a[1:], causal=True))
        np.testing.assert_array_equal(np.isnan(tail), np.isnan(full[:, -lq:]))
        np.testing.assert_allclose(tail, full[:, -lq:], rtol=1e-9, equal_nan=True)


def test_more_queries_than_keys_causal_is_an_error(xp):
    q = xp.asarray(np.zeros((6, 4)))
    k = xp.asarray(np.zeros((5, 4)))
    w = xp.asarray(fp.draw_projection(4, 4, seed=0))
    with pytest.raises(ValueError, match="causal attention needs at most as many queries"):
        fp.favor_attention(q, k, k, w, causal=True)
    with pytest.raises(ValueError, match="causal attention needs at most as many queries"):
        fp.softmax_attention(q, k, k, causal=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_minimum_drops_keys_like_minus_inf(xp, dtype):
    """Hugging Face writes "masked" as finfo(dtype).min: the same as -inf, in key masks and
    full causal masks (a bias of finfo.min would add exp(-3e38) = 0 anyway)."""
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng)
    keep = rng.random((2, 1, 12)) > 0.3
    low = np.finfo(dtype).min
    tri = np.tril(np.ones((12, 12), dtype=bool))
    args = [xp.asarray(a, dtype=dtype) for a in (q, k, v, fp.draw_projection(16, 8, seed=1))]
    for kw, expect in (
        ({"key_mask": np.where(keep, 0.0, low)}, {"key_mask": keep}),
        (
            {"attn_mask": np.where(tri & keep[..., None, :], 0.0, low)},
            {"causal": True, "key_mask": keep},
        ),
    ):
        got = fp.favor_attention(*args, **{n: xp.asarray(m, dtype=dtype) for n, m in kw.items()})
        want = fp.favor_attention(
            *args, **{n: xp.asarray(m) if n != "causal" else m for n, m in expect.items()}
        )
        assert np.all(np.isfinite(xp.numpy(got)))
        np.testing.assert_array_equal(xp.numpy(got), xp.numpy(want))


def test_large_finite_negatives_in_a_causal_pattern_are_refused_with_the_fix(xp):
    """-1e9 above the diagonal is a bias of -1e9 for the earlier queries only (not the
    dtype's minimum): refused, saying to write -inf; a relative-position bias is named as
    such."""
    rng = np.random.default_rng(6)
    a = [xp.asarray(x) for x in (*_inputs(rng), fp.draw_projection(16, 8, seed=1))]
    i, j = np.arange(12)[:, None], np.arange(12)[None, :]
    with pytest.raises(ValueError, match=r"down to -1e\+09.*Write -inf"):
        fp.favor_attention(*a, attn_mask=xp.asarray(np.where(j <= i, 0.0, -1e9)))
    with pytest.raises(ValueError, match="relative-position bias"):
        fp.favor_attention(*a, attn_mask=xp.asarray(np.where(j <= i, (i - j) * -0.5, -1e9)))


@pytest.mark.parametrize(
    "pattern",
    [
        "upper",  # anti-causal
        "band",  # sliding window
        "block",  # packed sequences (block diagonal)
        "query_bias",  # a bias that differs between queries (relative positions)
        "top_left",  # causal aligned top-left with Lq < Lk (torch SDPA's is_causal)
    ],
)
def test_other_patterns_are_refused(xp, pattern):
    rng = np.random.default_rng(9)
    lq = 8 if pattern == "top_left" else 12
    q, k, v = _inputs(rng, lq=lq)
    w = fp.draw_projection(16, 8, seed=1)
    i, j = np.arange(lq)[:, None], np.arange(12)[None, :]
    mask = {
        "upper": j >= i,
        "band": np.abs(i - j) <= 2,
        "block": (i // 4) == (j // 4),
        "query_bias": np.where(j <= i, (i - j) * -0.5, -np.inf),
        "top_left": j <= i,
    }[pattern]
    a = [xp.asarray(x) for x in (q, k, v, w)]
    with pytest.raises(ValueError, match="not computable by FAVOR\\+ in linear time"):
        fp.favor_attention(*a, attn_mask=xp.asarray(mask))
    with pytest.raises(ValueError, match="not computable by FAVOR\\+ in linear time"):
        fp.favor_attention_matrix(a[0], a[1], a[3], attn_mask=xp.asarray(mask))
    # Exact attention takes any pattern: compare with the float64 reference.
    exact = fp.softmax_attention(*a[:3], attn_mask=xp.asarray(mask))
    s = (q @ np.swapaxes(k, -1, -2)) / math.sqrt(8)
    s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(xp.numpy(exact), (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-9)


def test_bad_mask_values_and_types(xp):
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng)
    a = [xp.asarray(x) for x in (q, k, v, fp.draw_projection(16, 8, seed=1))]
    nan = np.zeros(12)
    nan[3] = np.nan
    with pytest.raises(ValueError, match=r"key_mask .* finite values or -inf; got NaN"):
        fp.favor_attention(*a, key_mask=xp.asarray(nan))
    with pytest.raises(ValueError, match=r"attn_mask .* finite values or -inf; got \+inf"):
        fp.favor_attention(*a, attn_mask=xp.asarray(np.full((12, 12), np.inf)))
    for bad, what in ((np.nan, "NaN"), (np.inf, r"\+inf")):  # the exact reference too
        mask = np.zeros((12, 12))
        mask[4, 2] = bad
        with pytest.raises(ValueError, match=rf"attn_mask .* finite values or -inf; got {what}"):
            fp.softmax_attention(*a[:3], attn_mask=xp.asarray(mask))
    with pytest.raises(ValueError, match=r"attn_mask must have shape .* got shape \(5, 12\)"):
        fp.favor_attention(*a, attn_mask=xp.asarray(np.ones((5, 12), dtype=bool)))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(\.\.\., Lk\)"):
        fp.favor_attention(*a, key_mask=xp.asarray(np.ones(11, dtype=bool)))


@pytest.mark.numpy_only
def test_dropout_is_unbiased(numpy_backend):
    """Key dropout: the mean over N draws equals the undropped output within 5 of its
    standard errors. Per row i, out_i = sum_j a_ij z_j v_j with a_ij the implicit
    weights and z_j = keep_j / (1 - p) independent, Var(z_j) = p / (1 - p); so
    Var(out_i) = p / (1 - p) sum_j a_ij^2 v_j^2 and SE = sqrt(Var / N)."""
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, batch=(2,), lq=10, lk=10)
    w = fp.draw_projection(32, 8, seed=12)
    p, n = 0.3, 2000
    exp_out = fp.favor_attention(q, k, v, w)
    a = fp.favor_attention_matrix(q, k, w)
    se = np.sqrt(p / (1 - p) * (a**2 @ v**2) / n)
    gen = np.random.default_rng(13)
    draws = [fp.favor_attention(q, k, v, w, dropout_p=p, dropout_rng=gen) for _ in range(n)]
    assert np.all(np.abs(np.mean(draws, axis=0) - exp_out) < 5 * se)
    # A draw really drops: a key's values leave the numerator only.
    one = fp.favor_attention(q, k, v, w, dropout_p=p, dropout_rng=1)
    assert not np.allclose(one, exp_out)


def test_dropout_keep_masks(xp):
    """dropout_keep (drawn by the caller): dropped keys leave the numerator, kept ones
    are scaled by 1 / (1 - p), the normaliser keeps every key; NaN values of a dropped
    key do not leak; causal too."""
    rng = np.random.default_rng(14)
    q, k, v = _inputs(rng)
    v[..., 2, :] = np.nan
    w = fp.draw_projection(32, 8, seed=15)
    keep = rng.random((2, 3, 12)) > 0.5
    keep[..., 2] = False
    scale = 1 / math.sqrt(8)
    for causal in (False, True):
        fq = ref.features(q, w, "softmax", scale)
        fk = ref.features(k, w, "softmax", scale)
        a = fq @ np.swapaxes(fk, -1, -2)
        if causal:
            a = np.tril(a)
        weights = a / a.sum(-1, keepdims=True)
        expected = weights @ np.where(keep[..., None], v / (1 - 0.25), 0.0)
        out = fp.favor_attention(
            *(xp.asarray(x) for x in (q, k, v, w)),
            causal=causal,
            dropout_p=0.25,
            dropout_keep=xp.asarray(keep),
        )
        np.testing.assert_allclose(xp.numpy(out), expected, rtol=1e-9, atol=1e-12)


def test_dropout_arguments(xp):
    a = [xp.asarray(x) for x in _inputs(np.random.default_rng(0))]
    w = xp.asarray(fp.draw_projection(16, 8, seed=0))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got 1.0"):
        fp.favor_attention(*a, w, dropout_p=1.0)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        fp.favor_attention(*a, w, dropout_p="0.1")
    with pytest.raises(TypeError, match="dropout_keep must be a boolean array"):
        fp.favor_attention(*a, w, dropout_p=0.1, dropout_keep=xp.asarray(np.ones(12)))
    with pytest.raises(TypeError, match="dropout_rng must be an int"):
        fp.favor_attention(*a, w, dropout_p=0.1, dropout_rng="x")


def test_full_mask_inside_jit_is_refused():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    q = jnp.zeros((2, 6, 4))
    w = jnp.asarray(fp.draw_projection(8, 4, seed=0))
    mask = jnp.tril(jnp.ones((6, 6), dtype=bool))

    @jax.jit
    def f(q, mask):
        return fp.favor_attention(q, q, q, w, attn_mask=mask)

    with pytest.raises(ValueError, match="cannot be inspected inside a traced program"):
        f(q, mask)

    @jax.jit
    def g(q, key_mask):  # key masks work under jit
        return fp.favor_attention(q, q, q, w, key_mask=key_mask, causal=True)

    keep = jnp.asarray([True, True, False, True, True, True])
    eager = fp.favor_attention(q, q, q, w, key_mask=keep, causal=True)
    np.testing.assert_allclose(np.asarray(g(q, keep)), np.asarray(eager), rtol=1e-6)
