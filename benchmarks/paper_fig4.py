"""Fig. 4 of the Performer paper: MSE of the FAVOR+ attention output against m (iid and
orthogonal projections; positive, trigonometric and hyperbolic features).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

import paper_theory as theory
from paper_common import (
    KERNEL_COLOR,
    KERNEL_LABEL,
    SOFTMAX_KERNELS,
    meta,
    pyplot,
)
from run import progress

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
