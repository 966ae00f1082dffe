"""The demo (python -m favorplus) runs, reports sensible figures and explains bad options."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from favorplus.__main__ import BACKENDS, main

SMALL = ["--quick", "--length", "96", "--heads", "2", "--dim", "8", "--features", "64"]
INSTALLED = [b for b, (module, _) in BACKENDS.items() if importlib.util.find_spec(module)]


def _rows(out: str) -> list[str]:
    names = "|".join(BACKENDS)
    return [line for line in out.splitlines() if re.match(rf"^({names})\s", line)]


def test_demo_table(capsys):
    assert main(SMALL) == 0  # every installed backend, array-api-strict included
    rows = _rows(capsys.readouterr().out)
    assert sorted(r.split()[0] for r in rows) == sorted(INSTALLED)
    for row in rows:
        err = float(row.split()[3])
        assert 0 <= err < 0.5, row  # moderate inputs: FAVOR+ is close to exact attention


def test_demo_help():
    res = subprocess.run(
        [sys.executable, "-m", "favorplus", "--help"], capture_output=True, text=True, check=True
    )
    options = re.findall(r"^\s+(--[a-z-]+)", res.stdout, flags=re.MULTILINE)
    assert {"--length", "--features", "--causal", "--backends", "--quick"} <= set(options)
    # every option has help text: no option line stands alone without a description
    parser_actions = [a for a in _parser_actions() if a.option_strings]
    assert all(a.help for a in parser_actions), [a.option_strings for a in parser_actions]


def _parser_actions() -> list[argparse.Action]:
    from favorplus.__main__ import _parser

    return list(_parser()._actions)


def test_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        main(["--length", "0"])


@pytest.mark.parametrize("spec", ["numpy,foo", "foo", ","])
def test_demo_names_unknown_backends(spec, capsys):
    with pytest.raises(SystemExit):
        main([*SMALL, "--backends", spec])
    err = capsys.readouterr().err
    assert "--backends" in err and "choose from numpy, strict, torch, jax, cupy" in err
    assert "installed here: numpy" in err
    if "foo" in spec:
        assert "'foo'" in err


def test_demo_names_missing_backends(capsys):
    missing = [b for b in BACKENDS if b not in INSTALLED]
    if not missing:
        pytest.skip("every backend is installed")
    with pytest.raises(SystemExit):
        main([*SMALL, "--backends", missing[0]])
    err = capsys.readouterr().err
    assert f"{missing[0]} not installed" in err and f"favorplus[{BACKENDS[missing[0]][1]}]" in err


def test_demo_quick_keeps_explicit_repeats(monkeypatch, capsys):
    """--quick shortens the problem but does not silently override --repeats."""
    import favorplus.__main__ as demo

    calls = []
    real = demo._best_time

    def counting(fn, repeats):
        calls.append(repeats)
        return real(fn, repeats)

    monkeypatch.setattr(demo, "_best_time", counting)
    assert main([*SMALL, "--backends", "numpy", "--repeats", "2"]) == 0
    assert calls and set(calls) == {2}
    calls.clear()
    assert main([*SMALL, "--backends", "numpy"]) == 0
    assert set(calls) == {1}  # --quick alone: one timed repeat


def test_demo_relu_is_not_an_approximation_error(capsys):
    assert main([*SMALL, "--backends", "numpy", "--kernel", "relu"]) == 0
    out = capsys.readouterr().out
    assert "vs softmax" in out and "rel. error" not in out
    assert "not an approximation of softmax" in out


@pytest.mark.parametrize("kernel", ["softmax_oprf", "softmax_saderf"])
def test_demo_runs_the_estimators_and_simplex_projections(capsys, kernel):
    assert main([*SMALL, "--backends", "numpy", "--kernel", kernel, "--kind", "simplex"]) == 0
    out = capsys.readouterr().out
    assert f"kernel = {kernel}, simplex features" in out and "rel. error" in out


def test_demo_refuses_data_driven_estimators_in_causal_attention(capsys):
    with pytest.raises(SystemExit):
        main([*SMALL, "--backends", "numpy", "--kernel", "softmax_oprf", "--causal"])
    assert "later tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"), [("--seed", "-1"), ("--input-std", "nan"), ("--input-std", "inf")]
)
def test_demo_refuses_bad_seed_and_input_std(option, value, capsys):
    with pytest.raises(SystemExit):
        main([*SMALL, "--backends", "numpy", option, value])
    err = capsys.readouterr().err
    assert f"{option} must be" in err and f"got {value}" in err, err


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_demo_labels_only_the_dtype_it_ran(capsys):
    # JAX without x64 turns float64 requests into float32 arrays: the row must not
    # report float64 figures then. In its own process, so that x64 is as a user has it.
    res = subprocess.run(
        [sys.executable, "-m", "favorplus", *SMALL, "--backends", "jax", "--dtype", "float64"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_ENABLE_X64": "0"},
    )
    (row,) = _rows(res.stdout)
    assert "float64" in row and "dtype not available (set JAX_ENABLE_X64=1)" in row, row
