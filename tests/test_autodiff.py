"""Autodiff and transformations: torch autograd, jax.grad / jit / vmap / lax.scan."""

from __future__ import annotations

import math

import numpy as np
import pytest

import favorplus as fp


def _problem(L=13, d=6, dv=3, m=20, seed=0, norm=1.0):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((2, L, d)) * norm * 0.5 for _ in range(2))
    v = rng.standard_normal((2, L, dv))
    mask = rng.random((2, L)) < 0.8
    w = fp.draw_projection(m, d, seed=seed + 1)
    return q, k, v, mask, w


def _quadratic(lib, q, k, v, w, mask, causal, kernel):
    """The quadratic form written directly in the autodiff library (no favorplus code)."""
    d = q.shape[-1]
    s = math.sqrt(1 / math.sqrt(d))

    def phi(x):
        x = x * s
        u = x @ w.T
        sq = 0.5 * (x * x).sum(-1)[..., None]
        if kernel == "softmax":
            return lib.exp(u - sq)
        return lib.exp(-sq) * lib.concatenate([lib.exp(u), lib.exp(-u)], -1)

    a = phi(q) @ lib.swapaxes(phi(k), -1, -2)
    a = a * mask[..., None, :]
    if causal:
        a = lib.tril(a)
    return (a @ v) / a.sum(-1)[..., None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic"])
def test_torch_gradients_match_quadratic_form(causal, kernel):
    torch = pytest.importorskip("torch")
    q, k, v, mask, w = _problem()
    mask[:, 0] = True  # every causal row sees a key
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tw, tm = torch.tensor(w), torch.tensor(mask)
    g = torch.tensor(np.random.default_rng(9).standard_normal((2, 13, 3)))
    out = fp.favor_attention(
        tq, tk, tv, tw, kernel=kernel, causal=causal, key_mask=tm, chunk_size=4
    )
    grads = torch.autograd.grad((out * g).sum(), (tq, tk, tv))
    ref = _quadratic(torch, tq, tk, tv, tw, tm.double(), causal, kernel)
    want = torch.autograd.grad((ref * g).sum(), (tq, tk, tv))
    for a, b in zip(grads, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_float32_gradients_finite_with_extreme_inputs(causal):
    torch = pytest.importorskip("torch")
    q, k, v, mask, w = _problem(L=40, d=16, norm=10 * 16**0.25 * 2)
    k[:, 7] *= 50
    tq, tk, tv = (torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (q, k, v))
    out = fp.favor_attention(
        tq, tk, tv, torch.tensor(w, dtype=torch.float32), causal=causal, chunk_size=8
    )
    out.sum().backward()
    for t in (out, tq.grad, tk.grad, tv.grad):
        assert torch.isfinite(t).all()


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic"])
def test_jax_grad_matches_quadratic_form(jax, causal, kernel):
    jnp = jax.numpy
    q, k, v, mask, w = _problem(seed=3)
    mask[:, 0] = True
    g = np.random.default_rng(9).standard_normal((2, 13, 3))
    jw, jm = jnp.asarray(w), jnp.asarray(mask)

    def ours(q, k, v):
        out = fp.favor_attention(
            q, k, v, jw, kernel=kernel, causal=causal, key_mask=jm, chunk_size=4
        )
        return (out * g).sum()

    def theirs(q, k, v):
        return (_quadratic(jnp, q, k, v, jw, jm.astype(q.dtype), causal, kernel) * g).sum()

    args = tuple(jnp.asarray(a) for a in (q, k, v))
    got = jax.grad(ours, argnums=(0, 1, 2))(*args)
    want = jax.grad(theirs, argnums=(0, 1, 2))(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
def test_jax_jit_vmap_and_float32_grad(jax, causal):
    jnp = jax.numpy
    q, k, v, mask, w = _problem(L=21, norm=20.0)
    jw = jnp.asarray(w, dtype=jnp.float32)
    f = lambda q, k, v: fp.favor_attention(q, k, v, jw, causal=causal, chunk_size=5)  # noqa: E731
    args = tuple(jnp.asarray(a, dtype=jnp.float32) for a in (q, k, v))
    eager = f(*args)
    np.testing.assert_allclose(
        np.asarray(jax.jit(f)(*args)), np.asarray(eager), rtol=2e-5, atol=2e-6
    )
    per_row = jax.vmap(f)(*args)  # maps over the leading batch axis
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(eager), rtol=2e-5, atol=2e-6)
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(*args)
    assert all(bool(jnp.isfinite(x).all()) for x in grads)


def test_jax_causal_program_does_not_grow_with_length(jax):
    """Under jit the traced program (hence compile time) does not grow with L."""
    jnp = jax.numpy
    w = jnp.asarray(fp.draw_projection(16, 8, seed=0), dtype=jnp.float32)

    def size(L):
        x = jnp.zeros((2, L, 8), dtype=jnp.float32)
        f = lambda q, k, v: fp.favor_attention(q, k, v, w, causal=True, chunk_size=16)  # noqa: E731
        jaxpr = jax.make_jaxpr(f)(x, x, x)
        return len(str(jaxpr).splitlines())

    # Equal up to a few equations (jnp elides some broadcasts depending on sizes); a
    # loop unrolled over the chunks would add several equations per chunk: 64 chunks
    # at L = 1024, 4096 at L = 65536.
    small, large = size(1024), size(65536)
    assert abs(large - small) <= 30, (small, large)


def test_jax_decoding_in_lax_scan(jax):
    jnp = jax.numpy
    q, k, v, _, w = _problem(L=17, seed=5)
    jw = jnp.asarray(w)
    full = fp.favor_attention(*(jnp.asarray(a) for a in (q, k, v)), jw, causal=True)
    state = fp.init_causal_state(jw, 3, batch_shape=(2,), dtype=jnp.float64)

    def body(state, tok):
        qt, kt, vt = tok
        out, state = fp.favor_attention_step(qt[:, None], kt[:, None], vt[:, None], jw, state)
        return state, out[:, 0]

    toks = tuple(jnp.moveaxis(jnp.asarray(a), 1, 0) for a in (q, k, v))
    _, outs = jax.jit(lambda s, t: jax.lax.scan(body, s, t))(state, toks)
    np.testing.assert_allclose(
        np.asarray(jnp.moveaxis(outs, 0, 1)), np.asarray(full), rtol=1e-10, atol=1e-12
    )


def test_torch_decoding_step_compiles():
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    q, k, v, _, w = _problem(L=6, seed=2)
    tw = torch.tensor(w)
    tq, tk, tv = (torch.tensor(a) for a in (q, k, v))
    full = fp.favor_attention(tq, tk, tv, tw, causal=True)
    state = fp.init_causal_state(tw, 3, batch_shape=(2,), dtype=torch.float64)

    def step(qt, kt, vt, state):
        return fp.favor_attention_step(qt, kt, vt, tw, state)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    outs = []
    for t in range(6):
        o, state = compiled(tq[:, t : t + 1], tk[:, t : t + 1], tv[:, t : t + 1], state)
        outs.append(o)
    np.testing.assert_allclose(torch.cat(outs, 1).numpy(), full.numpy(), rtol=1e-10, atol=1e-12)


# --- CPU blocks under torch autograd: recomputation, split blocks, torch.func -------------


@pytest.fixture(params=["blocks", "one block"])
def blocks(request, monkeypatch):
    """CPU blocks of a few tokens (12 under autograd: 3 blocks of up to 3 chunks,
    recomputed in the backward pass in causal mode), or one block for the whole
    sequence (no recomputation: autograd's own checks see every in-place step)."""
    from favorplus._backend import blocking as _backend

    size = 4 * 12 * 2 * 20 if request.param == "blocks" else 1 << 30  # 48 tokens of 2 x 20
    monkeypatch.setattr(_backend, "BLOCK_NUMBERS", size)
    return request.param


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyperbolic"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("which", ["q", "k", "v", "projection", "all"])
def test_torch_blocked_gradients_of_each_input(blocks, monkeypatch, causal, which, kernel):
    """Gradients with respect to any subset of the inputs (here one, or all), through
    several CPU blocks (recomputed in the backward pass when causal), equal those of
    the quadratic form: nothing that autograd needs is changed in place, and each
    block's recomputation reproduces what its forward pass saved."""
    torch = pytest.importorskip("torch")
    from favorplus import causal as causal_module

    recomputed = _count_calls(monkeypatch, causal_module, "recompute")
    q, k, v, mask, w = _problem(L=30, m=20, seed=4)
    mask[:, 0] = True
    names = ["q", "k", "v", "projection"]
    grad = {n: which in (n, "all") for n in names}
    tq, tk, tv, tw = (torch.tensor(a, requires_grad=grad[n]) for n, a in zip(names, (q, k, v, w)))
    tm = torch.tensor(mask)
    wanted = [t for t, n in zip((tq, tk, tv, tw), names) if grad[n]]
    g = torch.tensor(np.random.default_rng(2).standard_normal((2, 30, 3)))
    out = fp.favor_attention(
        tq, tk, tv, tw, kernel=kernel, causal=causal, key_mask=tm, chunk_size=4
    )
    got = torch.autograd.grad((out * g).sum(), wanted)
    ref = _quadratic(torch, tq, tk, tv, tw, tm.double(), causal, kernel)
    want = torch.autograd.grad((ref * g).sum(), wanted)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-11)
    if causal and blocks == "blocks":
        assert len(recomputed) >= 3  # several blocks, each recomputed


@pytest.mark.parametrize("causal", [False, True])
def test_torch_func_grad_equals_autograd(blocks, causal):
    """torch.func transforms hide the tracking from requires_grad and turn saved-tensor
    hooks off: favorplus must then neither mutate tensors in place nor recompute."""
    torch = pytest.importorskip("torch")
    q, k, v, mask, w = _problem(L=30, m=20, seed=6)
    tq, tk, tv, tw = (torch.tensor(a) for a in (q, k, v, w))

    def loss(q, k, v):
        return fp.favor_attention(q, k, v, tw, causal=causal, chunk_size=4).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(tq, tk, tv)
    leaves = [t.clone().requires_grad_(True) for t in (tq, tk, tv)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


def test_recompute_keeps_no_temporaries_and_gives_the_same_gradients():
    """favorplus._backend.recompute: after the forward pass no temporary of the function
    is alive (plain autograd keeps exp's result); gradients, also of second order, are
    those of the plain call."""
    torch = pytest.importorskip("torch")
    import weakref

    from favorplus._backend import recompute

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((5, 4)), requires_grad=True)
    w = torch.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    refs = []

    def fn(x, w):
        e = (x @ w).exp()
        refs.append(weakref.ref(e))
        return (e * x.sum(-1, keepdim=True)).sin().sum()

    plain = fn(x, w)
    assert refs[-1]() is not None  # autograd keeps exp's result for the backward pass
    ours = recompute(fn, x, w)
    assert refs[-1]() is None  # ... recompute keeps nothing but the inputs
    want = torch.autograd.grad(plain, (x, w), create_graph=True)
    got = torch.autograd.grad(ours, (x, w), create_graph=True)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-12)
    second_want = torch.autograd.grad(sum(t.sum() for t in want), (x, w))
    second_got = torch.autograd.grad(sum(t.sum() for t in got), (x, w))
    for a, b in zip(second_got, second_want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_func_vmap_equals_batched_call(blocks, causal):
    torch = pytest.importorskip("torch")
    q, k, v, mask, w = _problem(L=30, m=20, seed=7)
    tq, tk, tv, tw, tm = (torch.tensor(a) for a in (q, k, v, w, mask))

    def one(q, k, v, m):
        return fp.favor_attention(q, k, v, tw, causal=causal, key_mask=m, chunk_size=4)

    mapped = torch.func.vmap(one)(tq, tk, tv, tm)
    np.testing.assert_allclose(mapped.numpy(), one(tq, tk, tv, tm).numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mapped", ["k", "v", "kv", "km", "qv", "m"])
def test_torch_func_vmap_with_unmapped_inputs(blocks, causal, mapped):
    """vmap over some inputs only (``in_dims`` None for the others, e.g. one query for
    a batch of key sets) equals the loop over the mapped axis; an in-place step on an
    unmapped temporary with a mapped operand would need the batch axis it lacks."""
    torch = pytest.importorskip("torch")
    q, k, v, mask, w = _problem(L=30, m=20, seed=7)
    tq, tk, tv, tw, tm = (torch.tensor(a) for a in (q, k, v, w, mask))
    full = dict(zip("qkvm", (tq, tk, tv, tm)))
    dims = tuple(0 if n in mapped else None for n in "qkvm")
    args = [full[n] if d == 0 else full[n][0] for n, d in zip("qkvm", dims)]

    def one(q, k, v, m):
        return fp.favor_attention(q, k, v, tw, causal=causal, key_mask=m, chunk_size=4)

    got = torch.func.vmap(one, in_dims=dims)(*args)
    rows = [[a[i] if d == 0 else a for a, d in zip(args, dims)] for i in range(tq.shape[0])]
    want = torch.stack([one(*row) for row in rows])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("causal", "dims"), [(False, (None, 0, 0)), (True, (0, None, 0))])
def test_torch_compile_of_vmap_with_unmapped_inputs(causal, dims):
    """torch.compile traces the vmap itself: the same unmapped inputs compile and equal
    the loop (its tracing saw an in-place step on one example's shapes and failed)."""
    torch = pytest.importorskip("torch")
    q, k, v, _, w = _problem(L=12, m=8, seed=3)
    full = [torch.tensor(a) for a in (q, k, v)]
    args = [x if d == 0 else x[0] for x, d in zip(full, dims)]
    tw = torch.tensor(w)

    def one(q, k, v):
        return fp.favor_attention(q, k, v, tw, causal=causal)

    got = torch.compile(torch.func.vmap(one, in_dims=dims), fullgraph=True)(*args)
    want = torch.stack(
        [one(*(a[i] if d == 0 else a for a, d in zip(args, dims))) for i in range(2)]
    )
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-14)
