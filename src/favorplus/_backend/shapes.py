"""Broadcasting of the leading (batch) dimensions, with errors that name the arguments."""

from __future__ import annotations

from collections.abc import Sequence


def broadcast_shapes(*shapes: Sequence[int], names: Sequence[str]) -> tuple[int, ...]:
    """Broadcast leading (batch) shapes, naming the arguments on failure."""
    ndim = max([0, *(len(s) for s in shapes)])
    out = []
    for axis in range(-ndim, 0):
        size = 1
        for shape in shapes:
            if len(shape) >= -axis:
                n = shape[axis]
                if n != 1:
                    if size not in (1, n):
                        listed = ", ".join(f"{nm}: {tuple(s)}" for nm, s in zip(names, shapes))
                        raise ValueError(
                            f"the leading (batch) dimensions must broadcast together; got {listed}"
                        )
                    size = n
        out.append(size)
    return tuple(out)
