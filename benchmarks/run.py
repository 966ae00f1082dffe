"""favorplus benchmarks: ratios measured side by side in one run.

    python benchmarks/run.py                      # every benchmark (minutes)
    python benchmarks/run.py bidirectional causal # some of them
    python benchmarks/run.py --quick              # small sizes, under a minute

Timings are the best of a few repeats after a warm-up, forward passes without
autograd unless "fwd+bwd" is said. Timings whose ratios are goals run in alternation,
so that they see the same machine state: favorplus, plain and performer-pytorch per
backend and length; the causal forward, the bidirectional forward and the machine
bound's probes. Implementations of very different memory use run one after the other
instead (a call right after one that used gigabytes runs on cold memory).
Peak memory is the peak resident set size of a fresh subprocess during one call,
minus its size just before the call (inputs included in neither): after a first call on
64 tokens (the libraries' lazy set-up is not counted), with freed heap memory returned
to the system and the peak counter reset just before the call. Results are
printed and written as JSON to benchmarks/results/<name>.json (or the folder given
by --out).

Competitor: performer-pytorch's FastAttention (installed only for benchmarks), on
its default CPU path. "plain" is the same algorithm as favorplus hand-written in
plain torch / numpy, to show what the array API layer costs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
H, D, M = 8, 64, 256


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved_best(fns: list[Callable[[], Any]], rounds: int) -> list[float]:
    """Best time of each function over ``rounds`` rounds that run them in turn: a
    ratio of two such times sees the same machine state (this machine is shared)."""
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def progress(i: int, n: int, label: str) -> None:
    done = int(24 * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (24 - done)}] {i}/{n} {label:<48}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


# ----------------------------------------------------------------------------------
# The implementations under test, each built as fn() closures over fixed inputs.


def inputs(L: int, lib: str, grad: bool = False, seed: int = 0) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, H, L, D)).astype(np.float32) * s for s in (0.35, 0.35, 1.0))
    if lib == "numpy":
        return q, k, v
    import torch

    return tuple(torch.tensor(a, requires_grad=grad) for a in (q, k, v))


def make(impl: str, L: int, *, causal: bool = False, grad: bool = False) -> Callable[[], Any]:
    """A zero-argument callable running one implementation on fixed inputs of length L."""
    import favorplus as fp

    lib = "numpy" if impl.endswith("numpy") else "torch"
    q, k, v = inputs(L, lib, grad)
    if lib == "torch":
        import torch

        w = fp.draw_projection(M, D, seed=1, xp=torch, dtype=torch.float32)
    else:
        w = fp.draw_projection(M, D, seed=1, dtype=np.float32)

    if impl in ("favorplus-torch", "favorplus-numpy"):

        def run():
            return fp.favor_attention(q, k, v, w, causal=causal)
    elif impl in ("exact-torch", "exact-numpy"):

        def run():
            return fp.softmax_attention(q, k, v, causal=causal)
    elif impl == "plain-torch":
        run = lambda: plain_torch(q, k, v, w)  # noqa: E731
    elif impl == "plain-numpy":
        run = lambda: plain_numpy(q, k, v, w)  # noqa: E731
    elif impl == "performer-pytorch":
        import torch
        from performer_pytorch import FastAttention

        attn = FastAttention(dim_heads=D, nb_features=M, causal=causal)

        def run():
            return attn(q, k, v)
    else:
        raise ValueError(impl)

    if not grad:
        if lib == "torch":
            import torch

            def fwd():
                with torch.no_grad():
                    return run()

            return fwd
        return run

    def fwd_bwd():
        out = run()
        out.sum().backward()
        return out

    return fwd_bwd


def plain_torch(q, k, v, w):
    """Bidirectional FAVOR+ with the same stabilizers, hand-written in plain torch."""
    import torch

    with torch.no_grad():
        ws = w * D**-0.25
        uk = torch.matmul(k, ws.T)
        uk.sub_(0.5 * D**-0.5 * (k * k).sum(-1, keepdim=True))
        ck = uk.amax(-2, keepdim=True)
        kf = uk.sub_(ck).exp_()
        uq = torch.matmul(q, ws.T).add_(ck)
        qf = uq.sub_(uq.amax(-1, keepdim=True)).exp_()
        state = torch.cat([kf.transpose(-1, -2) @ v, kf.sum(-2).unsqueeze(-1)], -1)
        out = qf @ state
        return out[..., :-1] / out[..., -1:]


def plain_numpy(q, k, v, w):
    """Bidirectional FAVOR+ with the same stabilizers, hand-written in plain numpy."""
    ws = w * D**-0.25
    uk = k @ ws.T
    uk -= 0.5 * D**-0.5 * (k * k).sum(-1, keepdims=True)
    ck = uk.max(-2, keepdims=True)
    uk -= ck
    kf = np.exp(uk, out=uk)
    uq = q @ ws.T
    uq += ck
    uq -= uq.max(-1, keepdims=True)
    qf = np.exp(uq, out=uq)
    state = np.concatenate([np.swapaxes(kf, -1, -2) @ v, kf.sum(-2)[..., None]], -1)
    out = qf @ state
    return out[..., :-1] / out[..., -1:]


# ----------------------------------------------------------------------------------
# Peak memory in a fresh process.


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(impl: str, L: int, *, causal: bool = False, grad: bool = False) -> float:
    """Peak extra resident memory (MiB) of one call, measured in a fresh subprocess."""
    spec = json.dumps({"impl": impl, "L": L, "causal": causal, "grad": grad})
    res = subprocess.run(
        [sys.executable, __file__, "--_peak", spec], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        return math.nan
    return float(res.stdout.strip().splitlines()[-1])


def _peak_child(spec: str) -> None:
    s = json.loads(spec)
    # A first call on 64 tokens: the libraries' lazy set-up (thread pools, buffers) is
    # not part of the peak of a call at length L.
    make(s["impl"], 64, causal=s["causal"], grad=s["grad"])()
    fn = make(s["impl"], s["L"], causal=s["causal"], grad=s["grad"])
    ok = release_and_reset()
    before = _rss()
    fn()
    print((_peak_rss() - before) / 2**20 if ok else math.nan)


def release_and_reset() -> bool:
    """Return freed heap memory to the system (glibc) and reset this process's peak
    resident size (VmHWM) to its current one (Linux): a call measured next cannot
    reuse pages already counted, and its peak is its own.

    False where the peak cannot be reset (no writable /proc/self/clear_refs).
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    # VmHWM belongs to this process image (ru_maxrss would carry the parent's over exec).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ----------------------------------------------------------------------------------
# Machine bound (the definition).


def bound_probes(L: int) -> dict[str, Callable[[], Any]]:
    """The three timings the machine bound is made of, as closures."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(H * L * M)
    out = torch.empty_like(x)
    return {
        "matmul 2048": lambda: a @ b,
        "exp": lambda: torch.exp(x),
        # The same exponentials written into memory that is already there (no page
        # faults): the faster rate, hence the stricter bound, reported beside the issue's.
        "exp in place": lambda: torch.exp(x, out=out),
    }


def bound_from(times: dict[str, float], L: int) -> dict[str, float]:
    """The machine bound at length L from the timings of :func:`bound_probes`."""
    flops_rate = 2 * 2048**3 / times["matmul 2048"]
    exp_rate = H * L * M / times["exp"]
    exp_rate_out = H * L * M / times["exp in place"]
    flops = 4 * 2 * H * L * D * M
    exps = 2 * H * L * M
    return {
        "matmul_gflops": flops_rate / 1e9,
        "exp_per_s": exp_rate,
        "bound_s": flops / flops_rate + exps / exp_rate,
        "exp_per_s_in_place": exp_rate_out,
        "strict_bound_s": flops / flops_rate + exps / exp_rate_out,
    }


def causal_products(L: int, chunk: int, block: int) -> Callable[[], None]:
    """The matrix products alone that chunked causal FAVOR+ needs at length L, in
    torch on random data of the right shapes: no exponential, no elementwise step.

    Per block of ``block`` tokens in chunks of ``chunk`` (C; heads batched): the query
    and key projections (T x d by d x m); per chunk the C x C scores (C x m by
    m x C), their product with the values and the normaliser column (C x C by
    C x (dv + 1)), the state update (m x C by C x (dv + 1)) and the read of the state
    before the chunk (C x m by m x (dv + 1), one call per chunk: each chunk needs the
    state after the previous one). Each block's operands are contiguous arrays of
    their own, as in favorplus (slices of one long array would make torch copy them).
    """
    import torch

    g = torch.Generator().manual_seed(0)
    n = block // chunk
    blocks = [
        (
            torch.randn(H, block, D, generator=g),
            torch.rand(H, n, chunk, M, generator=g),
            torch.rand(H, n, chunk, M, generator=g),
            torch.randn(H, n, chunk, D + 1, generator=g),
        )
        for _ in range(L // block)
    ]
    w = torch.randn(D, M, generator=g)
    state = torch.randn(H, M, D + 1, generator=g)

    def run() -> None:
        for x, qf, kf, vc in blocks:
            x @ w
            x @ w
            scores = qf @ kf.transpose(-1, -2)
            scores @ vc
            kf.transpose(-1, -2) @ vc
            for i in range(n):
                qf[:, i] @ state

    return run


def causal_product_floor(L: int, repeats: int) -> dict[str, Any]:
    """Best time of :func:`causal_products` over chunk sizes 32, 64 and 128 and over
    favorplus's CPU block length or no blocks: an implementation built on these
    torch products cannot be faster."""
    from favorplus._backend import BLOCK_NUMBERS

    favor_block = BLOCK_NUMBERS // (H * M)
    times = {}
    for chunk in (32, 64, 128):
        for block in sorted({min(favor_block, L), L}):
            times[f"C={chunk}, block={block}"] = best_time(
                causal_products(L, chunk, block), repeats + 2
            )
    best = min(times, key=times.__getitem__)
    return {"best_s": times[best], "best": best, "each_s": times}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


# ----------------------------------------------------------------------------------
# Benchmarks.


def bench_bidirectional(quick: bool, repeats: int) -> dict[str, Any]:
    lengths = [1024, 2048] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    impls = [
        "favorplus-torch",
        "plain-torch",
        "performer-pytorch",
        "exact-torch",
        "favorplus-numpy",
        "plain-numpy",
        "exact-numpy",
    ]
    exact_cap = 8192
    # The implementations whose ratios are goals, in alternation per group (same memory
    # use, so no one runs on memory another left cold); exact attention, which needs
    # gigabytes, one after the other at the end.
    groups = [
        ["favorplus-torch", "plain-torch", "performer-pytorch"],
        ["favorplus-numpy", "plain-numpy"],
    ]
    Lb = 2048 if quick else 8192
    rows = []
    bound: dict[str, float] = {}
    total = len(lengths)
    for i, L in enumerate(lengths):
        progress(i, total, f"bidirectional L={L}")
        row: dict[str, Any] = {"L": L}
        for group in groups:
            timed: dict[str, Callable[[], Any]] = {impl: make(impl, L) for impl in group}
            if L == Lb and "favorplus-torch" in group:
                timed.update(bound_probes(L))  # the bound in the same session
            times = interleaved_best(list(timed.values()), rounds=2 * repeats + 1)
            row.update(zip(timed, times))
            if L == Lb and "favorplus-torch" in group:
                bound = bound_from(row, L)
        for impl in ("exact-torch", "exact-numpy"):
            row[impl] = best_time(make(impl, L), repeats) if L <= exact_cap else None
        rows.append({"L": L, **{impl: row[impl] for impl in impls}})
    progress(total, total, "bidirectional done")
    at = next(r for r in rows if r["L"] == Lb)
    mem = {L: peak_memory("favorplus-torch", L) for L in ([1024, 2048] if quick else [4096, 16384])}
    summary = {
        "favorplus/performer (torch)": {
            r["L"]: r["favorplus-torch"] / r["performer-pytorch"] for r in rows
        },
        "favorplus/plain (torch)": {r["L"]: r["favorplus-torch"] / r["plain-torch"] for r in rows},
        "favorplus/plain (numpy)": {r["L"]: r["favorplus-numpy"] / r["plain-numpy"] for r in rows},
        "exact/favorplus (torch)": {
            r["L"]: r["exact-torch"] / r["favorplus-torch"] for r in rows if r["exact-torch"]
        },
        f"fraction of machine bound at L={Lb} (torch)": bound["bound_s"] / at["favorplus-torch"],
        f"fraction of the strict bound (exp in place) at L={Lb} (torch)": bound["strict_bound_s"]
        / at["favorplus-torch"],
        "machine": bound,
        "peak MiB (favorplus torch forward)": mem,
    }
    return {"rows": rows, "summary": summary}


def bench_causal(quick: bool, repeats: int) -> dict[str, Any]:
    lengths = [1024, 2048] if quick else [1024, 2048, 4096, 8192]
    rows = []
    total = len(lengths) * 2
    for i, L in enumerate(lengths):
        # One after the other, not in alternation: a call right after one that used
        # gigabytes runs on cold memory (favorplus's fwd+bwd at L = 2048 measured 0.34 s
        # right after performer-pytorch's, 0.14 s after its own).
        progress(2 * i, total, f"causal fwd+bwd favorplus L={L}")
        ours = best_time(make("favorplus-torch", L, causal=True, grad=True), repeats)
        progress(2 * i + 1, total, f"causal fwd+bwd performer-pytorch L={L}")
        theirs = best_time(make("performer-pytorch", L, causal=True, grad=True), repeats)
        rows.append({"L": L, "favorplus-torch fwd+bwd": ours, "performer-pytorch fwd+bwd": theirs})
    progress(total, total, "causal done")
    Lm = 2048
    mem_ours = peak_memory("favorplus-torch", Lm, causal=True, grad=True)
    mem_theirs = peak_memory("performer-pytorch", Lm, causal=True, grad=True)
    Lb = 2048 if quick else 8192
    floor = causal_product_floor(Lb, repeats)
    chunk, block = (int(part.split("=")[1]) for part in floor["best"].split(", "))
    # Everything a ratio is made of runs in the same interleaved session (this machine
    # is shared: its speed changes from minute to minute); three independent sessions.
    timed = {
        "causal": make("favorplus-torch", Lb, causal=True),
        "bidirectional": make("favorplus-torch", Lb),
        "products": causal_products(Lb, chunk, block),
        **bound_probes(Lb),
    }
    exps = 2 * H * Lb * M
    sessions = []
    for _ in range(1 if quick else 3):
        t = dict(zip(timed, interleaved_best(list(timed.values()), rounds=2 * repeats + 1)))
        b = bound_from(t, Lb)
        reachable = t["products"] + exps / b["exp_per_s"]
        reachable_strict = t["products"] + exps / b["exp_per_s_in_place"]
        sessions.append(
            {
                "ms causal, bidirectional, products": [
                    1e3 * t["causal"],
                    1e3 * t["bidirectional"],
                    1e3 * t["products"],
                ],
                "causal / bidirectional": t["causal"] / t["bidirectional"],
                "fraction of machine bound": b["bound_s"] / t["causal"],
                "fraction of the strict bound": b["strict_bound_s"] / t["causal"],
                "reachable fraction of machine bound": b["bound_s"] / reachable,
                "reachable fraction of the strict bound": b["strict_bound_s"] / reachable_strict,
                "products + exps / bidirectional": reachable_strict / t["bidirectional"],
                "machine": b,
            }
        )

    def med(key: str) -> float:
        return _median([s[key] for s in sessions])

    small, large = (1024, 4096) if quick else (4096, 16384)
    peak_small = peak_memory("favorplus-torch", small, causal=True)
    peak_large = peak_memory("favorplus-torch", large, causal=True)
    summary = {
        "favorplus/performer time, causal fwd+bwd": {
            r["L"]: r["favorplus-torch fwd+bwd"] / r["performer-pytorch fwd+bwd"] for r in rows
        },
        f"favorplus/performer peak memory, causal fwd+bwd, L={Lm}": mem_ours / mem_theirs,
        f"peak MiB at L={Lm} (favorplus, performer)": [mem_ours, mem_theirs],
        f"causal fwd / bidirectional fwd, L={Lb} (median of the sessions)": med(
            "causal / bidirectional"
        ),
        f"causal fwd / bidirectional fwd, L={Lb}, each session": [
            s["causal / bidirectional"] for s in sessions
        ],
        f"fraction of machine bound, causal fwd, L={Lb} (median)": med("fraction of machine bound"),
        f"fraction of the strict bound (exp in place), causal fwd, L={Lb} (median)": med(
            "fraction of the strict bound"
        ),
        f"causal matrix products alone ({floor['best']}): reachable fraction of the "
        "strict bound (median)": med("reachable fraction of the strict bound"),
        "the same products + exps / bidirectional fwd (median)": med(
            "products + exps / bidirectional"
        ),
        f"peak ratio causal fwd L={large} / L={small}": peak_large / peak_small,
        f"peak MiB causal fwd L={small}, L={large}": [peak_small, peak_large],
        "sessions": sessions,
        "causal products, each chunk and block": floor,
    }
    return {"rows": rows, "summary": summary}


BENCHES = {"bidirectional": bench_bidirectional, "causal": bench_causal}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in x.items())
    if isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
        return "".join(f"\n    {_fmt(v)}" for v in x)
    if isinstance(x, list):
        return ", ".join(_fmt(v) for v in x)
    return str(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHES)}"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--_peak", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._peak:
        _peak_child(args._peak)
        return 0
    names = args.names or list(BENCHES)
    repeats = 1 if args.quick else args.repeats
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    for name in names:
        result = BENCHES[name](args.quick, repeats)
        result["meta"] = {
            "quick": args.quick,
            "repeats": repeats,
            "heads": H,
            "d": D,
            "m": M,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        suffix = "-quick" if args.quick else ""
        (args.out / f"{name}{suffix}.json").write_text(json.dumps(result, indent=2))
        print(f"\n== {name} ==")
        keys = list(result["rows"][0])
        print("  ".join(f"{k:>18}" for k in keys))
        for r in result["rows"]:
            print("  ".join(f"{_fmt(r[k]) if r[k] is not None else '-':>18}" for k in keys))
        for k, v in result["summary"].items():
            print(f"  {k}: {_fmt(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
