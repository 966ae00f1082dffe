"""favorplus beside performer-pytorch (FastAttention, torch CPU): speed, peak memory,
accuracy at equal m with the same projection, causal leak and the Haar check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from paper_common import (
    ROOT,
    fmt,
    measure,
    meta,
    pyplot,
    run_in_child,
)
from run import D, H, M, inputs, make, progress

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
