"""GPU benchmarks (CUDA): favorplus against exact attention and performer-pytorch.

    python benchmarks/gpu.py [--quick] [--out results.json]

Batch 1, 8 heads, d = 64, m = 256, float32 unless said. Times are the best of a
few repeats after a warm-up, synchronised; peak memory is
torch.cuda.max_memory_allocated during one call, minus what was allocated before it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

H, D, M = 8, 64, 256


def _timeit(fn: Callable[[], Any], sync: Callable[[], None], repeats: int = 5) -> float:
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def torch_cases(quick: bool) -> dict[str, Any]:
    import torch

    import favorplus as fp

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    out: dict[str, Any] = {"device": torch.cuda.get_device_name()}

    def inputs(L: int, grad: bool = False, dtype=torch.float32):
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k = (torch.randn(1, H, L, D, generator=g) * 0.35 for _ in range(2))
        v = torch.randn(1, H, L, D, generator=g)
        return [t.to(dev, dtype).requires_grad_(grad) for t in (q, k, v)]

    w = fp.draw_projection(M, D, seed=1, xp=torch, device=dev, dtype=torch.float32)

    def peak(fn: Callable[[], Any]) -> float:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    from performer_pytorch import FastAttention

    bidir = []
    for L in [4096, 16384] if quick else [4096, 16384, 65536]:
        q, k, v = inputs(L)
        perf = FastAttention(dim_heads=D, nb_features=M).to(dev)
        row = {"L": L}
        with torch.no_grad():
            row["favorplus"] = _timeit(lambda: fp.favor_attention(q, k, v, w), sync)
            row["performer"] = _timeit(lambda: perf(q, k, v), sync)
            row["sdpa (exact, fused)"] = _timeit(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), sync
            )
            if L <= 16384:
                row["softmax_attention (exact)"] = _timeit(
                    lambda: fp.softmax_attention(q, k, v), sync
                )
            row["favorplus peak MiB"] = peak(lambda: fp.favor_attention(q, k, v, w))
            qh, kh, vh = (t.half() for t in (q, k, v))
            row["favorplus fp16"] = _timeit(lambda: fp.favor_attention(qh, kh, vh, w.half()), sync)
        bidir.append(row)
    out["bidirectional forward (s)"] = bidir

    causal = []
    for L in [2048, 8192]:
        q, k, v = inputs(L, grad=True)
        perf = FastAttention(dim_heads=D, nb_features=M, causal=True).to(dev)

        def ours():
            fp.favor_attention(q, k, v, w, causal=True).sum().backward()

        def theirs():
            perf(q, k, v).sum().backward()

        row = {
            "L": L,
            "favorplus fwd+bwd": _timeit(ours, sync, 3),
            "performer fwd+bwd": _timeit(theirs, sync, 3),
            "favorplus peak MiB": peak(ours),
            "performer peak MiB": peak(theirs),
        }
        causal.append(row)
    out["causal forward+backward"] = causal

    lin = {}
    for L in [4096, 16384] if quick else [4096, 16384, 65536]:
        q, k, v = inputs(L)
        with torch.no_grad():
            lin[L] = {
                "causal fwd s": _timeit(lambda: fp.favor_attention(q, k, v, w, causal=True), sync),
                "bidir fwd s": _timeit(lambda: fp.favor_attention(q, k, v, w), sync),
                "causal peak MiB": peak(lambda: fp.favor_attention(q, k, v, w, causal=True)),
            }
    out["causal forward"] = lin
    return out


def other_backends() -> dict[str, Any]:
    import favorplus as fp

    res: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    L = 16384
    q, k = (rng.standard_normal((1, H, L, D)).astype(np.float32) * 0.35 for _ in range(2))
    v = rng.standard_normal((1, H, L, D)).astype(np.float32)
    w = fp.draw_projection(M, D, seed=1).astype(np.float32)
    try:
        import jax
        import jax.numpy as jnp

        dev = jax.devices("gpu")[0]
        a = [jax.device_put(x, dev) for x in (q, k, v, w)]
        f = jax.jit(lambda q, k, v, w: fp.favor_attention(q, k, v, w))
        fc = jax.jit(lambda q, k, v, w: fp.favor_attention(q, k, v, w, causal=True))
        res["jax gpu L=16384"] = {
            "bidir fwd s": _timeit(lambda: f(*a).block_until_ready(), lambda: None),
            "causal fwd s": _timeit(lambda: fc(*a).block_until_ready(), lambda: None),
            "exact s": _timeit(
                lambda: jax.jit(fp.softmax_attention)(*a[:3]).block_until_ready(), lambda: None
            ),
        }
        del jnp
    except Exception as e:  # report, do not hide
        res["jax gpu"] = f"failed: {e!r}"
    try:
        import cupy

        a = [cupy.asarray(x) for x in (q, k, v, w)]
        sync = cupy.cuda.Device().synchronize
        res["cupy L=16384"] = {
            "bidir fwd s": _timeit(lambda: fp.favor_attention(*a), sync),
            "causal fwd s": _timeit(lambda: fp.favor_attention(*a, causal=True), sync),
        }
    except Exception as e:
        res["cupy"] = f"failed: {e!r}"
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    res = {"torch": torch_cases(args.quick), "others": other_backends()}
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
