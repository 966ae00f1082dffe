"""The framework modules say which extra to install when their framework is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("favorplus.torch", "torch", "torch"),
        ("favorplus.flax", "flax", "flax"),
        ("favorplus.transformers", "transformers", "transformers"),
    ],
)
def test_missing_framework_names_the_extra(module, blocked, extra):
    # A meta-path finder that hides the framework, in a fresh interpreter.
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {blocked!r} or name.startswith({blocked!r} + '.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as e:\n"
        "    print('MSG', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"favorplus[{extra}]" in out.stdout and module in out.stdout, out.stdout + out.stderr


def test_import_favorplus_imports_no_framework():
    code = (
        "import sys, favorplus, favorplus.masks\n"
        "bad = [m for m in ('torch', 'jax', 'cupy', 'flax', 'transformers', 'sklearn', 'triton',"
        " 'dask') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
