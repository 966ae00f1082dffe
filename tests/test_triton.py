"""The fused Triton kernels against the array API path (the reference).

On a machine without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``,
CPU tensors), so the kernels' logic is tested everywhere; with a CUDA GPU (and the
interpreter off) they run on it. Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not _GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined
pytest.importorskip("triton")

import favorplus as fp  # noqa: E402
from favorplus import _fastpath  # noqa: E402

DEV = torch.device("cuda" if _GPU else "cpu")
if _GPU:
    torch.backends.cuda.matmul.allow_tf32 = False  # compare full float32 products

KERNELS = ("softmax", "softmax_hyperbolic")
# (Keys beyond 64 make the bidirectional key state split into ranges, combined after.)


def _inputs(shape_q, shape_k, dv, m, seed=0, scale=0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g) * scale
    k = torch.randn(*shape_k, generator=g) * scale
    v = torch.randn(*shape_k[:-1], dv, generator=g)
    w = fp.draw_projection(m, shape_q[-1], seed=seed, xp=torch, dtype=torch.float32)
    return [t.to(DEV, dtype) for t in (q, k, v)] + [w.to(DEV)]


def _both(*args, **kwargs):
    """(fused, array API) results of the same call; checks that the fused path ran."""
    before = _fastpath.stats["fused"]
    with fp.fast_path("triton"):
        fused = fp.favor_attention(*args, **kwargs)
    assert _fastpath.stats["fused"] == before + 1, "the fused kernels did not run"
    with fp.fast_path("array_api"):
        ref = fp.favor_attention(*args, **kwargs)
    return fused, ref


def _close(a, b, rtol=2e-5, atol=2e-6):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape
    assert torch.isfinite(a).all()
    err = (a - b).abs().max().item()
    assert err <= atol + rtol * b.abs().max().item(), err


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("shape_q", "shape_k", "dv", "m"),
    [
        ((1, 20, 8), (1, 20, 8), 8, 16),  # one row, non-power-of-two length
        ((2, 3, 17, 12), (2, 3, 70, 12), 5, 40),  # Lq != Lk, several key blocks, m % 16
        ((2, 1, 9, 16), (3, 33, 16), 20, 24),  # broadcast leading dims
    ],
)
def test_matches_array_path(kernel, shape_q, shape_k, dv, m):
    q, k, v, w = _inputs(shape_q, shape_k, dv, m)
    fused, ref = _both(q, k, v, w, kernel=kernel)
    _close(fused, ref)


@pytest.mark.parametrize("kernel", KERNELS)
def test_large_norms_do_not_overflow(kernel):
    # exp(s |k|^2 / 2) and exp(w . k) overflow float32 many times over here; the
    # stabilizers (per-feature key maximum, per-query row maximum) keep every
    # exponent <= 0 and the normaliser >= 1.
    q, k, v, w = _inputs((2, 24, 16), (2, 80, 16), 8, 32, scale=30.0)
    fused, ref = _both(q, k, v, w, kernel=kernel)
    assert torch.isfinite(ref).all()
    _close(fused, ref, rtol=1e-4)


def test_masked_keys_leave_no_trace():
    q, k, v, w = _inputs((2, 2, 11, 8), (2, 2, 77, 8), 6, 16)
    keep = torch.rand(2, 1, 77, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[..., 0] = True
    keep = keep.to(DEV)
    full = keep.expand(2, 2, 77)
    # Masked keys and values are huge or NaN: they must change nothing.
    k_bad = torch.where(full[..., None], k, torch.full_like(k, float("nan")))
    k_bad[..., 1, :] = torch.where(full[..., 1, None], k[..., 1, :], 1e4)
    v_bad = torch.where(full[..., None], v, torch.full_like(v, float("inf")))
    fused, ref = _both(q, k_bad, v_bad, w, key_mask=keep)
    _close(fused, ref)
    # The same as dropping the masked keys from the sequence (batch row by row).
    for b in range(2):
        for h in range(2):
            idx = torch.nonzero(keep[b, 0]).flatten()
            with fp.fast_path("triton"):
                alone = fp.favor_attention(q[b, h], k[b, h, idx], v[b, h, idx], w)
            _close(fused[b, h], alone)


def test_all_keys_masked_gives_zero():
    q, k, v, w = _inputs((2, 5, 8), (2, 69, 8), 4, 16)
    keep = torch.tensor([[True] * 69, [False] * 69], device=DEV)
    keep[0, :64] = False  # the first 64 keys (one key range of the split state) masked
    fused, ref = _both(q, k, v, w, key_mask=keep)
    assert (fused[1] == 0).all()
    _close(fused, ref)


@pytest.mark.parametrize("kernel", KERNELS)
def test_additive_mask_and_key_bias(kernel):
    q, k, v, w = _inputs((1, 2, 13, 8), (1, 2, 29, 8), 8, 16)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(1, 2, 1, 29, generator=g) * 3.0
    bias[..., ::4] = float("-inf")
    fused, ref = _both(q, k, v, w, kernel=kernel, attn_mask=bias.to(DEV))
    _close(fused, ref)
    # exact check of the bias rule: a bias b_j is the same as exp(b_j) copies of key j
    # (here b = log 2: key j counted twice).
    kb = torch.zeros(1, 2, 29, device=DEV)
    kb[..., 3] = float(np.log(2.0))
    doubled = [torch.cat([x, x[..., 3:4, :]], dim=-2) for x in (k, v)]
    with fp.fast_path("triton"):
        a = fp.favor_attention(q, k, v, w, kernel=kernel, key_mask=kb)
        b = fp.favor_attention(q, *doubled, w, kernel=kernel)
    _close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    q, k, v, w = _inputs((2, 21, 16), (2, 45, 16), 8, 32, dtype=dtype)
    fused, ref = _both(q, k, v, w.to(dtype))
    assert fused.dtype == dtype
    # Both compute in float32 from the same rounded inputs; only the final rounding to
    # the half type differs: within one unit in the last place of the outputs.
    eps = torch.finfo(dtype).eps
    _close(fused, ref, rtol=2 * eps, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_match_array_path(kernel):
    base = _inputs((2, 2, 9, 8), (2, 2, 23, 8), 6, 16)
    bias = torch.randn(2, 1, 23, generator=torch.Generator().manual_seed(2)).to(DEV)
    grads = []
    for mode in ("triton", "array_api"):
        leaves = [t.clone().requires_grad_(True) for t in (*base, bias)]
        q, k, v, w, b = leaves
        with fp.fast_path(mode):
            out = fp.favor_attention(q, k, v, w, kernel=kernel, key_mask=b)
        (out * torch.cos(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        _close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("shape", "dv", "m"), [((1, 20, 8), 8, 16), ((2, 3, 150, 12), 5, 40)])
def test_causal_matches_array_path(kernel, shape, dv, m):
    # 150 tokens: three chunks of 64, the last one partial.
    q, k, v, w = _inputs(shape, shape, dv, m)
    fused, ref = _both(q, k, v, w, kernel=kernel, causal=True)
    _close(fused, ref)
    # chunks of 16 instead of 64: the same result up to rounding
    with fp.fast_path("triton"):
        _close(fp.favor_attention(q, k, v, w, kernel=kernel, causal=True, chunk_size=16), ref)


def test_causal_masks_biases_and_large_norms():
    q, k, v, w = _inputs((2, 2, 90, 8), (2, 2, 90, 8), 6, 16, scale=20.0)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(2, 1, 90, generator=g) * 2.0
    bias[..., 5::7] = float("-inf")
    bias[1, ..., :70] = float("-inf")  # a row whose first 70 queries see no key at all
    fused, ref = _both(q, k, v, w, causal=True, key_mask=bias.to(DEV))
    assert torch.isfinite(ref).all()
    assert (fused[1, :, :70] == 0).all()
    _close(fused, ref, rtol=1e-4)


def test_causal_is_leak_free():
    # An adversarial future (right after t a key whose log-features are 200 higher,
    # exp(200) overflows float32; values of 1e30 later, in the same chunk) changes no bit
    # of the outputs up to t: the references c_j look at the past only (a maximum over
    # all positions would turn the earlier rows into 0 / 0).
    q, k, v, w = _inputs((1, 100, 8), (1, 100, 8), 4, 16)
    t = 40
    v2 = v.clone()
    v2[:, t + 2 :] = 1e30
    bias = torch.zeros(1, 100, device=DEV)
    bias[:, t + 1] = 200.0
    with fp.fast_path("triton"):
        a = fp.favor_attention(q, k, v, w, causal=True)
        b = fp.favor_attention(q, k, v2, w, causal=True, key_mask=bias)
    assert _fastpath.stats["fused"] >= 2
    assert torch.isfinite(a).all() and torch.isfinite(b[:, : t + 2]).all()
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    # row t + 1 is then (nearly) all value t + 1
    _close(b[:, t + 1], v[:, t + 1], rtol=1e-5)


def test_causal_gradients_match_array_path():
    base = _inputs((2, 70, 8), (2, 70, 8), 6, 16)
    grads = []
    for mode in ("triton", "array_api"):
        leaves = [t.clone().requires_grad_(True) for t in base]
        with fp.fast_path(mode):
            out = fp.favor_attention(*leaves, causal=True)
        (out * torch.cos(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        _close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=8)
@given(
    lq=st.integers(1, 90),
    lk=st.integers(1, 90),
    d=st.integers(1, 20),
    dv=st.integers(1, 20),
    m=st.integers(1, 40),
    kernel=st.sampled_from(KERNELS),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_fused_equals_array_path(lq, lk, d, dv, m, kernel, causal, masked, seed):
    if causal:
        lq = lk
    q, k, v, w = _inputs((2, lq, d), (2, lk, d), dv, m, seed=seed, scale=1.5)
    mask = None
    if masked:
        g = torch.Generator().manual_seed(seed)
        mask = (torch.rand(2, lk, generator=g) > 0.5).to(DEV)
    fused, ref = _both(q, k, v, w, kernel=kernel, causal=causal, key_mask=mask)
    _close(fused, ref, rtol=1e-4, atol=1e-6)


def test_uncovered_calls_fall_back():
    q, k, v, w = _inputs((1, 12, 8), (1, 12, 8), 8, 16)
    before = _fastpath.stats["fused"]
    with fp.fast_path("triton"):
        # causal with fewer queries than keys (the last Lq positions)
        causal = fp.favor_attention(q[:, 4:], k, v, w, causal=True)
        relu = fp.favor_attention(q, k, v, w, kernel="relu")
        dropped = fp.favor_attention(q, k, v, w, dropout_p=0.5, dropout_rng=0)
        d64 = fp.favor_attention(q.double(), k.double(), v.double(), w.double())
    assert _fastpath.stats["fused"] == before
    with fp.fast_path("array_api"):
        _close(causal, fp.favor_attention(q[:, 4:], k, v, w, causal=True), rtol=0, atol=0)
        _close(relu, fp.favor_attention(q, k, v, w, kernel="relu"), rtol=0, atol=0)
        again = fp.favor_attention(q, k, v, w, dropout_p=0.5, dropout_rng=0)
        _close(dropped, again, rtol=0, atol=0)
    assert d64.dtype == torch.float64


@pytest.mark.skipif(_GPU, reason="auto mode runs the kernels on a GPU")
def test_auto_mode_leaves_cpu_tensors_to_the_array_path():
    q, k, v, w = _inputs((1, 8, 8), (1, 8, 8), 8, 16)
    before = _fastpath.stats["fused"]
    assert fp.get_fast_path() == "auto"
    fp.favor_attention(q, k, v, w)
    assert _fastpath.stats["fused"] == before


def test_switch():
    assert fp.get_fast_path() == "auto"
    with pytest.raises(ValueError, match="fast path mode must be one of"):
        fp.set_fast_path("cuda")
    with pytest.raises(ValueError, match="got 'fused'"):
        with fp.fast_path("fused"):
            pass
    with fp.fast_path("array_api"):
        assert fp.get_fast_path() == "array_api"
        with fp.fast_path("triton"):
            assert fp.get_fast_path() == "triton"
        assert fp.get_fast_path() == "array_api"
    assert fp.set_fast_path("triton") == "auto"
    assert fp.set_fast_path("auto") == "triton"


def test_import_favorplus_does_not_import_triton():
    code = "import sys, favorplus; print('triton' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_fused.py"
    spec = importlib.util.spec_from_file_location("gpu_fused", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_bounds():
    bench = _bench_module()
    # L = 65536, 8 heads, d = 64, m = 256, float32: q, k, v, out = 4 x 128 MiB.
    nbytes, flops = bench.favor_work(65536, 8, 64, 256, 4, backward=False)
    assert nbytes == 4 * 8 * 65536 * 64 * 4
    assert flops == 8 * 65536 * (4 * 64 * 256 + 4 * 256 * 65)
    # memory-bound there: 0.537 GB at 4.8 TB/s = 0.112 ms (~69 GFLOP take 0.14 ms at 494 T)
    t = bench.bound_seconds(nbytes, flops, 4.8e12, 494e12)
    assert t == pytest.approx(max(nbytes / 4.8e12, flops / 494e12))
    assert bench.sdpa_work(1024, 1, 64, 2, causal=True, backward=False)[1] == 2.0 * 1024**2 * 64


@pytest.mark.skipif(_GPU, reason="the smoke run is the CPU (interpreter) variant")
def test_gpu_benchmark_smoke(tmp_path):
    import argparse
    import json

    bench = _bench_module()
    out = tmp_path / "fused.json"
    args = argparse.Namespace(
        smoke=True,
        quick=True,
        out=str(out),
        dtype="float32",
        bandwidth=4.8e12,
        cell_cap=60.0,
        tf32=False,
    )
    res = bench.run(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    cells = res["cells"]
    assert {c["method"] for c in cells} == {"favorplus fused", "favorplus array API", "torch SDPA"}
    assert all(c["status"] == "ok" and 0 < c["fraction of bound"] for c in cells)
    for c in cells:
        assert c["fused kernels ran"] == (c["method"] == "favorplus fused"), c
