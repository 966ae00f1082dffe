"""favor_attention(process_group=...) on 3 gloo CPU processes (127.0.0.1) against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("_dist_torch_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_sharded_equals_single_process_three_ranks_uneven(tmp_path: Path) -> None:
    # Shards of 5, 0 and 32 tokens (an empty rank included); a bool key mask (batch row 0
    # without any key on rank 0), softmax and relu kernels, bidirectional and causal;
    # outputs and gradients of q, k, v against the single-process call (float64:
    # rounding ~1e-15); also an additive mask with -inf on rank 0 only and a mask on
    # rank 0 only (None elsewhere). Ranks with other projections or kernels: a
    # ValueError on every rank. Causal on a DeviceMesh dimension with the last rank adversarial:
    # the earlier ranks' outputs unchanged bit for bit.
    world = 3
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "res"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(port), "uneven", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in range(world)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors = [p.stderr.read().decode()[-2000:] for p in procs if p.stderr is not None]
    assert codes == [0] * world, errors
    for r in range(world):
        res = torch.load(f"{out}.{r}")
        err = res.pop("error")
        assert "ranks must hold q of the same shape" in err and "rank 1 has (2, 3, 4, 8)" in err
        # a (1, 3) DeviceMesh's "sp" dimension as the group; the last rank adversarial
        assert res.pop("leaked") == 0
        assert res.pop("mesh-gap")[0] < 1e-12
        for name in ("projection", "kernel"):
            err = res.pop(f"error-{name}")
            assert f"ranks must call favor_attention with the same {name}" in err, err
        assert len(res) == 8
        for case, gaps in res.items():
            assert max(gaps) < 1e-12, (r, case, gaps)


def test_process_group_needs_torch_tensors() -> None:
    import numpy as np

    import favorplus as fp

    x = np.zeros((4, 8))
    with pytest.raises(TypeError, match="process_group is for torch tensors"):
        fp.favor_attention(x, x, x, fp.draw_projection(8, 8, seed=0), process_group=object())


def test_process_group_needs_initialized_distributed() -> None:
    import favorplus as fp

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    x = torch.zeros((4, 8))
    w = torch.tensor(fp.draw_projection(8, 8, seed=0), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialized"):
        fp.favor_attention(x, x, x, w, process_group=object())
