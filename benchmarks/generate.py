"""generate() memory and time per token: transformers' DynamicCache against FavorplusCache.

    python benchmarks/generate.py            # 1k and 16k new tokens (a few minutes)
    python benchmarks/generate.py --quick    # 32 and 256 new tokens (seconds)

One tiny Llama-style model (hidden 64, 2 layers, 4 query heads, 2 key/value heads,
vocabulary 100, random weights, float32) with attn_implementation="favorplus" generates
N new tokens greedily from a 16-token prompt, once with transformers' DynamicCache
(every past key and value kept) and once with favorplus' FavorplusCache (the causal
FAVOR+ state kept), each in a fresh subprocess, one after the other. Reported per run:

* cache bytes: the tensors the cache holds after the last token (exact);
* peak extra memory: the peak resident set size during generate() minus the size
  just before it (the peak counter reset before the call; Linux);
* time per token: the median step time over the first and over the last 10 % of the
  steps (a StoppingCriteria timestamps every step), so that growth shows as a ratio.

Ratios compare the two caches at the same N, and each cache's 16k run with its 1k run.
Results are printed and written as JSON to benchmarks/results/generate.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
PROMPT = 16


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure(cache_name: str, new_tokens: int) -> dict[str, Any]:
    """One generate() run in this process (called in a fresh subprocess)."""
    import torch
    import transformers

    import favorplus.transformers as fpt

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=PROMPT + new_tokens + 8,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="favorplus")
    model.eval()
    ids = torch.randint(0, 100, (1, PROMPT), generator=torch.Generator().manual_seed(1))

    stamps: list[float] = []

    class Stamp(transformers.StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def run(n: int) -> Any:
        cache = transformers.DynamicCache() if cache_name == "dynamic" else fpt.FavorplusCache()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache=cache,
            pad_token_id=0,
            stopping_criteria=transformers.StoppingCriteriaList([Stamp()]),
        )
        return out, cache

    with torch.no_grad():
        run(8)  # lazy set-up (projections, kernels) not counted
        stamps.clear()
        resettable = _reset_peak()
        before = _status("VmRSS")
        out, cache = run(new_tokens)
        peak = _status("VmHWM") - before if resettable else float("nan")
    assert out.shape[1] == PROMPT + new_tokens
    if cache_name == "dynamic":
        held = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        nbytes = sum(t.numel() * t.element_size() for t in held)
    else:
        nbytes = cache.nbytes
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    tenth = max(1, len(steps) // 10)

    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2]

    return {
        "cache": cache_name,
        "new_tokens": new_tokens,
        "cache_bytes": nbytes,
        "peak_extra_bytes": peak,
        "step_first_s": median(steps[:tenth]),
        "step_last_s": median(steps[-tenth:]),
        "total_s": stamps[-1] - stamps[0] if stamps else float("nan"),
    }


def _subprocess(cache_name: str, new_tokens: int) -> dict[str, Any]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import generate; "
        "print(json.dumps(generate.measure(sys.argv[2], int(sys.argv[3]))))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run(
        [sys.executable, "-c", code, str(HERE), cache_name, str(new_tokens)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if res.returncode:
        raise RuntimeError(f"{cache_name} at {new_tokens} tokens failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Print the table and return the ratios."""
    lengths = sorted({r["new_tokens"] for r in rows})
    by = {(r["cache"], r["new_tokens"]): r for r in rows}
    mib = 2.0**20
    print(f"generate(), tiny Llama (GQA 4/2 heads, 2 layers), prompt {PROMPT}, float32, CPU")
    print(
        f"{'new tokens':>10} {'cache':>10} {'cache MiB':>10} {'peak MiB':>9} "
        f"{'ms/token first':>15} {'ms/token last':>14}"
    )
    for r in rows:
        print(
            f"{r['new_tokens']:>10} {r['cache']:>10} {r['cache_bytes'] / mib:>10.3f} "
            f"{r['peak_extra_bytes'] / mib:>9.1f} {1e3 * r['step_first_s']:>15.2f} "
            f"{1e3 * r['step_last_s']:>14.2f}"
        )
    short, long = lengths[0], lengths[-1]
    ratios = {}
    for n in lengths:
        d, f = by[("dynamic", n)], by[("favorplus", n)]
        ratios[f"cache_bytes dynamic/favorplus at {n}"] = d["cache_bytes"] / f["cache_bytes"]
        ratios[f"peak dynamic/favorplus at {n}"] = d["peak_extra_bytes"] / max(
            f["peak_extra_bytes"], 1
        )
        ratios[f"ms/token last dynamic/favorplus at {n}"] = d["step_last_s"] / f["step_last_s"]
    for c in ("dynamic", "favorplus"):
        a, b = by[(c, short)], by[(c, long)]
        ratios[f"{c} cache_bytes {long}/{short}"] = b["cache_bytes"] / a["cache_bytes"]
        ratios[f"{c} peak {long}/{short}"] = b["peak_extra_bytes"] / max(a["peak_extra_bytes"], 1)
        # within one run (one process, minutes apart at most): growth along the sequence
        ratios[f"{c} ms/token last/first at {long}"] = b["step_last_s"] / b["step_first_s"]
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 and 256 new tokens")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--report", type=Path, help="print and re-summarise a results file, measure nothing"
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        rows = json.loads(args.report.read_text())["rows"]
        ratios = summarise(rows)
        args.report.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2) + "\n")
        return 0
    lengths = (32, 256) if args.quick else (1024, 16384)
    rows = [_subprocess(c, n) for n in lengths for c in ("dynamic", "favorplus")]
    ratios = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "generate.json"
    path.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2) + "\n")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
