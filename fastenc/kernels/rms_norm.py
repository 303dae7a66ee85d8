"""Residual add + T5 RMSNorm in one pass over each row.

    s = residual + delta                (rounded to the residual's dtype, stored)
    y = weight * (s / sqrt(mean(s^2) + eps))

The normalisation runs in fp32; when the weight is 16-bit the normalised row is rounded to the
weight's dtype before the multiply, exactly like T5 (and :meth:`fastenc.ops.TorchOps.rms_norm`).
One program normalises one row; the row is read once and both outputs written once.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ..ops import TORCH_OPS
from ._common import SUM, Kernel, next_pow2, rows


def _add_rms_norm_kernel(
    X,  # *residual [M, N], row stride stride_x
    D,  # *delta [M, N], row stride stride_d (unused unless HAS_DELTA)
    W,  # *weight [N]
    S,  # *out: residual + delta [M, N] in the residual's dtype (unused unless HAS_DELTA)
    Y,  # *out: normalised rows [M, N] in the weight's dtype
    stride_x,
    stride_d,
    stride_s,
    stride_y,
    N,  # row length (d_model)
    eps,
    HAS_DELTA: tl.constexpr,  # add delta to the residual first
    HALF_WEIGHT: tl.constexpr,  # weight is fp16/bf16: round the normalised row before the multiply
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < N
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(D + row * stride_d + cols, mask=valid, other=0.0).to(tl.float32)
        d = d.to(X.dtype.element_ty).to(tl.float32)  # delta.to(residual.dtype)
        s = (x + d).to(X.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=valid)
        x = s.to(tl.float32)
    var = tl.reduce(x * x, 0, SUM) / N
    y = x * tl.rsqrt(var + eps)
    if HALF_WEIGHT:
        y = y.to(W.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * y).to(Y.dtype.element_ty), mask=valid)


_KERNEL = Kernel(_add_rms_norm_kernel)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + delta, rms_norm(residual + delta))``; with ``delta=None`` the first is ``residual``.

    residual, delta: [..., N]; weight: [N]. The sum keeps the residual's dtype, the normalised
    output takes the weight's dtype (what T5 and the torch reference produce).
    """
    shape, N = residual.shape, residual.shape[-1]
    x = rows(residual)  # [M, N]
    M = x.shape[0]
    y = torch.empty((M, N), dtype=weight.dtype, device=x.device)
    if delta is not None:
        d = rows(delta)
        s = torch.empty_like(x)
    else:
        d, s = x, x
    if M:
        block = next_pow2(N)
        _KERNEL(
            x.device, lambda meta: (M,),
            x, d, weight, s, y,
            x.stride(0), d.stride(0), s.stride(0), y.stride(0),
            N, eps,
            HAS_DELTA=delta is not None,
            HALF_WEIGHT=weight.dtype in (torch.float16, torch.bfloat16),
            BLOCK_N=block,
            num_warps=_num_warps(block),
        )
    summed = s.view(shape) if delta is not None else residual
    return summed, y.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5 RMSNorm of ``x`` [..., N] (no residual add)."""
    return add_rms_norm(x, None, weight, eps)[1]


def reference(
    residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference: :class:`fastenc.ops.TorchOps`' add + RMSNorm."""
    if delta is None:
        return residual, TORCH_OPS.rms_norm(residual, weight, eps)
    return TORCH_OPS.add_rms_norm(residual, delta, weight, eps)
