"""Fig. 3 of the Performer paper: time and peak memory against L, exact attention and
FAVOR+ on each CPU backend, each backend in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from paper_common import (
    fmt,
    measure,
    meta,
    pyplot,
    run_in_child,
)
from run import D, H, M, inputs, make, progress

# ----------------------------------------------------------------------------------
# Fig. 3: time and peak memory against L, on each CPU backend.

FIG3_IMPLS = ("exact", "favor", "favor-causal")
FIG3_LABEL = {
    "exact": "exact (softmax_attention)",
    "favor": "FAVOR+ bidirectional",
    "favor-causal": "FAVOR+ causal",
}
FIG3_COLOR = {"exact": "black", "favor": "tab:blue", "favor-causal": "tab:green"}


def fig3_fn(backend: str, impl: str, L: int, grad: bool) -> Callable[[], Any]:
    """A zero-argument callable: one forward (or forward + backward) pass on fixed inputs.

    NumPy and torch reuse run.make (torch forward under no_grad; fwd+bwd is
    ``out.sum().backward()``); JAX compiles ``jax.jit(f)`` or
    ``jax.jit(jax.grad(sum f))`` ahead of time and blocks until the result is ready.
    """
    if backend in ("numpy", "torch"):
        name = ("exact-" if impl == "exact" else "favorplus-") + backend
        return make(name, L, causal=impl == "favor-causal", grad=grad)
    import jax
    import jax.numpy as jnp

    import favorplus as fp

    q, k, v = (jnp.asarray(a) for a in inputs(L, "numpy"))
    w = fp.draw_projection(M, D, seed=1, xp=jnp, dtype=jnp.float32)
    if impl == "exact":

        def f(q: Any, k: Any, v: Any, w: Any) -> Any:
            return fp.softmax_attention(q, k, v)
    else:

        def f(q: Any, k: Any, v: Any, w: Any) -> Any:
            return fp.favor_attention(q, k, v, w, causal=impl == "favor-causal")

    g = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)) if grad else f
    compiled = jax.jit(g).lower(q, k, v, w).compile()

    def run() -> Any:
        return jax.block_until_ready(compiled(q, k, v, w))

    with contextlib.suppress(Exception):  # XLA's own compile-time memory accounting
        analysis = compiled.memory_analysis()
        run.xla_mib = {  # type: ignore[attr-defined]
            "temp": analysis.temp_size_in_bytes / 2**20,
            "output": analysis.output_size_in_bytes / 2**20,
        }
    return run


def crossover(lengths: list[int], exact: list[float], favor: list[float]) -> dict[str, Any]:
    """Length beyond which FAVOR+ stays faster than exact (log-log interpolation)."""
    ratio = [e / f for e, f in zip(exact, favor)]
    if not ratio:
        return {"L": None, "note": "no common lengths"}
    if all(r > 1 for r in ratio):
        return {"L": None, "note": f"FAVOR+ faster at every L measured (from L={lengths[0]})"}
    last_slow = max(i for i, r in enumerate(ratio) if r <= 1)
    if last_slow == len(ratio) - 1:
        return {"L": None, "note": f"exact not slower up to L={lengths[-1]}"}
    la, lb = math.log(lengths[last_slow]), math.log(lengths[last_slow + 1])
    ra, rb = math.log(ratio[last_slow]), math.log(ratio[last_slow + 1])
    at = la + (lb - la) * (-ra) / (rb - ra) if rb != ra else la
    return {"L": math.exp(at), "note": "interpolated in log-log"}


def fig3_series(
    backend: str,
    modes: list[str],
    cap: float,
    repeats: int,
    start: int,
    max_length: int,
    step: int,
    total: int,
) -> list[dict[str, Any]]:
    """One backend's rows (run in a fresh subprocess by :func:`fig3`).

    For each mode, L doubles from ``start``: exact attention runs until one call takes
    longer than ``cap`` seconds; FAVOR+ (bidirectional and causal) goes on for two more
    doublings, up to ``max_length``, and stops after a call above 4 x cap.
    """
    rows: list[dict[str, Any]] = []
    for i, mode in enumerate(modes):
        grad = mode == "fwd+bwd"
        active = dict.fromkeys(FIG3_IMPLS, True)
        exact_stop: int | None = None
        L = start
        while any(active.values()) and L <= max_length:
            for impl in FIG3_IMPLS:
                if not active[impl]:
                    continue
                if impl != "exact" and exact_stop is not None and L > 4 * exact_stop:
                    active[impl] = False
                    continue
                progress(step + i, total, f"fig3 {backend} {mode} {impl} L={L}")
                t_build = time.perf_counter()
                fn = fig3_fn(backend, impl, L, grad)
                build = time.perf_counter() - t_build
                limit = cap if impl == "exact" else 4 * cap
                row = {"backend": backend, "mode": mode, "impl": impl, "L": L}
                row.update(measure(fn, repeats, 2 * limit))
                if backend == "jax":
                    row["compile_s"] = build
                    row["xla_mib"] = getattr(fn, "xla_mib", None)
                del fn
                if backend == "torch":
                    row["torch_threads"] = sys.modules["torch"].get_num_threads()
                rows.append(row)
                if row["time_s"] > limit:
                    active[impl] = False
                    if impl == "exact":
                        exact_stop = L
            L *= 2
    return rows


def fig3(args: argparse.Namespace) -> dict[str, Any]:
    """Forward and forward + backward time, and peak memory, against L on each CPU backend.

    Each backend runs in its own fresh subprocess (:func:`fig3_series`).
    """
    quick = args.quick
    cap = args.cap if args.cap is not None else (0.1 if quick else 1.0)
    repeats = 1 if quick else args.repeats
    start = 256
    max_length = 1024 if quick else 1 << 16
    backends = [b for b in args.backends.split(",") if b]
    plan = {b: ["fwd"] if b == "numpy" else ["fwd", "fwd+bwd"] for b in backends}
    series = [(b, mode) for b in backends for mode in plan[b]]
    rows: list[dict[str, Any]] = []
    step = 0
    for backend in backends:
        task = {
            "kind": "fig3",
            "backend": backend,
            "modes": plan[backend],
            "cap": cap,
            "repeats": repeats,
            "start": start,
            "max_length": max_length,
            "step": step,
            "total": len(series),
        }
        rows += run_in_child(task, args.threads)
        step += len(plan[backend])
    progress(len(series), len(series), "fig3 done")

    cross = []
    for backend, mode in series:
        for impl in ("favor", "favor-causal"):
            ex = {
                r["L"]: r["time_s"]
                for r in rows
                if (r["backend"], r["mode"], r["impl"]) == (backend, mode, "exact")
            }
            fa = {
                r["L"]: r["time_s"]
                for r in rows
                if (r["backend"], r["mode"], r["impl"]) == (backend, mode, impl)
            }
            common = sorted(set(ex) & set(fa))
            c = crossover(common, [ex[L] for L in common], [fa[L] for L in common])
            cross.append({"backend": backend, "mode": mode, "impl": impl, **c})

    result = {
        "what": "time and peak memory against L: exact attention (favorplus.softmax_attention) "
        "and FAVOR+ (bidirectional, causal) on each CPU backend",
        "setup": {
            "batch": 1,
            "heads": H,
            "d": D,
            "m": M,
            "dtype": "float32",
            "inputs": "q, k ~ N(0, 0.35^2), v ~ N(0, 1) (run.inputs)",
            "projection": "orthogonal, chi norms, seed 1",
            "cap_s": cap,
            "repeats": repeats,
            "threads": args.threads,
            "timing": "best of repeats after a warm-up call; the warm-up call alone when it "
            "exceeds 2 x the stop threshold (cap for exact, 4 x cap for FAVOR+); JAX: "
            "ahead-of-time jax.jit compiled, block_until_ready; fwd+bwd: gradient of "
            "out.sum() w.r.t. q, k, v (torch: .backward(); jax: jax.grad)",
            "memory": "peak RSS (VmHWM) of one more call minus RSS just before it, after "
            "malloc_trim and a VmHWM reset; each backend in a fresh subprocess",
        },
        "rows": rows,
        "crossover": cross,
        "meta": meta(args),
    }
    print("\n== fig3: time (s) / peak MiB ==")
    for backend, mode in series:
        print(f"{backend} {mode}")
        lengths = sorted({r["L"] for r in rows if (r["backend"], r["mode"]) == (backend, mode)})
        print(f"{'L':>8} " + " ".join(f"{FIG3_LABEL[i][:22]:>24}" for i in FIG3_IMPLS))
        for L in lengths:
            cells = []
            for impl in FIG3_IMPLS:
                r = next(
                    (
                        r
                        for r in rows
                        if (r["backend"], r["mode"], r["impl"], r["L"]) == (backend, mode, impl, L)
                    ),
                    None,
                )
                cells.append(
                    f"{fmt(r['time_s']) + ' / ' + fmt(r['peak_mib'], 4):>24}" if r else f"{'-':>24}"
                )
            print(f"{L:>8} " + " ".join(cells))
    for c in cross:
        print(
            f"  crossover {c['backend']} {c['mode']} {c['impl']}: L = {fmt(c['L'], 4)} "
            f"({c['note']})"
        )
    return {"result": result, "figure": plot_fig3(result)}


def _log_log_axes(ax: Any, ylabel: str, title: str) -> None:
    """Log-log axes against the sequence length, with a grid and a small legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def plot_fig3(result: dict[str, Any]) -> Any:
    plt = pyplot()
    rows = result["rows"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(len(backends), 3, figsize=(16, 4.6 * len(backends)), squeeze=False)
    setup = result["setup"]
    for axrow, backend in zip(axes, backends):
        for col, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axrow[col]
            sel = [r for r in rows if r["backend"] == backend and r["mode"] == mode]
            if not sel:
                ax.text(
                    0.5,
                    0.5,
                    f"{backend}: no autodiff,\nforward only",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=12,
                )
                ax.set_axis_off()
                continue
            for impl in FIG3_IMPLS:
                pts = [r for r in sel if r["impl"] == impl]
                label = FIG3_LABEL[impl]
                c = next(
                    (
                        c
                        for c in result["crossover"]
                        if (c["backend"], c["mode"], c["impl"]) == (backend, mode, impl)
                    ),
                    None,
                )
                if c is not None:
                    if c["L"]:
                        ax.axvline(c["L"], color=FIG3_COLOR[impl], ls=":", lw=1.3)
                        label += f" (faster than exact from L≈{c['L']:.0f}, dotted)"
                    else:
                        label += f" ({c['note']})"
                ax.plot(
                    [r["L"] for r in pts],
                    [r["time_s"] for r in pts],
                    marker="o",
                    ms=4,
                    color=FIG3_COLOR[impl],
                    label=label,
                )
                single = [r for r in pts if r["single_call"]]
                ax.plot(
                    [r["L"] for r in single],
                    [r["time_s"] for r in single],
                    ls="none",
                    marker="o",
                    ms=8,
                    mfc="white",
                    color=FIG3_COLOR[impl],
                )
            ax.axhline(
                setup["cap_s"],
                color="grey",
                lw=0.7,
                ls="--",
                label=f"time cap {setup['cap_s']:g} s (exact stops above it)",
            )
            ax.plot(
                [],
                [],
                ls="none",
                marker="o",
                ms=8,
                mfc="white",
                color="grey",
                label="open circle: one cold call (too slow to repeat)",
            )
            _log_log_axes(
                ax,
                "seconds (best of repeats)",
                f"{backend}: {'forward' if mode == 'fwd' else 'forward + backward'}",
            )
        ax = axrow[2]
        for impl in FIG3_IMPLS:
            for mode, ls in (("fwd", "-"), ("fwd+bwd", "--")):
                pts = [
                    r
                    for r in rows
                    if (r["backend"], r["mode"], r["impl"]) == (backend, mode, impl)
                    and not math.isnan(r.get("peak_mib", math.nan))
                ]
                if pts:
                    ax.plot(
                        [r["L"] for r in pts],
                        [max(r["peak_mib"], 0.1) for r in pts],
                        marker="o",
                        ms=3,
                        ls=ls,
                        color=FIG3_COLOR[impl],
                        label=f"{FIG3_LABEL[impl]}, {mode}",
                    )
                xla = [r for r in pts if r.get("xla_mib")]
                if xla:
                    ax.plot(
                        [r["L"] for r in xla],
                        [r["xla_mib"]["temp"] + r["xla_mib"]["output"] for r in xla],
                        ls="none",
                        marker="x",
                        ms=6,
                        color=FIG3_COLOR[impl],
                    )
        if backend == "jax":
            ax.plot(
                [],
                [],
                ls="none",
                marker="x",
                color="grey",
                label="x: XLA memory_analysis, temp + output",
            )
        _log_log_axes(
            ax,
            "peak extra RSS of one call (MiB)",
            f"{backend}: peak memory (values below ~10 MiB are noise)",
        )
    threads = setup.get("threads") or "default"
    fig.suptitle(
        f"Exact attention vs FAVOR+ on CPU: batch 1, {setup['heads']} heads, d={setup['d']}, "
        f"m={setup['m']}, float32; {threads} thread(s) per process on a shared "
        f"{result['meta']['cpu_count']}-core machine",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    return fig
