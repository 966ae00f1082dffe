"""The fused calls as torch autograd functions: batching, launch, and the backward.

The forward runs the Triton kernels of :mod:`favorplus._triton.bidirectional` or
:mod:`favorplus._triton.causal`. The
backward recomputes the call on the array API path and differentiates it there (the
gradients are the array API path's own); fused backward kernels are not written yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import bidirectional, causal


def _batched(x: torch.Tensor, batch: tuple[int, ...], tail: int) -> torch.Tensor:
    """``x`` broadcast to ``(*batch, *tail dims)``, flattened to ``(B, ...)``, contiguous."""
    shape = (*batch, *x.shape[x.ndim - tail :])
    flat = (max(1, math.prod(batch)), *x.shape[x.ndim - tail :])
    return x.broadcast_to(shape).reshape(flat).contiguous()


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        fused: Callable[..., torch.Tensor],
        reference: Callable[..., torch.Tensor],
        *tensors: Any,
    ) -> torch.Tensor:
        ctx.reference = reference
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in tensors))
        return fused(*tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            inputs = [
                None if t is None else (t.detach().requires_grad_(True) if n else t.detach())
                for t, n in zip(saved, needs, strict=True)
            ]
            out = ctx.reference(*inputs)
            wanted = [t for t, n in zip(inputs, needs, strict=True) if n]
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, *(next(grads) if n else None for n in needs))


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    prep: Any,
    kern: Any,
    chunk: int | None,
    reference: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """FAVOR+ attention (bidirectional, or causal with Lq = Lk) by the fused kernels."""
    batch = tuple(prep.chk.batch)
    scale = prep.chk.scale
    hyperbolic = kern.name == "softmax_hyperbolic"
    lq, dv = q.shape[-2], v.shape[-1]

    def fused(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
        mask: torch.Tensor | None, bias: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        qb, kb, vb = _batched(q, batch, 2), _batched(k, batch, 2), _batched(v, batch, 2)
        mb = None if mask is None else _batched(mask, batch, 1).to(torch.uint8)
        bb = None if bias is None else _batched(bias.to(torch.float32), batch, 1)
        if prep.causal:
            out = causal.forward(qb, kb, vb, w, mb, bb, scale, hyperbolic, chunk)
        else:
            out = bidirectional.forward(qb, kb, vb, w, mb, bb, scale, hyperbolic)
        return out.reshape(*batch, lq, dv)

    return _FusedAttention.apply(fused, reference, q, k, v, w, prep.key_mask, prep.key_bias)
