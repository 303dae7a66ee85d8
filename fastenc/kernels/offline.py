"""The GPU build checked without a GPU: each kernel's launch at the base student's widths, recorded on
the CPU and compiled ahead of time for an NVIDIA architecture with triton's bundled ``ptxas``
(:meth:`~fastenc.kernels._common.Kernel.compile_for`), and what it asks of that architecture's shared
memory. ``tests/test_kernels.py`` compiles every config at bf16 for sm_80 and sm_90;
``scripts/compile_matrix.py`` prints the whole matrix (sm_75..sm_90, bf16/fp16/fp32)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from ..errors import ConfigError

#: Shared memory one block may use (the opt-in maximum), per architecture: T4 / RTX 20xx (sm_75),
#: A100 / A30 (sm_80), RTX 30xx / A10 (sm_86), Jetson Orin (sm_87), L4 / RTX 40xx (sm_89), H100 / H200 (sm_90).
SMEM_PER_BLOCK = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
OPS = ("rms_norm", "attention", "gated_ffn", "linear_relu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def ptxas() -> Path:
    """triton's bundled ``ptxas`` (what compiles for an NVIDIA architecture without a GPU or a CUDA install)."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def have_ptxas() -> bool:
    return ptxas().exists()


def record_launch(op: str, dtype: torch.dtype, *, masked: bool = True):
    """``(kernel, (args, kwargs))``: one launch of ``op`` in ``dtype`` at the base student's widths
    (d_model 768, 12 heads of 64, L = 512, the 4096-wide projector), recorded instead of run. Attention
    gets a padding mask (``masked``), as the CUDA-graph runner always passes one."""
    from . import attention, gated_ffn, linear_relu, rms_norm
    from .ops import TritonOps

    if op == "rms_norm":
        x, w = torch.randn(2, 8, 768).to(dtype), torch.ones(768, dtype=dtype)
        kernel, call = rms_norm._KERNEL, lambda: rms_norm.add_rms_norm(x, x, w, 1e-6)
    elif op == "attention":
        q = torch.randn(2, 12, 512, 64).to(dtype)
        mask = torch.ones(2, 512) if masked else None
        bias = TritonOps("cpu").position_bias(torch.randn(32, 12), 512, mask, 32, 128, dtype)
        kernel, call = attention.kernel_for(dtype), lambda: attention.rel_attention(q, q, q, bias)
    elif op == "gated_ffn":
        x, w = torch.randn(16, 768).to(dtype), torch.randn(4096, 768).to(dtype)
        kernel, call = gated_ffn._KERNEL, lambda: gated_ffn.gated_ffn(x, w, "gelu_new", dtype)
    elif op == "linear_relu":
        x, w = torch.randn(16, 768).to(dtype), torch.randn(4096, 768).to(dtype)
        kernel, call = linear_relu._KERNEL, lambda: linear_relu.linear_relu(x, w)
    else:
        raise ConfigError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    with kernel.recording() as calls:
        call()
    (launch,) = calls  # one launch per op
    return kernel, launch


@dataclass
class Build:
    """One kernel config compiled for one architecture."""

    op: str
    dtype: str
    arch: int
    config: str
    shared: int = 0  # bytes of shared memory the compiled kernel asks for
    error: str = ""

    @property
    def limit(self) -> int:
        return SMEM_PER_BLOCK[self.arch]

    @property
    def fits(self) -> bool:
        return not self.error and self.shared <= self.limit


def describe(config: Any) -> str:
    if config is None:
        return "(no autotune configs)"
    meta = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
    return f"{meta} w{config.num_warps} s{config.num_stages}"


def build(op: str, dtype_name: str, arch: int, config: Any = None, launch=None) -> Build:
    """Compile ``op``'s launch in ``dtype_name`` with ``config`` (None: a kernel without configs) for sm_<arch>."""
    kernel, (args, kwargs) = launch or record_launch(op, DTYPES[dtype_name])
    result = Build(op, dtype_name, arch, describe(config))
    try:
        compiled = kernel.compile_for(args, kwargs, arch=arch, config=config, UPCAST=False)
        result.shared = int(compiled.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - a compile failure is the result
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    return result


def builds(op: str, dtype_name: str, arch: int) -> list[Build]:
    """Every config of ``op``'s kernel for ``dtype_name`` (the full list, whatever ``FASTENC_AUTOTUNE`` says)."""
    launch = record_launch(op, DTYPES[dtype_name])
    return [build(op, dtype_name, arch, c, launch) for c in (launch[0].all_configs or [None])]
