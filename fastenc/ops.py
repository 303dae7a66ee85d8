"""The hot operations of the encoder, as one swappable table.

The model (``fastenc/model.py``) calls only these; the torch implementations here are
the numerical reference. A backend that fuses ops (e.g. Triton) subclasses
:class:`TorchOps` and overrides what it accelerates, so the block structure is never
copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bidirectional bucketing of ``key_pos - query_pos`` (integer tensor, any shape).

    Half the buckets encode the sign; within a half, distances below ``num_buckets // 4``
    get one bucket each and larger ones are spaced logarithmically up to ``max_distance``.
    """
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    n = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu_new":
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    return F.relu(x)


class TorchOps:
    """Reference implementations in plain PyTorch (also the CPU production path)."""

    name = "torch"

    # -- norms -------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """T5 RMSNorm: normalise in fp32, cast to the weight's dtype if half, scale."""
        var = x.float().pow(2).mean(-1, keepdim=True)  # [B, L, 1]
        y = x.float() * torch.rsqrt(var + eps)
        if weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(weight.dtype)
        return weight * y

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(residual + delta, rms_norm(residual + delta))``; the sum keeps the residual's dtype."""
        summed = residual + delta.to(residual.dtype)
        return summed, self.rms_norm(summed, weight, eps)

    # -- attention ---------------------------------------------------------------------
    def position_bias(
        self,
        table: torch.Tensor,  # [num_buckets, H]
        seq_len: int,
        mask: torch.Tensor | None,  # [B, L] (1 = token, 0 = padding) or None
        num_buckets: int,
        max_distance: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Additive attention bias [B|1, H, L, L]: relative-position bias plus key-padding mask."""
        pos = torch.arange(seq_len, device=table.device)
        rel = pos[None, :] - pos[:, None]  # [Lq, Lk]: key - query
        buckets = relative_position_bucket(rel, num_buckets, max_distance)
        bias = F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0).to(dtype).contiguous()  # [1, H, L, L]
        if mask is not None:
            pad = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # [B, 1, 1, L]
            bias = bias + pad
        return bias

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, L, dk]; bias: [B|1, H, L, L]; no 1/sqrt(dk) scaling (T5)."""
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # [B, H, L, L]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, v)  # [B, H, L, dk]

    # -- feed-forward / projector ------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def gated_act_linear(self, x: torch.Tensor, wi: torch.Tensor, act: str, out_dtype: torch.dtype) -> torch.Tensor:
        """``act(x @ wi_0.T) * (x @ wi_1.T)`` with ``wi = cat([wi_0, wi_1])``: [B, L, D] -> [B, L, F]."""
        h = F.linear(x, wi)  # [B, L, 2F]
        h0, h1 = h.chunk(2, dim=-1)
        if out_dtype != h.dtype:  # fp16 compute with an fp32 output projection: multiply in fp32
            h0, h1 = h0.to(out_dtype), h1.to(out_dtype)
        return activation(h0, act) * h1

    def act_linear(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """``act(x @ w.T + b)`` (plain T5 FFN input, projector's first layer)."""
        return activation(F.linear(x, w, b).to(out_dtype), act)


TORCH_OPS = TorchOps()
