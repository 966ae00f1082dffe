"""Autograd recomputation: blocks whose saved tensors are dropped in the forward pass
and recomputed in the backward pass (linear-memory causal training under torch).
"""

from __future__ import annotations

import sys
from typing import Any


def recompute(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, keeping for torch autograd only what ``fn`` receives.

    Under torch autograd the tensors that ``fn``'s operations save for the backward
    pass are dropped as soon as they are saved; the first time the backward pass needs
    one of them, ``fn(*args)`` runs again (with the same inputs, so the same values)
    and its saved tensors stand in for the dropped ones, in the same order. A backward
    pass then holds one call's temporaries at a time. (The idea of
    ``torch.utils.checkpoint``, whose first call imports torch._dynamo, about 80 MiB,
    which is more than all this saves.) Other arrays, and calls without autograd,
    just run ``fn``. ``args`` must not change in place before the backward pass.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_grad_enabled():
        return fn(*args)
    # torch.func transforms (grad, vjp, ...) turn saved-tensor hooks off: plain call.
    hooks_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    if hooks_enabled is not None and not hooks_enabled():
        return fn(*args)
    hooks = torch.autograd.graph.saved_tensors_hooks
    replay: list[Any] = []  # the saved tensors of a recomputation, in saving order

    def recomputed(index: int) -> Any:
        if not replay:
            with torch.enable_grad(), hooks(_keep(replay), _never):
                fn(*args)
        tensor, version = replay[index]
        if tensor._version != version:  # what autograd itself checks without hooks
            raise RuntimeError(
                "favorplus: a tensor saved for the backward pass was changed in place"
            )
        return tensor

    counter = iter(range(1 << 62))
    with hooks(lambda _: next(counter), recomputed):
        return fn(*args)


def _keep(store: list[Any]) -> Any:
    """A pack hook that records what a recomputation saves, detached (no reference
    cycle through grad_fn) and with its version; its own graph is never used."""

    def pack(t: Any) -> None:
        store.append((t.detach(), t._version))

    return pack


def _never(_: Any) -> Any:
    raise RuntimeError("favorplus: a recomputed graph was used for a backward pass")
