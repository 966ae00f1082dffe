"""favor_attention(axis_name=...) inside jax.shard_map on 8 simulated CPU devices,
against the single-device call (in a subprocess: the device count is fixed when jax is
imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

SCRIPT = Path(__file__).with_name("_dist_jax_script.py")


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("XLA_FLAGS", None)
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sharded_equals_single_device(results: dict) -> None:
    # Meshes (8,) over the sequence (three kernels) and (2, 4) over batch x sequence
    # (softmax); bidirectional and causal; no mask, a bool mask that empties whole shards,
    # an additive mask with -inf and per-key biases. float64: equal to ~1e-15.
    cases = {k: v for k, v in results.items() if k.startswith("(")}
    assert len(cases) == 2 * 3 * 3 + 2 * 3
    bad = {k: v for k, v in cases.items() if not v < 1e-12}
    assert not bad


def test_other_meshes_and_shard_counts(results: dict) -> None:
    # 2 shards on a (2, 2) mesh with the batch over the other axis; 8 shards over a
    # tuple of two mesh axes (2, 4), with gradients; bidirectional and causal, a bool
    # mask that empties whole shards (float64: rounding ~1e-15).
    cases = {k: v for k, v in results.items() if k.startswith(("mesh-", "mgrad-"))}
    assert len(cases) == 2 * 2 + 2
    assert all(v < 1e-11 for v in cases.values()), cases


def test_plain_call_under_jit_on_a_sequence_sharded_auto_mesh(results: dict) -> None:
    # No shard_map, no axis_name: XLA partitions the call; equal results, and the output
    # keeps the sequence sharding.
    for causal in (False, True):
        assert results[f"jit-{causal}"] < 1e-12
        assert results[f"jit-spec-{causal}"] == "P(None, None, 's', None)"


def test_sharded_gradients_equal_single_device(results: dict) -> None:
    grads = {k: v for k, v in results.items() if k.startswith("grad")}
    assert len(grads) == 4
    assert all(v < 1e-11 for v in grads.values()), grads


def test_causal_shards_see_no_later_shard_bit_for_bit(results: dict) -> None:
    # Later shards filled with inf, NaN, +-1e30: the first five shards' outputs are
    # unchanged in every bit.
    assert results["leaked_bits"] == 0


def test_unbound_axis_name_is_a_clear_error(results: dict) -> None:
    assert "axis_name='nowhere' is not bound" in results["unbound"]


def test_plain_call_under_jit_on_a_sequence_sharded_explicit_mesh(results: dict) -> None:
    # Explicit axes (2, 4) = (batch, sequence), bool key mask: favor_attention shard_maps
    # itself over the sequence axes; outputs and causal gradients equal one device.
    for causal in (False, True):
        assert results[f"explicit-{causal}"] < 1e-12
        assert results[f"explicit-spec-{causal}"] == "P('b', None, 's', None)"
    assert results["explicit-grad"] < 1e-11
    assert results["explicit-mask-row"] < 1e-12
    for case in ("keys", "batch"):
        err = results[f"explicit-mask-{case}"]
        assert "needs key_mask sharded like k: its last (key) axis over 's'" in err, err
        assert "key_mask.shape=(2, 1, 64)" in err, err
