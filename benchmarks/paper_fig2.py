"""Fig. 2 of the Performer paper: MSE ratio of trigonometric to positive features over
angle and norm (closed form of paper_theory.py and a Monte Carlo check).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

import paper_theory as theory
from paper_common import (
    KERNEL_LABEL,
    meta,
    pyplot,
)
from run import progress

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
