"""Gated FFN input: one GEMM against ``wi = cat([wi_0, wi_1])`` with the gate fused in the epilogue.

    y = act(x @ wi_0^T) * (x @ wi_1^T)        x: [M, K], wi: [2F, K], y: [M, F]

Each program owns a [BLOCK_M, BLOCK_N] tile of y and keeps two fp32 accumulators (rows n and
F + n of ``wi``), so the [M, 2F] pre-activation never reaches memory. ``act`` is T5 v1.1's
tanh-approximated GELU, ``0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))`` = ``h * sigmoid(2 inner)``,
or exact GELU / ReLU. The output dtype is the FFN output projection's (fp32 when ``wo`` is kept
out of fp16), so the following ``wo`` GEMM sees no overflow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import TORCH_OPS
from ._common import (ACT_GELU_ERF, ACT_GELU_TANH, ACT_RELU, ACTIVATION_CODES, Kernel, dot_precision, gemm_smem,
                      next_pow2, rows)


def _gated_ffn_kernel(
    X,  # *[M, K] normalised activations, row stride stride_xm, unit stride on K
    W,  # *[2F, K] fused wi_0 | wi_1, row stride stride_wn, unit stride on K
    Y,  # *[M, F] output, row stride stride_ym
    M, F, K,
    stride_xm, stride_wn, stride_ym,
    M_BUCKET,  # next power of two >= M (autotuning key only)
    ACT: tl.constexpr,  # activation code (see _common)
    UPCAST: tl.constexpr,  # interpreter: fp32 tiles
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-tiles per group (L2 reuse of wi tiles)
):
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (F + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols load valid memory; their results are never stored
    rn = offs_n % F
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w0_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of wi_0^T
    w1_ptrs = w0_ptrs + F * stride_wn  # wi_1^T

    acc0 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc1 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w0 = tl.load(w0_ptrs, mask=k_ok[:, None], other=0.0)
        w1 = tl.load(w1_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w0 = w0.to(tl.float32)
            w1 = w1.to(tl.float32)
        acc0 = tl.dot(x, w0, acc0, input_precision=DOT_PREC)
        acc1 = tl.dot(x, w1, acc1, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w0_ptrs += BLOCK_K
        w1_ptrs += BLOCK_K

    if ACT == ACT_GELU_TANH:
        inner = 0.7978845608028654 * (acc0 + 0.044715 * acc0 * acc0 * acc0)
        acc0 = acc0 / (1.0 + tl.exp(-2.0 * inner))
    elif ACT == ACT_GELU_ERF:
        acc0 = 0.5 * acc0 * (1.0 + tl.erf(acc0 * 0.7071067811865476))
    elif ACT == ACT_RELU:
        acc0 = tl.maximum(acc0, 0.0)
    y = acc0 * acc1

    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < F))


# Hopper (sm_90, bf16): every config below compiles to wgmma without register spills (checked
# with ptxas' resource usage); BLOCK_K = 64 with two 128x128 accumulators spills.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 32, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 32, 8, 4),
        (64, 128, 32, 8, 4),
        (64, 64, 64, 8, 3),
        (64, 64, 32, 4, 3),
        (32, 64, 32, 4, 4),  # short prompts: more programs
    ]
]
_KERNEL = Kernel(
    _gated_ffn_kernel,
    configs=_GPU_CONFIGS,
    key=["M_BUCKET", "F", "K", "DOT_PREC"],
    interpret_meta={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
    smem=lambda meta, stages, elsize: gemm_smem(meta, stages, elsize, b_tiles=2),  # wi_0 and wi_1 tiles
    elsize=4,  # runs fp32 too
)


def gated_ffn(x: torch.Tensor, wi: torch.Tensor, act: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``act(x @ wi_0.T) * (x @ wi_1.T)`` with ``wi = cat([wi_0, wi_1])``: [..., K] -> [..., F] in ``out_dtype``."""
    if act not in ACTIVATION_CODES or act is None:
        raise ValueError(f"unsupported activation {act!r}")
    K = x.shape[-1]
    if wi.shape[1] != K or wi.shape[0] % 2:
        raise ValueError(f"wi must be [2F, {K}], got {tuple(wi.shape)}")
    F = wi.shape[0] // 2
    x2 = rows(x)  # [M, K]
    w = wi if wi.stride(1) == 1 else wi.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, F), dtype=out_dtype, device=x.device)
    if M and F:
        _KERNEL(
            x.device,
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),),
            x2, w, y, M, F, K, x2.stride(0), w.stride(0), y.stride(0), next_pow2(M),
            ACT=ACTIVATION_CODES[act],
            UPCAST=_KERNEL.interpreting(x.device),
            DOT_PREC=dot_precision(x.dtype),
        )
    return y.view(*x.shape[:-1], F)


def reference(x: torch.Tensor, wi: torch.Tensor, act: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The torch reference: :meth:`fastenc.ops.TorchOps.gated_act_linear`."""
    return TORCH_OPS.gated_act_linear(x, wi, act, out_dtype).to(out_dtype)
