"""favorplus.sklearn.FavorFeatures against scikit-learn's RBFSampler and Nystroem.

    python benchmarks/sklearn_kernels.py            # full run (a few minutes on 2 cores)
    python benchmarks/sklearn_kernels.py --quick    # small sizes, for CI (well under a minute)

Two parts, on data sets that scikit-learn ships (breast cancer, digits, diabetes) or
generates (make_friedman1); nothing is downloaded.

1. **Kernel approximation** of the Gaussian kernel exp(-gamma |x - y|^2) at equal feature
   counts, as gamma varies in units of gamma_s = 1 / (n_features X.var()) (scikit-learn's
   "scale"): each method is fitted on a training split and the kernel between held-out
   points is estimated as phi(X) phi(X)^T. Errors: the relative error |K^ - K| / K per
   entry (median over the off-diagonal entries with K < 0.1, over all of them, and per
   decade of K) and the relative operator-norm error ||K^ - K||_2 / ||K||_2; the mean over
   independent draws. Methods: FavorFeatures with hyperbolic (the default), positive and
   trigonometric orthogonal features; RBFSampler; Nystroem (which samples landmarks from
   the training data: data-dependent, so not a random-feature method).
2. **Learning**: a linear model on the features (LogisticRegression for classification,
   Ridge for regression) against the exact kernel machine (SVC, KernelRidge) at the same
   gamma: test accuracy / R^2, and fit + predict time with one thread.

Full runs write ``docs/figures/sklearn_kernels.json`` and ``.png``; ``--quick`` writes to
``benchmarks/results/quick/`` (git-ignored); ``--out DIR`` overrides either.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, make_friedman1
from sklearn.kernel_approximation import Nystroem, RBFSampler
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from favorplus.sklearn import FavorFeatures

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FULL_OUT = ROOT / "docs" / "figures"
QUICK_OUT = HERE / "results" / "quick"
NAME = "sklearn_kernels"

METHODS = ("favor-hyperbolic", "favor-positive", "favor-trig", "rbfsampler", "nystroem")
LABEL = {
    "favor-hyperbolic": "FavorFeatures (hyperbolic, default)",
    "favor-positive": "FavorFeatures (positive)",
    "favor-trig": "FavorFeatures (trig, orthogonal RFF)",
    "rbfsampler": "RBFSampler",
    "nystroem": "Nystroem",
    "exact": "exact kernel machine",
}
COLOR = {
    "favor-hyperbolic": "tab:green",
    "favor-positive": "tab:blue",
    "favor-trig": "tab:purple",
    "rbfsampler": "tab:red",
    "nystroem": "tab:gray",
}
SMALL = 0.1  # the small-kernel regime: entries K < SMALL
DECADES = np.arange(-8, 1)  # bins [10^e, 10^(e+1)) of K for the per-decade medians


def make_features(method: str, n: int, gamma: float, seed: int) -> Any:
    if method.startswith("favor-"):
        return FavorFeatures(n_components=n, gamma=gamma, features=method[6:], random_state=seed)
    if method == "rbfsampler":
        return RBFSampler(n_components=n, gamma=gamma, random_state=seed)
    return Nystroem(kernel="rbf", n_components=n, gamma=gamma, random_state=seed)


def approximation_data(name: str, quick: bool, rng: np.random.Generator) -> tuple:
    """(train, held-out) splits, standardized (cancer) or scaled to [0, 1] (digits)."""
    if name == "breast_cancer":
        X = StandardScaler().fit_transform(load_breast_cancer().data)
        n_eval = 150 if quick else 200
    else:
        X = load_digits().data / 16.0
        n_eval = 200 if quick else 400
    idx = rng.permutation(len(X))
    return X[idx[n_eval:]], X[idx[:n_eval]]


def approximation(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    n_features = 128 if quick else 256
    draws = 2 if quick else 5
    multipliers = [0.3, 1.0, 3.0] if quick else [0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {
        "n_components": n_features,
        "draws": draws,
        "gamma_over_scale": multipliers,
        "data": {},
    }
    for name in ("breast_cancer", "digits"):
        X_train, X_eval = approximation_data(name, quick, rng)
        gamma_s = 1.0 / (X_train.shape[1] * X_train.var())
        upper = np.triu_indices(len(X_eval), 1)
        per: dict[str, Any] = {
            "n_train": len(X_train),
            "n_eval": len(X_eval),
            "n_features_in": X_train.shape[1],
            "gamma_scale": gamma_s,
            "fraction_below_0.1": [],
            "results": {m: [] for m in METHODS},
        }
        for c in multipliers:
            gamma = c * gamma_s
            K = rbf_kernel(X_eval, gamma=gamma)
            k = K[upper]
            small = k < SMALL
            per["fraction_below_0.1"].append(float(small.mean()))
            bins = np.floor(np.log10(np.maximum(k, 1e-300))).astype(int)
            k_norm = np.linalg.norm(K, 2)
            for method in METHODS:
                rows = []
                for seed in range(draws):
                    t = make_features(method, n_features, gamma, args.seed * 1000 + seed)
                    phi = t.fit(X_train).transform(X_eval)
                    K_hat = phi @ phi.T
                    rel = np.abs(K_hat[upper] - k) / k
                    by_decade = [
                        float(np.median(rel[bins == e])) if np.sum(bins == e) >= 20 else None
                        for e in DECADES
                    ]
                    rows.append(
                        {
                            "median_rel_small": float(np.median(rel[small]))
                            if small.sum() >= 20
                            else None,
                            "median_rel_all": float(np.median(rel)),
                            "operator_rel": float(np.linalg.norm(K_hat - K, 2) / k_norm),
                            "median_rel_by_decade": by_decade,
                        }
                    )
                per["results"][method].append(_mean_rows(rows))
            print(f"  approximation {name} gamma = {c} gamma_s done", flush=True)
        out["data"][name] = per
    # The goal: a lower median relative error than RBFSampler wherever K < 0.1.
    goal = []
    for name, per in out["data"].items():
        for i, c in enumerate(multipliers):
            base = per["results"]["rbfsampler"][i]["median_rel_small"]
            for method in ("favor-hyperbolic", "favor-positive"):
                mine = per["results"][method][i]["median_rel_small"]
                if base is not None and mine is not None:
                    goal.append(
                        {"data": name, "gamma_over_scale": c, "method": method,
                         "favor": mine, "rbfsampler": base, "met": mine < base}
                    )  # fmt: skip
            # decade e holds 10^e <= K < 10^(e + 1): e <= -2 lies below 0.1
            for e_i, e in enumerate(DECADES[DECADES <= -2]):
                base_d = per["results"]["rbfsampler"][i]["median_rel_by_decade"][e_i]
                mine_d = per["results"]["favor-hyperbolic"][i]["median_rel_by_decade"][e_i]
                if base_d is not None and mine_d is not None:
                    goal.append(
                        {"data": name, "gamma_over_scale": c, "method": "favor-hyperbolic",
                         "decade": int(e), "favor": mine_d, "rbfsampler": base_d,
                         "met": mine_d < base_d}
                    )  # fmt: skip
    out["goal_lower_median_below_0.1"] = {"all_met": all(g["met"] for g in goal), "cases": goal}
    return out


def _mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if len(vals) == len(values) and vals else None

    out = {key: mean([r[key] for r in rows]) for key in rows[0] if key != "median_rel_by_decade"}
    out["median_rel_by_decade"] = [
        mean([r["median_rel_by_decade"][i] for r in rows]) for i in range(len(DECADES))
    ]
    return out


# ------------------------------------------------------------------------------------------


def learning_tasks(quick: bool, rng: np.random.Generator) -> list[dict[str, Any]]:
    def split(X, y, n_test):
        idx = rng.permutation(len(X))
        return X[idx[n_test:]], X[idx[:n_test]], y[idx[n_test:]], y[idx[:n_test]]

    digits = load_digits()
    cancer = load_breast_cancer()
    diabetes = load_diabetes()
    n_friedman = 1500 if quick else 6000
    Xf, yf = make_friedman1(n_samples=n_friedman + 1000, n_features=10, noise=1.0, random_state=0)
    Xc = StandardScaler().fit_transform(cancer.data)
    Xd = StandardScaler().fit_transform(diabetes.data)
    return [
        {"name": "digits", "kind": "classification",
         "split": split(digits.data / 16, digits.target, 597)},
        {"name": "breast_cancer", "kind": "classification", "split": split(Xc, cancer.target, 169)},
        {"name": "diabetes", "kind": "regression", "alpha": 1.0,
         "split": split(Xd, diabetes.target, 142)},
        {"name": f"friedman1 (n={n_friedman})", "kind": "regression", "alpha": 1e-2,
         "split": (Xf[:n_friedman], Xf[n_friedman:], yf[:n_friedman], yf[n_friedman:])},
    ]  # fmt: skip


def learning(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    n_features = 256 if quick else 1024
    multipliers = [1.0] if quick else [0.3, 1.0, 3.0]
    methods = (
        "exact",
        "favor-hyperbolic",
        "favor-positive",
        "favor-trig",
        "rbfsampler",
        "nystroem",
    )
    rng = np.random.default_rng(args.seed + 1)
    out: dict[str, Any] = {"n_components": n_features, "gamma_over_scale": multipliers, "tasks": {}}
    for task in learning_tasks(quick, rng):
        X_tr, X_te, y_tr, y_te = task["split"]
        gamma_s = 1.0 / (X_tr.shape[1] * X_tr.var())
        classify = task["kind"] == "classification"
        # at most half as many features as training points (else Nystroem is the exact kernel)
        width = min(n_features, 2 * (len(X_tr) // 4))
        per: dict[str, Any] = {
            "n_components": width,
            "kind": task["kind"],
            "n_train": len(X_tr),
            "n_test": len(X_te),
            "n_features_in": X_tr.shape[1],
            "gamma_scale": gamma_s,
            "metric": "accuracy" if classify else "R^2",
            "model": "SVC(C=10) / LogisticRegression(C=10)"
            if classify
            else f"KernelRidge / Ridge (alpha={task['alpha']})",
            "results": {m: [] for m in methods},
        }
        for c in multipliers:
            gamma = c * gamma_s
            for method in methods:
                if method == "exact":
                    model = (
                        SVC(kernel="rbf", gamma=gamma, C=10.0)
                        if classify
                        else KernelRidge(kernel="rbf", gamma=gamma, alpha=task["alpha"])
                    )
                else:
                    head = (
                        LogisticRegression(C=10.0, max_iter=2000)
                        if classify
                        else Ridge(alpha=task["alpha"])
                    )
                    model = make_pipeline(make_features(method, width, gamma, args.seed), head)
                with threadpool_limits(1):
                    start = time.perf_counter()
                    model.fit(X_tr, y_tr)
                    score = float(model.score(X_te, y_te))
                    elapsed = time.perf_counter() - start
                per["results"][method].append({"score": score, "seconds": elapsed})
            print(f"  learning {task['name']} gamma = {c} gamma_s done", flush=True)
        out["tasks"][task["name"]] = per
    return out


# ------------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    approx = result["approximation"]
    names = list(approx["data"])
    fig, axes = plt.subplots(3, len(names), figsize=(6.2 * len(names), 12.5), squeeze=False)
    xs = approx["gamma_over_scale"]
    focus = len(xs) - 1  # the largest gamma: the widest range of kernel values
    for col, name in enumerate(names):
        per = approx["data"][name]
        title = (
            f"{name} (d = {per['n_features_in']}, {per['n_eval']} held-out points, "
            f"{approx['n_components']} features)"
        )
        for row, key, ylabel in (
            (0, "median_rel_small", "median |K^ - K| / K over entries K < 0.1"),
            (1, "operator_rel", "||K^ - K||_2 / ||K||_2"),
        ):
            ax = axes[row][col]
            for method in METHODS:
                ys = [r[key] for r in per["results"][method]]
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=COLOR[method], label=LABEL[method])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
            ax.set_xlabel("gamma / gamma_scale   (gamma_scale = 1 / (d Var X))")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(title, fontsize=10)
                fr = per["fraction_below_0.1"]
                for x, f in zip(xs, fr):
                    ax.annotate(f"{100 * f:.0f}%", (x, 1.0), xycoords=("data", "axes fraction"),
                                xytext=(0, -12), textcoords="offset points", ha="center",
                                fontsize=7, color="0.4")  # fmt: skip
        ax = axes[2][col]
        centers = 10.0 ** (DECADES + 0.5)
        for method in METHODS:
            ys = per["results"][method][focus]["median_rel_by_decade"]
            pts = [(x, y) for x, y in zip(centers, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", color=COLOR[method], label=LABEL[method])
        ax.axvline(SMALL, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"kernel value K (per decade), gamma = {xs[focus]} gamma_scale")
        ax.set_ylabel("median |K^ - K| / K")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Gaussian-kernel approximation at equal feature counts (mean of "
        f"{approx['draws']} draws; % = share of entries with K < 0.1)",
        fontsize=11,
    )
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.05, hspace=0.3, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("favorplus", "numpy", "scikit-learn", "scipy", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _finite(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _finite(x.item())
    return x


def print_summary(result: dict[str, Any]) -> None:
    goal = result["approximation"]["goal_lower_median_below_0.1"]
    print(f"goal (median relative error below RBFSampler's where K < 0.1): {goal['all_met']}")
    for case in goal["cases"]:
        if not case["met"]:
            print(f"  not met: {case}")
    learn = result["learning"]
    for task, per in learn["tasks"].items():
        for i, c in enumerate(learn["gamma_over_scale"]):
            cells = ", ".join(
                f"{m} {per['results'][m][i]['score']:.3f} ({per['results'][m][i]['seconds']:.2f} s)"
                for m in per["results"]
            )
            print(f"  {task} gamma = {c} gamma_s: {cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for CI")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out_dir = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python", "benchmarks/sklearn_kernels.py", *sys.argv[1:]]),
            "quick": args.quick,
            "seed": args.seed,
            "cpu_count": os.cpu_count(),
            "loadavg_at_start": os.getloadavg()[0],
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "versions": versions(),
        }
    }
    result["approximation"] = approximation(args)
    result["learning"] = learning(args)
    result["meta"]["seconds"] = time.perf_counter() - start
    (out_dir / f"{NAME}.json").write_text(json.dumps(_finite(result), indent=1) + "\n")
    plot(result, out_dir / f"{NAME}.png")
    print_summary(result)
    print(f"wrote {out_dir / NAME}.json and .png in {result['meta']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
