"""The Performer paper's figures at small scale, one command each, on CPUs.

    python benchmarks/paper.py fig2           # MSE ratio trig / positive (Fig. 2)
    python benchmarks/paper.py fig3           # time and memory against L (Fig. 3)
    python benchmarks/paper.py fig4           # attention-output MSE against m (Fig. 4)
    python benchmarks/paper.py peers          # favorplus beside performer-pytorch
    python benchmarks/paper.py all --quick    # all four, small sizes (under a minute each)

Full runs write ``docs/figures/<name>.json`` and ``<name>.png``; ``--quick`` runs write
to ``benchmarks/results/quick/`` (git-ignored); ``--out DIR`` overrides either.

Speed figures (fig3, peers): each backend runs in a fresh subprocess, with one CPU
thread by default (``--threads``; on a shared machine multi-threaded torch timings
are dominated by the other load). Times are the best of ``--repeats`` calls after a
warm-up call; a point whose warm-up call is far above the time cap is that one call.
Peak memory is the peak resident set size of one call minus the resident size just
before it (inputs included in neither): before the call, freed heap memory is returned
to the system (``malloc_trim``) and the kernel's high-water mark is reset
(``/proc/self/clear_refs``), so that the peak is that call's own. Setup as in
docs/benchmarks.md: batch 1, 8 heads, d = 64, m = 256, float32.

The accuracy figures (fig2, fig4) run in float64 NumPy and put the closed forms of
``paper_theory.py`` beside the measurements.
"""

# The figures live in paper_fig2.py, paper_fig3.py, paper_fig4.py and paper_peers.py, the
# shared helpers in paper_common.py; this file is the command line that dispatches to them.

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paper_common import FULL_OUT, QUICK_OUT, ROOT, _json_default, save
from paper_fig2 import fig2
from paper_fig3 import fig3, fig3_series
from paper_fig4 import fig4
from paper_peers import peers, peers_series


def _child(spec: str) -> None:
    task = json.loads(spec)
    worker = {"fig3": fig3_series, "peers": peers_series}[task.pop("kind")]
    print(json.dumps(worker(**task), default=_json_default))


# ----------------------------------------------------------------------------------

FIGURES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fig2": fig2,
    "fig3": fig3,
    "fig4": fig4,
    "peers": peers,
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quick", action="store_true", help="small sizes (each figure in under a minute), for CI"
    )
    common.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: {FULL_OUT.relative_to(ROOT)}, or "
        f"{QUICK_OUT.relative_to(ROOT)} with --quick)",
    )
    common.add_argument("--seed", type=int, default=0, help="seed of inputs and draws")
    common.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repeats, the best is kept (fig3, peers; 1 with --quick)",
    )
    common.add_argument(
        "--cap",
        type=float,
        default=None,
        help="time cap in seconds. fig3 (default 1, quick 0.1): exact attention stops "
        "after a call above it, FAVOR+ after a call above 4 x cap, and a warm-up call "
        "above twice that limit is not repeated. peers (default 2, quick 0.5): a "
        "warm-up call above it is not repeated",
    )
    common.add_argument(
        "--threads",
        type=int,
        default=1,
        help="fig3, peers: CPU threads of the timed processes (default 1: robust on a "
        "shared machine; 0: each library's default)",
    )
    common.add_argument(
        "--backends",
        default="numpy,torch,jax",
        help="fig3: comma-separated CPU backends (default numpy,torch,jax)",
    )
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--_child", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="figure", metavar="{fig2,fig3,fig4,peers,all}")
    helps = {
        "fig2": "MSE ratio of trigonometric to positive features over angle and norm",
        "fig3": "time and peak memory against L, exact vs FAVOR+, each CPU backend",
        "fig4": "attention-output MSE against m: iid/orthogonal, positive/trig/hyperbolic",
        "peers": "favorplus beside performer-pytorch: speed, memory, accuracy, causal leak",
        "all": "all of the above, one after the other",
    }
    for name, text in helps.items():
        sub.add_parser(name, parents=[common], help=text, description=text)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args._child:
        _child(args._child)
        return 0
    if not args.figure:
        p.print_help()
        return 2
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    names = list(FIGURES) if args.figure == "all" else [args.figure]
    for name in names:
        t0 = time.perf_counter()
        produced = FIGURES[name](args)
        produced["result"]["meta"]["wall_s"] = time.perf_counter() - t0
        paths = save(out, name, produced["result"], produced["figure"])
        print(
            f"{name}: {time.perf_counter() - t0:.1f} s; wrote "
            + ", ".join(str(path) for path in paths)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
