"""``python -m favorplus``: FAVOR+ against exact attention on every installed backend.

Draws one reproducible problem, runs bidirectional (or causal) FAVOR+ and exact
softmax attention on each backend and device found, and prints a table of the
relative error against exact attention, the time of each and the speed-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import __version__, draw_projection, favor_attention, softmax_attention

# --backends names -> (module to look for, the extra that installs it).
BACKENDS = {
    "numpy": ("numpy", None),
    "strict": ("array_api_strict", "strict"),
    "torch": ("torch", "torch"),
    "jax": ("jax", "jax"),
    "cupy": ("cupy", "cupy"),
}
ALIASES = {"array_api_strict": "strict", "array-api-strict": "strict", "np": "numpy"}
KERNELS = (
    "softmax",
    "softmax_hyperbolic",
    "softmax_trig",
    "relu",
    "softmax_oprf",
    "softmax_saderf",
)
# Estimators whose parameters come from the call's own queries and keys: bidirectional.
DATA_DRIVEN = ("softmax_oprf", "softmax_saderf")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m favorplus",
        description="Compare FAVOR+ with exact softmax attention on every installed backend.",
    )
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--length", "-L", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--dim", "-d", type=int, default=64, help="head dimension (default 64)")
    p.add_argument("--features", "-m", type=int, default=256, help="random features (default 256)")
    p.add_argument(
        "--kernel",
        default="softmax",
        choices=KERNELS,
        help="feature map (default softmax, the positive FAVOR+ features); "
        "softmax_oprf (FAVOR++) and softmax_saderf (FAVOR#) are the lower-variance "
        "estimators, with parameters from the call's own queries and keys (bidirectional "
        "only); relu is generalized attention, a different attention, compared with softmax "
        "only to show how different it is",
    )
    p.add_argument(
        "--kind",
        default="orthogonal",
        choices=["orthogonal", "iid", "simplex"],
        help="random projection: Haar-orthogonal blocks (default), iid Gaussian rows, or "
        "simplex blocks (directions at a regular simplex's vertices)",
    )
    p.add_argument("--causal", action="store_true", help="causal (unidirectional) attention")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float16", "bfloat16", "float32", "float64"],
        help="dtype of the inputs (default float32; half precisions compute in float32)",
    )
    p.add_argument(
        "--input-std",
        type=float,
        default=0.35,
        help="standard deviation of the query and key entries (default 0.35, "
        "i.e. scaled norms |x| d**-0.25 of about 1); the error grows "
        "quickly with it",
    )
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated backends to run, of {', '.join(BACKENDS)} "
        "(default: every installed one)",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats, the best is shown (default 3)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the problem and the features")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small problem (L = 512, one timed repeat unless --repeats says otherwise) "
        "for a smoke test",
    )
    p.add_argument("--version", action="version", version=f"favorplus {__version__}")
    return p


def _installed(name: str) -> bool:
    return importlib.util.find_spec(BACKENDS[name][0]) is not None


def _select(parser: argparse.ArgumentParser, spec: str | None) -> list[str]:
    """The backends that --backends names (all installed ones by default), checked."""
    if spec is None:
        return [b for b in BACKENDS if _installed(b)]
    names = [ALIASES.get(b.strip(), b.strip()) for b in spec.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    installed = ", ".join(b for b in BACKENDS if _installed(b))
    if unknown or not names:
        parser.error(
            f"--backends: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
            f"choose from {', '.join(BACKENDS)} (installed here: {installed})"
        )
    missing = [b for b in names if not _installed(b)]
    if missing:
        hints = "; ".join(
            f"{b}: python -m pip install 'favorplus[{BACKENDS[b][1]}]'" for b in missing
        )
        parser.error(
            f"--backends: {', '.join(missing)} not installed ({hints}); installed here: {installed}"
        )
    return list(dict.fromkeys(names))


def _targets(names: list[str]) -> Iterator[tuple[str, Any, Any, str]]:
    """(backend, namespace module, device, device label) for each available one."""
    for name in names:
        if name == "numpy":
            yield "numpy", np, None, "cpu"
        elif name == "strict":
            import array_api_strict

            yield "strict", array_api_strict, None, "cpu"
        elif name == "torch":
            import torch

            yield "torch", torch, torch.device("cpu"), "cpu"
            if torch.cuda.is_available():
                yield "torch", torch, torch.device("cuda"), torch.cuda.get_device_name()
        elif name == "jax":
            import jax
            import jax.numpy as jnp

            for dev in {d.platform: d for d in jax.devices()}.values():
                yield "jax", jnp, dev, f"{dev.platform}"
        elif name == "cupy":
            try:
                import cupy

                if cupy.cuda.runtime.getDeviceCount() > 0:
                    yield "cupy", cupy, None, "gpu"
            except Exception:
                continue


def _sync(x: Any) -> Any:
    if hasattr(x, "block_until_ready"):
        x.block_until_ready()
    mod = type(x).__module__
    if mod.startswith("torch") and x.is_cuda:
        import torch

        torch.cuda.synchronize()
    if mod.startswith("cupy"):
        import cupy

        cupy.cuda.Device().synchronize()
    return x


def _best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = _sync(fn())  # warm-up (compilation, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = _sync(fn())
        best = min(best, time.perf_counter() - t0)
    return best, out


def _to_numpy(x: Any) -> np.ndarray:
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().float().cpu().numpy().astype(np.float64)
    if mod.startswith("cupy"):
        return x.get().astype(np.float64)
    if mod.startswith("array_api_strict"):
        return np.from_dlpack(x).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def _progress(step: int, total: int, label: str) -> None:
    width = 24
    done = int(width * step / max(total, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {label:<40}")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.quick:
        args.length = min(args.length, 512)
    for name in ("heads", "length", "dim", "features", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not (math.isfinite(args.input_std) and args.input_std >= 0):
        parser.error(f"--input-std must be a finite number at least 0; got {args.input_std}")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0; got {args.seed}")
    if args.causal and args.kernel in DATA_DRIVEN:
        parser.error(
            f"--kernel {args.kernel} takes its parameters from the call's own queries and "
            "keys, which in causal attention would let every output see later tokens: run it "
            "without --causal (favor_attention takes OPRF(statistics=...) from past data for "
            "causal calls)"
        )
    selected = _select(parser, args.backends)
    rng = np.random.default_rng(args.seed)
    shape = (1, args.heads, args.length, args.dim)
    q, k = (rng.standard_normal(shape) * args.input_std for _ in range(2))
    v = rng.standard_normal(shape)
    w = draw_projection(args.features, args.dim, kind=args.kind, seed=args.seed + 1)

    targets = list(_targets(selected))
    print(
        f"favorplus {__version__}: {args.heads} heads, L = {args.length}, d = {args.dim}, "
        f"m = {args.features}, kernel = {args.kernel}, {args.kind} features, "
        f"{'causal' if args.causal else 'bidirectional'}, inputs N(0, {args.input_std}^2)"
    )
    rows = []
    for i, (name, ns, dev, label) in enumerate(targets):
        _progress(i, len(targets), f"{name} on {label}")
        dtype = getattr(ns, args.dtype, None)
        if dtype is None:
            rows.append((name, label, args.dtype, "dtype not available", "", "", ""))
            continue
        conv = (
            (lambda a: ns.asarray(a, dtype=dtype, device=dev))
            if dev is not None
            else (lambda a: ns.asarray(a, dtype=dtype))
        )
        if name == "strict":
            conv = lambda a: ns.asarray(a.astype(args.dtype))  # noqa: E731
        if name == "torch" and args.dtype == "bfloat16":
            conv = lambda a: ns.asarray(a, device=dev).to(dtype)  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # JAX's "float64 is not available"
            qb, kb, vb, wb = conv(q), conv(k), conv(v), conv(w)
        if qb.dtype != dtype:  # JAX without x64 makes float32 arrays of float64 requests
            hint = " (set JAX_ENABLE_X64=1)" if name == "jax" else ""
            rows.append((name, label, args.dtype, f"dtype not available{hint}", "", "", ""))
            continue
        t_fav, out = _best_time(
            lambda: favor_attention(qb, kb, vb, wb, kernel=args.kernel, causal=args.causal),
            args.repeats,
        )
        try:
            t_exact, exact = _best_time(
                lambda: softmax_attention(qb, kb, vb, causal=args.causal), args.repeats
            )
        except MemoryError:
            rows.append((name, label, args.dtype, "exact: out of memory", f"{t_fav:.4f}", "", ""))
            continue
        o, e = _to_numpy(out), _to_numpy(exact)
        err = float(np.linalg.norm(o - e) / np.linalg.norm(e))
        rows.append(
            (
                name,
                label,
                args.dtype,
                f"{err:.4f}",
                f"{t_fav:.4f}",
                f"{t_exact:.4f}",
                f"{t_exact / t_fav:.2f}x",
            )
        )
    _progress(len(targets), len(targets), "done")
    sys.stderr.write("\n")
    approximates = args.kernel != "relu"
    error_head = "rel. error" if approximates else "vs softmax"
    head = ("backend", "device", "dtype", error_head, "FAVOR+ (s)", "exact (s)", "speed-up")
    widths = [max(len(str(r[c])) for r in [head, *rows]) for c in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip())
    if approximates:
        print(
            "rel. error = |FAVOR+ - exact| / |exact| (Frobenius). It grows like "
            "exp(|q'|^2 + |k'|^2) with the scaled norms: see --input-std."
        )
    else:
        print(
            f"vs softmax = |{args.kernel} attention - softmax attention| / |softmax attention|: "
            f"{args.kernel} features define another attention (generalized attention), not an "
            "approximation of softmax; the column shows how different the two are."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
