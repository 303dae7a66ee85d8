"""Flash-style T5 self-attention with the relative-position bias computed in the kernel.

For one (batch b, head h) and a tile of queries i, keys j are visited in tiles with an online
softmax (running max ``m``, running sum ``l``, rescaled accumulator)::

    s_ij = q_i . k_j + table[bucket(j - i), h]      (no 1/sqrt(d) scaling in T5)
    s_ij = -1e30 where mask[b, j] == 0              (every padded key alike)
    o_i  = sum_j softmax_j(s_ij) v_j

``bucket`` is T5's bidirectional bucketing (half the buckets per sign; one bucket per distance
below ``max_exact = num_buckets // 4``, logarithmic steps up to ``max_distance``) evaluated per
score from the query and key positions, so only the [num_buckets, H] table is read and no
[H, L, L] bias exists. The logarithmic part is a staircase: with ``steps[s]`` the smallest
distance of bucket ``max_exact + 1 + s`` (a handful of integers, derived once from
:func:`fastenc.ops.relative_position_bucket` itself), a distance ``d`` falls in bucket
``min(d, max_exact) + #{s : d >= steps[s]}``. Integer compares instead of a per-score logarithm
keep the kernel's buckets identical to the reference's on every device, ties included (distance
16, 32, 64 at 32 buckets / 128), and cost less than a software ``log`` per score.
Q, K and V are strided [B, H, L, dk] views of the fused QKV projection output (no copies); the
output is written as [B, L, H, dk] so the model's transpose + reshape to [B, L, H*dk] is free.

A query whose keys are all padding gets the uniform average over every key, as the dense
reference does (its additive mask is the same for all keys).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops import TORCH_OPS, relative_position_bucket
from ._common import MAX, SUM, Kernel, attention_smem, dot_precision, next_pow2

LOG2E = tl.constexpr(1.4426950408889634)  # constexpr so the kernel may read it


def _rel_attention_kernel(
    Q,  # *[B, H, L, dk] queries (strided view, unit stride on dk)
    K,  # *[B, H, L, dk] keys
    V,  # *[B, H, L, dk] values
    TABLE,  # *[num_buckets, H] relative-position bias table (row stride stride_t, unit stride on H)
    MASK,  # *[B, L] int32 key mask, 1 = token, 0 = padding (unused unless HAS_MASK)
    STEPS,  # *[NUM_STEPS] int32 smallest distance of each logarithmic bucket past max_exact
    O,  # *[B, H, L, dk] output
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_t,
    stride_mb,
    H,  # heads
    L,  # sequence length
    DK,  # head dim
    L_BUCKET,  # next power of two >= L (autotuning key only)
    HALF_BUCKETS: tl.constexpr,  # num_buckets // 2
    MAX_EXACT: tl.constexpr,  # num_buckets // 4
    NUM_STEPS: tl.constexpr,  # HALF_BUCKETS - MAX_EXACT - 1
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: compute in fp32 from the first load
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two >= max(DK, 16)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DK

    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < L) & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n  # key positions [BLOCK_N]
        in_seq = cols < L
        kt = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None],
                     mask=in_seq[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :],
                    mask=in_seq[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] fp32

        # T5 bidirectional bucket of (key - query), then the bias gathered from the table
        rel = cols[None, :] - offs_m[:, None]  # [BLOCK_M, BLOCK_N]
        dist = tl.abs(rel)
        bucket = tl.where(rel > 0, HALF_BUCKETS, 0) + tl.minimum(dist, MAX_EXACT)
        for step in tl.static_range(NUM_STEPS):
            bucket += (dist >= tl.load(STEPS + step)).to(tl.int32)
        s += tl.load(TABLE + bucket * stride_t + h).to(tl.float32)

        if HAS_MASK:
            keep = tl.load(MASK + b.to(tl.int64) * stride_mb + cols, mask=in_seq, other=0)
            s = tl.where(keep[None, :] != 0, s, -1.0e30)
        s = tl.where(in_seq[None, :], s * LOG2E, float("-inf"))

        m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, SUM)
        p = p.to(V.dtype.element_ty)  # probabilities in the value dtype, as the reference does
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < L) & d_ok[None, :])


# Hopper (sm_90, bf16, dk = 64): all compile without register spills (ptxas' resource usage);
# BLOCK_M = 32 trades wgmma for more programs when B * H * L / BLOCK_M is small (short prompts).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 3), (32, 64, 4, 2)]
]
# fp32 (IEEE dot, no tensor cores): the 16-bit tiles above spill 6-35 KB of stack per thread;
# these compile for sm_90 with no spills (ptxas -v; checked by tests/test_kernels.py).
_FP32_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 2, 2)]
]
_KEY = ["L_BUCKET", "BLOCK_D", "HAS_MASK", "DOT_PREC"]
_KERNEL = Kernel(_rel_attention_kernel, configs=_GPU_CONFIGS, key=_KEY, interpret_meta={"BLOCK_M": 32, "BLOCK_N": 64},
                 smem=attention_smem, elsize=2)  # 16-bit q/k/v only: fp32 runs _KERNEL_FP32
_KERNEL_FP32 = Kernel(_rel_attention_kernel, configs=_FP32_CONFIGS, key=_KEY,
                      interpret_meta={"BLOCK_M": 32, "BLOCK_N": 64}, smem=attention_smem, elsize=4)


def kernel_for(dtype: torch.dtype) -> Kernel:
    """The launcher's kernel for q/k/v of ``dtype``: fp32 gets its own, smaller tiles."""
    return _KERNEL_FP32 if dtype == torch.float32 else _KERNEL


@dataclass(frozen=True)
class RelativePositionBias:
    """What the fused attention needs instead of a dense [B, H, L, L] bias."""

    table: torch.Tensor  # [num_buckets, H] in the compute dtype
    mask: torch.Tensor | None  # [B, L] int32 (1 = token, 0 = padding) or None
    steps: torch.Tensor  # [half - max_exact - 1] int32, see bucket_steps
    num_buckets: int
    max_distance: int

    @classmethod
    def build(cls, table: torch.Tensor, mask: torch.Tensor | None, num_buckets: int, max_distance: int,
              dtype: torch.dtype) -> "RelativePositionBias":
        key_mask = None if mask is None else mask.to(device=table.device, dtype=torch.int32).contiguous()
        steps = _steps_on(num_buckets, max_distance, table.device)
        return cls(table.to(dtype).contiguous(), key_mask, steps, num_buckets, max_distance)


def bucket_params(num_buckets: int, max_distance: int) -> tuple[int, int]:
    """(half_buckets, max_exact) of T5's bidirectional bucketing."""
    half = num_buckets // 2
    max_exact = half // 2
    if max_exact < 1 or max_distance <= max_exact:
        raise ValueError(f"unsupported relative-attention buckets: num_buckets={num_buckets}, "
                         f"max_distance={max_distance} (need num_buckets >= 4 and max_distance > num_buckets // 4)")
    return half, max_exact


@functools.lru_cache(maxsize=None)
def bucket_steps(num_buckets: int, max_distance: int) -> tuple[int, ...]:
    """Smallest distance of each bucket ``max_exact + 1 .. half - 1`` (of either sign's half).

    Read off :func:`fastenc.ops.relative_position_bucket` over distances 0..max_distance, so a
    distance ``d`` is in bucket ``min(d, max_exact) + #{s : d >= steps[s]}`` exactly when the
    reference says so (a bucket the logarithm skips repeats the next one's distance).
    """
    half, max_exact = bucket_params(num_buckets, max_distance)
    dist = torch.arange(max_distance + 1)
    inner = relative_position_bucket(-dist, num_buckets, max_distance)  # key before query: no sign offset
    return tuple(int(dist[inner >= b][0]) for b in range(max_exact + 1, half))


_STEPS: dict[tuple[int, int, str], torch.Tensor] = {}


def _steps_on(num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """:func:`bucket_steps` as an int32 tensor on ``device``, made once (so a CUDA-graph capture,
    which follows an eager warm-up, never copies from the host)."""
    key = (num_buckets, max_distance, str(device))
    if key not in _STEPS:
        _STEPS[key] = torch.tensor(bucket_steps(num_buckets, max_distance), dtype=torch.int32, device=device)
    return _STEPS[key]


def supported(q: torch.Tensor) -> bool:
    """Head dims the kernel tiles (a [BLOCK, dk] tile must fit in registers)."""
    return q.shape[-1] <= 256 and q.stride(-1) == 1


def rel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: RelativePositionBias) -> torch.Tensor:
    """q, k, v: [B, H, L, dk] (views of the fused QKV output are fine) -> [B, H, L, dk].

    The result is a [B, H, L, dk] view of a [B, L, H, dk] buffer.
    """
    B, H, L, DK = q.shape
    if not (k.stride(-1) == v.stride(-1) == q.stride(-1) == 1):
        raise ValueError("rel_attention needs a unit stride on the head dim of q, k and v")
    if bias.table.shape[1] != H:
        raise ValueError(f"bias table has {bias.table.shape[1]} heads, q has {H}")
    out = torch.empty((B, L, H, DK), dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, H, L, dk]
    if B == 0 or L == 0:
        return out
    half, max_exact = bucket_params(bias.num_buckets, bias.max_distance)
    mask = bias.mask
    if mask is not None and mask.shape != (B, L):
        raise ValueError(f"key mask shape {tuple(mask.shape)} != (batch, seq) {(B, L)}")
    table = bias.table
    if table.stride(1) != 1:
        table = table.contiguous()
    kernel = kernel_for(q.dtype)
    interp = kernel.interpreting(q.device)
    kernel(
        q.device, lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H),
        q, k, v, table, mask if mask is not None else table, bias.steps, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        table.stride(0),
        mask.stride(0) if mask is not None else 0,
        H, L, DK, next_pow2(L),
        HALF_BUCKETS=half,
        MAX_EXACT=max_exact,
        NUM_STEPS=bias.steps.numel(),
        HAS_MASK=mask is not None,
        UPCAST=interp,
        DOT_PREC=dot_precision(q.dtype),
        BLOCK_D=max(16, next_pow2(DK)),
    )
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: RelativePositionBias) -> torch.Tensor:
    """The torch reference: dense bias from :class:`fastenc.ops.TorchOps`, then its attention."""
    mask = bias.mask
    dense = TORCH_OPS.position_bias(bias.table, q.shape[2], mask, bias.num_buckets, bias.max_distance, q.dtype)
    return TORCH_OPS.attention(q, k, v, dense)
