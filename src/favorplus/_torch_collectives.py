"""torch.distributed collectives for sequence-parallel FAVOR+
(``favor_attention(..., process_group=...)``).

Each rank of the group holds a contiguous piece of the sequence, in rank order (shards
may have different lengths, 0 included). One differentiable all-gather
(``torch.distributed._functional_collectives.all_gather_single_autograd``, whose
backward pass is a reduce-scatter) of each rank's key summary, m (dv + 1) numbers per
row and rank whatever the length, then a merge of all of them (bidirectional) or of
those of the earlier ranks (causal, LASP-2) on every rank. Before that, one small
all-gather checks that the ranks agree on the shapes, the kernel, the scale, the
dtype and the projection (skipped under torch.compile).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

from .summaries import Collectives

__all__ = ["TorchGroup", "call_settings"]


def _resolve(group: Any) -> Any:
    """A ProcessGroup from a ProcessGroup, a 1-D DeviceMesh or (DeviceMesh, dim)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group); it is not"
        )
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - old torch
        DeviceMesh = ()
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh):
        return group[0].get_group(group[1])
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"process_group as a DeviceMesh must be 1-D (or pass (mesh, dim) for the "
                f"sequence dimension); got a {group.ndim}-D mesh"
            )
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(
        f"process_group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or "
        f"(DeviceMesh, dim); got {type(group).__name__}"
    )


class TorchGroup(Collectives):
    """The process group the sequence is sharded over (rank order = sequence order)."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group = _resolve(group)
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)

    def index(self) -> int:
        return self.rank

    def gather(self, x: Any) -> Any:
        import torch
        from torch.distributed import _functional_collectives as funcol

        # all_gather_single_autograd is the newer name (newer torch warns on the old one).
        gather = getattr(funcol, "all_gather_single_autograd", None)
        if gather is None:  # pragma: no cover - older torch
            gather = funcol.all_gather_tensor_autograd
        out = gather(x.contiguous()[None], 0, self.group)
        out = funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out
        if not isinstance(out, torch.Tensor):  # pragma: no cover
            out = torch.as_tensor(out)
        return out

    def check_agreement(
        self,
        device: Any,
        shapes: dict[str, tuple[int, ...] | None],
        settings: dict[str, tuple[Any, str]],
    ) -> None:
        """One small all-gather that checks that the ranks agree: on the shapes but for
        the sequence axis (-2) of q, k and v (axis -1 of the key masks), and on the
        ``settings`` (name: a 0-d tensor or a number, compared to a relative 1e-6, and
        this rank's value as text: the kernel, the scale, the projection's checksum,
        ...). ``shapes`` names every array, None for one a rank does not hold:
        every rank sends a row of the same size whatever it holds (else the gather
        itself would fail). The key masks may be held by some ranks only (they mask
        each rank's own keys). Else a ValueError on every rank (all see the same
        gathered values). Skipped under torch.compile."""
        import torch
        import torch.distributed as dist

        if torch.compiler.is_compiling():
            return
        width = 10  # the last 10 dimensions of each shape are compared
        rows = [_row(shape, width) for shape in shapes.values()]
        floats = [
            torch.as_tensor(x, dtype=torch.float64, device=device) for x, _ in settings.values()
        ]
        mine = torch.cat(
            [
                torch.tensor(rows, dtype=torch.int64, device=device).flatten(),
                torch.stack(floats).view(torch.int64),
            ]
        )
        everyone = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(everyone, mine, group=self.group)
        n = len(rows) * (width + 1)
        tables = [t[:n].view(len(rows), width + 1).tolist() for t in everyone]
        values = [t[n:].view(torch.float64).tolist() for t in everyone]
        for r in range(self.size):
            for i, name in enumerate(shapes):
                a, b = list(tables[0][i]), list(tables[r][i])
                if min(a[0], b[0]) < 0 and name in _MAY_DIFFER:
                    continue
                back = 2 if name in ("q", "k", "v") else 1 if name != "batch" else 0
                if back and a[0] == b[0] and a[0] >= back:
                    a[a[0] + 1 - back] = b[b[0] + 1 - back] = -1  # the sequence length
                if a != b:
                    raise ValueError(
                        f"process_group: the ranks must hold {name} of the same shape but "
                        f"for the sequence axis; rank 0 has {_shape(tables[0][i])}, rank {r} "
                        f"has {_shape(tables[r][i])}"
                    )
            for (name, (_, shown)), x0, x in zip(settings.items(), values[0], values[r]):
                if not math.isclose(x, x0, rel_tol=1e-6, abs_tol=0.0):
                    raise ValueError(
                        f"process_group: the ranks must call favor_attention with the same "
                        f"{name}; rank {r}'s differs from rank 0's (rank "
                        f"{self.rank}, this one, has {shown})"
                    )


def call_settings(
    projection: Any, xp: Any, kern: Any, scale: float, dtype: Any, causal: bool, *_: Any
) -> dict[str, tuple[Any, str]]:
    """What every rank must call a sharded favor_attention with: for each, a number
    and this rank's value as text (for the error message). The kernel's and the
    dtype's names by checksum; the projection by a weighted sum of its absolute values,
    weights rising from 1 to 2 along its entries (positive terms: equal to rounding
    whatever the device's summation order; moved or other entries change it)."""
    checksum: Any = 0.0  # without a projection too: every rank sends as many numbers
    shown = "none"
    if projection is not None:
        import torch

        w = projection.detach().double().flatten()
        weights = torch.linspace(1.0, 2.0, w.numel(), dtype=w.dtype, device=w.device)
        checksum, shown = (w.abs() * weights).sum(), f"one of shape {tuple(projection.shape)}"
    return {
        "kernel": (zlib.crc32(kern.name.encode()), repr(kern.name)),
        "dtype": (zlib.crc32(str(dtype).encode()), str(dtype)),
        "scale": (scale, repr(scale)),
        "causal": (float(causal), repr(causal)),
        "projection": (checksum, shown),
    }


# Masks of each rank's own keys: a rank may hold one where another holds none.
_MAY_DIFFER = ("key_mask", "key_bias", "dropout_keep")


def _row(shape: tuple[int, ...] | None, width: int) -> list[int]:
    """[ndim, the last ``width`` dimensions, zeros] for a shape; [-1, zeros] for none."""
    if shape is None:
        return [-1] + [0] * width
    shape = tuple(shape)
    return [len(shape), *shape[-width:]] + [0] * (width - min(width, len(shape)))


def _shape(row: list[int]) -> str:
    """The shape that a gathered row (see ``_row``) holds, as text."""
    return "none" if row[0] < 0 else str(tuple(row[1 : 1 + row[0]]))
