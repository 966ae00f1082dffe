"""Worker for tests/test_distributed_torch.py: one gloo rank (spawned, 127.0.0.1 only)."""

from __future__ import annotations

import os
import sys


def _gap(a, b) -> float:
    """Largest absolute difference (0 for empty shards)."""
    if a is None:  # no gradient reached an empty shard's input: it is 0
        return float(b.detach().abs().max()) if b.numel() else 0.0
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def main(rank: int, world: int, port: int, case: str, path: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    import favorplus as fp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    b, h, L, d = 2, 2, 37, 8
    q, k, v = (torch.tensor(rng.standard_normal((b, h, L, d)) * 0.5) for _ in range(3))
    mask = torch.tensor(rng.random((b, 1, L)) > 0.3)
    mask[0, :, :5] = False  # batch row 0: no key on the first shard (5 tokens)
    w = torch.tensor(fp.draw_projection(16, d, seed=0))
    cuts = np.linspace(0, L, world + 1).astype(int)
    if case == "uneven":
        cuts = np.array([*[0, 5, 5, 20][:world], L]) if world > 2 else np.array([0, 3, L])
    lo, hi = int(cuts[rank]), int(cuts[rank + 1])
    results = {}
    for causal in (False, True):
        for kernel in ("softmax", "relu"):
            kw = dict(causal=causal, kernel=kernel, key_mask=mask[..., lo:hi])
            qs, ks, vs = (x[..., lo:hi, :].clone().requires_grad_(True) for x in (q, k, v))
            out = fp.favor_attention(qs, ks, vs, w, process_group=dist.group.WORLD, **kw)
            torch.sin(out).sum().backward()
            qf, kf, vf = (x.clone().requires_grad_(True) for x in (q, k, v))
            kw["key_mask"] = mask
            ref = fp.favor_attention(qf, kf, vf, w, **kw)
            torch.sin(ref).sum().backward()
            pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in ((qs, qf), (ks, kf), (vs, vf))]
            results[f"{causal}-{kernel}"] = [_gap(a, b[..., lo:hi, :]) for a, b in pairs]
    # Masks held unevenly: an additive mask whose -inf entries fall on rank 0 only (other
    # ranks' pieces are all finite biases, so favorplus splits the pieces differently);
    # a bool mask on rank 0 and none on the other ranks (their keys all kept).
    fmask = torch.tensor(rng.standard_normal((b, 1, L)) * 0.3)
    fmask[..., 1] = -torch.inf
    first = torch.where(torch.arange(L) < int(cuts[1]), mask, True)  # rank 0's mask only
    cases = {
        "float": (fmask, fmask[..., lo:hi]),
        "partial": (first, mask[..., lo:hi] if rank == 0 else None),
    }
    for causal in (False, True):
        for name, (full, piece) in cases.items():
            qs, ks, vs = (x[..., lo:hi, :] for x in (q, k, v))
            group = dist.group.WORLD
            out = fp.favor_attention(
                qs, ks, vs, w, causal=causal, key_mask=piece, process_group=group
            )
            ref = fp.favor_attention(q, k, v, w, causal=causal, key_mask=full)
            results[f"{name}-{causal}"] = [_gap(out, ref[..., lo:hi, :])]
    # Ranks that call with another projection or another kernel: a ValueError on every
    # rank, not a merge of unrelated summaries.
    qs, ks, vs = (x[..., lo:hi, :] for x in (q, k, v))
    for name, kw in (
        ("projection", dict(projection=torch.tensor(fp.draw_projection(16, d, seed=rank)))),
        ("kernel", dict(projection=w, kernel="relu" if rank == world - 1 else "softmax")),
    ):
        try:
            fp.favor_attention(qs, ks, vs, process_group=dist.group.WORLD, **kw)
            results[f"error-{name}"] = "none"
        except ValueError as e:
            results[f"error-{name}"] = str(e)
    # A 2-D DeviceMesh (1 x world), the sequence over its dimension "sp"; causal, the
    # last rank's keys and values adversarial (inf, NaN, +-1e30): the other ranks'
    # outputs equal those of the plain inputs bit for bit.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "sp"))
    even = np.linspace(0, L, world + 1).astype(int)  # no empty rank: every rank compared
    lo, hi = int(even[rank]), int(even[rank + 1])
    kw = dict(causal=True, key_mask=mask[..., lo:hi], process_group=(mesh, "sp"))
    qs, ks, vs = (x[..., lo:hi, :] for x in (q, k, v))
    base = fp.favor_attention(qs, ks, vs, w, **kw)
    results["mesh-gap"] = [
        _gap(base, fp.favor_attention(q, k, v, w, causal=True, key_mask=mask)[..., lo:hi, :])
    ]
    changed = 0
    for bad in (float("inf"), float("nan"), 1e30, -1e30):
        if rank == world - 1:
            ks, vs = torch.full_like(ks, bad), torch.full_like(vs, bad)
        out = fp.favor_attention(qs, ks, vs, w, **kw)
        if rank < world - 1:
            changed += int((out != base).sum())
    results["leaked"] = changed
    if True:  # every run ends with ranks that disagree on the shapes
        try:
            x = torch.zeros((2, 2 + rank, 4, d), dtype=torch.float64)
            fp.favor_attention(x, x, x, w, process_group=dist.group.WORLD)
            results["error"] = "none"
        except ValueError as e:
            results["error"] = str(e)
    torch.save(results, f"{path}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    r, n, p, c, o = sys.argv[1:]
    main(int(r), int(n), int(p), c, o)
