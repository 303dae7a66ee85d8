"""Linear with the activation fused into the GEMM epilogue (the projector's first layer).

    y = act(x @ w^T + b)        x: [M, K], w: [N, K], b: [N] or none, y: [M, N]

``act`` is ReLU for the projector (Linear(d_model -> 4096) -> ReLU); the plain (ungated) T5 FFN
input uses the same kernel with its own activation. Accumulation is fp32; the bias is added and
the activation applied before the single rounding to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import TORCH_OPS
from ._common import (ACT_GELU_ERF, ACT_GELU_TANH, ACT_RELU, ACTIVATION_CODES, Kernel, dot_precision, gemm_smem,
                      next_pow2, rows)


def _linear_act_kernel(
    X,  # *[M, K] activations, row stride stride_xm, unit stride on K
    W,  # *[N, K] weight (nn.Linear layout), row stride stride_wn, unit stride on K
    BIAS,  # *[N] bias (unused unless HAS_BIAS)
    Y,  # *[M, N] output, row stride stride_ym
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    M_BUCKET,  # next power of two >= M (autotuning key only)
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # activation code (see _common)
    UPCAST: tl.constexpr,  # interpreter: fp32 tiles
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-tiles per group (L2 reuse of weight tiles)
):
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols load valid memory; their results are never stored
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of w^T

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(BIAS + rn).to(tl.float32)[None, :]
    if ACT == ACT_RELU:
        acc = tl.maximum(acc, 0.0)
    elif ACT == ACT_GELU_TANH:
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(-2.0 * inner))
    elif ACT == ACT_GELU_ERF:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))

    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# Hopper (sm_90, bf16): every config below compiles to wgmma without register spills (checked
# with ptxas' resource usage); 128x256 tiles spill.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 64, 8, 3),
        (64, 256, 32, 8, 3),
        (64, 64, 32, 4, 4),
        (32, 64, 32, 4, 4),  # short prompts: more programs
    ]
]
_KERNEL = Kernel(
    _linear_act_kernel,
    configs=_GPU_CONFIGS,
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "DOT_PREC"],
    interpret_meta={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
    smem=gemm_smem,
    elsize=4,  # runs fp32 too
)


def linear_act(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``act(x @ w.T + b)``: [..., K] -> [..., N] in ``out_dtype`` (``act=None``: plain linear)."""
    if act not in ACTIVATION_CODES:
        raise ValueError(f"unsupported activation {act!r}")
    K = x.shape[-1]
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"weight must be [N, {K}], got {tuple(w.shape)}")
    if b is not None and b.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(b.shape)}")
    x2 = rows(x)  # [M, K]
    w2 = w if w.stride(1) == 1 else w.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M and N:
        bias = b.contiguous() if b is not None else w2
        _KERNEL(
            x.device,
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
            x2, w2, bias, y, M, N, K, x2.stride(0), w2.stride(0), y.stride(0), next_pow2(M),
            HAS_BIAS=b is not None,
            ACT=ACTIVATION_CODES[act],
            UPCAST=_KERNEL.interpreting(x.device),
            DOT_PREC=dot_precision(x.dtype),
        )
    return y.view(*x.shape[:-1], N)


def linear_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(x @ w.T + b)`` in ``x``'s dtype."""
    return linear_act(x, w, b, "relu", x.dtype)


def reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """The torch reference: :meth:`fastenc.ops.TorchOps.act_linear` (plain ``F.linear`` for ``act=None``)."""
    if act is None:
        return TORCH_OPS.linear(x, w, b).to(out_dtype)
    return TORCH_OPS.act_linear(x, w, b, act, out_dtype)
