"""Sequence-parallel FAVOR+ on torch.distributed (gloo, CPU processes on 127.0.0.1).

    python benchmarks/distributed_torch.py           # docs/figures/distributed_torch.{json,png}
    python benchmarks/distributed_torch.py --quick   # small sizes (CI): benchmarks/results/quick/

W = 1, 2, 4 processes (``torch.distributed`` with the gloo backend, 127.0.0.1 only, each
with one thread), each holding L / W tokens of one sequence: batch 1, 8 heads,
d = dv = 64, m = 256 features, float32, ``favor_attention(q, k, v, w, causal=...,
process_group=dist.group.WORLD)``. For every W, mode (causal / bidirectional forward,
causal forward + backward) and L, each rank records

* **the bytes of every collective** favorplus issues, observed (not computed): a
  ``TorchDispatchMode`` logs each ``c10d`` / ``_c10d_functional`` operation with the
  shapes and dtypes of its operands (the agreement check, the all-gathers of the summaries
  and, in the backward pass, their reduce-scatters); the benchmark fails if they change
  with L;
* **its peak memory**: the process's peak resident set (``VmHWM``) during the shard's
  input creation and the call, above its resident set just before (the peak is reset
  through ``/proc/self/clear_refs`` and freed memory returned with ``malloc_trim``
  before each measurement; Linux only);
* the wall time of the call (only indicative: this machine has 2 cores, and 4 processes
  share them).

Every run is bounded in time (``--timeout`` seconds per group of processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FULL_OUT = ROOT / "docs" / "figures"
QUICK_OUT = HERE / "results" / "quick"
B, H, D, M = 1, 8, 64, 256
MODES = ("causal fwd", "bidirectional fwd", "causal fwd+bwd")


# --- one rank ------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text)[1]) * 1024  # type: ignore[index]


def _reset_peak() -> int:
    """Free what can be freed, reset the peak resident set; the resident set now."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _logger() -> Any:
    """A TorchDispatchMode that records every collective operation and its operands."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def tensors(x: Any) -> list[Any]:
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, (list, tuple)):
            return [t for y in x for t in tensors(y)]
        return []

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.phase = "forward"
            self.ops: list[dict[str, Any]] = []

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket)
            skip = ("wait_tensor", "_wrap_tensor_autograd")
            if "c10d" in name and not any(s in name for s in skip):
                # The operand: the first tensor argument (a list of them for c10d ops:
                # the first list holds what this rank sends, or its output buffers).
                first = tensors(args[0] if args else [])
                if name.startswith("c10d.allgather"):
                    first = tensors(args[1]) if len(args) > 1 else first  # inputs
                self.ops.append(
                    {
                        "op": name,
                        "phase": self.phase,
                        "shapes": [list(t.shape) for t in first],
                        "dtype": str(first[0].dtype) if first else None,
                        "operand_bytes": sum(t.numel() * t.element_size() for t in first),
                    }
                )
            return out

    return Log()


def rank_main(rank: int, world: int, port: int, lengths: list[int], path: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "src"))
    import favorplus as fp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    group = dist.group.WORLD
    w = torch.tensor(fp.draw_projection(M, D, seed=0), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1000 + rank)

    def run(mode: str, length: int, log: Any = None) -> tuple[float, Any]:
        n = length // world  # this rank's tokens (L divisible by W here)
        grad = mode.endswith("bwd")
        q, k, v = (
            (0.5 * torch.randn((B, H, n, D), generator=gen)).requires_grad_(grad) for _ in range(3)
        )
        dist.barrier(group)  # (not logged: the benchmark's own collective)
        with log if log is not None else contextlib.nullcontext():
            start = time.perf_counter()
            out = fp.favor_attention(
                q, k, v, w, causal=mode.startswith("causal"), process_group=group
            )
            if grad:
                if log is not None:
                    log.phase = "backward"
                out.square().sum().backward()
            seconds = time.perf_counter() - start
        return seconds, out

    for mode in MODES:
        run(mode, 64 * world)  # warm-up: lazy initialisations outside the measurements
    results: dict[str, Any] = {}
    for mode in MODES:
        rows = {}
        for length in lengths:
            base = _reset_peak()
            log = _logger()
            seconds, out = run(mode, length, log)
            peak = _status("VmHWM")
            del out
            rows[str(length)] = {
                "tokens_per_rank": length // world,
                "seconds": seconds,
                "rss_before_bytes": base,
                "peak_above_before_bytes": peak - base,
                "collectives": log.ops,
            }
        results[mode] = rows
    Path(f"{path}.{rank}").write_text(json.dumps(results))
    dist.destroy_process_group()


# --- the driver ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, lengths: list[int], tmp: Path, timeout: float) -> list[dict[str, Any]]:
    """Run ``world`` gloo processes to the end (or kill them after ``timeout`` s)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    port = _free_port()
    out = tmp / f"w{world}"
    args = [str(port), ",".join(map(str, lengths)), str(out)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--_rank", str(r), str(world), *args],
            env=env,
            stderr=subprocess.PIPE,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        sys.exit(f"W = {world}: the processes ran past {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        if p.returncode != 0:
            err = p.stderr.read().decode()[-3000:] if p.stderr else ""
            sys.exit(f"W = {world}, rank {r} failed ({p.returncode}):\n{err}")
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


def summarize(ranks: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """Per mode and L: the peak memory of the largest rank, the slowest time, and the
    collectives (the same on every rank: checked)."""
    table: dict[str, Any] = {}
    for mode in MODES:
        rows = {}
        for length, row in ranks[0][mode].items():
            ops = row["collectives"]
            for r, other in enumerate(ranks[1:], 1):
                theirs = [dict(o, shapes=None) for o in other[mode][length]["collectives"]]
                if theirs != [dict(o, shapes=None) for o in ops]:
                    sys.exit(f"W = {world}, {mode}, L = {length}: rank {r} ran other collectives")
            rows[length] = {
                "tokens_per_rank": row["tokens_per_rank"],
                "peak_bytes_per_rank_max": max(
                    rk[mode][length]["peak_above_before_bytes"] for rk in ranks
                ),
                "seconds_max": max(rk[mode][length]["seconds"] for rk in ranks),
                "collectives": ops,
                "summary_operand_bytes": sum(
                    o["operand_bytes"] for o in ops if o["op"].startswith("_c10d_functional")
                ),
            }
        sizes = {json.dumps(r["collectives"]) for r in rows.values()}
        if len(sizes) != 1:
            sys.exit(f"W = {world}, {mode}: the collectives change with L")
        table[mode] = rows
    return table


def figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    worlds = sorted(int(w) for w in runs)
    lengths = sorted(int(n) for n in runs[str(worlds[0])]["causal fwd"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("causal fwd", "causal fwd+bwd")):
        for length, color in zip(lengths, ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
            ys = [
                runs[str(w)][mode][str(length)]["peak_bytes_per_rank_max"] / 2**20 for w in worlds
            ]
            ax.plot(worlds, ys, "o-", color=color, label=f"L = {length}")
            ax.plot(worlds, [ys[0] / w for w in worlds], ":", color=color, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("gloo processes W")
        ax.set_title(f"{mode} (dotted: 1 / W)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("peak memory per process above its start (MiB)")
    axes[0].legend(fontsize=8)
    fig.suptitle("FAVOR+ over torch.distributed (gloo, CPU), 8 heads, d = 64, m = 256")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per W")
    args = parser.parse_args()
    import tempfile

    import torch

    worlds = [1, 2] if args.quick else [1, 2, 4]
    lengths = [2**10, 2**11] if args.quick else [2**13, 2**14, 2**15, 2**16]
    timeout = args.timeout or (60.0 if args.quick else 900.0)
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            table = summarize(launch(world, lengths, Path(tmp), timeout), world)
            runs[str(world)] = table
            for mode, rows in table.items():
                ops = next(iter(rows.values()))["collectives"]
                print(f"W = {world} {mode:>17}: "
                      + ", ".join(f"{o['op'].split('.')[-1]} ({o['phase']}) "
                                  f"{o['operand_bytes']} B" for o in ops))  # fmt: skip
                print(" " * 24 + "peak MiB per rank at L = "
                      + ", ".join(f"{n}: {r['peak_bytes_per_rank_max'] / 2**20:.1f}"
                                  for n, r in rows.items()))  # fmt: skip
    result = {
        "command": "python benchmarks/distributed_torch.py" + (" --quick" if args.quick else ""),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "backend": "gloo, 127.0.0.1, one thread per process",
        "sizes": {"batch": B, "heads": H, "d": D, "m": M, "dtype": "float32"},
        "expected_summary_bytes": B * H * M * (D + 1) * 4,
        "memory_measure": "VmHWM - VmRSS around input creation and the call "
        "(/proc/self/clear_refs reset, malloc_trim, MALLOC_MMAP_THRESHOLD_=65536)",
        "runs": runs,
    }
    (out / "distributed_torch.json").write_text(json.dumps(result, indent=1))
    figure(result, out / "distributed_torch.png")
    print(f"wrote {out / 'distributed_torch.json'} and {out / 'distributed_torch.png'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_rank":
        r, n, p, ls, o = sys.argv[2:]
        rank_main(int(r), int(n), int(p), [int(x) for x in ls.split(",")], o)
    else:
        main()
