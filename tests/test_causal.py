"""Causal FAVOR+: exactness, no leak from the future, chunking, decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import favorplus as fp

from . import reference as ref
from .strategies import problems
from .test_attention import close, expected, run

KERNELS = ["softmax", "softmax_hyperbolic", "softmax_trig", "relu"]


@pytest.mark.parametrize("kernel", KERNELS)
@given(p=problems(causal=True, max_len=40, max_norm=1.0), chunk=st.integers(1, 17))
def test_equals_tril_quadratic_form(xp, kernel, p, chunk):
    out, w = run(xp, p, kernel=kernel, causal=True, chunk_size=chunk)
    want = expected(p, w, kernel, causal=True)
    got = xp.numpy(out)
    if kernel == "softmax_trig":
        # Compare only rows whose trigonometric normaliser is well away from 0.
        fq = ref.features(p.q, w, kernel, 1 / math.sqrt(p.d))
        fk = ref.features(p.k, w, kernel, 1 / math.sqrt(p.d))
        a = np.tril(fq @ np.swapaxes(fk, -1, -2))
        if p.key_mask is not None:
            a = np.where(p.key_mask[..., None, :], a, 0.0)
        good = np.abs(a.sum(-1)) > 0.05 * np.abs(a).sum(-1)
        got, want = np.broadcast_arrays(got, want)
        good = np.broadcast_to(good[..., None], got.shape)
        got, want = got[good], want[good]
    close(got, want, 1e-8)


@given(p=problems(causal=True, max_len=20), chunk=st.integers(1, 8), data=st.data())
def test_rows_equal_bidirectional_on_prefix(xp, p, chunk, data):
    """Row t of the causal output is the bidirectional attention of query t over keys
    0..t: (1) the bidirectional call whose key mask hides exactly the future, for every
    row (all rows in one call: row t's mask along a new leading axis); (2) the
    bidirectional call on the truncated prefix q[t], k[:t+1], v[:t+1], for every row,
    except on JAX, where each prefix length is one more program to compile: there the
    last row and two drawn ones."""
    out, w = run(xp, p, causal=True, chunk_size=chunk)
    got = xp.numpy(out)
    L = p.q.shape[-2]
    wb = xp.asarray(w)

    # (1) One call over a new leading axis T = L: masks[t] hides the keys after t (and
    # the problem's own masked keys); every array gets the same number of batch axes.
    lead = max(a.ndim - 2 for a in (p.q, p.k, p.v))
    if p.key_mask is not None:
        lead = max(lead, p.key_mask.ndim - 1)

    def stacked(a, core):  # (1, 1..., *a.shape): a broadcast over T and missing batch axes
        return a.reshape((1,) * (1 + lead + core - a.ndim) + a.shape)

    future = np.tril(np.ones((L, L), dtype=bool)).reshape((L,) + (1,) * lead + (L,))
    masks = future if p.key_mask is None else future & stacked(p.key_mask, 1)
    full = fp.favor_attention(
        *(xp.asarray(stacked(a, 2)) for a in (p.q, p.k, p.v)), wb, key_mask=xp.asarray(masks)
    )
    full = xp.numpy(full)  # (T, *batch, L, dv)
    for t in range(L):
        close(got[..., t, :], np.broadcast_to(full[t, ..., t, :], got[..., t, :].shape), 1e-9)

    # (2) The truncated prefixes.
    rows = range(L)
    if xp.name.startswith("jax"):
        rows = sorted({L - 1, *data.draw(st.lists(st.integers(0, L - 1), max_size=2))})
    for t in rows:
        m_t = None if p.key_mask is None else xp.asarray(p.key_mask[..., : t + 1])
        pre = fp.favor_attention(
            xp.asarray(p.q[..., t : t + 1, :]),
            xp.asarray(p.k[..., : t + 1, :]),
            xp.asarray(p.v[..., : t + 1, :]),
            wb,
            key_mask=m_t,
        )
        close(
            got[..., t : t + 1, :],
            np.broadcast_to(xp.numpy(pre), got[..., t : t + 1, :].shape),
            1e-9,
        )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic", "relu"])
@given(data=st.data())
def test_prefix_never_depends_on_the_future(xp, dtype, kernel, data):
    """out[:t] is bit-for-bit unchanged when every token after t is replaced, even by extremes."""
    L = data.draw(st.integers(2, 50))
    t = data.draw(st.integers(1, L - 1))
    d = data.draw(st.sampled_from([2, 8, 16]))
    chunk = data.draw(st.sampled_from([None, 1, 3, 8, 64]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q, k, v = rng.standard_normal((3, 2, L, d))
    w = fp.draw_projection(24, d, seed=3)
    future = data.draw(st.sampled_from(["huge_keys", "huge_values", "random", "huge_queries"]))
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    big = 1e30 if dtype == "float32" else 1e150
    if future == "huge_keys":
        k2[:, t:] = rng.standard_normal((2, L - t, d)) * 1e3
        k2[:, -1] = big
    elif future == "huge_values":
        v2[:, t:] = big
    elif future == "huge_queries":
        q2[:, t:] = big
    else:
        q2[:, t:], k2[:, t:], v2[:, t:] = rng.standard_normal((3, 2, L - t, d)) * 5
    wb = xp.asarray(w, dtype)

    def go(a, b, c):
        return xp.numpy(
            fp.favor_attention(
                xp.asarray(a, dtype),
                xp.asarray(b, dtype),
                xp.asarray(c, dtype),
                wb,
                kernel=kernel,
                causal=True,
                chunk_size=chunk,
            )
        )

    before = go(q, k, v)
    with np.errstate(over="ignore"):  # |k|^2 of a 1e30 key overflows float32: that key drops out
        after = go(q2, k2, v2)
    assert np.all(np.isfinite(before))
    np.testing.assert_array_equal(after[:, :t], before[:, :t])


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic"])
@given(data=st.data())
def test_float32_extreme_inputs_finite(xp, kernel, data):
    """No inf or NaN for finite float32 inputs up to scaled norm 10 (and the huge-key case)."""
    L = data.draw(st.integers(1, 70))
    d = data.draw(st.sampled_from([4, 16, 64]))
    norm = data.draw(st.sampled_from([1.0, 10.0, 100.0]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(rng.standard_normal((2, L, d))) * norm * d**0.25
    k = -q if data.draw(st.booleans()) else unit(rng.standard_normal((2, L, d))) * norm * d**0.25
    v = rng.standard_normal((2, L, 3)) * 1e3
    w = fp.draw_projection(32, d, seed=0)
    out = fp.favor_attention(
        *(xp.asarray(a, "float32") for a in (q, k, v, w)),
        kernel=kernel,
        causal=True,
        chunk_size=data.draw(st.sampled_from([4, 64])),
    )
    assert np.all(np.isfinite(xp.numpy(out)))


@given(
    p=problems(causal=True, max_len=30), chunks=st.lists(st.integers(1, 9), min_size=2, max_size=4)
)
def test_chunk_size_never_changes_the_result(xp, p, chunks):
    outs = [xp.numpy(run(xp, p, causal=True, chunk_size=c)[0]) for c in [*chunks, None, 1000]]
    for o in outs[1:]:
        close(o, outs[0], 1e-10)


@given(p=problems(causal=True, max_len=40), chunk=st.integers(1, 9))
def test_accelerator_scan_equals_cpu_scan(xp, p, chunk):
    """The chunk recurrence's two forms (the states stacked and read by one product, on
    GPUs; each state read by its chunk at once, on CPUs) give the same output."""
    from favorplus._backend import scan as _backend

    cpu = xp.numpy(run(xp, p, causal=True, chunk_size=chunk)[0])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_backend, "on_accelerator", lambda x: True)
        gpu = xp.numpy(run(xp, p, causal=True, chunk_size=chunk)[0])
    close(gpu, cpu, 1e-10)


def _with_flat(monkeypatch_context, flat):
    """Spy on (flat=None) or force (flat=False) the check of the causal fast path."""
    from favorplus import causal

    seen = []
    check = causal._is_flat

    def spy(*args):
        result = check(*args) if flat is None else flat
        seen.append(result)
        return result

    monkeypatch_context.setattr(causal, "_is_flat", spy)
    return seen


@given(p=problems(causal=True, max_len=40), chunk=st.integers(1, 6), blocks=st.integers(1, 3))
def test_flat_fast_path_changes_no_bit(xp, p, chunk, blocks):
    """Blocks in which the causal reference never changes skip their rescaling factors
    (all exp(0) = 1): the output is bit for bit that of the general path."""
    from favorplus._backend import blocking as _backend

    rows = max(1, int(np.prod(np.broadcast_shapes(p.q.shape[:-2], p.k.shape[:-2], p.v.shape[:-2]))))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_backend, "BLOCK_NUMBERS", blocks * chunk * rows * p.num_features)
        _with_flat(m, None)
        fast = xp.numpy(run(xp, p, causal=True, chunk_size=chunk)[0])
        _with_flat(m, False)
        slow = xp.numpy(run(xp, p, causal=True, chunk_size=chunk)[0])
    np.testing.assert_array_equal(fast, slow)


def test_flat_fast_path_is_taken_on_typical_inputs():
    """After the first chunk, keys of typical size stay below the reference's level:
    the later CPU blocks take the fast path, and give the general path's bits."""
    from favorplus._backend import blocking as _backend

    rng = np.random.default_rng(3)
    q, k = (rng.standard_normal((2, 3, 256, 16)) * 0.5 for _ in range(2))
    v = rng.standard_normal((2, 3, 256, 16))
    w = fp.draw_projection(32, 16, seed=0)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_backend, "BLOCK_NUMBERS", 32 * 6 * 32)  # blocks of 32 tokens
        seen = _with_flat(m, None)
        fast = fp.favor_attention(q, k, v, w, causal=True, chunk_size=8)
        _with_flat(m, False)
        slow = fp.favor_attention(q, k, v, w, causal=True, chunk_size=8)
    assert len(seen) == 8 and not seen[0] and sum(seen) >= 6, seen
    np.testing.assert_array_equal(fast, slow)


@given(p=problems(causal=True, max_len=30), data=st.data())
def test_decoding_equals_full_call(xp, p, data):
    """Token by token, and in blocks of random sizes, with the state carried along."""
    full, w = run(xp, p, causal=True)
    full = xp.numpy(full)
    L = p.q.shape[-2]
    sizes = data.draw(st.sampled_from(["tokens", "blocks"]))
    cuts = (
        list(range(1, L))
        if sizes == "tokens"
        else sorted(data.draw(st.sets(st.integers(1, max(1, L - 1)), max_size=5)) if L > 1 else [])
    )
    bounds = [0, *[c for c in cuts if 0 < c < L], L]
    wb = xp.asarray(w)
    state = None
    if data.draw(st.booleans()):
        batch = np.broadcast_shapes(p.q.shape[:-2], p.k.shape[:-2], p.v.shape[:-2])
        state = fp.init_causal_state(wb, p.v.shape[-1], batch_shape=batch)
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mask = None if p.key_mask is None else xp.asarray(p.key_mask[..., a:b])
        o, state = fp.favor_attention_step(
            xp.asarray(p.q[..., a:b, :]),
            xp.asarray(p.k[..., a:b, :]),
            xp.asarray(p.v[..., a:b, :]),
            wb,
            state,
            key_mask=mask,
            chunk_size=data.draw(st.sampled_from([None, 2])),
        )
        pieces.append(xp.numpy(o))
    got = np.concatenate(
        [np.broadcast_to(x, (*full.shape[:-2], x.shape[-2], full.shape[-1])) for x in pieces],
        axis=-2,
    )
    close(got, full, 1e-10)
    assert isinstance(state, tuple) and len(state) == 2


def test_state_shapes_and_errors(xp):
    w = xp.asarray(fp.draw_projection(8, 4, seed=0))
    st0 = fp.init_causal_state(w, 3, batch_shape=(2,), kernel="softmax_hyperbolic")
    assert st0.numerator.shape == (2, 16, 4) and st0.log_scale.shape == (2,)
    q = xp.asarray(np.zeros((2, 1, 4)))
    v = xp.asarray(np.zeros((2, 1, 3)))
    with pytest.raises(ValueError, match=r"state\.numerator"):
        fp.favor_attention_step(q, q, v, w, st0)  # softmax has 8 features, not 16
    with pytest.raises(TypeError, match="state"):
        fp.favor_attention_step(q, q, v, w, "not a state")
    assert fp.init_causal_state(w, 3, batch_shape=5).log_scale.shape == (5,)
    with pytest.raises(ValueError, match=r"batch_shape must not have negative sizes; got \(2, -1"):
        fp.init_causal_state(w, 3, batch_shape=(2, -1))
    with pytest.raises(TypeError, match="batch_shape must be a tuple of ints"):
        fp.init_causal_state(w, 3, batch_shape=(2.0,))


def test_causal_needs_at_most_as_many_queries_as_keys(xp):
    q = xp.asarray(np.zeros((6, 4)))
    k = xp.asarray(np.zeros((5, 4)))
    w = xp.asarray(fp.draw_projection(4, 4, seed=0))
    with pytest.raises(ValueError, match="causal"):
        fp.favor_attention(q, k, k, w, causal=True)
    with pytest.raises(ValueError, match="causal"):  # a decoding step: as many as keys
        fp.favor_attention_step(k[:3, :], k, k, w)


def test_decoding_from_first_masked_tokens(xp):
    """Rows before the first visible key are 0; later rows are unaffected by masked ones."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 6, 4))
    mask = np.array([False, False, True, False, True, True])
    w = fp.draw_projection(16, 4, seed=1)
    out = xp.numpy(
        fp.favor_attention(
            xp.asarray(q),
            xp.asarray(k),
            xp.asarray(v),
            xp.asarray(w),
            causal=True,
            key_mask=xp.asarray(mask),
            chunk_size=2,
        )
    )
    assert np.all(out[:2] == 0)
    fq = ref.features(q, w, "softmax", 0.5)
    fk = ref.features(k, w, "softmax", 0.5)
    close(out, ref.quadratic_attention(fq, fk, v, key_mask=mask, causal=True), 1e-10)


@given(p=problems(causal=True, max_len=40), chunk=st.integers(1, 6), blocks=st.integers(1, 3))
def test_cpu_blocks_equal_one_pass(xp, p, chunk, blocks):
    """On a CPU the sequence runs in blocks of whole chunks; the result is the same."""
    import favorplus._backend.blocking as backend

    one, w = run(xp, p, causal=True, chunk_size=chunk)
    rows = max(1, int(np.prod(np.broadcast_shapes(p.q.shape[:-2], p.k.shape[:-2], p.v.shape[:-2]))))
    saved = backend.BLOCK_NUMBERS
    backend.BLOCK_NUMBERS = blocks * chunk * rows * p.num_features  # blocks of `blocks` chunks
    try:
        many, _ = run(xp, p, causal=True, chunk_size=chunk)
    finally:
        backend.BLOCK_NUMBERS = saved
    close(xp.numpy(many), xp.numpy(one), 1e-12)
    close(xp.numpy(many), expected(p, w, "softmax", causal=True), 1e-8)


def test_decoding_step_without_tokens(xp):
    # A step of no token returns an empty output and the state it was given (the
    # empty state without one), broadcast to the batch shape.
    rng = np.random.default_rng(3)
    w = xp.asarray(fp.draw_projection(8, 3, seed=0))
    q, k, v = (xp.asarray(rng.standard_normal((2, 4, 3))) for _ in range(3))
    _, state = fp.favor_attention_step(q, k, v, w)
    empty = xp.asarray(np.zeros((2, 0, 3)))
    out, same = fp.favor_attention_step(empty, empty, empty, w, state)
    assert tuple(out.shape) == (2, 0, 3)
    for got, want in zip(same, state):
        np.testing.assert_array_equal(xp.numpy(got), xp.numpy(want))
    out, fresh = fp.favor_attention_step(empty, empty, empty, w)
    start = fp.init_causal_state(w, 3, batch_shape=(2,))
    for got, want in zip(fresh, start):
        assert tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype
        np.testing.assert_array_equal(xp.numpy(got), xp.numpy(want))
    # and the next tokens continue as if the empty step had not happened
    later, _ = fp.favor_attention_step(q, k, v, w, same)
    direct, _ = fp.favor_attention_step(q, k, v, w, state)
    np.testing.assert_array_equal(xp.numpy(later), xp.numpy(direct))


# --- recomputed blocks and in-place changes (torch autograd, CPU) ----------------------


def _torch_problem(torch, L=512, heads=8, d=16, m=256, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (torch.from_numpy(0.5 * rng.standard_normal((2, heads, L, d))) for _ in range(3))
    return q, k, v, torch.from_numpy(fp.draw_projection(m, d, seed=seed))


@pytest.mark.parametrize("changed", ["projection", "k", "v"])
def test_in_place_change_before_backward_is_an_error(changed):
    """At L = 512 (8 heads, m = 256) the CPU blocks are recomputed in the backward pass:
    an input changed in place in between is an error naming it, as autograd's own
    saved tensors are, never the gradient of another function."""
    torch = pytest.importorskip("torch")
    q, k, v, w = _torch_problem(torch)
    q.requires_grad_()
    out = fp.favor_attention(q, k, v, w, causal=True)
    target = {"projection": w, "k": k, "v": v}[changed]
    with torch.no_grad():
        target.mul_(1.5)
    with pytest.raises(RuntimeError, match=rf"favorplus: (the )?{changed}\b.*in-place"):
        out.sum().backward()


def test_gradient_with_recomputed_blocks_is_right():
    """The recomputed blocks give autograd's gradient of the one-pass computation."""
    torch = pytest.importorskip("torch")
    from favorplus._backend import blocking as _backend

    q, k, v, w = _torch_problem(torch, L=96, heads=2, d=4, m=16)
    cot = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 2, 96, 4)))

    def grads(numbers):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_backend, "BLOCK_NUMBERS", numbers)
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            (fp.favor_attention(qq, kk, vv, w, causal=True, chunk_size=8) * cot).sum().backward()
            return [x.grad for x in (qq, kk, vv)]

    blocked = grads(4 * 16 * 2 * 2 * 16)  # blocks of 16 tokens: recomputed
    one = grads(1 << 30)
    for a, b in zip(blocked, one):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_layer_redraw_between_calls_keeps_the_pending_backward():
    """FavorAttention(redraw_interval=1) called twice before one backward: each call's
    gradient is that of its own projection (the redraw replaces the buffer)."""
    torch = pytest.importorskip("torch")
    from favorplus._backend import blocking as _backend
    from favorplus.torch import FavorAttention

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((2, 80, 16)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_backend, "BLOCK_NUMBERS", 4 * 16 * 2 * 4 * 8)  # recomputed blocks
        layer = FavorAttention(
            16,
            4,
            causal=True,
            batch_first=True,
            redraw_interval=1,
            seed=0,
            num_features=8,
            chunk_size=4,
            dtype=torch.float64,
        )
        layer.train()
        xs = x.clone().requires_grad_()
        first, _ = layer(xs)
        p0 = layer.projection.clone()
        second, _ = layer(xs)
        p1 = layer.projection.clone()
        assert not torch.equal(p0, p1)
        (first.square().sum() + second.sum()).backward()

        # The same two functions, each with its projection fixed (no redraw).
        fixed = FavorAttention(
            16,
            4,
            causal=True,
            batch_first=True,
            num_features=8,
            chunk_size=4,
            dtype=torch.float64,
        )
        fixed.load_state_dict({**layer.state_dict(), "projection": p0})
        xr = x.clone().requires_grad_()
        a = fixed(xr)[0].square().sum()
        fixed.projection = p1
        (a + fixed(xr)[0].sum()).backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for (name, p), (_, r) in zip(layer.named_parameters(), fixed.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12, msg=name)
