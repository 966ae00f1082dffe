"""Fused fast path benchmark (torch CUDA): favorplus fused vs its array API path vs
performer-pytorch vs torch SDPA (FlashAttention), side by side in one run.

    python benchmarks/gpu_fused.py [--quick] [--out fused.json]
    TRITON_INTERPRET=1 python benchmarks/gpu_fused.py --smoke   # CPU, tiny, logic only

Batch 1, 8 heads, d = 64, m = 256, float32 (full float32 products; ``--tf32``: TF32
tensor-core products for every method, favorplus's kernels included),
L = 1k ... 256k; bidirectional and causal, forward and forward+backward. Each cell is
the best of a few synchronised repeats after a warm-up; a method whose cell takes more
than ``--cell-cap`` seconds, or runs out of memory, is not run at longer lengths
(recorded as "skipped" / "oom"). Results are written after every length, so a run cut
short still leaves its figures.

Bound fractions: ``bound_s / time`` where ``bound_s = max(bytes / bandwidth, flops /
peak)`` of the method's own minimal work (see :func:`favor_work`, :func:`sdpa_work`);
defaults are the H200's 4.8 TB/s and 494 dense TF32 TFLOP/s (989 for fp16 / bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

H, D, M = 8, 64, 256
BANDWIDTH = 4.8e12  # bytes / s, H200 HBM3e
PEAK = {"float32": 494e12, "float16": 989e12, "bfloat16": 989e12}  # dense tensor-core FLOP/s


def favor_work(
    length: int, heads: int, d: int, m: int, itemsize: int, backward: bool
) -> tuple[float, float]:
    """(bytes, flops) a fused FAVOR+ call cannot avoid: read q, k, v and write the output
    (forward); also read the output gradient and write dq, dk, dv (backward). FLOPs:
    features of queries and keys (2 L d m each), key state and readout (2 L m (d + 1)
    each); a backward does about twice the forward's products."""
    arrays = 8 if backward else 4
    nbytes = arrays * heads * length * d * itemsize
    flops = heads * length * (4 * d * m + 4 * m * (d + 1))
    return float(nbytes), float(flops * (3 if backward else 1))


def sdpa_work(
    length: int, heads: int, d: int, itemsize: int, causal: bool, backward: bool
) -> tuple[float, float]:
    """(bytes, flops) of exact attention (FlashAttention): the same input/output traffic,
    4 L^2 d FLOPs per head (half when causal), 2.5x that with the backward."""
    arrays = 8 if backward else 4
    nbytes = arrays * heads * length * d * itemsize
    flops = 4.0 * heads * length * length * d * (0.5 if causal else 1.0)
    return float(nbytes), flops * (3.5 if backward else 1.0)


def bound_seconds(nbytes: float, flops: float, bandwidth: float, peak: float) -> float:
    """The roofline time: whichever of memory traffic and arithmetic takes longer."""
    return max(nbytes / bandwidth, flops / peak)


def _timeit(fn: Callable[[], Any], sync: Callable[[], None], repeats: int) -> float:
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def methods(torch: Any, fp: Any, w: Any, causal: bool, have_performer: bool) -> dict[str, Any]:
    """name -> (callable(q, k, v) -> output, kind of work for the bound)."""
    import torch.nn.functional as F

    def fused(q, k, v):
        with fp.fast_path("triton"):
            return fp.favor_attention(q, k, v, w, causal=causal)

    def array_api(q, k, v):
        with fp.fast_path("array_api"):
            return fp.favor_attention(q, k, v, w, causal=causal)

    out = {"favorplus fused": (fused, "favor"), "favorplus array API": (array_api, "favor")}
    if have_performer:
        from performer_pytorch import FastAttention

        perf = FastAttention(dim_heads=w.shape[1], nb_features=w.shape[0], causal=causal)
        perf = perf.to(w.device)
        out["performer-pytorch"] = (lambda q, k, v: perf(q, k, v), "favor")
    out["torch SDPA"] = (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "sdpa",
    )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    import torch

    import favorplus as fp

    smoke = args.smoke
    dev = torch.device("cpu" if smoke else "cuda")
    if not smoke:
        # TF32 products (tensor cores) for every float32 method, or none of them.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    heads, d, m = (2, 16, 32) if smoke else (H, D, M)
    lengths = [64, 128] if smoke else ([1024, 4096, 16384] if args.quick else
                                       [1024, 2048, 4096, 8192, 16384, 65536, 262144])  # fmt: skip
    repeats = 1 if smoke else 3
    have_performer = importlib.util.find_spec("performer_pytorch") is not None and not smoke
    dtype = getattr(torch, args.dtype)
    itemsize = torch.finfo(dtype).bits // 8
    peak = PEAK[args.dtype]
    w = fp.draw_projection(m, d, seed=1, xp=torch, device=dev, dtype=torch.float32)
    res: dict[str, Any] = {
        "device": "cpu (interpreter smoke run)" if smoke else torch.cuda.get_device_name(),
        "heads": heads, "d": d, "m": m, "dtype": args.dtype,
        "bandwidth B/s": args.bandwidth, "peak FLOP/s": peak,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32), "cells": [],
    }  # fmt: skip
    if not have_performer and not smoke:
        res["performer-pytorch"] = "not installed: not measured"
    stopped: set[tuple[str, bool, bool]] = set()
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        base = [torch.randn(1, heads, length, d, generator=g) * 0.35 for _ in range(3)]
        for causal in (False, True):
            for backward in (False, True):
                for name, (fn, work) in methods(torch, fp, w, causal, have_performer).items():
                    key = (name, causal, backward)
                    cell: dict[str, Any] = {
                        "L": length, "method": name, "causal": causal, "backward": backward,
                    }  # fmt: skip
                    res["cells"].append(cell)
                    if key in stopped:
                        cell["status"] = "skipped (slower than the cap at a shorter L)"
                        continue
                    q, k, v = (x.to(dev, dtype).requires_grad_(backward) for x in base)

                    def call(fn=fn, q=q, k=k, v=v, backward=backward):
                        if backward:
                            fn(q, k, v).sum().backward()
                        else:
                            with torch.no_grad():
                                fn(q, k, v)

                    before = fp._fastpath.stats["fused"]
                    try:
                        t = _timeit(call, sync, repeats)
                    except torch.OutOfMemoryError:
                        cell["status"] = "oom"
                        stopped.add(key)
                        torch.cuda.empty_cache()
                        continue
                    if work == "favor":
                        nbytes, flops = favor_work(length, heads, d, m, itemsize, backward)
                    else:
                        nbytes, flops = sdpa_work(length, heads, d, itemsize, causal, backward)
                    bound = bound_seconds(nbytes, flops, args.bandwidth, peak)
                    # "favorplus fused" on a call no kernel covers runs the array API path.
                    cell["fused kernels ran"] = fp._fastpath.stats["fused"] > before
                    cell.update(
                        {"s": t, "bound s": bound, "fraction of bound": bound / t, "status": "ok"}
                    )
                    if t > args.cell_cap:
                        stopped.add(key)
        _ratios(res)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    return res


def _ratios(res: dict[str, Any]) -> None:
    """Each cell's time over performer-pytorch's and SDPA's in the same setting."""
    ok = {(c["L"], c["method"], c["causal"], c["backward"]): c for c in res["cells"] if "s" in c}
    for (length, name, causal, backward), cell in ok.items():
        for peer in ("performer-pytorch", "torch SDPA"):
            other = ok.get((length, peer, causal, backward))
            if other is not None and peer != name:
                cell[f"x {peer}"] = cell["s"] / other["s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU tensors, tiny sizes (interpreter)")
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="float32", choices=sorted(PEAK))
    p.add_argument("--bandwidth", type=float, default=BANDWIDTH)
    p.add_argument("--cell-cap", type=float, default=2.0)
    p.add_argument("--tf32", action="store_true", help="float32 products in TF32 (all methods)")
    res = run(p.parse_args())
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
