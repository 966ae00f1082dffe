"""CPU blocking: on a CPU, long sequences are processed in blocks whose (tokens x
features) temporaries hold about ``BLOCK_NUMBERS`` numbers (8 MiB in float32): they stay
in cache and in the allocator's reusable memory instead of costing fresh page faults.
"""

from __future__ import annotations

from .tracing import host_readable
from .types import Array

BLOCK_NUMBERS = 1 << 21


def cpu_block(
    x: Array, numbers_per_token: int, multiple: int = 1, *, training: bool = False
) -> int | None:
    """Block length (a multiple of ``multiple``) for eager CPU arrays; None elsewhere.

    GPUs, traced JAX programs, torch.compile graphs and torch.func transforms process
    the whole sequence at once (one program, few kernel launches). ``training``:
    blocks of a quarter of the size, for blocks that are recomputed in the backward
    pass (see :func:`recompute`), where one block's temporaries and their gradients
    are held at once.
    """
    if not host_readable(x):
        return None
    budget = BLOCK_NUMBERS // 4 if training else BLOCK_NUMBERS
    tokens = budget // max(1, numbers_per_token)
    return max(multiple, tokens // multiple * multiple)
