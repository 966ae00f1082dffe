"""``python -m favorplus``: FAVOR+ against exact attention on every installed backend.

Draws one reproducible problem, runs bidirectional (or causal) FAVOR+ and exact
softmax attention on each backend and device found, and prints a table of the
relative error against exact attention, the time of each and the speed-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import __version__, draw_projection, favor_attention, softmax_attention

BACKENDS = ("numpy", "torch", "jax", "cupy")


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
        choices=["softmax", "softmax_hyperbolic", "softmax_trig", "relu"],
    )
    p.add_argument("--kind", default="orthogonal", choices=["orthogonal", "iid"])
    p.add_argument("--causal", action="store_true", help="causal (unidirectional) attention")
    p.add_argument(
        "--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"]
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
        default=",".join(BACKENDS),
        help="comma-separated backends to try (default: all installed)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is shown")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem and the features")
    p.add_argument(
        "--quick", action="store_true", help="a small problem (L = 512) for a smoke test"
    )
    p.add_argument("--version", action="version", version=f"favorplus {__version__}")
    return p


def _targets(names: list[str]) -> Iterator[tuple[str, Any, Any, str]]:
    """(backend, namespace module, device, device label) for each available one."""
    for name in names:
        if name != "numpy" and importlib.util.find_spec(name) is None:
            continue
        if name == "numpy":
            yield "numpy", np, None, "cpu"
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
    return np.asarray(x, dtype=np.float64)


def _progress(step: int, total: int, label: str) -> None:
    width = 24
    done = int(width * step / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {label:<40}")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.length, args.repeats = min(args.length, 512), 1
    for name in ("heads", "length", "dim", "features", "repeats"):
        if getattr(args, name) < 1:
            _parser().error(f"--{name} must be at least 1")
    rng = np.random.default_rng(args.seed)
    shape = (1, args.heads, args.length, args.dim)
    q, k = (rng.standard_normal(shape) * args.input_std for _ in range(2))
    v = rng.standard_normal(shape)
    w = draw_projection(args.features, args.dim, kind=args.kind, seed=args.seed + 1)

    targets = list(_targets([b.strip() for b in args.backends.split(",") if b.strip()]))
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
        if name == "torch" and args.dtype == "bfloat16":
            conv = lambda a: ns.asarray(a, device=dev).to(dtype)  # noqa: E731
        qb, kb, vb, wb = conv(q), conv(k), conv(v), conv(w)
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
    head = ("backend", "device", "dtype", "rel. error", "FAVOR+ (s)", "exact (s)", "speed-up")
    widths = [max(len(str(r[c])) for r in [head, *rows]) for c in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip())
    print(
        "rel. error = |FAVOR+ - exact| / |exact| (Frobenius). It grows like exp(|q'|^2 + |k'|^2)"
        " with the scaled norms: see --input-std."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
