"""The demo (python -m favorplus) runs and reports sensible figures."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from favorplus.__main__ import main


def test_demo_table(capsys):
    args = ["--quick", "--length", "96", "--heads", "2", "--dim", "8", "--features", "64"]
    assert main([*args, "--backends", "numpy,torch,jax"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^(numpy|torch|jax)\s", line)]
    assert rows, out
    for row in rows:
        err = float(row.split()[3])
        assert 0 <= err < 0.5, row  # moderate inputs: FAVOR+ is close to exact attention


def test_demo_help():
    res = subprocess.run(
        [sys.executable, "-m", "favorplus", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--length", "--features", "--causal", "--backends", "--quick"):
        assert option in res.stdout


def test_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        main(["--length", "0"])
