"""Environment report for ``fastenc info``: versions, GPU, usable backends."""

from __future__ import annotations

import importlib
import platform

import torch


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # missing or broken install
        return "not installed"


def usable_backends() -> dict[str, str]:
    """backend name -> 'yes' or the reason it is not usable here."""
    out = {"torch": "yes"}
    from .backends.cpu import fast_path_supported

    ok, why = fast_path_supported()
    out["cpu"] = "yes (default on this CPU)" if ok else f"no ({why})"
    cuda = torch.cuda.is_available()
    out["triton"] = ("yes" if cuda else "no (needs a CUDA GPU)") if _version("triton") != "not installed" \
        else "no (triton not installed)"
    out["onnxruntime"] = "yes" if _version("onnxruntime") != "not installed" else "no (onnxruntime not installed)"
    trt = _version("tensorrt")
    out["tensorrt"] = ("yes" if cuda else "no (needs a CUDA GPU)") if trt != "not installed" else "no (tensorrt not installed)"
    out["aoti"] = "yes" if hasattr(torch, "_inductor") else "no (torch without inductor)"
    return out


def collect() -> dict[str, str]:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("fastenc", "torch", "triton", "onnxruntime", "tensorrt", "transformers", "diffusers"):
        info[mod] = _version(mod)
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(i)
        info["gpu"] = f"{torch.cuda.get_device_name(i)} (compute capability {major}.{minor})"
    else:
        info["gpu"] = "none (CPU only)"
    info["cpu threads"] = str(torch.get_num_threads())
    for name, status in usable_backends().items():
        info[f"backend {name}"] = status
    return info
