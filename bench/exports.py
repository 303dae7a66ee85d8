"""Exported artifacts for the benchmarks, built once through ``fastenc.exporters`` and reused.

A benchmark model (random T5-initialised weights, or a real checkpoint) is saved as a fastenc
checkpoint under the bench cache, then ``fastenc export`` turns it into ONNX / int8 ONNX /
AOTInductor / TensorRT artifacts. Every export step records its inputs and is skipped when they
match, so a second run costs a fingerprint check only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from fastenc.errors import BackendUnavailable, FastencError
from fastenc.model import T5Encoder

log = logging.getLogger("fastenc")


def cache_root() -> Path:
    root = os.environ.get("FASTENC_BENCH_CACHE")
    if root:
        return Path(root)
    from fastenc.caches import cache_root as fastenc_cache  # $FASTENC_CACHE_DIR, else ~/.cache/fastenc

    return fastenc_cache() / "bench"


def model_key(size: str, seed: int, checkpoint: str | None = None) -> str:
    """Cache folder name of a benchmark model."""
    if checkpoint is None:
        return f"{size}-t5init-seed{seed}"
    digest = hashlib.sha256(str(Path(checkpoint).resolve()).encode()).hexdigest()[:12]
    return f"checkpoint-{digest}"


def saved_checkpoint(model: T5Encoder, name: str) -> Path:
    """Save ``model`` once as ``<cache>/<name>/checkpoint`` (reused when its config.json is there)."""
    import fastenc

    directory = cache_root() / name / "checkpoint"
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        fastenc.save(model, directory)  # model.safetensors first, config.json last (each atomic)
    return directory


def export_dir(name: str) -> Path:
    return cache_root() / name / "export"


def ensure_export(checkpoint: Path, out: Path, *, int8: bool = False, aoti: bool = False, trt: bool = False,
                  dtype: str | None = None, max_batch: int = 1, max_seq: int = 512, device: str | None = None) -> Path:
    """Run ``fastenc export`` (without its verify step: the benchmarks measure accuracy themselves).

    Raises :class:`BackendUnavailable` with a one-line reason when the exporters, ONNX, TensorRT
    or a GPU are missing."""
    try:
        from fastenc.exporters.pipeline import ExportRequest, export
    except ImportError as exc:
        raise BackendUnavailable(f"fastenc.exporters is not available ({exc})") from None
    req = ExportRequest(out=out, checkpoint=str(checkpoint), dtype=dtype, int8=int8, aoti=aoti, trt=trt,
                        max_batch=max_batch, max_seq=max_seq, device=device, verify=False)
    out.parent.mkdir(parents=True, exist_ok=True)  # the bench cache's own folder (export never creates parents)
    try:
        export(req)
    except BackendUnavailable:
        raise
    except FastencError as exc:
        raise BackendUnavailable(f"export failed: {str(exc).splitlines()[0]}") from None
    return out


def onnx_file(out: Path, dtype: str) -> Path:
    """The plain (not ORT-optimised) ONNX model of ``dtype`` in an export directory."""
    from fastenc.exporters.artifacts import find_artifacts

    for path, meta in find_artifacts(out, "onnxruntime"):
        if meta.get("dtype") == dtype and meta.get("kind") in ("onnx", "onnx-int8"):
            return path
    raise BackendUnavailable(f"{out}: no {dtype} ONNX model")


class OrtSession:
    """An ONNX Runtime session over an exported model with the export contract's I/O, default
    optimisation level (what a user gets), ``threads`` intra-op threads on the CPU, intra-op spinning
    off (spinning threads slow whatever runs next on the same cores)."""

    def __init__(self, path: Path, *, threads: int | None = None, device: torch.device = torch.device("cpu")):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed ({exc})") from None
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.device = device

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.to(torch.int32).cpu().numpy()
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            feed["attention_mask"] = mask.to(torch.int32).cpu().numpy()
        return torch.from_numpy(self.session.run(None, feed)[0])
