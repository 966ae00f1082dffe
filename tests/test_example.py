"""The training example (examples/train_copy.py) in its quick mode, per framework."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_copy.py"
NEEDS = {"torch": ("torch",), "jax": ("jax", "flax", "optax")}


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_quick_training_learns_to_copy(framework, tmp_path):
    missing = [m for m in NEEDS[framework] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    out = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, str(EXAMPLE), "--framework", framework, "--quick", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    report = json.loads(out.read_text())
    chance = report["chance_loss"]
    assert chance == pytest.approx(math.log(report["config"]["vocab"] - 1))
    variants = {r["variant"]: r for r in report["results"]}
    assert set(variants) == {"exact", "favor", "favor+redraw"}
    for name, r in variants.items():
        first, last = r["losses"][0][1], r["losses"][-1][1]
        # Learning to copy: from about log(15) = 2.7 nats towards 0; without attention to
        # the first half the loss cannot go below log(15).
        assert last < first, name
        assert r["eval_loss"] < 0.3 * chance, (name, r["eval_loss"])
        assert r["eval_accuracy"] > 0.7, (name, r["eval_accuracy"])


PERFORMERIZE = Path(__file__).parents[1] / "examples" / "performerize.py"


def test_quick_conversion_recovers_the_loss(tmp_path):
    """examples/performerize.py --quick: converting a trained exact model with one call
    first raises its loss (FAVOR+ only approximates the attention it was trained with),
    fine-tuning recovers it, faster than training the Performer from scratch."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    out = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, str(PERFORMERIZE), "--quick", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    r = json.loads(out.read_text())
    chance = r["chance_loss"]
    assert r["exact_final"] < 0.3 * chance  # the exact model learned to copy
    assert r["converted"] > 2 * r["exact_final"]  # the conversion costs accuracy ...
    assert r["finetuned_final"] < 0.5 * r["converted"]  # ... which fine-tuning recovers
    assert r["finetuned_final"] < r["scratch_final"]  # faster than from scratch
    assert r["finetune"][0] == [r["config"]["pretrain_steps"], r["converted"]]
