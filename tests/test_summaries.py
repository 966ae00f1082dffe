"""Shard summaries (favorplus.summaries): split, merged and read out == one call."""

from __future__ import annotations

import numpy as np
import pytest

import favorplus as fp

KERNELS = ("softmax", "softmax_hyperbolic", "relu")


def _inputs(seed: int = 0, length: int = 40):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 3, length, 8)) * 0.8 for _ in range(3))
    return q, k, v, fp.draw_projection(16, 8, seed=1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_merged_summaries_read_out_as_one_call(kernel: str) -> None:
    q, k, v, w = _inputs()
    mask = np.ones((2, 1, 40), dtype=bool)
    mask[0, :, 10:25] = False  # the middle chunk of batch row 0 has no key at all
    cuts = [0, 10, 25, 40]
    parts = [
        fp.key_summary(k[..., a:b, :], v[..., a:b, :], w, kernel=kernel, key_mask=mask[..., a:b])
        for a, b in zip(cuts, cuts[1:])
    ]
    tree = fp.merge_summaries(parts[0], fp.merge_summaries(parts[1], parts[2]))
    out = fp.read_summary(q, tree, w, kernel=kernel)
    ref = fp.favor_attention(q, k, v, w, kernel=kernel, key_mask=mask)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_prefix_equals_one_causal_call(kernel: str) -> None:
    q, k, v, w = _inputs(1)
    rng = np.random.default_rng(2)
    bias = np.where(rng.random((2, 1, 40)) < 0.2, -np.inf, rng.standard_normal((2, 1, 40)))
    bias[1, :, :16] = -np.inf  # the first two chunks of batch row 1 empty
    cuts = [0, 8, 16, 33, 40]
    sl = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
    states = [fp.causal_summary(k[..., s, :], v[..., s, :], w, kernel=kernel,
                                key_mask=bias[..., s]) for s in sl]  # fmt: skip
    outs = [
        fp.favor_attention_step(q[..., s, :], k[..., s, :], v[..., s, :], w, p,
                                kernel=kernel, key_mask=bias[..., s])[0]
        for s, p in zip(sl, fp.exclusive_prefix(states))
    ]  # fmt: skip
    ref = fp.favor_attention(q, k, v, w, kernel=kernel, causal=True, key_mask=bias)
    np.testing.assert_allclose(np.concatenate(outs, axis=-2), ref, rtol=1e-11, atol=1e-12)
    whole = fp.merge_causal_states(*states)
    _, final = fp.favor_attention_step(q, k, v, w, kernel=kernel, key_mask=bias)
    np.testing.assert_allclose(whole.numerator, final.numerator, rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(whole.log_scale, final.log_scale)


def test_summary_of_large_logits_does_not_overflow() -> None:
    # Keys whose log-features reach ~1e3: exp would overflow; levels keep every factor <= 1.
    q, k, v, w = _inputs(3)
    k = k * 40.0
    a = fp.key_summary(k[..., :20, :], v[..., :20, :], w)
    b = fp.key_summary(k[..., 20:, :], v[..., 20:, :], w)
    out = fp.read_summary(q, fp.merge_summaries(a, b), w)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, fp.favor_attention(q, k, v, w), rtol=1e-10, atol=1e-12)


def test_bad_summaries_are_clear_errors() -> None:
    q, k, v, w = _inputs()
    with pytest.raises(ValueError, match="at least one summary"):
        fp.merge_summaries()
    with pytest.raises(TypeError, match="must be a KeySummary"):
        fp.merge_summaries(object())
    s = fp.key_summary(k, v, w)
    with pytest.raises(
        ValueError, match=r"summary must have 8 features .* got state shape \(2, 3, 16, 9\)"
    ):
        fp.read_summary(q, s, fp.draw_projection(8, 8, seed=0))


def test_summaries_that_do_not_fit_together_are_refused_naming_them() -> None:
    _, k, v, w = _inputs()
    w8 = fp.draw_projection(8, 8, seed=0)
    s = fp.key_summary(k, v, w)
    c = fp.causal_summary(k, v, w)
    other = {  # another M, another dv, a batch that does not broadcast with (2, 3)
        "M": (fp.key_summary(k, v, w8), fp.causal_summary(k, v, w8)),
        "dv": (fp.key_summary(k, v[..., :5], w), fp.causal_summary(k, v[..., :5], w)),
        "batch": (fp.key_summary(k[:, :2], v[:, :2], w), fp.causal_summary(k[:, :2], v[:, :2], w)),
    }
    for what, (s2, c2) in other.items():
        name = "leading .batch. dimensions" if what == "batch" else "same last two axes"
        with pytest.raises(ValueError, match=rf"{name}.*summaries\[1\]\.state"):
            fp.merge_summaries(s, s2)
        with pytest.raises(ValueError, match=rf"{name}.*states\[2\]\.numerator"):
            fp.merge_causal_states(c, c, c2)
        with pytest.raises(ValueError, match=rf"{name}.*states\[1\]\.numerator"):
            fp.exclusive_prefix([c, c2, c])
    # batch dimensions that broadcast still merge: (2, 3) with (3,)
    merged = fp.merge_summaries(s, fp.key_summary(k[0], v[0], w))
    assert merged.state.shape == s.state.shape


def test_bad_keys_are_named_k() -> None:
    _, k, v, w = _inputs()
    for summary in (fp.key_summary, fp.causal_summary):
        with pytest.raises(TypeError, match=r"^k must be an array"):
            summary(k.tolist(), v, w)
        with pytest.raises(TypeError, match=r"^k must have a real floating dtype"):
            summary(k.astype(np.int64), v, w)
        with pytest.raises(ValueError, match=r"^k must have at least 2 dimensions"):
            summary(k[0, 0, 0], v, w)
