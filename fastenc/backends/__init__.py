"""Backends: each turns (input_ids [B, L], attention_mask [B, L] | None) into [B, L, P].

``torch`` runs :class:`fastenc.model.T5Encoder` with the reference op table; op-swapping
backends (``triton``) run the same module with another op table; graph backends
(``onnxruntime``, ``tensorrt``, ``aoti``) consume an artifact exported from it.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailable, ConfigError

BACKENDS = ("torch", "cpu", "triton", "onnxruntime", "tensorrt", "aoti")


def op_table(name: str, device: torch.device):
    """The op table an op-swapping backend installs into the model."""
    if name == "torch":
        from ..ops import TORCH_OPS

        return TORCH_OPS
    if name == "triton":
        try:
            from ..kernels import triton_ops
        except ImportError as exc:
            raise BackendUnavailable(f"backend 'triton' needs the triton package ({exc})") from None
        return triton_ops(device)
    raise ConfigError(f"backend {name!r} does not swap ops")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Validate a backend name; ``auto`` picks the fastest one usable on ``device``.

    On the CPU that is ``cpu`` (bf16 with planned int8 GEMMs, :mod:`fastenc.backends.cpu`) when the CPU
    has native bf16 and no dtype other than bf16 was asked for; else ``torch``."""
    if name == "auto":
        if device.type == "cuda" and _triton_importable():
            return "triton"
        if device.type == "cpu" and dtype in (None, torch.bfloat16):
            from .cpu import fast_path_supported

            if fast_path_supported()[0]:
                return "cpu"
        return "torch"
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return name
