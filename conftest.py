"""Root pytest configuration: skip the doctests of framework adapters whose framework
is not installed (each nox session installs one backend)."""

from __future__ import annotations

import importlib.util
import os
import shutil

# Without an NVIDIA GPU the Triton kernels run under Triton's interpreter, which must be
# switched on before any kernel is defined (test modules and doctests alike).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

collect_ignore = [
    f"src/favorplus/{module}.py"
    for module, needs in (
        ("torch", "torch"),
        ("_torch_amp", "torch"),
        ("flax", "flax"),
        ("transformers", "transformers"),
        ("sklearn", "sklearn"),
    )
    if importlib.util.find_spec(needs) is None
]
# The fused GPU kernels need triton and torch (the `gpu` extra).
if any(importlib.util.find_spec(needs) is None for needs in ("triton", "torch")):
    collect_ignore.append("src/favorplus/_triton")
# Helper scripts that the distributed tests run in their own processes (they import
# their framework at the top): not test modules, and no doctests.
collect_ignore_glob = ["tests/_dist_*.py"]
