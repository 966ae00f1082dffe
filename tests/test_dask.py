"""favor_attention on dask arrays chunked along the sequence: lazy, chunk-preserving, equal
to the NumPy call, causal leak-free across chunks (favorplus._dask)."""

from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import favorplus as fp  # noqa: E402

KERNELS = ("softmax", "softmax_hyperbolic", "relu")
SEQ_CHUNKS = (7, 0, 13, 30, 10)  # uneven, one empty chunk; 60 tokens
HEAD_CHUNKS = (1, 2)  # the heads axis chunked too


def _no_compute(dsk, keys, **kwargs):  # a dask scheduler
    raise AssertionError("favorplus computed a dask array during the call")


def _numpy_inputs(seed: int = 0, length: int = 60):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 3, length, 8)) * 0.8 for _ in range(3))
    return q, k, v, fp.draw_projection(16, 8, seed=1)


def _lazy(x: np.ndarray, seq=SEQ_CHUNKS):
    chunks = (*((s,) for s in x.shape[:-3]), HEAD_CHUNKS, seq, (x.shape[-1],))
    if x.ndim == 3:  # (batch, 1, L) masks
        chunks = ((x.shape[0],), (1,), seq)
    return da.from_array(x, chunks=chunks)


def _masks(length: int = 60):
    rng = np.random.default_rng(7)
    boolean = np.ones((2, 1, length), dtype=bool)
    boolean[0, :, 7:50] = False  # batch row 0: whole chunks (13 and 30 tokens) without keys
    boolean[1, :, 3] = False
    additive = np.where(
        rng.random((2, 1, length)) < 0.2, -np.inf, rng.standard_normal((2, 1, length))
    )
    additive[1, :, :20] = -np.inf  # batch row 1: its first chunks empty
    return {"none": None, "bool": boolean, "additive": additive}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_dask_equals_numpy_lazily_with_the_queries_chunks(kernel: str, causal: bool) -> None:
    q, k, v, w = _numpy_inputs()
    for name, mask in _masks().items():
        with dask.config.set(scheduler=_no_compute):
            out = fp.favor_attention(
                _lazy(q), _lazy(k), _lazy(v), w, kernel=kernel, causal=causal,
                key_mask=None if mask is None else _lazy(mask),
            )  # fmt: skip
        assert isinstance(out, da.Array)
        assert out.chunks == ((2,), HEAD_CHUNKS, SEQ_CHUNKS, (8,)), name
        ref = fp.favor_attention(q, k, v, w, kernel=kernel, causal=causal, key_mask=mask)
        got = out.compute(scheduler="sync")
        assert got.dtype == ref.dtype
        # float64 rounding: the chunked merge reorders sums (as in test_summaries)
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12, err_msg=name)


def test_causal_chunks_see_no_later_chunk_bit_for_bit() -> None:
    # Chunks after the first 20 tokens filled with inf, NaN, +-1e30 (keys, values, queries,
    # and an additive mask of +1e30 biases there): the first three chunks' outputs keep
    # every bit.
    q, k, v, w = _numpy_inputs(2)
    bias = np.zeros((2, 1, 60))
    cut = sum(SEQ_CHUNKS[:3])
    base = fp.favor_attention(_lazy(q), _lazy(k), _lazy(v), w, causal=True, key_mask=_lazy(bias))
    base = base.compute(scheduler="sync")
    for bad in (np.inf, np.nan, 1e30, -1e30):
        q2, k2, v2, b2 = q.copy(), k.copy(), v.copy(), bias.copy()
        for x in (q2, k2, v2):
            x[..., cut:, :] = bad
        b2[..., cut:] = 1e30 if np.isfinite(bad) else -np.inf
        out = fp.favor_attention(_lazy(q2), _lazy(k2), _lazy(v2), w, causal=True,
                                 key_mask=_lazy(b2))  # fmt: skip
        with np.errstate(invalid="ignore", over="ignore"):  # in the later chunks only
            out = out.compute(scheduler="sync")
        assert np.array_equal(out[..., :cut, :], base[..., :cut, :]), bad
        assert np.all(np.isfinite(base))


def test_graph_grows_with_the_chunks_not_the_tokens() -> None:
    # Tasks per chunk, whatever a chunk's length: 10x the tokens in as many chunks gives
    # the same number of tasks.
    w = fp.draw_projection(16, 8, seed=1)

    def tasks(length: int, causal: bool) -> int:
        x = da.zeros((2, length, 8), chunks=(2, length // 4, 8))
        return len(dict(fp.favor_attention(x, x, x, w, causal=causal).__dask_graph__()))

    for causal in (False, True):
        assert tasks(400, causal) == tasks(4000, causal)


def test_fewer_queries_than_keys() -> None:
    q, k, v, w = _numpy_inputs(3)
    mask = _masks()["bool"]
    lazy_q = _lazy(q[..., 25:, :], seq=(5, 20, 10))
    for causal in (False, True):
        with dask.config.set(scheduler=_no_compute):
            out = fp.favor_attention(lazy_q, _lazy(k), _lazy(v), w, causal=causal,
                                     key_mask=_lazy(mask))  # fmt: skip
        assert out.chunks[-2] == (5, 20, 10)
        ref = fp.favor_attention(q[..., 25:, :], k, v, w, causal=causal, key_mask=mask)
        np.testing.assert_allclose(out.compute(scheduler="sync"), ref, rtol=1e-11, atol=1e-12)


def test_float32_dropout_and_numpy_masks() -> None:
    # float32 inputs stay float32; a NumPy mask and dropout_keep beside dask inputs; a host
    # dropout draw from a seed is the same mask as for NumPy inputs.
    q, k, v, w = (x.astype(np.float32) for x in _numpy_inputs(4))
    keep = np.random.default_rng(5).random((2, 3, 60)) > 0.3
    mask = _masks()["bool"]
    for kw in (
        dict(dropout_p=0.3, dropout_keep=keep, key_mask=mask),
        dict(dropout_p=0.3, dropout_rng=11, causal=True),
    ):
        with dask.config.set(scheduler=_no_compute):
            out = fp.favor_attention(_lazy(q), _lazy(k), _lazy(v), w, **kw)
        ref = fp.favor_attention(q, k, v, w, **kw)
        got = out.compute(scheduler="sync")
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)


def test_full_numpy_masks_are_read_on_the_host() -> None:
    # A NumPy (Lq, Lk) mask beside dask inputs: causal and/or key padding plus per-key
    # biases, as for NumPy inputs; other patterns are refused as there.
    q, k, v, w = _numpy_inputs(6)
    tri = np.tril(np.ones((60, 60), dtype=bool))
    pad = np.arange(60) < np.array([[60], [45]])  # (2, 60)
    bias = np.random.default_rng(8).standard_normal(60)
    masks = {
        "causal": tri,
        "causal_padding": tri & pad[:, None, None, :],
        "padding_additive": np.where(pad[:, None, None, :], bias, -np.inf) + np.zeros((60, 60)),
        "causal_bias": np.where(tri, bias, -np.inf),
    }
    for name, mask in masks.items():
        with dask.config.set(scheduler=_no_compute):
            out = fp.favor_attention(_lazy(q), _lazy(k), _lazy(v), w, attn_mask=mask)
        ref = fp.favor_attention(q, k, v, w, attn_mask=mask)
        got = out.compute(scheduler="sync")
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12, err_msg=name)
    band = np.abs(np.arange(60)[:, None] - np.arange(60)[None, :]) <= 3
    with pytest.raises(ValueError, match="not computable by FAVOR\\+ in linear time"):
        fp.favor_attention(_lazy(q), _lazy(k), _lazy(v), w, attn_mask=band)


def test_dask_errors_are_clear() -> None:
    q, k, v, w = _numpy_inputs()
    lq, lk, lv = _lazy(q), _lazy(k), _lazy(v)
    full = da.from_array(np.tril(np.ones((60, 60), dtype=bool)))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(60, 60\) .* is a dask array"):
        fp.favor_attention(lq, lk, lv, w, attn_mask=full)
    with pytest.raises(ValueError, match=r"dask arrays support the FAVOR\+ kernels"):
        fp.favor_attention(lq, lk, lv, w, kernel=fp.OPRF())
    with pytest.raises(ValueError, match=r"axis_name / process_group .* dask arrays"):
        fp.favor_attention(lq, lk, lv, w, axis_name="s")
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fp.favor_attention(lq, lk, lv, w, dropout_p=1.5)
    with pytest.raises(ValueError, match="k and v must have the same length"):
        fp.favor_attention(lq, lk, lv[..., :50, :], w)
