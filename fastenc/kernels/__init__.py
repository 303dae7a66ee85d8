"""Fused Triton kernels for the student encoder, one file per op (kernel, launcher, torch reference).

- :mod:`.rms_norm`: residual add + T5 RMSNorm
- :mod:`.attention`: flash-style attention with the T5 relative-position bias computed in-kernel
- :mod:`.gated_ffn`: GEMM against ``cat(wi_0, wi_1)`` with the tanh-GELU x gate epilogue
- :mod:`.linear_relu`: GEMM with a ReLU (or other activation) epilogue
- :mod:`.ops`: :class:`TritonOps`, the op table the model runs with
- :mod:`.graphs`: CUDA-graph capture of the whole forward per (batch, seq) bucket
- :mod:`.tuning`: autotuning choices per GPU kind, kept between processes under fastenc's cache folder
- :mod:`.offline`: the kernels' launches compiled for an NVIDIA architecture without a GPU (shared-memory check)

CUDA tensors run compiled kernels; CPU tensors run the same kernel sources through triton's
interpreter (slow; for tests), see :mod:`._common`.
"""

from __future__ import annotations

import torch

import logging

from ..errors import BackendUnavailable
from ._common import interpreter_requested
from .ops import TritonOps

__all__ = ["TritonOps", "triton_ops", "compiled_kernels_available"]

log = logging.getLogger("fastenc")


def compiled_kernels_available() -> bool:
    """False when TRITON_INTERPRET=1 was set at import: triton then hands out interpreted kernels only."""
    from . import attention, gated_ffn, linear_relu, rms_norm

    kernels = [m._KERNEL for m in (attention, gated_ffn, linear_relu, rms_norm)] + [attention._KERNEL_FP32]
    return all(k._gpu_compiled for k in kernels)


def triton_ops(device: torch.device | str) -> TritonOps:
    """The Triton op table for ``device``.

    CUDA needs a visible GPU. CPU is accepted only with ``TRITON_INTERPRET=1`` (triton's
    interpreter: correct but orders of magnitude slower than the torch backend).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"backend 'triton' on {device}: no CUDA GPU is visible to torch")
        if not compiled_kernels_available():
            raise BackendUnavailable(
                f"backend 'triton' on {device}: TRITON_INTERPRET=1 was set when fastenc's kernels were imported, "
                "so they would run in triton's CPU interpreter; unset TRITON_INTERPRET to run them on the GPU")
        if interpreter_requested():
            log.warning("fastenc: TRITON_INTERPRET=1 is set but the encoder is on %s: its kernels run compiled on "
                        "the GPU (the interpreter only runs CPU tensors)", device)
        return TritonOps(device)
    if device.type == "cpu" and interpreter_requested():
        return TritonOps(device)
    raise BackendUnavailable(
        f"backend 'triton' needs a CUDA device, got {device.type!r}; use backend='torch' on CPU "
        "(or set TRITON_INTERPRET=1 to run the kernels in triton's slow CPU interpreter)"
    )
