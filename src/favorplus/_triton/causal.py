"""The fused causal FAVOR+ forward: chunked, leak-free, the inter-chunk state carried.

One program per batch row walks the sequence chunk by chunk (FAVOR-NOTES section 5, the
algorithm of :mod:`favorplus.causal`): for a chunk of C tokens it computes the query
and key log-features on-chip, each key's reference ``c_j`` = the running maximum over
the past of ``level(max_r u_{j,r})`` (rounded up to a multiple of 4, masked keys at the
floor), the intra-chunk weights ``(q^_i . k^_j) exp(c_j - c_i)`` for ``j <= i`` (C x C,
on-chip), adds ``exp(c_prev - c_i) q^_i S`` from the carried state, and then folds the
chunk into ``S`` (float32, in registers). Every exponent is <= 0 and every quantity of
row i depends on positions <= i only: no overflow, no leak from the future.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .bidirectional import _block, _precision

NEG_INF = float("-inf")
FLOOR = float(torch.finfo(torch.float32).min)
LEVEL_STEP = 4.0


@triton.jit
def _causal_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, mask_ptr, bias_ptr, out_ptr,
    L, D, DV, M,
    half_scale, log_const, floor, level_step,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    C: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_c = tl.arange(0, C)
    feat_ok = offs_m < M
    wt = tl.load(
        w_ptr + offs_m[None, :] * D + offs_d[:, None],
        mask=feat_ok[None, :] & (offs_d[:, None] < D),
        other=0.0,
    ).to(tl.float32)
    tri = offs_c[None, :] <= offs_c[:, None]  # (i, j): j <= i
    s = tl.zeros((BM, BDV), tl.float32)
    z = tl.zeros((BM,), tl.float32)
    c_prev = floor
    for t0 in range(0, L, C):
        pos = t0 + offs_c
        inside = pos < L
        ok = inside
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * L + pos, mask=inside, other=0) != 0)
        kb = tl.load(
            k_ptr + (b * L + pos[:, None]) * D + offs_d[None, :],
            mask=ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        vb = tl.load(
            v_ptr + (b * L + pos[:, None]) * DV + offs_dv[None, :],
            mask=ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        ).to(tl.float32)
        qb = tl.load(
            q_ptr + (b * L + pos[:, None]) * D + offs_d[None, :],
            mask=inside[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        row = half_scale * tl.sum(kb * kb, axis=1) + log_const
        if HAS_BIAS:
            row = row - tl.load(bias_ptr + b * L + pos, mask=inside, other=0.0)
        uk = tl.dot(kb, wt, input_precision=PRECISION) - row[:, None]
        uk = tl.where(ok[:, None] & feat_ok[None, :], uk, NEG_INF)
        # Each key's level, its running maximum inside the chunk, then over the past.
        level = tl.maximum(tl.ceil(tl.max(uk, axis=1) / level_step) * level_step, floor)
        level = tl.where(ok, level, floor)
        cin = tl.max(tl.where(tri, level[None, :], floor), axis=1)
        c = tl.maximum(cin, c_prev)
        kh = tl.exp(uk - c[:, None])  # <= 1; 0 for masked keys
        uq = tl.dot(qb, wt, input_precision=PRECISION)
        uq = tl.where(feat_ok[None, :], uq, NEG_INF)
        qh = tl.exp(uq - tl.max(uq, axis=1)[:, None])  # per-query row maximum: cancels
        scores = tl.dot(qh, tl.trans(kh), input_precision=PRECISION)
        decay = tl.exp(tl.where(tri, c[None, :] - c[:, None], NEG_INF))
        weights = tl.where(tri, scores * decay, 0.0)
        factor = tl.exp(c_prev - c)
        num = tl.dot(weights, vb, input_precision=PRECISION)
        num += factor[:, None] * tl.dot(qh, s, input_precision=PRECISION)
        den = tl.sum(weights, axis=1) + factor * tl.sum(qh * z[None, :], axis=1)
        out = num / tl.where(den == 0.0, float("inf"), den)[:, None]
        tl.store(
            out_ptr + (b * L + pos[:, None]) * DV + offs_dv[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=inside[:, None] & (offs_dv[None, :] < DV),
        )
        # Fold the chunk into the state, referenced to the chunk's last maximum.
        c_end = tl.max(c, axis=0)
        gate = tl.exp(c_prev - c_end)
        kg = kh * tl.exp(c - c_end)[:, None]
        s = s * gate + tl.dot(tl.trans(kg), vb, input_precision=PRECISION)
        z = z * gate + tl.sum(kg, axis=0)
        c_prev = c_end


def covers(m: int, dv: int) -> bool:
    """The whole state (m x dv, float32) is held by one program: bounded sizes only."""
    return triton.next_power_of_2(m) * triton.next_power_of_2(max(dv, 16)) <= 256 * 128


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    hyperbolic: bool,
    chunk: int | None,
) -> torch.Tensor:
    """Fused causal attention of batched, contiguous (B, L, .) inputs with Lq = Lk."""
    rows = w.to(torch.float32) * math.sqrt(scale)
    if hyperbolic:
        rows = torch.cat([rows, -rows], dim=0)
    rows = rows.contiguous()
    nb, length, d = q.shape
    dv, m = v.shape[-1], rows.shape[0]
    out = torch.empty((nb, length, dv), dtype=v.dtype, device=q.device)
    bm = max(16, triton.next_power_of_2(m))
    # The (C, m) feature tiles and the (m, dv) state share the GPU's on-chip memory:
    # shorter chunks for more features (64 up to m = 128, 32 at 256, 16 at 512).
    size = min(64 if chunk is None else _block(chunk, 64), max(16, 8192 // bm))
    _causal_kernel[(nb,)](
        q, k, v, rows, k if mask is None else mask, k if bias is None else bias, out,
        length, d, dv, m, 0.5 * scale, 0.5 * math.log(m), FLOOR, LEVEL_STEP,
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        C=size, BD=_block(d, 256), BDV=_block(dv, 256), BM=bm,
        num_warps=8 if bm * max(16, dv) > 128 * 64 else 4,
        PRECISION=_precision(q),
    )  # fmt: skip
    return out
