"""The fused bidirectional FAVOR+ forward: features, stabilizers, key state, readout.

Two kernels, neither of which writes an (L, m) feature array to memory:

* ``_key_state_kernel`` (grid: batch rows x feature blocks x key ranges) streams its
  range of keys once:
  it computes the positive-softmax log-features ``u_j = W k_j - s |k_j|^2 / 2 + b_j``
  on-chip, keeps the per-feature maximum over the unmasked keys as a running maximum
  and the state ``S = sum_j exp(u_j - top) [v_j, 1]`` in float32, rescaled by
  ``exp(top_old - top_new)`` whenever the maximum grows (every exponent stays <= 0).
  The partial states of the key ranges are combined exactly (each rescaled to the
  overall maximum): the one-pass estimator's state ``kf^T [v, 1]`` and its maximum
  ``top`` (0 for a feature with no unmasked key, as in :mod:`favorplus._stabilize`).
* ``_readout_kernel`` (grid: batch rows x query blocks) computes the query
  log-features plus ``top`` (the key maximum moved onto the query side, so each
  product is unchanged) and reads ``D^-1 qf S`` out with a running per-query
  row maximum over the feature blocks (the row constant cancels in the ratio).

The hyperbolic kernel's features ``[exp(Wx), exp(-Wx)]`` are the positive kernel's
with the rows ``[W; -W]``, so the same kernels compute both. Inputs may be float32,
float16 or bfloat16; every product and sum is accumulated in float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

NEG_INF = float("-inf")


@triton.jit
def _key_state_kernel(
    k_ptr, v_ptr, w_ptr, mask_ptr, bias_ptr, s_ptr, z_ptr, top_ptr,
    L, D, DV, M, SPAN, SPLITS,
    half_scale, log_const,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    m0 = tl.program_id(1) * BM
    part = tl.program_id(2)  # this program's keys: [part * SPAN, (part + 1) * SPAN)
    out_row = b * SPLITS + part
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    feat_ok = offs_m < M
    # The projection rows of this feature block, transposed: (BD, BM); W is pre-scaled.
    wt = tl.load(
        w_ptr + offs_m[None, :] * D + offs_d[:, None],
        mask=feat_ok[None, :] & (offs_d[:, None] < D),
        other=0.0,
    ).to(tl.float32)
    top = tl.full((BM,), NEG_INF, tl.float32)
    acc = tl.zeros((BM, BDV), tl.float32)
    zsum = tl.zeros((BM,), tl.float32)
    start = part * SPAN
    stop = tl.minimum(start + SPAN, L)
    for l0 in range(start, stop, BL):
        offs_l = l0 + tl.arange(0, BL)
        ok = offs_l < stop
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * L + offs_l, mask=offs_l < L, other=0) != 0)
        kb = tl.load(
            k_ptr + (b * L + offs_l[:, None]) * D + offs_d[None, :],
            mask=ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        vb = tl.load(
            v_ptr + (b * L + offs_l[:, None]) * DV + offs_dv[None, :],
            mask=ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        ).to(tl.float32)
        row = half_scale * tl.sum(kb * kb, axis=1) + log_const
        if HAS_BIAS:
            row = row - tl.load(bias_ptr + b * L + offs_l, mask=offs_l < L, other=0.0)
        u = tl.dot(kb, wt, input_precision=PRECISION) - row[:, None]
        # Masked keys (whatever their values, NaN included) and padding features: -inf.
        u = tl.where(ok[:, None] & feat_ok[None, :], u, NEG_INF)
        new = tl.maximum(top, tl.max(u, axis=0))
        base = tl.where(new == NEG_INF, 0.0, new)
        alpha = tl.exp(top - base)  # 0 while nothing was seen (top = -inf)
        f = tl.exp(u - base[None, :])  # <= 1; exactly 0 for masked keys
        acc = acc * alpha[:, None] + tl.dot(tl.trans(f), vb, input_precision=PRECISION)
        zsum = zsum * alpha + tl.sum(f, axis=0)
        top = new
    # Partial states of the key ranges, each referenced to its own maximum (-inf where
    # the range has no unmasked key); key_state combines them.
    tl.store(
        s_ptr + (out_row * M + offs_m[:, None]) * DV + offs_dv[None, :],
        acc,
        mask=feat_ok[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(z_ptr + out_row * M + offs_m, zsum, mask=feat_ok)
    tl.store(top_ptr + out_row * M + offs_m, top, mask=feat_ok)


@triton.jit
def _readout_kernel(
    q_ptr, w_ptr, s_ptr, z_ptr, top_ptr, out_ptr,
    L, D, DV, M,
    BQ: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs_q = tl.program_id(1) * BQ + tl.arange(0, BQ)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q_ok = offs_q < L
    qb = tl.load(
        q_ptr + (b * L + offs_q[:, None]) * D + offs_d[None, :],
        mask=q_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    rowmax = tl.full((BQ,), NEG_INF, tl.float32)
    acc = tl.zeros((BQ, BDV), tl.float32)
    den = tl.zeros((BQ,), tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        feat_ok = offs_m < M
        wt = tl.load(
            w_ptr + offs_m[None, :] * D + offs_d[:, None],
            mask=feat_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        ).to(tl.float32)
        shift = tl.load(top_ptr + b * M + offs_m, mask=feat_ok, other=0.0)
        zb = tl.load(z_ptr + b * M + offs_m, mask=feat_ok, other=0.0)
        sb = tl.load(
            s_ptr + (b * M + offs_m[:, None]) * DV + offs_dv[None, :],
            mask=feat_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        u = tl.dot(qb, wt, input_precision=PRECISION) + shift[None, :]
        u = tl.where(feat_ok[None, :], u, NEG_INF)
        new = tl.maximum(rowmax, tl.max(u, axis=1))
        alpha = tl.exp(rowmax - new)
        p = tl.exp(u - new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p, sb, input_precision=PRECISION)
        den = den * alpha + tl.sum(p * zb[None, :], axis=1)
        rowmax = new
    # Rows with no key to attend to (den exactly 0) return 0.
    out = acc / tl.where(den == 0.0, float("inf"), den)[:, None]
    tl.store(
        out_ptr + (b * L + offs_q[:, None]) * DV + offs_dv[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_ok[:, None] & (offs_dv[None, :] < DV),
    )


def _block(n: int, cap: int = 64) -> int:
    """A power-of-two block of at least 16 (tl.dot's minimum) and at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


def _precision(x: torch.Tensor) -> str:
    """float32 products as torch's own matmuls do them: TF32 only where torch allows it."""
    if x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def key_state(
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S, z, top)``: ``S = kf^T v`` (B, M, dv), ``z = kf^T 1`` (B, M), the per-feature
    key maximum ``top`` (B, M), for contiguous ``k`` (B, L, d), ``v`` (B, L, dv) and the
    pre-scaled rows ``w`` (M, d) (float32)."""
    nb, length, d = k.shape
    dv, m = v.shape[-1], w.shape[0]
    bm, bl = _block(m), _block(length)
    span = _span(k, length, nb * triton.cdiv(m, bm), bl)
    splits = triton.cdiv(length, span)
    s = torch.empty((nb, splits, m, dv), dtype=torch.float32, device=k.device)
    z = torch.empty((nb, splits, m), dtype=torch.float32, device=k.device)
    top = torch.empty((nb, splits, m), dtype=torch.float32, device=k.device)
    grid = (nb, triton.cdiv(m, bm), splits)
    _key_state_kernel[grid](
        k, v, w, k if mask is None else mask, k if bias is None else bias, s, z, top,
        length, d, dv, m, span, splits, 0.5 * scale, 0.5 * math.log(m),
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        BL=bl, BD=_block(d, 256), BDV=_block(dv, 256), BM=bm,
        PRECISION=_precision(k),
    )  # fmt: skip
    if splits == 1:
        top = top[:, 0]
        return s[:, 0], z[:, 0], torch.where(top == NEG_INF, 0.0, top)
    # The exact combination: every part rescaled to the overall maximum (factors <= 1).
    best = top.amax(dim=1)
    best = torch.where(best == NEG_INF, 0.0, best)
    factor = torch.exp(top - best[:, None])
    s = (s * factor[..., None]).sum(dim=1)
    z = (z * factor).sum(dim=1)
    return s, z, best


def _span(x: torch.Tensor, length: int, programs: int, bl: int) -> int:
    """Keys per program of the key-state kernel (a multiple of the key block).

    On a GPU the keys are split so that about four programs per multiprocessor run
    (at least 1024 keys each); under the interpreter one block per program, so that
    the tests exercise the combination of partial states.
    """
    if x.device.type != "cuda":
        return bl
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    wanted = max(1, (4 * sms) // max(1, programs))
    span = max(1024, triton.cdiv(length, wanted))
    return triton.cdiv(span, bl) * bl


def readout(
    q: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    top: torch.Tensor,
    out_dtype: Any,
) -> torch.Tensor:
    """``D^-1 qf [S, z]`` for contiguous ``q`` (B, L, d): shape (B, L, dv)."""
    nb, length, d = q.shape
    m, dv = s.shape[-2], s.shape[-1]
    out = torch.empty((nb, length, dv), dtype=out_dtype, device=q.device)
    bq = _block(length)
    grid = (nb, triton.cdiv(length, bq))
    _readout_kernel[grid](
        q, w, s, z, top, out, length, d, dv, m,
        BQ=bq, BD=_block(d, 256), BDV=_block(dv, 256), BM=_block(m),
        PRECISION=_precision(q),
    )  # fmt: skip
    return out


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    hyperbolic: bool,
) -> torch.Tensor:
    """Fused bidirectional attention of batched, contiguous (B, L, .) inputs."""
    rows = w.to(torch.float32) * math.sqrt(scale)
    if hyperbolic:
        rows = torch.cat([rows, -rows], dim=0)
    rows = rows.contiguous()
    s, z, top = key_state(k, v, rows, mask, bias, scale)
    return readout(q, rows, s, z, top, v.dtype)
