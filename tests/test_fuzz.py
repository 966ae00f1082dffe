"""Fuzz suite: adversarial values, causal prefix properties, every public function against
the float64 reference (tests/reference.py), extremes of each dtype, and bad inputs.

Runs on every backend through the ``xp`` fixture. A short profile by default (a few
examples per test); ``FAVORPLUS_FUZZ=long`` runs 300 examples per test, e.g.
``FAVORPLUS_FUZZ=long pytest tests/test_fuzz.py -k numpy``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import favorplus as fp

from . import reference as ref
from .strategies import adversarial_values, causal_cases, problems

LONG = os.environ.get("FAVORPLUS_FUZZ", "short") == "long"
fuzz = settings(max_examples=300 if LONG else 8)

POSITIVE = ["softmax", "softmax_hyperbolic"]


def _np(xp, x):
    return xp.numpy(x)


def _causal(xp, q, k, v, w, dtype, kernel="softmax", chunk=None, mask=None, exact=False):
    arrays = [xp.asarray(a, dtype) for a in (q, k, v)]
    m = None if mask is None else xp.asarray(mask)
    with np.errstate(all="ignore"):
        if exact:
            return _np(xp, fp.softmax_attention(*arrays, causal=True, key_mask=m))
        return _np(
            xp,
            fp.favor_attention(
                *arrays,
                xp.asarray(w, dtype),
                kernel=kernel,
                causal=True,
                chunk_size=chunk,
                key_mask=m,
            ),
        )


def _same_non_finite(got, want):
    """Where ``want`` is not finite, ``got`` is the same inf or NaN."""
    bad = ~np.isfinite(want)
    np.testing.assert_array_equal(np.isnan(got[bad]), np.isnan(want[bad]))
    finite_inf = bad & ~np.isnan(want)
    np.testing.assert_array_equal(got[finite_inf], want[finite_inf])


# --- adversarial values at later positions ----------------------------------------------


@pytest.mark.parametrize("exact", [False, True], ids=["favor", "softmax_attention"])
@fuzz
@given(case=causal_cases(), data=st.data())
def test_later_non_finite_values_reach_later_rows_only(xp, exact, case, data):
    """inf / NaN / extreme values after t: rows < t are bit for bit those of the clean
    input (float32 and float64); rows >= t are what the float64 reference gives."""
    q, k, v, m, t, chunk = case
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    kernel = "softmax" if exact else data.draw(st.sampled_from([*POSITIVE, "relu"]))
    w = fp.draw_projection(m, q.shape[-1], seed=1)
    bad = v.copy()
    for _ in range(data.draw(st.integers(1, 3))):
        j = data.draw(st.integers(t, v.shape[-2] - 1))
        c = data.draw(st.integers(0, v.shape[-1] - 1))
        bad[data.draw(st.integers(0, 1)), j, c] = data.draw(adversarial_values(dtype))
    clean = _causal(xp, q, k, v, w, dtype, kernel, chunk, exact=exact)
    dirty = _causal(xp, q, k, bad, w, dtype, kernel, chunk, exact=exact)
    np.testing.assert_array_equal(dirty[:, :t], clean[:, :t])
    moderate = np.all(np.abs(bad[np.isfinite(bad)]) < 1e10)  # extremes: the leak check only
    if dtype == "float64" and kernel != "relu" and moderate:
        s = 1 / math.sqrt(q.shape[-1])
        with np.errstate(all="ignore"):
            if exact:
                want = ref.exact_attention(q, k, bad, causal=True)
            else:
                fq, fk = (ref.features(x, w, kernel, s) for x in (q, k))
                want = ref.quadratic_attention(fq, fk, bad, causal=True)
        _same_non_finite(dirty, want)
        ok = np.isfinite(want)
        np.testing.assert_allclose(dirty[ok], want[ok], rtol=1e-8, atol=1e-10)


@fuzz
@given(case=causal_cases(), data=st.data())
def test_later_non_finite_queries_and_keys_do_not_leak(xp, case, data):
    q, k, v, m, t, chunk = case
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    kernel = data.draw(st.sampled_from([*POSITIVE, "relu"]))
    w = fp.draw_projection(m, q.shape[-1], seed=2)
    q2, k2 = q.copy(), k.copy()
    target = data.draw(st.sampled_from([q2, k2]))
    j = data.draw(st.integers(t, q.shape[-2] - 1))
    target[data.draw(st.integers(0, 1)), j, data.draw(st.integers(0, q.shape[-1] - 1))] = data.draw(
        adversarial_values(dtype)
    )
    clean = _causal(xp, q, k, v, w, dtype, kernel, chunk)
    dirty = _causal(xp, q2, k2, v, w, dtype, kernel, chunk)
    np.testing.assert_array_equal(dirty[:, :t], clean[:, :t])


@pytest.mark.parametrize("causal", [False, True])
@fuzz
@given(p=problems(max_len=20, with_mask=True), data=st.data())
def test_masked_positions_hide_any_value(xp, causal, p, data):
    """Masked keys with inf / NaN / extreme keys and values, at any position: the output
    is bit for bit that with zeros there."""
    if causal:
        p.q = p.q[..., : p.k.shape[-2], :] if p.q.shape[-2] >= p.k.shape[-2] else p.q
        if p.q.shape[-2] != p.k.shape[-2]:
            return
    lead = np.broadcast_shapes(p.key_mask.shape, p.k.shape[:-1], p.v.shape[:-1])
    masked = ~np.broadcast_to(p.key_mask, lead)
    junk = data.draw(adversarial_values("float64"))
    kb = np.broadcast_to(p.k, (*masked.shape, p.d)).copy()
    vb = np.broadcast_to(p.v, (*masked.shape, p.v.shape[-1])).copy()
    kz, vz = kb.copy(), vb.copy()
    kb[masked], vb[masked] = junk, junk
    kz[masked], vz[masked] = 0.0, 0.0
    w = xp.asarray(fp.draw_projection(p.num_features, p.d, seed=p.seed))
    mask = xp.asarray(p.key_mask)

    def go(k, v):
        with np.errstate(all="ignore"):
            return _np(
                xp,
                fp.favor_attention(
                    xp.asarray(p.q), xp.asarray(k), xp.asarray(v), w, key_mask=mask, causal=causal
                ),
            )

    np.testing.assert_array_equal(go(kb, vb), go(kz, vz))


# --- causal prefix: truncation ----------------------------------------------------------


@fuzz
@given(case=causal_cases(max_len=150), data=st.data())
def test_truncation_changes_earlier_rows_by_rounding_only(xp, case, data):
    """Rows < t of a length-L call and the call on the first t tokens agree to float
    rounding: within 64 units of roundoff of max |v| (the documented contract; the
    matrix products' kernels and the chunk length may differ with the length)."""
    q, k, v, m, t, chunk = case
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    w = fp.draw_projection(m, q.shape[-1], seed=3)
    full = _causal(xp, q, k, v, w, dtype, chunk=chunk)[:, :t]
    part = _causal(xp, q[:, :t], k[:, :t], v[:, :t], w, dtype, chunk=chunk)
    eps = float(np.finfo(dtype).eps)
    assert np.max(np.abs(full - part)) <= 64 * eps * np.max(np.abs(v))


# --- every public function against the float64 reference -------------------------------


@fuzz
@given(p=problems(max_len=16), causal=st.booleans(), kernel=st.sampled_from([*POSITIVE, "relu"]))
def test_public_functions_match_reference(xp, p, causal, kernel):
    if causal:
        if p.q.shape[-2] != p.k.shape[-2]:
            return
    d = p.d
    s = 1 / math.sqrt(d)
    w_np = fp.draw_projection(p.num_features, d, seed=p.seed)
    w = fp.draw_projection(
        p.num_features, d, seed=p.seed, xp=xp.xp, device=xp.device, dtype=xp.dtype("float64")
    )
    np.testing.assert_allclose(_np(xp, w), w_np, rtol=1e-15, atol=0)
    q, k, v = (xp.asarray(a) for a in (p.q, p.k, p.v))
    mask = None if p.key_mask is None else xp.asarray(p.key_mask)
    fq, fk = (ref.features(x, w_np, kernel, s) for x in (p.q, p.k))
    np.testing.assert_allclose(_np(xp, fp.feature_map(q, w, kernel=kernel)), fq, rtol=1e-10)
    want = ref.quadratic_attention(fq, fk, p.v, key_mask=p.key_mask, causal=causal)
    out = fp.favor_attention(q, k, v, w, kernel=kernel, causal=causal, key_mask=mask)
    np.testing.assert_allclose(
        _np(xp, out), np.broadcast_to(want, out.shape), rtol=1e-8, atol=1e-10
    )
    a = fp.favor_attention_matrix(q, k, w, kernel=kernel, causal=causal, key_mask=mask)
    np.testing.assert_allclose(
        _np(xp, a) @ _masked_v(p),
        np.broadcast_to(want, out.shape),
        rtol=1e-8,
        atol=1e-10,
    )
    exact = fp.softmax_attention(q, k, v, causal=causal, key_mask=mask)
    want_exact = ref.exact_attention(p.q, p.k, p.v, key_mask=p.key_mask, causal=causal)
    np.testing.assert_allclose(
        _np(xp, exact), np.broadcast_to(want_exact, exact.shape), rtol=1e-10, atol=1e-12
    )
    if causal:
        batch = tuple(out.shape[:-2])
        state = fp.init_causal_state(w, p.v.shape[-1], batch_shape=batch, kernel=kernel)
        pieces = []
        for i in range(p.q.shape[-2]):
            sl = (Ellipsis, slice(i, i + 1), slice(None))
            mi = None if p.key_mask is None else xp.asarray(p.key_mask[..., i : i + 1])
            o, state = fp.favor_attention_step(
                xp.asarray(p.q[sl]),
                xp.asarray(p.k[sl]),
                xp.asarray(p.v[sl]),
                w,
                state,
                kernel=kernel,
                key_mask=mi,
            )
            pieces.append(_np(xp, o))
        got = np.concatenate([np.broadcast_to(x, (*batch, 1, x.shape[-1])) for x in pieces], -2)
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-8, atol=1e-10)


def _masked_v(p):
    return p.v if p.key_mask is None else np.where(p.key_mask[..., None], p.v, 0.0)


# --- extremes of each dtype -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@fuzz
@given(data=st.data())
def test_finite_output_at_the_edge_of_the_range(xp, dtype, causal, data):
    """Finite inputs within the documented bounds give finite outputs: scaled norms
    |x| scale^(1/2) up to sqrt(max) / 2 of the compute dtype and |v| up to
    max / (4 L M); for float16 / bfloat16 inputs (computed in float32), any finite value."""
    xp.dtype(dtype)  # skips where the backend lacks it
    L = data.draw(st.integers(1, 20))
    d = data.draw(st.sampled_from([1, 4, 16]))
    m = 16
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    compute = "float32" if dtype in ("float16", "bfloat16") else dtype
    big = float(np.finfo(compute).max)
    if dtype == "float16":
        norm_cap = v_cap = 65504.0  # float16's largest finite value
    else:  # bfloat16 spans float32's range: the float32 bounds
        norm_cap, v_cap = math.sqrt(big) / 2, big / (4 * L * m)
    unit = rng.standard_normal((2, L, d))
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    if dtype == "float16":
        q = np.sign(unit) * norm_cap  # every entry at float16's largest finite value
        k = -q if data.draw(st.booleans()) else q[:, rng.permutation(L)]
    else:
        radius = np.where(rng.random((2, L, 1)) < 0.5, norm_cap, 1.0)
        q = unit * radius * d**0.25
        k = -q if data.draw(st.booleans()) else rng.permutation(q, axis=1)
    v = np.clip(rng.standard_normal((2, L, 3)), -1, 1) * v_cap
    w = fp.draw_projection(m, d, seed=0)
    kernel = data.draw(st.sampled_from(POSITIVE))
    with np.errstate(all="ignore"):
        out = fp.favor_attention(
            *(xp.asarray(np.ascontiguousarray(a), dtype) for a in (q, k, v)),
            xp.asarray(np.ascontiguousarray(w), compute),
            kernel=kernel,
            causal=causal,
        )
    assert np.all(np.isfinite(_np(xp, out)))


def test_float32_causal_range_edge(xp):
    """The documented float32 causal range (d = 64, m = 256, antiparallel query and key
    along the projection's longest row, the worst direction measured): at scaled norm
    7 the output matches float64 to 1e-5 for 20 projection seeds (failures start at 7.5).
    On JAX 6: XLA on the CPU flushes subnormal products to zero (failures start at 6.25)."""
    norm = 6.0 if xp.name.startswith("jax") else 7.0
    d, m = 64, 256
    for seed in range(20):
        w = fp.draw_projection(m, d, seed=seed)
        u = w[np.argmax(np.linalg.norm(w, axis=1))]
        q = (u / np.linalg.norm(u) * norm * d**0.25)[None]
        out = fp.favor_attention(
            *(xp.asarray(a, "float32") for a in (q, -q, np.ones((1, 1)), w)), causal=True
        )
        assert abs(float(_np(xp, out)[0, 0]) - 1.0) <= 1e-5, seed


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic"])
@pytest.mark.parametrize("causal", [False, True])
def test_one_token_at_the_largest_norm_returns_its_value(xp, causal, kernel):
    """One token whose query and key sit at the documented bound (scaled norm
    sqrt(max) / 2 of float32, d = 1, so that the projection is a product): its output
    is its own value. Under XLA's fusion a contracted multiply-add once turned the
    largest feature into inf (a NaN row); the stabilized exponent must be exactly 0."""
    big = math.sqrt(float(np.finfo(np.float32).max)) / 2
    x = np.array([[big], [-big], [big / 3]])
    v = np.array([[1.0, -2.0], [3e30, 0.5], [-7.0, 4.0]])
    w = fp.draw_projection(16, 1, seed=0)
    for i in range(3):
        q = x[i : i + 1]
        out = fp.favor_attention(
            *(xp.asarray(a, "float32") for a in (q, q, v[i : i + 1], w)),
            kernel=kernel,
            causal=causal,
        )
        np.testing.assert_allclose(_np(xp, out), v[i : i + 1], rtol=1e-6, err_msg=str(i))


# --- bad inputs -------------------------------------------------------------------------


def _catalogue(xp):
    """(call, exception type, argument named in the message)."""
    rng = np.random.default_rng(0)
    q = xp.asarray(rng.standard_normal((2, 3, 4)))
    w = xp.asarray(fp.draw_projection(8, 4, seed=0))
    ns = xp.xp
    d0 = xp.asarray(np.zeros((3, 0)))
    v2 = xp.asarray(np.zeros((3, 2)))
    state = fp.init_causal_state(w, 4, batch_shape=(2,))
    cases = [
        (lambda: fp.favor_attention(None, q, q, w), TypeError, "q"),
        (lambda: fp.favor_attention(q, None, q, w), TypeError, "k"),
        (lambda: fp.favor_attention(q, q, None, w), TypeError, "v"),
        (lambda: fp.softmax_attention(None, q, q), TypeError, "q"),
        (lambda: fp.softmax_attention(q, q, None), TypeError, "v"),
        (lambda: fp.favor_attention_matrix(q, None, w), TypeError, "k"),
        (lambda: fp.favor_attention_step(q, q, None, w), TypeError, "v"),
        (lambda: fp.feature_map(None, w), TypeError, "x"),
        (lambda: fp.init_causal_state(None, 3), TypeError, "projection"),
        (lambda: fp.favor_attention(d0, d0, v2, None, kernel="relu"), ValueError, "q"),
        (lambda: fp.softmax_attention(d0, d0, v2), ValueError, "q"),
        (lambda: fp.feature_map(d0, None, kernel="relu"), ValueError, "x"),
        (lambda: fp.draw_projection(4, 4, like=[1.0]), TypeError, "like"),
        (lambda: fp.init_causal_state(w[:0, ...], 3), ValueError, "projection"),
        (lambda: fp.init_causal_state(w, 3, dtype=ns.int32), TypeError, "dtype"),
        (lambda: fp.init_causal_state(w, 3, dtype="junk"), TypeError, "dtype"),
        (lambda: fp.init_causal_state(w, 0), ValueError, "value_dim"),
        (lambda: fp.favor_attention_step(q, q, q, w, (None, None)), TypeError, "state"),
        (lambda: fp.favor_attention_step(q, q, q, w, state[:1]), TypeError, "state"),
        (lambda: fp.favor_attention(q, q, q, w, scale=float("nan")), ValueError, "scale"),
        (lambda: fp.favor_attention(q, q, q, w, kernel=lambda u: 1.0), TypeError, "kernel"),
        (
            lambda: fp.favor_attention(q, q, q, w, causal=True, chunk_size=2.0),
            TypeError,
            "chunk_size",
        ),
        # the shard summaries and states of the distributed primitives
        (lambda: fp.read_summary(None, fp.key_summary(q, q, w), w), TypeError, "q"),
        (lambda: fp.merge_summaries(fp.KeySummary(None, q)), TypeError, "state"),
        (lambda: fp.merge_summaries(fp.KeySummary(q, [1.0])), TypeError, "level"),
        (lambda: fp.merge_causal_states(fp.CausalState(None, q)), TypeError, "numerator"),
        (lambda: fp.merge_causal_states(state, fp.CausalState(q, None)), TypeError, "log_scale"),
    ]
    for bad in ("int32", "bool", "complex128", "int64", "uint8"):
        if hasattr(ns, bad):
            dt = getattr(ns, bad)
            cases.append(
                (lambda dt=dt: fp.draw_projection(4, 4, xp=ns, dtype=dt), TypeError, "dtype")
            )
            arr = ns.asarray(np.ones((8, 4)).astype(bad), device=xp.device)
            cases.append((lambda a=arr: fp.draw_projection(4, 4, like=a), TypeError, "like"))
            cases.append((lambda a=arr: fp.init_causal_state(a, 3), TypeError, "projection"))
            cases.append((lambda a=arr: fp.feature_map(a, w), TypeError, "x"))
            st_bad = fp.CausalState(ns.astype(state.numerator, dt), ns.astype(state.log_scale, dt))
            cases.append(
                (lambda s=st_bad: fp.favor_attention_step(q, q, q, w, s), TypeError, "state")
            )
    if xp.name == "numpy":
        qn = np.asarray(q)
        for sub in (np.asmatrix(qn[0]), np.ma.MaskedArray(qn)):
            cases += [
                (lambda s=sub: fp.favor_attention(s, qn, qn, np.asarray(w)), TypeError, "q"),
                (lambda s=sub: fp.softmax_attention(qn, qn, s), TypeError, "v"),
                (lambda s=sub: fp.feature_map(s, np.asarray(w)), TypeError, "x"),
                (
                    lambda s=sub: fp.favor_attention(qn, qn, qn, s[..., :1, :]),
                    TypeError,
                    "projection",
                ),
            ]
        cases.append(
            (lambda: fp.init_causal_state(np.asmatrix(np.asarray(w)), 3), TypeError, "projection")
        )
    return cases


def test_bad_input_catalogue(xp):
    """Every bad input raises favorplus's TypeError / ValueError naming the argument."""
    for call, kind, name in _catalogue(xp):
        with pytest.raises(kind) as info:
            call()
        assert name in str(info.value), (name, str(info.value))
        assert "favorplus" in info.traceback[-1].path.parts[-3:-1], info.traceback[-1].path
