"""Fused Triton kernels for the student encoder, one file per op (kernel, launcher, torch reference).

- :mod:`.rms_norm`: residual add + T5 RMSNorm
- :mod:`.attention`: flash-style attention with the T5 relative-position bias computed in-kernel
- :mod:`.gated_ffn`: GEMM against ``cat(wi_0, wi_1)`` with the tanh-GELU x gate epilogue
- :mod:`.linear_relu`: GEMM with a ReLU (or other activation) epilogue
- :mod:`.ops`: :class:`TritonOps`, the op table the model runs with
- :mod:`.graphs`: CUDA-graph capture of the whole forward per (batch, seq) bucket

CUDA tensors run compiled kernels; CPU tensors run the same kernel sources through triton's
interpreter (slow; for tests), see :mod:`._common`.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from ._common import interpreter_requested
from .ops import TritonOps

__all__ = ["TritonOps", "triton_ops"]


def triton_ops(device: torch.device | str) -> TritonOps:
    """The Triton op table for ``device``.

    CUDA needs a visible GPU. CPU is accepted only with ``TRITON_INTERPRET=1`` (triton's
    interpreter: correct but orders of magnitude slower than the torch backend).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"backend 'triton' on {device}: no CUDA GPU is visible to torch")
        return TritonOps(device)
    if device.type == "cpu" and interpreter_requested():
        return TritonOps(device)
    raise BackendUnavailable(
        f"backend 'triton' needs a CUDA device, got {device.type!r}; use backend='torch' on CPU "
        "(or set TRITON_INTERPRET=1 to run the kernels in triton's slow CPU interpreter)"
    )
