"""The Performer paper's figures at small scale, one command each, on CPUs.

    python benchmarks/paper.py fig2           # MSE ratio trig / positive (Fig. 2)
    python benchmarks/paper.py fig3           # time and memory against L (Fig. 3)
    python benchmarks/paper.py fig4           # attention-output MSE against m (Fig. 4)
    python benchmarks/paper.py peers          # favorplus beside performer-pytorch
    python benchmarks/paper.py all --quick    # all four, small sizes (under a minute each)

Full runs write ``docs/figures/<name>.json`` and ``<name>.png``; ``--quick`` runs write
to ``benchmarks/results/quick/`` (git-ignored); ``--out DIR`` overrides either.

Speed figures (fig3, peers): each backend runs in a fresh subprocess, with one CPU
thread by default (``--threads``; on a shared machine multi-threaded torch timings
are dominated by the other load). Times are the best of ``--repeats`` calls after a
warm-up call; a point whose warm-up call is far above the time cap is that one call.
Peak memory is the peak resident set size of one call minus the resident size just
before it (inputs included in neither): before the call, freed heap memory is returned
to the system (``malloc_trim``) and the kernel's high-water mark is reset
(``/proc/self/clear_refs``), so that the peak is that call's own. Setup as in
docs/benchmarks.md: batch 1, 8 heads, d = 64, m = 256, float32.

The accuracy figures (fig2, fig4) run in float64 NumPy and put the closed forms of
``paper_theory.py`` beside the measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import paper_theory as theory
from run import D, H, M, _peak_rss, _rss, inputs, make, progress, release_and_reset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FULL_OUT = ROOT / "docs" / "figures"
QUICK_OUT = HERE / "results" / "quick"

SOFTMAX_KERNELS = ("softmax", "softmax_trig", "softmax_hyperbolic")
KERNEL_LABEL = {
    "softmax": "positive",
    "softmax_trig": "trigonometric",
    "softmax_hyperbolic": "hyperbolic",
}
KERNEL_COLOR = {"softmax": "tab:blue", "softmax_trig": "tab:red", "softmax_hyperbolic": "tab:green"}


# ----------------------------------------------------------------------------------
# Shared helpers.


def pyplot() -> Any:
    """matplotlib.pyplot with the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def versions() -> dict[str, str]:
    """Versions of the libraries these figures depend on."""
    out = {"python": platform.python_version()}
    for name in ("favorplus", "numpy", "torch", "jax", "performer-pytorch", "matplotlib"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def meta(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Run metadata stored beside every result."""
    info: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/paper.py", *sys.argv[1:]]),
        "quick": args.quick,
        "seed": args.seed,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg()[0],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "versions": versions(),
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    info.update(extra)
    return info


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)


def _finite(x: Any) -> Any:
    """``x`` with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return _finite(x.tolist())
    if isinstance(x, (float, np.floating)) and not math.isfinite(x):
        return None
    return x


def save(out: Path, name: str, result: dict[str, Any], fig: Any) -> list[Path]:
    """Write ``<name>.json`` and ``<name>.png`` under ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.png"]
    text = json.dumps(_finite(result), indent=1, default=_json_default, allow_nan=False)
    paths[0].write_text(text + "\n")
    fig.savefig(paths[1], dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return paths


def fmt(x: float | None, digits: int = 3) -> str:
    """Short number formatting for the printed summaries."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


# ----------------------------------------------------------------------------------
# Time and peak memory of one callable; speed figures run each backend in a fresh process.


def measure(fn: Callable[[], Any], repeats: int, slow: float) -> dict[str, Any]:
    """Time (s) and peak extra resident memory (MiB) of ``fn()``.

    A first call warms up. When it takes longer than ``slow`` seconds, its time is the
    result and its memory is measured on it (``single_call``: too slow to repeat);
    otherwise the time is the best of ``repeats`` further calls, and the memory is that
    of one more call. Before a measured call, freed heap memory is returned to the
    system and the high-water mark is reset, so the peak (VmHWM) minus the resident
    size just before the call (inputs included in neither) is that call's own.
    """
    ok = release_and_reset()
    before = _rss()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    peak = (_peak_rss() - before) / 2**20 if ok else math.nan
    if first > slow or repeats < 1:
        return {"time_s": first, "peak_mib": peak, "single_call": True}
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    ok = release_and_reset()
    before = _rss()
    fn()
    peak = (_peak_rss() - before) / 2**20 if ok else math.nan
    return {"time_s": best, "peak_mib": peak, "single_call": False}


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a child process limited to ``threads`` CPU threads (0: defaults).

    OMP/OpenBLAS/MKL variables cover NumPy's BLAS and PyTorch; one thread also turns
    off XLA's multi-threaded Eigen for JAX on CPUs.
    """
    env = dict(os.environ)
    if threads > 0:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
        if threads == 1:
            flags = env.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return env


def run_in_child(task: dict[str, Any], threads: int) -> Any:
    """Run ``task`` (a child function's name and keyword arguments) in a fresh Python.

    The child inherits stderr (its progress bar shows) and prints its JSON result as
    the last line of stdout.
    """
    res = subprocess.run(
        [sys.executable, __file__, "--_child", json.dumps(task)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        env=thread_env(threads),
    )
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"child {task['kind']} failed with exit status {res.returncode}")
    return json.loads(lines[-1])


def _child(spec: str) -> None:
    task = json.loads(spec)
    worker = {"fig3": fig3_series, "peers": peers_series}[task.pop("kind")]
    print(json.dumps(worker(**task), default=_json_default))


# ----------------------------------------------------------------------------------
# Fig. 2: MSE ratio trig / positive over angle and norm.


def fig2(args: argparse.Namespace) -> dict[str, Any]:
    """Closed-form MSE_trig / MSE_positive over (angle, norm), with a Monte Carlo check.

    The closed forms (Lemma 2) are independent of m and d. The Monte Carlo check uses
    favorplus.feature_map with iid projections (d = 16, m = 16): one (R m, d) iid
    matrix holds R independent m-row projections, each estimate is the mean of its
    m rows' products, and the measured MSE is the mean of R squared errors. The error
    bars are the theoretical standard errors of those means (paper_theory.mse_estimate_se),
    propagated to the ratio (independent draws for the two estimators).
    """
    import favorplus as fp

    quick = args.quick
    d, m = 16, 16
    chunk = 2_000
    draws = chunk * (5 if quick else 200)  # independent m-row projections per estimator
    rng = np.random.default_rng(args.seed)

    # A coarse copy of the closed form for the JSON (the plot recomputes it finely).
    degrees = np.arange(5, 180, 5)
    norms = np.round(np.arange(0.1, 2.01, 0.1), 2)
    grid = theory.mse_ratio_trig_positive(np.radians(degrees)[None, :], norms[:, None])

    mc_norms = [0.5, 1.0] if quick else [0.5, 0.75, 1.0]
    mc_degrees = [30, 60, 90, 120, 150]
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]  # a random plane in R^d
    xs, ys, labels = [], [], []
    for r in mc_norms:
        for deg in mc_degrees:
            a = math.radians(deg)
            xs.append(r * basis[0])
            ys.append(r * (math.cos(a) * basis[0] + math.sin(a) * basis[1]))
            labels.append((r, deg))
    x, y = np.array(xs), np.array(ys)
    exact = np.exp(np.sum(x * y, axis=1))
    # feature_map scales its input by scale^(1/2); scale = 1 keeps x and y as they are.
    sq_err = {k: np.zeros(len(x)) for k in ("softmax", "softmax_trig")}
    steps = 2 * (draws // chunk)
    step = 0
    for kernel in sq_err:
        for _ in range(draws // chunk):
            progress(step, steps, f"fig2 Monte Carlo {KERNEL_LABEL[kernel]}")
            step += 1
            w = fp.draw_projection(chunk * m, d, kind="iid", seed=rng)
            prod = fp.feature_map(x, w, kernel=kernel, scale=1.0) * fp.feature_map(
                y, w, kernel=kernel, scale=1.0
            )
            # feature_map normalises by (chunk m)^-1/2 per side: group g's m-row estimate
            # is chunk times the sum of its rows' products (cos and sin parts for trig).
            estimates = prod.reshape(len(x), -1, chunk, m).sum(axis=(1, 3)) * chunk
            sq_err[kernel] += np.sum((estimates - exact[:, None]) ** 2, axis=1)
    progress(steps, steps, "fig2 done")
    mc = []
    for i, (r, deg) in enumerate(labels):
        mse = {k: sq_err[k][i] / draws for k in sq_err}
        th = {k: float(theory.kernel_mse(k, x[i], y[i], m)) for k in sq_err}
        se = {k: float(theory.mse_estimate_se(k, x[i], y[i], m, draws)) for k in sq_err}
        ratio = mse["softmax_trig"] / mse["softmax"]
        rel = math.hypot(se["softmax_trig"] / th["softmax_trig"], se["softmax"] / th["softmax"])
        mc.append(
            {
                "norm": r,
                "angle_deg": deg,
                "ratio_theory": th["softmax_trig"] / th["softmax"],
                "ratio_measured": ratio,
                "ratio_se": ratio * rel,
                "mse_theory": th,
                "mse_measured": mse,
                "mse_se": se,
            }
        )

    result = {
        "what": "MSE(trig) / MSE(positive) for |x| = |y| = norm at an angle; closed form "
        "(Lemma 2, independent of m and d) and Monte Carlo with favorplus.feature_map",
        "grid": {
            "angle_deg": degrees,
            "norm": norms,
            "log10_ratio_rows_by_norm": np.round(np.log10(grid), 3),
        },
        "monte_carlo": {"d": d, "m": m, "draws": draws, "points": mc},
        "meta": meta(args),
    }
    print("\n== fig2: MSE(trig) / MSE(positive) ==")
    print(f"{'norm':>5} {'angle':>6} {'theory':>10} {'measured':>10} {'+- s.e.':>9} {'z':>6}")
    for p in mc:
        z = (p["ratio_measured"] - p["ratio_theory"]) / p["ratio_se"]
        print(
            f"{p['norm']:>5} {p['angle_deg']:>6} {p['ratio_theory']:>10.4g} "
            f"{p['ratio_measured']:>10.4g} {p['ratio_se']:>9.2g} {z:>6.2f}"
        )
    return {"result": result, "figure": plot_fig2(result)}


def plot_fig2(result: dict[str, Any]) -> Any:
    plt = pyplot()
    angles = np.linspace(0.0, np.pi, 361)[1:-1]
    norms = np.linspace(0.0, 2.0, 201)[1:]
    lr = np.log10(theory.mse_ratio_trig_positive(angles[None, :], norms[:, None]))
    fig, (ax0, ax1, ax2) = plt.subplots(
        1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [1.15, 1, 0.8]}
    )
    deg = np.degrees(angles)
    im = ax0.pcolormesh(deg, norms, np.clip(lr, -8, 8), cmap="RdBu_r", vmin=-8, vmax=8)
    cs = ax0.contour(deg, norms, lr, levels=[-6, -4, -2, 0, 2, 4, 6], colors="k", linewidths=0.6)
    ax0.clabel(cs, fmt=lambda v: f"1e{int(v)}" if v else "1", fontsize=7)
    fig.colorbar(im, ax=ax0, label="log10 MSE(trig) / MSE(positive)  (colours clipped at ±8)")
    ax0.set_xlabel("angle between x and y (degrees)")
    ax0.set_ylabel("r = |x| = |y|  (scaled inputs: x = q d^-1/4)")
    ax0.set_title("Closed form (Lemma 2), any m and d\nred: positive features more accurate")

    mc = result["monte_carlo"]
    mc_norms = sorted({p["norm"] for p in mc["points"]})
    curve_norms = sorted(set(mc_norms) | {1.5, 2.0})
    palette = ["tab:purple", "tab:blue", "tab:green", "tab:orange", "tab:red", "tab:brown"]
    colors = dict(zip(curve_norms, palette))
    for r in curve_norms:
        ax1.plot(
            deg,
            theory.mse_ratio_trig_positive(angles, r),
            color=colors[r],
            label=f"closed form r={r}",
        )
    for r in mc_norms:
        pts = [p for p in mc["points"] if p["norm"] == r]
        val = np.array([p["ratio_measured"] for p in pts])
        se = np.array([p["ratio_se"] for p in pts])
        ax1.errorbar(
            [p["angle_deg"] for p in pts],
            val,
            yerr=[np.minimum(se, 0.9 * val), se],
            fmt="o",
            ms=5,
            mec="k",
            mew=0.6,
            color=colors[r],
            capsize=3,
            label=f"Monte Carlo r={r}",
        )
        th = np.array([p["ratio_theory"] for p in pts])
        offset = (mc_norms.index(r) - (len(mc_norms) - 1) / 2) * 3
        ax2.errorbar(
            np.array([p["angle_deg"] for p in pts]) + offset,
            val / th,
            yerr=se / th,
            fmt="o",
            ms=5,
            mec="k",
            mew=0.6,
            color=colors[r],
            capsize=3,
            label=f"r={r}",
        )
    ax1.axhline(1.0, color="grey", lw=0.7)
    ax1.set_yscale("log")
    ax1.set_ylim(1e-10, 1e10)
    ax1.set_xlabel("angle between x and y (degrees)")
    ax1.set_ylabel("MSE(trig) / MSE(positive)")
    ax1.set_title("Ratio against angle: closed form and Monte Carlo")
    ax1.legend(fontsize=7, ncol=2, loc="upper left")
    ax1.grid(True, which="both", alpha=0.3)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xlabel("angle between x and y (degrees)")
    ax2.set_ylabel("measured ratio / closed-form ratio")
    ax2.set_title(
        f"Monte Carlo check (±1 theoretical s.e.)\nfavorplus.feature_map, iid W, d={mc['d']}, "
        f"m={mc['m']}, {mc['draws']} draws",
        fontsize=9,
    )
    ax2.legend(fontsize=7)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------
# Fig. 4: MSE of the attention output against m.


def _fig4_inputs(
    rng: np.random.Generator, length: int, d: int, norm: float
) -> tuple[np.ndarray, ...]:
    """Queries and keys with uniformly random directions and scaled norm |x d^-1/4| = norm."""
    u = rng.standard_normal((2, length, d))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    q, k = u * norm * d**0.25
    v = rng.standard_normal((length, d))
    return q, k, v


def fig4(args: argparse.Namespace) -> dict[str, Any]:
    """Output MSE of FAVOR+ against m: iid / orthogonal, positive / trig / hyperbolic.

    For each input scaling and each of S random inputs (q, k of length L, d = 16,
    uniformly random directions with scaled norm |q d^-1/4| = |k d^-1/4| = rho;
    v ~ N(0, 1)), every (kind, m) draws a few projections (chi norms for orthogonal);
    all three kernels use the same draw. Measured in float64 NumPy against exact
    attention. Beside it: the kernel values ``phi(q) . phi(k)`` against ``exp(q'.k')``
    on a subset of pairs, whose iid MSE is Lemma 2 exactly.
    """
    import favorplus as fp

    quick = args.quick
    d = 16
    length = 1024 if quick else 4096
    ms = [16, 64, 256] if quick else [8, 16, 32, 64, 128, 256]
    samples = 2 if quick else 15
    draws = 1 if quick else 2
    theory_queries = 8 if quick else 16
    pair_q, pair_k = (64, 256) if quick else (256, 512)
    rhos = [1.0, 2.0]
    kinds = ["iid", "orthogonal"]
    rng = np.random.default_rng(args.seed)

    total = len(rhos) * samples
    step = 0
    scalings = []
    for rho in rhos:
        runs: dict[str, list[dict[str, Any]]] = {}
        th_out = {k: [] for k in SOFTMAX_KERNELS}
        th_pairs: dict[str, list[list[float]]] = {}
        exact_ms = []
        for s in range(samples):
            progress(step, total, f"fig4 rho={rho} input {s + 1}/{samples}")
            step += 1
            q, k, v = _fig4_inputs(rng, length, d, rho)
            qs, ks = q * d**-0.25, k * d**-0.25
            exact = fp.softmax_attention(q, k, v)
            exact_ms.append(float(np.mean(exact**2)))
            chosen = rng.choice(length, theory_queries, replace=False)
            for kernel in SOFTMAX_KERNELS:
                th_out[kernel].append(theory.output_mse_delta(kernel, qs, ks, v, chosen))
            pq, pk = q[:pair_q], k[:pair_k]
            sm = np.exp(qs[:pair_q] @ ks[:pair_k].T)
            for kernel in SOFTMAX_KERNELS:
                th_pairs.setdefault(f"iid {kernel}", []).append(
                    [
                        float(
                            theory.kernel_mse(
                                kernel, qs[:pair_q], ks[:pair_k], mm, pairwise=True
                            ).mean()
                        )
                        for mm in ms
                    ]
                )
            th_pairs.setdefault("orthogonal bound softmax", []).append(
                [
                    float(theory.orthogonal_bound(qs[:pair_q], ks[:pair_k], mm, d).mean())
                    for mm in ms
                ]
            )
            for kind in kinds:
                for mm in ms:
                    for _ in range(draws):
                        w = fp.draw_projection(mm, d, kind=kind, seed=rng)
                        for kernel in SOFTMAX_KERNELS:
                            out = fp.favor_attention(q, k, v, w, kernel=kernel)
                            est = (
                                fp.feature_map(pq, w, kernel=kernel)
                                @ fp.feature_map(pk, w, kernel=kernel).T
                            )
                            runs.setdefault(f"{kind} {kernel}", []).append(
                                {
                                    "m": mm,
                                    "sample": s,
                                    "output_mse": float(np.mean((out - exact) ** 2)),
                                    "kernel_mse": float(np.mean((est - sm) ** 2)),
                                }
                            )
        series = {}
        for name, rows in runs.items():
            per_m = []
            for mm in ms:
                o = np.array([r["output_mse"] for r in rows if r["m"] == mm])
                kv = np.array([r["kernel_mse"] for r in rows if r["m"] == mm])
                per_m.append(
                    {
                        "m": mm,
                        "output_mse_mean": float(o.mean()),
                        "output_mse_median": float(np.median(o)),
                        "output_mse_p16": float(np.percentile(o, 16)),
                        "output_mse_p84": float(np.percentile(o, 84)),
                        "output_mse_max": float(o.max()),
                        "kernel_mse_mean": float(kv.mean()),
                        "kernel_mse_p16": float(np.percentile(kv, 16)),
                        "kernel_mse_p84": float(np.percentile(kv, 84)),
                        "runs": len(o),
                    }
                )
            series[name] = per_m
        delta = {k: float(np.mean(v)) for k, v in th_out.items()}
        scalings.append(
            {
                "rho": rho,
                "exact_output_mean_square": float(np.mean(exact_ms)),
                "measured": series,
                "theory_output_delta_method_m1": delta,
                "theory_output_delta_method": {k: [c / mm for mm in ms] for k, c in delta.items()},
                "theory_kernel_mse": {k: np.mean(v, axis=0).tolist() for k, v in th_pairs.items()},
            }
        )
    progress(total, total, "fig4 done")
    result = {
        "what": "MSE of the FAVOR+ attention output against m (rows of W; trig and "
        "hyperbolic use 2m features), and of the kernel values on a subset of pairs",
        "setup": {
            "L": length,
            "d": d,
            "m": ms,
            "inputs_per_scaling": samples,
            "draws_per_input_and_m": draws,
            "inputs": "q, k rows: uniformly random directions, scaled norm |x d^-1/4| = rho; "
            "v ~ N(0, 1); float64 NumPy; exact attention as reference",
            "kernel_pairs": [pair_q, pair_k],
            "theory_queries_per_input": theory_queries,
            "theory_output": "first-order (delta-method) variance with iid rows, from the "
            "closed-form second moments of the features (paper_theory.output_mse_delta); "
            "a large-m approximation, averaged over random query subsets",
            "theory_kernel": "Lemma 2 MSE with iid rows (exact expectation); Theorem 2 "
            "upper bound for orthogonal rows, positive features",
        },
        "scalings": scalings,
        "meta": meta(args),
    }
    print("\n== fig4: attention-output MSE (mean over runs) ==")
    for sc in scalings:
        print(f"rho = {sc['rho']} (exact output mean square {sc['exact_output_mean_square']:.3g})")
        print(f"{'series':>30} " + " ".join(f"{'m=' + str(mm):>9}" for mm in ms))
        for name, per_m in sc["measured"].items():
            print(f"{name:>30} " + " ".join(f"{p['output_mse_mean']:>9.3g}" for p in per_m))
        for kernel, vals in sc["theory_output_delta_method"].items():
            print(f"{'delta-method iid ' + kernel:>30} " + " ".join(f"{x:>9.3g}" for x in vals))
    return {"result": result, "figure": plot_fig4(result)}


def plot_fig4(result: dict[str, Any]) -> Any:
    plt = pyplot()
    setup = result["setup"]
    ms = setup["m"]
    scal = result["scalings"]
    fig, axes = plt.subplots(len(scal), 2, figsize=(14, 6.5 * len(scal)), squeeze=False)
    for row, sc in zip(axes, scal):
        ax_out, ax_kv = row
        for name, per_m in sc["measured"].items():
            kind, kernel = name.split()
            ls = "-" if kind == "orthogonal" else "--"
            marker = "o" if kind == "orthogonal" else "s"
            mm = [p["m"] for p in per_m]
            label = f"{kind} {KERNEL_LABEL[kernel]}"
            for ax, key in ((ax_out, "output_mse"), (ax_kv, "kernel_mse")):
                mean = np.array([p[f"{key}_mean"] for p in per_m])
                lo = np.array([p[f"{key}_p16"] for p in per_m])
                hi = np.array([p[f"{key}_p84"] for p in per_m])
                ax.errorbar(
                    mm,
                    mean,
                    yerr=[np.maximum(mean - lo, 0), np.maximum(hi - mean, 0)],
                    color=KERNEL_COLOR[kernel],
                    ls=ls,
                    marker=marker,
                    ms=4,
                    capsize=2,
                    lw=1.2,
                    label=label,
                )
        for kernel, vals in sc["theory_output_delta_method"].items():
            ax_out.plot(
                ms,
                vals,
                color=KERNEL_COLOR[kernel],
                ls=":",
                lw=2,
                alpha=0.7,
                label=f"theory iid {KERNEL_LABEL[kernel]} (1st-order delta method)",
            )
        for name, vals in sc["theory_kernel_mse"].items():
            kernel = name.split()[-1]
            bound = name.startswith("orthogonal")
            ax_kv.plot(
                ms,
                vals,
                color=KERNEL_COLOR[kernel],
                ls="-." if bound else ":",
                lw=2,
                alpha=0.7,
                label=(
                    "Theorem 2 bound, orthogonal positive"
                    if bound
                    else f"Lemma 2 iid {KERNEL_LABEL[kernel]} (exact)"
                ),
            )
        ax_out.axhline(
            sc["exact_output_mean_square"],
            color="k",
            lw=0.8,
            alpha=0.6,
            label="mean square of the exact output",
        )
        for ax in (ax_out, ax_kv):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("m (rows of W; trig and hyperbolic use 2m features)")
            ax.grid(True, which="both", alpha=0.3)
        rho = sc["rho"]
        ax_out.set_ylabel("MSE of the attention output")
        ax_out.set_title(
            f"Attention output, L={setup['L']}, d={setup['d']}, |q'|=|k'|={rho}; "
            f"mean, bars 16-84 %",
            fontsize=10,
        )
        ax_kv.set_ylabel("MSE of the kernel values phi(q).phi(k)")
        ax_kv.set_title(
            f"Kernel values exp(q'.k') on {setup['kernel_pairs'][0]}x"
            f"{setup['kernel_pairs'][1]} pairs, |q'|=|k'|={rho}",
            fontsize=10,
        )
        for ax in (ax_out, ax_kv):
            ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    return fig


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


# ----------------------------------------------------------------------------------
# Peers: favorplus beside performer-pytorch.

PEERS = ("favorplus-torch", "performer-pytorch")
PEER_LABEL = {"favorplus-torch": "favorplus", "performer-pytorch": "performer-pytorch"}
PEER_COLOR = {"favorplus-torch": "tab:blue", "performer-pytorch": "tab:orange"}


def peers_fn(impl: str, L: int, causal: bool, grad: bool) -> Callable[[], Any]:
    """run.make, with performer-pytorch's "unable to import cuda code" notice silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        return make(impl, L, causal=causal, grad=grad)


def _performer(causal: bool, projection: Any) -> Any:
    """performer-pytorch's FastAttention at m = rows of ``projection``, using that matrix."""
    import torch
    from performer_pytorch import FastAttention

    with contextlib.redirect_stdout(io.StringIO()):
        attn = FastAttention(
            dim_heads=projection.shape[1], nb_features=projection.shape[0], causal=causal
        )
    with torch.no_grad():
        attn.projection_matrix.copy_(projection)
    return attn


def _reference_module() -> Any:
    """tests/reference.py: independent float64 NumPy formulas (no favorplus inside)."""
    import importlib.util

    path = ROOT / "tests" / "reference.py"
    spec = importlib.util.spec_from_file_location("favorplus_test_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peers_accuracy(length: int, scales: list[float], seed: int) -> list[dict[str, Any]]:
    """Relative error against exact attention at equal m and the same projection matrix.

    Also the deviation of each implementation from the ideal estimator with that
    matrix (tests/reference.py's features and quadratic attention in float64): what
    the implementation adds beyond the estimator's own error.
    """
    import torch

    import favorplus as fp

    ref = _reference_module()
    w64 = fp.draw_projection(M, D, seed=1)
    w = torch.tensor(w64, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    out = []
    for scale in scales:
        q, k = (rng.standard_normal((1, H, length, D)) * scale for _ in range(2))
        v = rng.standard_normal((1, H, length, D))
        qt, kt, vt = (torch.tensor(a, dtype=torch.float32) for a in (q, k, v))
        for causal in (False, True):
            exact = ref.exact_attention(q, k, v, causal=causal)
            fq = ref.features(q, w64, "softmax", D**-0.5)
            fk = ref.features(k, w64, "softmax", D**-0.5)
            ideal = ref.quadratic_attention(fq, fk, v, causal=causal)
            with torch.no_grad():
                ours = fp.favor_attention(qt, kt, vt, w, causal=causal).double().numpy()
                theirs = _performer(causal, w)(qt, kt, vt).double().numpy()

            def rel(a: np.ndarray, b: np.ndarray) -> float:
                return float(np.linalg.norm(a - b) / np.linalg.norm(b))

            out.append(
                {
                    "input_std": scale,
                    "mean_scaled_sq_norm": float(np.mean(np.sum(q * q, -1)) * D**-0.5),
                    "causal": causal,
                    "ideal_estimator_vs_exact": rel(ideal, exact),
                    "favorplus_vs_exact": rel(ours, exact),
                    "performer_vs_exact": rel(theirs, exact),
                    "favorplus_vs_ideal": rel(ours, ideal),
                    "performer_vs_ideal": rel(theirs, ideal),
                    "favorplus_finite": bool(np.isfinite(ours).all()),
                    "performer_finite": bool(np.isfinite(theirs).all()),
                }
            )
    return out


def peers_leak(length: int, factors: list[float], seed: int) -> list[dict[str, Any]]:
    """Causal leak: how much rows before the last change when only the LAST key grows.

    In exact causal attention rows t < L-1 do not depend on key L-1 at all; any
    change is a leak of the future into the past.
    """
    import torch

    import favorplus as fp

    w = fp.draw_projection(M, D, seed=1, xp=torch, dtype=torch.float32)
    q, k, v = (torch.tensor(a) for a in inputs(length, "numpy", seed=seed))
    attn = _performer(True, w)
    out = []
    with torch.no_grad():
        base = {
            "favorplus": fp.favor_attention(q, k, v, w, causal=True),
            "performer": attn(q, k, v),
        }
        for factor in factors:
            k2 = k.clone()
            k2[..., -1, :] *= factor
            new = {
                "favorplus": fp.favor_attention(q, k2, v, w, causal=True),
                "performer": attn(q, k2, v),
            }
            row: dict[str, Any] = {"last_key_factor": factor}
            for name in base:
                diff = (new[name][..., :-1, :] - base[name][..., :-1, :]).abs()
                row[f"{name}_max_change"] = float(diff.max())
                row[f"{name}_rows_changed"] = int((diff.amax(-1) > 0).sum())
                row[f"{name}_finite"] = bool(torch.isfinite(new[name]).all())
            row["rows_before_last"] = int(H * (length - 1))
            row["mean_abs_output"] = float(base["favorplus"].abs().mean())
            out.append(row)
    return out


def peers_haar(draws: int, seed: int) -> dict[str, Any]:
    """Are the orthogonal blocks Haar? Mean of w_rr / |w_r| over the diagonal of d x d blocks.

    For a Haar-distributed block every row is isotropic, so this mean is 0 within
    about 1/sqrt(d draws). performer-pytorch takes Q of a plain QR (no sign fix).
    """
    import torch
    from performer_pytorch.performer_pytorch import gaussian_orthogonal_random_matrix

    import favorplus as fp

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stats = {}
    for name in ("favorplus", "performer-pytorch"):
        diag0, diag_all = [], []
        for _ in range(draws):
            if name == "favorplus":
                w = fp.draw_projection(D, D, seed=rng)
            else:
                w = gaussian_orthogonal_random_matrix(D, D).double().numpy()
            unit = w / np.linalg.norm(w, axis=1, keepdims=True)
            diag0.append(unit[0, 0])
            diag_all.append(np.mean(np.diagonal(unit)))
        d0, da = np.array(diag0), np.array(diag_all)
        stats[name] = {
            "mean_w00": float(d0.mean()),
            "z_w00": float(d0.mean() / (d0.std() / math.sqrt(draws))),
            "mean_diagonal": float(da.mean()),
            "z_diagonal": float(da.mean() / (da.std() / math.sqrt(draws))),
        }
    return {"d": D, "draws": draws, **stats}


def peers_series(lengths: list[int], cap: float, repeats: int) -> list[dict[str, Any]]:
    """Time and peak memory of both libraries (run in a fresh subprocess by :func:`peers`).

    A call whose warm-up takes longer than ``cap`` seconds is timed once.
    """
    modes = [(c, g) for c in (False, True) for g in (False, True)]
    rows: list[dict[str, Any]] = []
    total = len(modes) * len(lengths) * len(PEERS)
    i = 0
    for causal, grad in modes:
        for L in lengths:
            for impl in PEERS:
                label = f"{'causal' if causal else 'bidir'} {'fwd+bwd' if grad else 'fwd'}"
                progress(i, total, f"peers {PEER_LABEL[impl]} {label} L={L}")
                i += 1
                fn = peers_fn(impl, L, causal, grad)
                row = {"impl": impl, "causal": causal, "grad": grad, "L": L}
                row.update(measure(fn, repeats, cap))
                del fn
                rows.append(row)
    progress(total, total, "peers timing and memory done")
    return rows


def peers(args: argparse.Namespace) -> dict[str, Any]:
    """favorplus and performer-pytorch (FastAttention, torch CPU) side by side.

    Speed and peak memory (forward, forward + backward; bidirectional, causal), error
    against exact attention at equal m = 256 with the same projection matrix (copied
    into FastAttention's ``projection_matrix`` buffer), the causal leak, and whether
    the orthogonal blocks are Haar-distributed.
    """
    quick = args.quick
    cap = args.cap if args.cap is not None else (0.5 if quick else 2.0)
    repeats = 1 if quick else args.repeats
    lengths = [256, 512, 1024] if quick else [1024, 2048, 4096]
    modes = [(c, g) for c in (False, True) for g in (False, True)]
    task = {"kind": "peers", "lengths": lengths, "cap": cap, "repeats": repeats}
    rows: list[dict[str, Any]] = run_in_child(task, args.threads)
    import torch

    if args.threads > 0:  # as in the timed child: tiny torch ops stall on a loaded machine
        torch.set_num_threads(args.threads)
    progress(0, 3, "peers accuracy")
    acc_length = 512 if quick else 2048
    scales = [0.35, 0.7] if quick else [0.25, 0.35, 0.5, 0.7, 1.0]
    accuracy = peers_accuracy(acc_length, scales, args.seed)
    progress(1, 3, "peers causal leak")
    leak_length = 256 if quick else 1024
    leak = peers_leak(leak_length, [2.0, 4.0, 8.0], args.seed)
    progress(2, 3, "peers Haar check")
    haar = peers_haar(300 if quick else 3000, args.seed)
    progress(3, 3, "peers done")

    ratios = []
    for causal, grad in modes:
        for L in lengths:
            a, b = (
                next(
                    r
                    for r in rows
                    if (r["impl"], r["causal"], r["grad"], r["L"]) == (impl, causal, grad, L)
                )
                for impl in PEERS
            )
            ratios.append(
                {
                    "causal": causal,
                    "grad": grad,
                    "L": L,
                    "time_ratio": a["time_s"] / b["time_s"],
                    "memory_ratio": a["peak_mib"] / b["peak_mib"] if b["peak_mib"] else math.nan,
                }
            )
    result = {
        "what": "favorplus vs performer-pytorch FastAttention (torch CPU): speed, peak memory, "
        "accuracy at equal m and the same projection, causal leak, Haar check",
        "setup": {
            "batch": 1,
            "heads": H,
            "d": D,
            "m": M,
            "dtype": "float32",
            "timing_inputs": "q, k ~ N(0, 0.35^2), v ~ N(0, 1) (run.make); each library "
            "draws its own projection (timing does not depend on it)",
            "accuracy": f"L={acc_length}; q, k ~ N(0, std^2), v ~ N(0, 1); the same "
            "orthogonal chi-norm W (favorplus seed 1) in both; float32 outputs against "
            "float64 exact attention and the float64 ideal estimator (tests/reference.py)",
            "leak": f"L={leak_length}, std 0.35; the last key multiplied by a factor; max "
            "abs change of all earlier output rows",
            "cap_s": cap,
            "repeats": repeats,
            "threads": args.threads,
            "performer_causal_path": "non-CUDA fallback (causal_linear_attention_noncuda): "
            "no fast-transformers CUDA kernel on a CPU",
        },
        "rows": rows,
        "ratios_favorplus_over_performer": ratios,
        "accuracy": accuracy,
        "causal_leak": leak,
        "haar": haar,
        "meta": meta(args),
    }
    print("\n== peers: favorplus / performer-pytorch ==")
    for r in ratios:
        print(
            f"  {'causal' if r['causal'] else 'bidir '} {'fwd+bwd' if r['grad'] else 'fwd    '}"
            f" L={r['L']:>5}: time ratio {fmt(r['time_ratio'])}, "
            f"peak-memory ratio {fmt(r['memory_ratio'])}"
        )
    print("  relative error against exact (ideal estimator / favorplus / performer):")
    for a in accuracy:
        print(
            f"    std {a['input_std']:<5} {'causal' if a['causal'] else 'bidir '}: "
            f"{fmt(a['ideal_estimator_vs_exact'])} / {fmt(a['favorplus_vs_exact'])} / "
            f"{fmt(a['performer_vs_exact'])}   (vs ideal: {fmt(a['favorplus_vs_ideal'])} / "
            f"{fmt(a['performer_vs_ideal'])})"
        )
    for lk in leak:
        print(
            f"  leak, last key x{lk['last_key_factor']}: favorplus max change "
            f"{fmt(lk['favorplus_max_change'])}, performer {fmt(lk['performer_max_change'])} "
            f"({lk['performer_rows_changed']}/{lk['rows_before_last']} rows changed)"
        )
    for name in ("favorplus", "performer-pytorch"):
        h = haar[name]
        print(f"  Haar check {name}: mean w00/|w0| = {h['mean_w00']:.4f} (z = {h['z_w00']:.1f})")
    return {"result": result, "figure": plot_peers(result)}


def plot_peers(result: dict[str, Any]) -> Any:
    plt = pyplot()
    rows = result["rows"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, causal in ((axes[0, 0], False), (axes[0, 1], True)):
        for impl in PEERS:
            for grad, ls, marker in ((False, "-", "o"), (True, "--", "s")):
                pts = [
                    r for r in rows if (r["impl"], r["causal"], r["grad"]) == (impl, causal, grad)
                ]
                ax.plot(
                    [r["L"] for r in pts],
                    [r["time_s"] for r in pts],
                    ls=ls,
                    marker=marker,
                    color=PEER_COLOR[impl],
                    label=f"{PEER_LABEL[impl]} {'fwd+bwd' if grad else 'fwd'}",
                )
        ax.set_title(f"{'Causal' if causal else 'Bidirectional'}: time (torch CPU)")
        ax.set_ylabel("seconds (best of repeats)")
    ax = axes[0, 2]
    for impl in PEERS:
        for causal, grad, ls, marker in (
            (False, True, "-", "o"),
            (True, True, "--", "s"),
            (True, False, ":", "^"),
        ):
            pts = [
                r
                for r in rows
                if (r["impl"], r["causal"], r["grad"]) == (impl, causal, grad)
                and not math.isnan(r["peak_mib"])
            ]
            ax.plot(
                [r["L"] for r in pts],
                [max(r["peak_mib"], 0.1) for r in pts],
                ls=ls,
                marker=marker,
                color=PEER_COLOR[impl],
                label=f"{PEER_LABEL[impl]} {'causal' if causal else 'bidir'} "
                f"{'fwd+bwd' if grad else 'fwd'}",
            )
    ax.set_title("Peak memory of one call")
    ax.set_ylabel("peak extra RSS (MiB)")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    acc = result["accuracy"]
    for ax, key, title in (
        (
            axes[1, 0],
            "vs_exact",
            "Relative error against exact attention (favorplus = ideal estimator)",
        ),
        (axes[1, 1], "vs_ideal", "Deviation from the ideal estimator (same W, float64)"),
    ):
        for causal, ls in ((False, "-"), (True, "--")):
            pts = [a for a in acc if a["causal"] == causal]
            x = [a["mean_scaled_sq_norm"] for a in pts]
            if key == "vs_exact":
                ax.plot(
                    x,
                    [a["ideal_estimator_vs_exact"] for a in pts],
                    color="black",
                    ls=ls,
                    lw=0.8,
                    marker="x",
                    ms=8,
                    zorder=5,
                    label=f"ideal estimator (float64) {'causal' if causal else 'bidir'}",
                )
            for name, impl in (
                ("favorplus", "favorplus-torch"),
                ("performer", "performer-pytorch"),
            ):
                ax.plot(
                    x,
                    [max(a[f"{name}_{key}"], 1e-9) for a in pts],
                    color=PEER_COLOR[impl],
                    ls=ls,
                    marker="o",
                    label=f"{PEER_LABEL[impl]} {'causal' if causal else 'bidir'}",
                )
        ax.set_yscale("log")
        stds = sorted({a["input_std"] for a in acc})
        ax.set_xlabel(
            f"mean |q'|^2, q' = q d^-1/4\n(q, k entries N(0, s^2), s = "
            f"{', '.join(f'{x:g}' for x in stds)})"
        )
        ax.set_ylabel("relative Frobenius error")
        ax.set_title(f"{title}\nm = {result['setup']['m']}, the same W in both", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    ax = axes[1, 2]
    leak = result["causal_leak"]
    factors = [lk["last_key_factor"] for lk in leak]
    xpos = np.arange(len(factors))
    for off, name, impl in (
        (-0.2, "favorplus", "favorplus-torch"),
        (0.2, "performer", "performer-pytorch"),
    ):
        vals = [lk[f"{name}_max_change"] for lk in leak]
        bars = ax.bar(
            xpos + off,
            [max(v, 1e-9) for v in vals],
            width=0.4,
            color=PEER_COLOR[impl],
            label=PEER_LABEL[impl],
        )
        for b, val in zip(bars, vals):
            ax.annotate(
                f"{val:.2g}",
                (b.get_x() + b.get_width() / 2, max(val, 1e-9)),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_yscale("log")
    ax.set_ylim(1e-9, 10)
    ax.set_xticks(xpos, [f"last key x{f:g}" for f in factors])
    ax.set_ylabel("max |change| of earlier output rows (0 shown at 1e-9)")
    h = result["haar"]
    ax.set_title(
        "Causal leak: earlier rows must not change\n"
        f"Haar check, mean w00/|w0| over {h['draws']} blocks: favorplus "
        f"{h['favorplus']['mean_w00']:+.3f}, performer {h['performer-pytorch']['mean_w00']:+.3f}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.suptitle(
        f"favorplus vs performer-pytorch {result['meta']['versions'].get('performer-pytorch', '')}"
        f" (torch CPU; batch 1, {result['setup']['heads']} heads, d={result['setup']['d']}, "
        f"m={result['setup']['m']}, float32)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


# ----------------------------------------------------------------------------------

FIGURES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fig2": fig2,
    "fig3": fig3,
    "fig4": fig4,
    "peers": peers,
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quick", action="store_true", help="small sizes (each figure in under a minute), for CI"
    )
    common.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: {FULL_OUT.relative_to(ROOT)}, or "
        f"{QUICK_OUT.relative_to(ROOT)} with --quick)",
    )
    common.add_argument("--seed", type=int, default=0, help="seed of inputs and draws")
    common.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repeats, the best is kept (fig3, peers; 1 with --quick)",
    )
    common.add_argument(
        "--cap",
        type=float,
        default=None,
        help="time cap in seconds. fig3 (default 1, quick 0.1): exact attention stops "
        "after a call above it, FAVOR+ after a call above 4 x cap, and a warm-up call "
        "above twice that limit is not repeated. peers (default 2, quick 0.5): a "
        "warm-up call above it is not repeated",
    )
    common.add_argument(
        "--threads",
        type=int,
        default=1,
        help="fig3, peers: CPU threads of the timed processes (default 1: robust on a "
        "shared machine; 0: each library's default)",
    )
    common.add_argument(
        "--backends",
        default="numpy,torch,jax",
        help="fig3: comma-separated CPU backends (default numpy,torch,jax)",
    )
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--_child", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="figure", metavar="{fig2,fig3,fig4,peers,all}")
    helps = {
        "fig2": "MSE ratio of trigonometric to positive features over angle and norm",
        "fig3": "time and peak memory against L, exact vs FAVOR+, each CPU backend",
        "fig4": "attention-output MSE against m: iid/orthogonal, positive/trig/hyperbolic",
        "peers": "favorplus beside performer-pytorch: speed, memory, accuracy, causal leak",
        "all": "all of the above, one after the other",
    }
    for name, text in helps.items():
        sub.add_parser(name, parents=[common], help=text, description=text)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args._child:
        _child(args._child)
        return 0
    if not args.figure:
        p.print_help()
        return 2
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    names = list(FIGURES) if args.figure == "all" else [args.figure]
    for name in names:
        t0 = time.perf_counter()
        produced = FIGURES[name](args)
        produced["result"]["meta"]["wall_s"] = time.perf_counter() - t0
        paths = save(out, name, produced["result"], produced["figure"])
        print(
            f"{name}: {time.perf_counter() - t0:.1f} s; wrote "
            + ", ".join(str(path) for path in paths)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
