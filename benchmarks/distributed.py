"""Sequence-parallel FAVOR+ on JAX meshes: bytes per collective, memory per device, a model.

    python benchmarks/distributed.py           # docs/figures/distributed.{json,png}
    python benchmarks/distributed.py --quick   # small sizes (CI): benchmarks/results/quick/

Runs in its own process with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before jax is imported).
``favor_attention(q, k, v, w, axis_name="s")`` inside ``jax.shard_map`` over a mesh of W
devices, the sequence axis sharded over it; batch 1, 8 heads, d = dv = 64, m = 256
features, float32. Nothing is executed: each program is lowered from shapes
(``jax.ShapeDtypeStruct``) and compiled, and

* **bytes per collective**: every all-gather / all-reduce in the compiled HLO of the
  per-device program, its operand size (an all-gather's result divided by W) at growing
  L and W = 8: it must not depend on L (the key summaries, m (dv + 1) numbers per row
  and device);
* **memory per device**: ``compiled.memory_analysis()`` of the per-device program
  (arguments + outputs + temporaries), forward and forward + backward (``jax.grad``), at
  one L and W = 1, 2, 4, 8: the L-dependent part falls as 1 / W;
* **a model of the time at 128 devices** (written out in the JSON and the user guide):
  the compute per device from a measured single-GPU rate (benchmarks/results/gpu-h200.json:
  torch, H200, causal / bidirectional forward at L = 65536, same sizes) for L / W tokens,
  plus the collective from its measured size, with stated bandwidths and latencies.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import platform
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

FULL_OUT = ROOT / "docs" / "figures"
QUICK_OUT = HERE / "results" / "quick"
B, H, D, M = 1, 8, 64, 256
COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-gather|all-reduce|reduce-scatter|"
    r"collective-permute|all-to-all)(?:-start)?\("
)
ARRAY = re.compile(r"(?P<dt>f64|f32|f16|bf16|s64|s32|u32|pred|s8|u8)\[(?P<dims>[\d,]*)\]")
BYTES = {"f64": 8, "s64": 8, "f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "pred": 1,
         "s8": 1, "u8": 1}  # fmt: skip


def _shape_bytes(text: str) -> int:
    total = 0
    for m in ARRAY.finditer(text):
        dims = [int(x) for x in m["dims"].split(",") if x]
        total += math.prod(dims) * BYTES[m["dt"]]
    return total


def collectives(hlo: str, devices: int) -> list[dict[str, Any]]:
    """Every collective of a compiled per-device HLO module: op and operand bytes."""
    found = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m is None:
            continue
        result = _shape_bytes(m["shape"])
        operand = result // devices if m["op"] == "all-gather" else result
        found.append({"op": m["op"], "result_bytes": result, "operand_bytes": operand})
    return found


def compile_program(devices: int, length: int, causal: bool, grad: bool) -> Any:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import favorplus as fp

    mesh = jax.make_mesh((devices,), ("s",), devices=jax.devices()[:devices])
    w = jnp.asarray(fp.draw_projection(M, D, seed=0), dtype=jnp.float32)
    spec = P(None, None, "s", None)

    def body(q: Any, k: Any, v: Any) -> Any:
        return fp.favor_attention(q, k, v, w, causal=causal, axis_name="s")

    f = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    if grad:
        g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), (0, 1, 2))
    else:
        g = f
    sd = jax.ShapeDtypeStruct((B, H, length, D), jnp.float32, sharding=NamedSharding(mesh, spec))
    return jax.jit(g).lower(sd, sd, sd).compile()


def memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def time_model(measured: dict[str, Any], summary_bytes: dict[str, int]) -> dict[str, Any]:
    """Forward time of one attention layer at W devices, on paper (see the assumptions)."""
    gpu = json.loads((HERE / "results" / "gpu-h200.json").read_text())["torch"]
    rate = {  # seconds per token (batch 1, 8 heads), measured at L = 65536 on one H200
        "causal": gpu["causal forward"]["65536"]["causal fwd s"] / 65536,
        "bidirectional": gpu["causal forward"]["65536"]["bidir fwd s"] / 65536,
    }
    links = {
        "in one node (NVLink, 8 GPUs)": {"bandwidth_bytes_per_s": 450e9, "latency_s": 3e-6},
        "across nodes (400 Gb/s per GPU)": {"bandwidth_bytes_per_s": 50e9, "latency_s": 10e-6},
    }
    length = 2**23
    table: dict[str, Any] = {}
    for mode in ("causal", "bidirectional"):
        s = summary_bytes[mode]  # bytes one device contributes to its collective
        rows = {}
        for w_ in (1, 8, 32, 128):
            compute = rate[mode] * length / w_
            row: dict[str, Any] = {"compute_s": compute}
            link = links["in one node (NVLink, 8 GPUs)" if w_ <= 8 else
                         "across nodes (400 Gb/s per GPU)"]  # fmt: skip
            bw, lat = link["bandwidth_bytes_per_s"], link["latency_s"]
            if w_ == 1:
                comm = 0.0
            elif mode == "causal":  # ring all-gather: each device receives (W - 1) s bytes
                comm = (w_ - 1) * (s / bw + lat)
            else:  # ring all-reduce: 2 (W - 1) / W of s, in 2 (W - 1) steps
                comm = 2 * (w_ - 1) / w_ * s / bw + 2 * (w_ - 1) * lat
            row["collective_s"] = comm
            row["total_s"] = compute + comm
            row["speedup_vs_1"] = rate[mode] * length / (compute + comm)
            if mode == "causal" and w_ > 1:  # LASP-1 style ring, for comparison
                row["sequential_ring_s"] = compute + (w_ - 1) * (s / bw + lat)
            rows[str(w_)] = row
        table[mode] = rows
    return {
        "tokens": length,
        "assumptions": [
            "one attention layer, forward, batch 1, 8 heads, d = dv = 64, m = 256, float32",
            f"L = 2^23 = {length} tokens split evenly over W devices",
            "compute per device: the measured single-H200 rate at L = 65536 (torch, "
            "benchmarks/results/gpu-h200.json), linear in the tokens per device",
            "collective: its measured operand size s from the compiled HLO (W = 8), "
            "ring algorithms: all-gather (causal) receives (W - 1) s bytes per device in "
            "W - 1 steps, all-reduce (bidirectional) 2 (W - 1) / W s bytes in 2 (W - 1) steps",
            "links: 450 GB/s and 3 us per step within a node of 8, 50 GB/s and 10 us across "
            "nodes (W > 8); no overlap of compute and communication (an upper bound)",
            "the merge of the W gathered summaries (W x 8 x 256 x 65 multiply-adds) is "
            "neglected (it reads W s bytes, 65 MiB at W = 128: about 14 us at a GPU's 4.8 TB/s)",
        ],
        "seconds_per_token_one_gpu": rate,
        "links": links,
        "table": table,
        "measured_summary_bytes": summary_bytes,
        "memory_per_device_model": measured,
    }


def figure(mem: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (mode, grad), color in zip(
        [("causal", False), ("causal", True), ("bidirectional", False), ("bidirectional", True)],
        ["tab:blue", "tab:cyan", "tab:red", "tab:orange"],
    ):
        key = f"{mode}{' fwd+bwd' if grad else ' fwd'}"
        rows = mem["runs"][key]
        ws = [int(w) for w in rows]
        ys = [rows[str(w)]["total_bytes"] / 2**20 for w in ws]
        ax.plot(ws, ys, "o-", color=color, label=key)
        ax.plot(ws, [ys[0] / w for w in ws], ":", color=color, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_xlabel("devices W (simulated JAX CPU devices)")
    ax.set_ylabel("memory per device (MiB, compiled)")
    ax.set_title(f"FAVOR+ sharded over the sequence, L = {mem['tokens']}\n(dotted: 1 / W)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", type=Path, help="output folder")
    args = parser.parse_args()
    import jax

    lengths = [2**10, 2**12] if args.quick else [2**12, 2**14, 2**16, 2**18]
    mem_length = 2**12 if args.quick else 2**17
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    out.mkdir(parents=True, exist_ok=True)

    bytes_table: dict[str, Any] = {}
    summary_bytes: dict[str, int] = {}
    for causal in (False, True):
        mode = "causal" if causal else "bidirectional"
        rows = {}
        for length in lengths:
            found = collectives(compile_program(8, length, causal, False).as_text(), 8)
            rows[str(length)] = {
                "collectives": found,
                "operand_bytes": sum(c["operand_bytes"] for c in found),
            }
            print(f"{mode:>13} L = {length:>7}, W = 8: "
                  + ", ".join(f"{c['op']} {c['operand_bytes']} B" for c in found))  # fmt: skip
        sizes = {r["operand_bytes"] for r in rows.values()}
        if len(sizes) != 1:
            sys.exit(f"{mode}: the collectives' sizes change with L: {sorted(sizes)}")
        summary_bytes[mode] = sizes.pop()
        bytes_table[mode] = rows
    expected = B * H * M * (D + 1) * 4
    print(f"one key summary: B H m (dv + 1) x 4 bytes = {expected} B")

    mem: dict[str, Any] = {"tokens": mem_length, "runs": {}}
    for causal in (True, False):
        for grad in (False, True):
            key = f"{'causal' if causal else 'bidirectional'}{' fwd+bwd' if grad else ' fwd'}"
            rows = {}
            for devices in (1, 2, 4, 8):
                rows[str(devices)] = memory(compile_program(devices, mem_length, causal, grad))
            mem["runs"][key] = rows
            tot = [rows[w]["total_bytes"] / 2**20 for w in rows]
            print(f"{key:>21} L = {mem_length}: MiB per device at W = 1, 2, 4, 8: "
                  + ", ".join(f"{t:.1f}" for t in tot))  # fmt: skip
    # Per-device memory model: a + b L / W, fitted on W = 1 and W = 8 (forward, causal).
    rows = mem["runs"]["causal fwd"]
    per_token = (rows["1"]["total_bytes"] - rows["8"]["total_bytes"]) / (mem_length * (1 - 1 / 8))
    fixed = rows["1"]["total_bytes"] - per_token * mem_length
    measured = {"bytes_per_token_per_device": per_token, "fixed_bytes": fixed}
    model = time_model(measured, summary_bytes)
    for mode, rows_ in model["table"].items():
        print(f"model {mode:>13}, L = 2^23: "
              + ", ".join(f"W = {w}: {r['total_s'] * 1e3:.2f} ms (collective "
                          f"{r['collective_s'] * 1e3:.2f})" for w, r in rows_.items()))  # fmt: skip
    result = {
        "command": "python benchmarks/distributed.py" + (" --quick" if args.quick else ""),
        "machine": platform.platform(),
        "jax": jax.__version__,
        "sizes": {"batch": B, "heads": H, "d": D, "m": M, "dtype": "float32"},
        "collective_bytes_per_device_W8": bytes_table,
        "expected_summary_bytes": expected,
        "memory_per_device": mem,
        "time_model": model,
    }
    (out / "distributed.json").write_text(json.dumps(result, indent=1))
    figure(mem, out / "distributed.png")
    print(f"wrote {out / 'distributed.json'} and {out / 'distributed.png'}")


if __name__ == "__main__":
    main()
