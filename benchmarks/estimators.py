"""Sharper estimators beside FAVOR+: accuracy against the scaled input norm, and their cost.

    python benchmarks/estimators.py            # full run: docs/figures/estimators.{json,png}
    python benchmarks/estimators.py --quick    # small sizes (CI): benchmarks/results/quick/

Accuracy (float64 NumPy, one head, d = 64, L queries and L keys): for every projection kind
(iid, orthogonal, simplex; chi norms) and feature map (positive = FAVOR+, hyperbolic,
OPRF = FAVOR++, SADERF = FAVOR#) at an equal number of features M = 256 (the hyperbolic map
makes 2 features per row: 128 rows), against the scaled norm r = |q| d^-1/4 = |k| d^-1/4 of
every query and key:

* per-pair kernel error: mean over all (i, j) of ``(K^_ij - K_ij)^2 / K_ij^2``;
* attention-output error: ``|out - exact|^2 / |exact|^2`` (relative MSE);

each averaged over independent projections (``--draws``). OPRF and SADERF take their
parameters from the call's own queries and keys (bidirectional). Inputs: "isotropic"
(directions uniform) and "anisotropic" (query coordinates scaled by g_l, key coordinates
by 1/g_l, g log-spaced over [e^-1.2, e^1.2], then every row rescaled to the norm).

Cost (float32, CPU, one thread, L = 8192, d = 64, m = 256, ``--heads`` heads): feature maps
of q and k, bidirectional attention and causal attention, each estimator against FAVOR+
(positive, orthogonal) timed in alternation in one run; the ratios are medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import favorplus as fp  # noqa: E402

FULL_OUT = ROOT / "docs" / "figures"
QUICK_OUT = HERE / "results" / "quick"

D, M = 64, 256
KINDS = ("iid", "orthogonal", "simplex")
MAPS = ("positive", "hyperbolic", "oprf", "saderf")
KERNEL = {"positive": "softmax", "hyperbolic": "softmax_hyperbolic"}
COLOR = {"positive": "tab:blue", "hyperbolic": "tab:green", "oprf": "tab:orange",
         "saderf": "tab:red"}  # fmt: skip
STYLE = {"iid": ":", "orthogonal": "--", "simplex": "-"}


def make_inputs(kind: str, length: int, norm: float, seed: int) -> tuple[np.ndarray, ...]:
    """Queries, keys (every row of scaled norm ``norm``) and values."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((length, D))
    k = rng.standard_normal((length, D))
    if kind == "anisotropic":
        g = np.exp(np.linspace(-1.2, 1.2, D))
        q, k = q * g, k / g
    target = norm * D**0.25
    q *= target / np.linalg.norm(q, axis=1, keepdims=True)
    k *= target / np.linalg.norm(k, axis=1, keepdims=True)
    v = rng.standard_normal((length, D))
    return q, k, v


def estimator(name: str, q: np.ndarray, k: np.ndarray) -> Any:
    """The kernel argument (OPRF / SADERF: parameters from this q and k)."""
    if name in KERNEL:
        return KERNEL[name]
    st = fp.feature_statistics(q, k)
    return fp.OPRF(statistics=st) if name == "oprf" else fp.SADERF(statistics=st)


def errors(name: str, kind: str, q, k, v, exact_kernel, exact_out, seed) -> tuple[float, float]:
    rows = M // 2 if name == "hyperbolic" else M
    w = fp.draw_projection(rows, D, kind=kind, seed=seed)
    kern = estimator(name, q, k)
    fq = fp.feature_map(q, w, kernel=kern)
    fk = fp.feature_map(k, w, kernel=kern, role="key")
    est = fq @ fk.T
    pair = float(np.mean(((est - exact_kernel) / exact_kernel) ** 2))
    out = fp.favor_attention(q, k, v, w, kernel=kern)
    rel = float(np.sum((out - exact_out) ** 2) / np.sum(exact_out**2))
    return pair, rel


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    norms = [0.5, 1.0, 1.5, 2.0] if args.quick else [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
    length = args.length or (128 if args.quick else 512)
    draws = args.draws or (3 if args.quick else 20)
    result: dict[str, Any] = {}
    for data in ("isotropic", "anisotropic"):
        table: dict[str, Any] = {}
        for ni, norm in enumerate(norms):
            q, k, v = make_inputs(data, length, norm, seed=1000 + ni)
            scale = 1 / math.sqrt(D)
            exact_kernel = np.exp(scale * q @ k.T)
            exact_out = fp.softmax_attention(q, k, v)
            for name in MAPS:
                for kind in KINDS:
                    pairs, outs = [], []
                    for r in range(draws):
                        p, o = errors(name, kind, q, k, v, exact_kernel, exact_out, seed=r)
                        pairs.append(p)
                        outs.append(o)
                    entry = table.setdefault(f"{name}/{kind}", {"pair": [], "out": [], "se": []})
                    entry["pair"].append(float(np.mean(pairs)))
                    entry["out"].append(float(np.mean(outs)))
                    entry["se"].append(float(np.std(outs) / math.sqrt(draws)))
            print(f"  {data} r={norm}: done", file=sys.stderr, flush=True)
        base = table["positive/orthogonal"]["out"]
        for entry in table.values():
            entry["gain_out_vs_favor"] = [b / e for b, e in zip(base, entry["out"])]
        result[data] = table
    return {"norms": norms, "length": length, "draws": draws, "m": M, "d": D, **result}


def _time(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cost(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    length = 8192
    heads = args.heads or (1 if args.quick else 8)
    rounds = args.rounds or (5 if args.quick else 15)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, heads, length, D)).astype(np.float32) * 0.3
    v = rng.standard_normal((heads, length, D)).astype(np.float32)
    out: dict[str, Any] = {"length": length, "heads": heads, "rounds": rounds}
    for backend in ("numpy", "torch"):
        conv = (lambda a: a) if backend == "numpy" else torch.asarray
        bq, bk, bv = conv(q), conv(k), conv(v)
        w = conv(fp.draw_projection(M, D, seed=0).astype(np.float32))
        st = fp.feature_statistics(bq, bk)
        kern = {
            "positive": "softmax",
            "oprf": fp.OPRF(statistics=st),
            "saderf": fp.SADERF(statistics=st),
        }

        def features(name: str) -> Any:
            def run() -> None:
                kk = kern[name]
                if name != "positive":  # statistics of this batch included
                    s = fp.feature_statistics(bq, bk)
                    kk = fp.OPRF(statistics=s) if name == "oprf" else fp.SADERF(statistics=s)
                fp.feature_map(bq, w, kernel=kk)
                fp.feature_map(bk, w, kernel=kk, role="key")

            return run

        tasks = {
            "features": {n: features(n) for n in kern},
            "bidirectional": {
                n: (
                    lambda n=n: fp.favor_attention(
                        bq, bk, bv, w, kernel=KERNEL.get(n, f"softmax_{n}")
                    )
                )
                for n in kern
            },
            "causal": {
                n: (lambda n=n: fp.favor_attention(bq, bk, bv, w, kernel=kern[n], causal=True))
                for n in kern
            },
        }
        res: dict[str, Any] = {}
        for task, fns in tasks.items():
            for fn in fns.values():
                fn()  # warm-up
            times: dict[str, list[float]] = {n: [] for n in fns}
            for _ in range(rounds):
                for n, fn in fns.items():
                    times[n].append(_time(fn))
            base = np.array(times["positive"])
            res[task] = {
                n: {
                    "median_s": float(np.median(t)),
                    "ratio_to_favor": float(np.median(np.array(t) / base)),
                }
                for n, t in times.items()
            }
            print(f"  cost {backend} {task}: done", file=sys.stderr, flush=True)
        out[backend] = res
    draw = {kind: [] for kind in ("orthogonal", "simplex")}
    for _ in range(rounds):
        for kind in draw:
            draw[kind].append(_time(lambda kind=kind: fp.draw_projection(M, D, kind=kind, seed=1)))
    out["draw_projection_s"] = {kind: float(np.median(t)) for kind, t in draw.items()}
    return out


def figure(acc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = acc["norms"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, data in enumerate(("isotropic", "anisotropic")):
        for row, metric in enumerate(("pair", "out")):
            ax = axes[row, col]
            for name in MAPS:
                for kind in KINDS:
                    ax.plot(
                        norms,
                        acc[data][f"{name}/{kind}"][metric],
                        STYLE[kind],
                        color=COLOR[name],
                        marker="o",
                        ms=3,
                        label=f"{name} / {kind}",
                    )
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            what = "per-pair relative MSE" if metric == "pair" else "attention-output rel. MSE"
            ax.set_title(f"{data}: {what}")
            if row == 1:
                ax.set_xlabel("scaled norm |q| d^-1/4 = |k| d^-1/4")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"d = {acc['d']}, M = {acc['m']} features, L = {acc['length']}, "
        f"{acc['draws']} projections per point"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(acc: dict[str, Any], cst: dict[str, Any] | None) -> str:
    lines = []
    norms = acc["norms"]
    for data in ("isotropic", "anisotropic"):
        lines.append(f"{data}: attention-output MSE of FAVOR+ orthogonal / estimator")
        lines.append("  estimator            " + " ".join(f"{r:>6}" for r in norms))
        for name in MAPS:
            for kind in KINDS:
                gains = acc[data][f"{name}/{kind}"]["gain_out_vs_favor"]
                lines.append(f"  {name + '/' + kind:20} " + " ".join(f"{g:6.2f}" for g in gains))
    if cst is not None:
        for backend in ("numpy", "torch"):
            for task in ("features", "bidirectional", "causal"):
                r = cst[backend][task]
                lines.append(
                    f"time {backend} {task} (L = {cst['length']}, {cst['heads']} heads): "
                    + ", ".join(f"{n} {v['ratio_to_favor']:.2f}x" for n, v in r.items())
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--length", type=int, help="accuracy: queries = keys")
    parser.add_argument("--draws", type=int, help="accuracy: projections per point")
    parser.add_argument("--heads", type=int, help="cost: heads at L = 8192")
    parser.add_argument("--rounds", type=int, help="cost: alternating rounds")
    parser.add_argument("--no-cost", action="store_true", help="accuracy only")
    args = parser.parse_args()
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    out.mkdir(parents=True, exist_ok=True)
    acc = accuracy(args)
    cst = None if args.no_cost else cost(args)
    result = {
        "command": "python benchmarks/estimators.py" + (" --quick" if args.quick else ""),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "accuracy": acc,
        "cost": cst,
    }
    (out / "estimators.json").write_text(json.dumps(result, indent=1))
    figure(acc, out / "estimators.png")
    print(summary(acc, cst))
    print(f"wrote {out / 'estimators.json'} and {out / 'estimators.png'}")


if __name__ == "__main__":
    main()
