"""favorplus on JAX against a paper-style JAX program, and against favorplus's own torch path.

    python benchmarks/jax_speed.py            # full run: benchmarks/results/jax_speed.json
    python benchmarks/jax_speed.py --quick    # small sizes, under a minute: results/quick/

Batch 1, 8 heads, d = dv = 64, m = 256 features, float32, the same projection (drawn by
:func:`favorplus.draw_projection`) for every implementation, on ``jax.devices()[0]`` (the
GPU when JAX has one, else the CPU). Bidirectional and causal, forward and forward +
backward (``jax.grad`` of the output's sum with respect to q, k and v), L = 1024 to 32768.

**paper-style**: a JAX program written for this benchmark from the algorithm of the
Performer paper's public JAX code (not a copy of it): positive features
``m^-1/2 (exp(W x' - |x'|^2 / 2 - max) + 1e-4)`` with ``x' = d^-1/4 x``, the maximum taken
per row for queries and over the whole array for keys (a global key maximum: it leaks
the future into causal outputs, which favorplus does not); bidirectional attention by
einsums (the key-value state, then the queries' products; the normaliser likewise);
causal attention by a ``lax.scan`` over the tokens carrying the prefix sums (one scan for
the numerator, one for the normaliser), each under a ``jax.custom_vjp`` whose backward
pass rescans the tokens in reverse, subtracting the sums back.

**favorplus**: ``jax.jit`` of :func:`favorplus.favor_attention` (the default chunk length
and kernel), and, for the goal "JAX within 1.5x of torch", the eager torch forward of
the same call under ``torch.no_grad()``.

**floor** (causal rows only): not a usable program, a lower bound of favorplus's causal
program structure on this machine. The products of favorplus's chunked scan (chunks
of 64 tokens, each scanned step rematerialized in the backward pass, the features
computed in the step) and nothing else: no running maximum, no decay factors, no
guards against inf or NaN; keys are stabilized by the paper-style global maximum (a
leak). It shows how far any program of this structure can get: the goal "causal
fwd+bwd <= 0.3x paper-style" would need the floor itself well under 0.3x.

Before timing, every program's output and gradients at L = 256 are checked against
favorplus's (the paper-style one without its epsilon): the programs compute the same
function.

Every ratio is measured in one process with the implementations alternated: each round
times every implementation once, in turn; a ratio is taken within each round and the
result reports the median ratio and its range over the rounds (this machine is shared:
its speed changes from second to second), besides each implementation's best time.
JAX and torch run with their default threads (XLA: all cores, both JAX programs alike), or
with ``--threads 1`` on one thread each (XLA without its multi-threaded Eigen; torch
``set_num_threads(1)``): on a loaded machine, torch's threads wait for each other much
more than XLA's, which makes the default-thread JAX / torch ratios flatter JAX.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

FULL_OUT = HERE / "results"
QUICK_OUT = HERE / "results" / "quick"
B, H, D, M = 1, 8, 64, 256
EPS = 1e-4
# Keys of the ratios in each result row.
PS, FS, JT = "favorplus/paper-style", "floor/paper-style", "jax/torch (favorplus)"


def _threads_from_argv() -> int:
    """``--threads N`` (read before jax is imported: XLA reads its flags then)."""
    argv = sys.argv[1:]
    return int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 0


THREADS = _threads_from_argv()
if THREADS == 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# ----------------------------------------------------------------------------------
# The paper-style program (layout: length first, as the paper's code scans over it).


def paper_features(x: jax.Array, w: jax.Array, *, query: bool, eps: float = EPS) -> jax.Array:
    """Positive random features of x (L, B, H, d) with the paper's stabilizer and epsilon."""
    d = x.shape[-1]
    norm = d**-0.25
    proj = jnp.einsum("lbhd,md->lbhm", norm * x, w)
    half_sq = 0.5 * norm**2 * jnp.sum(x * x, axis=-1, keepdims=True)
    if query:
        top = jnp.max(proj, axis=-1, keepdims=True)
    else:
        top = jnp.max(proj)  # over every key of every head: a global maximum
    top = jax.lax.stop_gradient(top)
    return (jnp.exp(proj - half_sq - top) + eps) / math.sqrt(w.shape[0])


def _outer_step(s: jax.Array, kv: tuple[jax.Array, ...]) -> jax.Array:
    k, v = kv
    return s + k[..., :, None] * v[..., None, :]


@jax.custom_vjp
def paper_causal_numerator(qf: jax.Array, kf: jax.Array, v: jax.Array) -> jax.Array:
    """``out_t = qf_t . sum_{j <= t} kf_j v_j^T`` by a scan over the tokens (axis 0)."""
    return _numerator_fwd(qf, kf, v)[0]


def _numerator_fwd(qf, kf, v):
    def step(s, xs):
        q, k, vv = xs
        s = _outer_step(s, (k, vv))
        return s, jnp.einsum("bhm,bhmd->bhd", q, s)

    s0 = jnp.zeros((*kf.shape[1:], v.shape[-1]), kf.dtype)
    final, out = jax.lax.scan(step, s0, (qf, kf, v))
    return out, (qf, kf, v, final)


def _numerator_bwd(res, g):
    qf, kf, v, final = res

    def step(carry, xs):
        s, acc = carry  # s: sum through t; acc: sum_{i >= t} qf_i g_i^T
        q, k, vv, gt = xs
        dq = jnp.einsum("bhmd,bhd->bhm", s, gt)
        acc = acc + q[..., :, None] * gt[..., None, :]
        dk = jnp.einsum("bhmd,bhd->bhm", acc, vv)
        dv = jnp.einsum("bhmd,bhm->bhd", acc, k)
        s = s - k[..., :, None] * vv[..., None, :]
        return (s, acc), (dq, dk, dv)

    _, (dq, dk, dv) = jax.lax.scan(
        step, (final, jnp.zeros_like(final)), (qf, kf, v, g), reverse=True
    )
    return dq, dk, dv


paper_causal_numerator.defvjp(_numerator_fwd, _numerator_bwd)


@jax.custom_vjp
def paper_causal_denominator(qf: jax.Array, kf: jax.Array) -> jax.Array:
    """``den_t = qf_t . sum_{j <= t} kf_j`` by a scan over the tokens (axis 0)."""
    return _denominator_fwd(qf, kf)[0]


def _denominator_fwd(qf, kf):
    def step(s, xs):
        q, k = xs
        s = s + k
        return s, jnp.sum(q * s, axis=-1)

    final, out = jax.lax.scan(step, jnp.zeros(kf.shape[1:], kf.dtype), (qf, kf))
    return out, (qf, kf, final)


def _denominator_bwd(res, g):
    qf, kf, final = res

    def step(carry, xs):
        s, acc = carry
        q, k, gt = xs
        dq = s * gt[..., None]
        acc = acc + q * gt[..., None]
        return (s - k, acc), (dq, acc)

    _, (dq, dk) = jax.lax.scan(step, (final, jnp.zeros_like(final)), (qf, kf, g), reverse=True)
    return dq, dk


paper_causal_denominator.defvjp(_denominator_fwd, _denominator_bwd)


def paper_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, w: jax.Array, *, causal: bool, eps: float = EPS
) -> jax.Array:
    """Paper-style FAVOR+ of (B, H, L, d) inputs; returns (B, H, L, dv)."""
    q, k, v = (jnp.moveaxis(x, 2, 0) for x in (q, k, v))  # (L, B, H, .)
    qf = paper_features(q, w, query=True, eps=eps)
    kf = paper_features(k, w, query=False, eps=eps)
    if causal:
        num = paper_causal_numerator(qf, kf, v)
        den = paper_causal_denominator(qf, kf)
    else:
        kv = jnp.einsum("lbhm,lbhd->bhmd", kf, v)
        num = jnp.einsum("lbhm,bhmd->lbhd", qf, kv)
        den = jnp.einsum("lbhm,bhm->lbh", qf, jnp.sum(kf, axis=0))
    return jnp.moveaxis(num / den[..., None], 0, 2)


FLOOR_CHUNK = 64


def floor_attention(q: jax.Array, k: jax.Array, v: jax.Array, w: jax.Array) -> jax.Array:
    """The floor: causal chunked linear attention of (B, H, L, d) inputs with the products
    of favorplus's scanned program and no stabilizer beyond the paper-style one (L a
    multiple of FLOOR_CHUNK)."""
    b, h, length, d = q.shape
    c = FLOOR_CHUNK
    n = length // c
    norm = d**-0.25
    ones = jnp.ones((b, h, length, 1), v.dtype)
    v1 = jnp.concatenate([v, ones], axis=-1)  # the normaliser as a last value column

    def proj(x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,md->...m", norm * x, w) - 0.5 * norm**2 * jnp.sum(
            x * x, axis=-1, keepdims=True
        )

    # The keys' global maximum, computed once outside the scan (a leak, as paper-style).
    top = jax.lax.stop_gradient(jnp.max(proj(k)))

    def chunks(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(jnp.reshape(x, (b, h, n, c, x.shape[-1])), 2, 0)

    tri = jnp.tril(jnp.ones((c, c), bool))

    def step(s: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        qc, kc, vc = xs
        pq = proj(qc)
        qf = jnp.exp(pq - jax.lax.stop_gradient(jnp.max(pq, axis=-1, keepdims=True)))
        kf = jnp.exp(proj(kc) - top)
        weights = jnp.where(tri, qf @ jnp.swapaxes(kf, -1, -2), 0.0)
        out = qf @ s + weights @ vc
        return s + jnp.swapaxes(kf, -1, -2) @ vc, out

    s0 = jnp.zeros((b, h, w.shape[0], v.shape[-1] + 1), q.dtype)
    step = jax.checkpoint(step, prevent_cse=False)
    _, out = jax.lax.scan(step, s0, (chunks(q), chunks(k), chunks(v1)))
    out = jnp.reshape(jnp.moveaxis(out, 0, 2), (b, h, length, v.shape[-1] + 1))
    return out[..., :-1] / out[..., -1:]


# ----------------------------------------------------------------------------------
# The programs under test.


def arrays(L: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(
        (rng.standard_normal((B, H, L, D)) * s).astype(np.float32) for s in (0.35, 0.35, 1.0)
    )


def jax_program(impl: str, L: int, *, causal: bool, grad: bool) -> Callable[[], Any]:
    """A zero-argument callable running a jitted program on fixed device arrays."""
    import favorplus as fp

    dev = jax.devices()[0]
    q, k, v = (jax.device_put(a, dev) for a in arrays(L))
    w = jax.device_put(fp.draw_projection(M, D, seed=1, dtype=np.float32), dev)
    if impl == "favorplus-jax":

        def attend(q, k, v, w):
            return fp.favor_attention(q, k, v, w, causal=causal)
    elif impl == "paper-style-jax":
        attend = functools.partial(paper_attention, causal=causal)
    elif impl == "floor-jax":
        if not causal or L % FLOOR_CHUNK:
            raise ValueError("the floor is causal, for lengths that are multiples of 64")
        attend = floor_attention
    else:
        raise ValueError(impl)
    if grad:
        fn = jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(attend(q, k, v, w)), argnums=(0, 1, 2)))
    else:
        fn = jax.jit(attend)

    def run() -> Any:
        return jax.block_until_ready(fn(q, k, v, w))

    return run


def torch_program(L: int, *, causal: bool) -> Callable[[], Any]:
    """favorplus's eager torch forward on the same inputs and projection."""
    import torch

    import favorplus as fp

    q, k, v = (torch.from_numpy(a) for a in arrays(L))
    w = torch.from_numpy(fp.draw_projection(M, D, seed=1, dtype=np.float32))

    def run() -> Any:
        with torch.no_grad():
            return fp.favor_attention(q, k, v, w, causal=causal)

    return run


def check_programs(L: int = 256) -> None:
    """Before any timing: the paper-style program (without its 1e-4 epsilon) and the floor
    compute favorplus's outputs and gradients, to float32 rounding, so the benchmark
    compares programs for the same function; AssertionError otherwise. Relative errors
    measured on the CPU: at most 2e-6 (the bound is 2e-5); with the epsilon the
    paper-style output is off by about 3e-3. Products in full float32 (JAX would use
    TF32 on a GPU)."""
    import favorplus as fp

    q, k, v = (jnp.asarray(a) for a in arrays(L))
    w = jnp.asarray(fp.draw_projection(M, D, seed=1, dtype=np.float32))

    def value_and_grads(f: Callable[..., jax.Array]) -> list[jax.Array]:
        with jax.default_matmul_precision("highest"):
            out, vjp = jax.vjp(f, q, k, v)
            return [out, *vjp(jnp.cos(out))]  # a cotangent that is not all ones

    for causal in (False, True):
        impls = {"paper-style": functools.partial(paper_attention, w=w, causal=causal, eps=0.0)}
        if causal:
            impls["floor"] = functools.partial(floor_attention, w=w)
        ref = value_and_grads(lambda q, k, v: fp.favor_attention(q, k, v, w, causal=causal))
        for name, f in impls.items():
            for what, a, b in zip(("output", "dq", "dk", "dv"), value_and_grads(f), ref):
                err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                assert err < 2e-5, f"{name}, causal={causal}: {what} is off by {err:.1e}"


def alternated(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Each function's time in each of ``rounds`` rounds that run them in turn (after one
    warm-up call each, which also compiles)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Median and range of the per-round ratios num / den."""
    r = sorted(a / b for a, b in zip(num, den))
    return {"median": r[len(r) // 2], "min": r[0], "max": r[-1]}


def bench(lengths: list[int], rounds: Callable[[int], int], log: Callable[[str], None]) -> list:
    rows = []
    on_cpu = jax.devices()[0].platform == "cpu"
    for L in lengths:
        for causal in (False, True):
            mode = "causal" if causal else "bidirectional"
            for grad in (False, True):
                # The JAX programs (and, for the forward on a CPU, torch's), alternated.
                names = ["favorplus-jax", "paper-style-jax"] + (["floor-jax"] if causal else [])
                fns = {name: jax_program(name, L, causal=causal, grad=grad) for name in names}
                if on_cpu and not grad:
                    fns["favorplus-torch"] = torch_program(L, causal=causal)
                t = alternated(fns, rounds(L))
                row: dict[str, Any] = {"L": L, "mode": mode, "pass": "fwd+bwd" if grad else "fwd"}
                row["best_s"] = {name: min(ts) for name, ts in t.items()}
                row[PS] = ratio_stats(t["favorplus-jax"], t["paper-style-jax"])
                if causal:
                    row[FS] = ratio_stats(t["floor-jax"], t["paper-style-jax"])
                if "favorplus-torch" in t:
                    row[JT] = ratio_stats(t["favorplus-jax"], t["favorplus-torch"])
                rows.append(row)
                log(_line(row))
                del fns, t
    return rows


def _line(row: dict[str, Any]) -> str:
    best = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in row["best_s"].items())
    parts = [f"L={row['L']:>5} {row['mode']:>13} {row['pass']:>7}: {best}"]
    for key in (PS, FS, JT):
        if key in row:
            s = row[key]
            parts.append(f"{key} {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]")
    return "; ".join(parts)


GOALS = {
    "bidirectional fwd <= 0.7x paper-style at L >= 4096": ("bidirectional", "fwd", 4096, PS, 0.7),
    "causal fwd <= 0.8x paper-style at L >= 1024": ("causal", "fwd", 1024, PS, 0.8),
    "causal fwd+bwd <= 0.3x paper-style": ("causal", "fwd+bwd", 0, PS, 0.3),
    "bidirectional fwd: JAX <= 1.5x torch": ("bidirectional", "fwd", 0, JT, 1.5),
    "causal fwd: JAX <= 1.5x torch": ("causal", "fwd", 0, JT, 1.5),
}


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each goal: the median ratios it covers (per L) and whether all of them meet it."""
    out = {}
    for name, (mode, pss, min_l, key, limit) in GOALS.items():
        picked = {
            r["L"]: r[key]["median"]
            for r in rows
            if r["mode"] == mode and r["pass"] == pss and r["L"] >= min_l and key in r
        }
        out[name] = {
            "median ratio per L": picked,
            "met": max(picked.values()) <= limit if picked else None,  # None: not measured
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="L = 1024 only, 3 rounds")
    p.add_argument("--rounds", type=int, default=7, help="rounds at L <= 8192 (fewer above)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="1: XLA without its multi-threaded Eigen and torch on one thread (the result\n"
        "file then ends in -1thread); 0: both libraries' defaults",
    )
    args = p.parse_args(argv)
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    if args.lengths:
        lengths = args.lengths
    else:
        lengths = [1024] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768]

    def rounds(L: int) -> int:
        if args.quick:
            return 3
        return args.rounds if L <= 8192 else max(3, args.rounds // 2)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    check_programs()
    t0 = time.perf_counter()
    rows = bench(lengths, rounds, lambda s: print(s, flush=True))

    result = {
        "rows": rows,
        "goals": goals(rows),
        "meta": {
            "command": " ".join(["python", "benchmarks/jax_speed.py", *sys.argv[1:]]),
            "quick": args.quick,
            "batch": B,
            "heads": H,
            "d": D,
            "m": M,
            "dtype": "float32",
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "loadavg_at_start": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 1),
            "versions": {
                "python": platform.python_version(),
                "jax": jax.__version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("jax_speed-1thread.json" if args.threads == 1 else "jax_speed.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    for name, g in result["goals"].items():
        per_l = ", ".join(f"{L}: {r:.2f}" for L, r in g["median ratio per L"].items())
        verdict = {True: "MET ", False: "NOT ", None: "N/A "}[g["met"]]
        print(f"{verdict} {name}: {per_l or 'no length in this run'}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
