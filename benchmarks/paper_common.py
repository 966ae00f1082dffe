"""Shared helpers of the paper figures (benchmarks/paper.py): paths, plotting, metadata,
result files, and the time / peak-memory measurement of one call in a fresh process.

Speed figures (fig3, peers): each backend runs in a fresh subprocess (:func:`run_in_child`,
re-invoking ``benchmarks/paper.py --_child``) with one CPU thread by default. Peak memory
is the peak resident set size of one call minus the resident size just before it
(:func:`measure`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
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

from run import _peak_rss, _rss, release_and_reset

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
        [sys.executable, str(HERE / "paper.py"), "--_child", json.dumps(task)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        env=thread_env(threads),
    )
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"child {task['kind']} failed with exit status {res.returncode}")
    return json.loads(lines[-1])
