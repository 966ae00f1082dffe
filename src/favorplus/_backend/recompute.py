"""Autograd recomputation: blocks whose saved tensors are dropped in the forward pass
and recomputed in the backward pass (linear-memory causal training under torch).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .namespaces import is_torch


def recompute(fn: Any, *args: Any, names: Sequence[str] | None = None) -> Any:
    """``fn(*args)``, keeping for torch autograd only what ``fn`` receives.

    Under torch autograd the tensors that ``fn``'s operations save for the backward
    pass are dropped as soon as they are saved; the first time the backward pass needs
    one of them, ``fn(*args)`` runs again (with the same inputs, so the same values)
    and its saved tensors stand in for the dropped ones, in the same order. A backward
    pass then holds one call's temporaries at a time. (The idea of
    ``torch.utils.checkpoint``, whose first call imports torch._dynamo, about 80 MiB,
    which is more than all this saves.) Other arrays, and calls without autograd,
    just run ``fn``.

    ``fn`` must depend on no tensor but ``args`` (tuples of tensors included). Their
    versions are recorded now; if one of them changed in place before the backward
    pass needs the recomputation, that raises a RuntimeError naming it (``names``,
    one per argument), as autograd does for a tensor it saved itself, instead of
    differentiating another function.
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
    labels = list(names) if names is not None else [f"argument {i}" for i in range(len(args))]
    watched = [
        (f"{label}[{j}]" if isinstance(arg, tuple) else label, t, t._version)
        for label, arg in zip(labels, args)
        for j, t in enumerate(arg if isinstance(arg, tuple) else (arg,))
        if is_torch(t)
    ]

    def recomputed(index: int) -> Any:
        if not replay:
            for label, t, version in watched:
                if t._version != version:
                    raise RuntimeError(
                        f"favorplus: {label}, a tensor needed to recompute a block of causal "
                        f"attention in the backward pass, was modified by an in-place operation "
                        f"after the forward pass (its version is {t._version}, expected "
                        f"{version}); the gradient would be that of another function. Replace "
                        f"the tensor (e.g. assign a new projection) instead of changing it in "
                        f"place, or run the backward pass first."
                    )
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
