"""The Triton op table: :class:`fastenc.ops.TorchOps` with the hot ops replaced by fused kernels.

What runs where (per layer):

- ``add_rms_norm`` / ``rms_norm``: one pass per row (:mod:`.rms_norm`).
- ``position_bias``: returns a :class:`~.attention.RelativePositionBias` (the [num_buckets, H]
  table and an int32 key mask) instead of a dense [B, H, L, L] tensor; built once per forward.
- ``attention``: the flash-style kernel reading Q/K/V straight from the fused QKV output
  (:mod:`.attention`); its result is laid out so the model's reshape to [B, L, H*dk] is free.
- ``gated_act_linear``: one GEMM against ``cat(wi_0, wi_1)`` with the GELU x gate epilogue
  (:mod:`.gated_ffn`).
- ``act_linear``: GEMM with the activation (ReLU for the projector) in the epilogue
  (:mod:`.linear_relu`).
- ``linear`` (QKV, attention output, ``wo``, projector fc2): cuBLAS through ``F.linear``; a plain
  GEMM has nothing to fuse.

Inference only: the kernels define no backward.
"""

from __future__ import annotations

import torch

from ..ops import TorchOps
from . import attention as _attention
from . import gated_ffn as _gated_ffn
from . import linear_relu as _linear_relu
from . import rms_norm as _rms_norm
from .attention import RelativePositionBias

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonOps(TorchOps):
    """Fused Triton kernels on ``device`` (CUDA; CPU tensors run through triton's interpreter)."""

    name = "triton"

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cuda")

    def __repr__(self) -> str:
        return f"TritonOps(device={self.device})"

    # -- norms -------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _rms_norm.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _rms_norm.add_rms_norm(residual, delta, weight, eps)

    # -- attention ---------------------------------------------------------------------
    def position_bias(
        self,
        table: torch.Tensor,  # [num_buckets, H]
        seq_len: int,
        mask: torch.Tensor | None,  # [B, L] (1 = token, 0 = padding) or None
        num_buckets: int,
        max_distance: int,
        dtype: torch.dtype,
    ) -> RelativePositionBias:
        """The bias table and key mask; the kernel derives each score's bias from positions."""
        return RelativePositionBias.build(table, mask, num_buckets, max_distance, dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias) -> torch.Tensor:
        """q, k, v: [B, H, L, dk] views of the fused QKV output; bias from :meth:`position_bias`."""
        if not isinstance(bias, RelativePositionBias):
            return super().attention(q, k, v, bias)  # a dense bias from elsewhere
        if q.dtype not in _KERNEL_DTYPES or not _attention.supported(q):
            dense = super().position_bias(bias.table, q.shape[2], bias.mask, bias.num_buckets,
                                          bias.max_distance, q.dtype)
            return super().attention(q, k, v, dense)
        return _attention.rel_attention(q, k, v, bias)

    # -- feed-forward / projector ------------------------------------------------------
    def gated_act_linear(self, x: torch.Tensor, wi: torch.Tensor, act: str, out_dtype: torch.dtype) -> torch.Tensor:
        return _gated_ffn.gated_ffn(x, wi, act, out_dtype)

    def act_linear(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return _linear_relu.linear_act(x, w, b, act, out_dtype)
