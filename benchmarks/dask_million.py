"""FAVOR+ on dask: a million tokens out of core, with the peak memory and the time.

    python benchmarks/dask_million.py           # L = 2^20: benchmarks/results/dask_million.json
    python benchmarks/dask_million.py --quick   # L = 2^14 (CI): benchmarks/results/quick/

q, k and v of shape (heads = 8, L, d = 64), float32, are dask arrays drawn lazily chunk by
chunk (``dask.array.random.default_rng(seed).standard_normal``, chunks of ``--chunk``
tokens): at L = 2^20 they hold 3 x 2 GiB = 6 GiB, and so would the 2 GiB output; none of
them is ever whole in memory. ``favor_attention(q, k, v, w)`` (m = 256 orthogonal features)
builds the graph (timed: no compute happens there), then one ``dask.compute`` (threaded
scheduler) evaluates the output's sum and sum of squares (every output is computed) and
its first chunk, which is checked against the NumPy call on that chunk alone (causal: the
first chunk's outputs depend on it only; bidirectional, quick mode only: the whole output
against NumPy).

Each attention mode runs in a fresh subprocess; the peak memory reported is that
process's peak resident set size, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (Linux:
KiB), which includes the Python interpreter, NumPy and dask (``baseline_rss``: the same
measure just before the compute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one BLAS thread per dask worker thread

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

FULL_OUT = HERE / "results"
QUICK_OUT = HERE / "results" / "quick"
GIB = 2.0**30


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker(mode: str, length: int, chunk: int, heads: int, dim: int, features: int) -> dict:
    """One attention mode in this process: returns its figures."""
    import dask
    import dask.array as da

    import favorplus as fp

    causal = mode == "causal"
    rng = da.random.default_rng(0)
    shape, chunks = (heads, length, dim), (heads, chunk, dim)
    q, k, v = (rng.standard_normal(shape, chunks=chunks, dtype=np.float32) for _ in range(3))
    w = fp.draw_projection(features, dim, seed=1).astype(np.float32)
    t0 = time.perf_counter()
    out = fp.favor_attention(q, k, v, w, causal=causal)
    build = time.perf_counter() - t0
    total = out.sum(dtype=np.float64)
    squares = (out.astype(np.float64) ** 2).sum()
    first = out[:, :chunk, :]
    baseline = _peak_rss_bytes()
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        total, squares, first = dask.compute(total, squares, first)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    qa, ka, va = (x[:, :chunk, :].compute() for x in (q, k, v))
    if causal:
        ref = fp.favor_attention(qa, ka, va, w, causal=True)
        gap = float(np.max(np.abs(first - ref)))
    elif length * heads * dim * 4 * 3 < 2**28:  # bidirectional: all of it, small runs only
        qa, ka, va = (x.compute() for x in (q, k, v))
        ref = fp.favor_attention(qa, ka, va, w)[:, :chunk, :]
        gap = float(np.max(np.abs(first - ref)))
    else:
        gap = None
    inputs = 3 * heads * length * dim * 4
    return {
        "mode": mode,
        "tokens": length,
        "chunk": chunk,
        "chunks": len(out.chunks[1]),
        "tasks": len(dict(out.__dask_graph__())),
        "inputs_bytes": inputs,
        "output_bytes": inputs // 3,
        "build_seconds": build,
        "compute_seconds": seconds,
        "tokens_per_second": length / seconds,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_over_inputs": peak / inputs,
        "output_sum": float(total),
        "output_rms": float(np.sqrt(squares / (heads * length * dim))),
        "first_chunk_max_abs_gap_vs_numpy": gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="L = 2^14 tokens (CI)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--length", type=int, help="tokens (default 2^20, quick 2^14)")
    parser.add_argument("--chunk", type=int, help="tokens per chunk (default 2^15, quick 2^12)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["bidirectional", "causal"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    length = args.length or (2**14 if args.quick else 2**20)
    chunk = args.chunk or (2**12 if args.quick else 2**15)
    sizes = (length, chunk, args.heads, args.dim, args.features)
    if args.worker:
        print(json.dumps(worker(args.worker, *sizes)))
        return
    runs: list[dict[str, Any]] = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--worker", mode, "--length", str(length),
               "--chunk", str(chunk), "--heads", str(args.heads), "--dim", str(args.dim),
               "--features", str(args.features)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(r)
        gap = r["first_chunk_max_abs_gap_vs_numpy"]
        print(
            f"{mode:>13}: L = {length} in {r['chunks']} chunks ({r['tasks']} tasks), graph "
            f"{r['build_seconds'] * 1e3:.0f} ms, compute {r['compute_seconds']:.1f} s, "
            f"peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB (before compute "
            f"{r['baseline_rss_bytes'] / GIB:.2f} GiB) for {r['inputs_bytes'] / GIB:.2f} GiB "
            f"of q, k, v; first chunk vs NumPy {gap if gap is None else f'{gap:.1e}'}"
        )
        if gap is not None and not gap < 1e-4:
            sys.exit(f"{mode}: the first chunk differs from NumPy by {gap}")
    import dask

    result = {
        "command": "python benchmarks/dask_million.py" + (" --quick" if args.quick else ""),
        "memory_measure": "resource.getrusage(RUSAGE_SELF).ru_maxrss of the worker process",
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dask": dask.__version__,
        "heads": args.heads,
        "dim": args.dim,
        "features": args.features,
        "dtype": "float32",
        "runs": runs,
    }
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dask_million.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
