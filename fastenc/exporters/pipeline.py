"""``fastenc export``: checkpoint -> ONNX (+ ORT-optimised, int8) -> TensorRT engine / AOTInductor package.

Each artifact is one idempotent step (reused when its recorded inputs match, rebuilt with
``force``), written under a temporary name and renamed; ``verify`` runs at the end.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import weights
from ..fileio import atomic_write
from ..config import get_size, max_length_for
from ..errors import BackendUnavailable, ConfigError
from ..model import T5Encoder
from .artifacts import (EXPORT_VERSION, KIND_DIRS, build_step, checkpoint_fingerprint, write_json, write_manifest,
                        write_sidecar)
from .contract import Profile, dtype_name, make_profile

log = logging.getLogger("fastenc")

DEFAULT_MAX_BATCH = 4


@dataclass(frozen=True)
class ExportRequest:
    """What to export; mirrors the ``fastenc export`` flags."""

    out: Path
    checkpoint: str | None = None
    size: str | None = None
    random_init: bool = False
    seed: int = 0
    tokenizer: str | None = None
    dtype: str | None = None  # default: bf16 with --trt, else fp32
    trt: bool = False
    aoti: bool = False
    int8: bool = False
    max_batch: int = DEFAULT_MAX_BATCH
    max_seq: int | None = None  # default: the target's max length
    target: str = "flux-dev"
    device: str | None = None  # where the AOTInductor package runs (default cpu; the engine is always cuda)
    force: bool = False
    verify: bool = True
    opset: int = 18
    external_data_threshold: int | None = None  # bytes; None = the ONNX default (1 GiB)


@dataclass
class ExportResult:
    directory: Path
    artifacts: list[Path] = field(default_factory=list)
    built: list[Path] = field(default_factory=list)
    report: Any = None  # verify.Report


class _Source:
    """The model to export, loaded lazily (a fully reused export never loads weights)."""

    def __init__(self, req: ExportRequest):
        self.req = req
        if req.random_init == (req.checkpoint is not None):
            raise ConfigError("pass --checkpoint DIR|HUB_ID, or --size SIZE --random-init")
        if req.random_init:
            self.size = req.size or "base"
            self.cfg = get_size(self.size)
            self.path = None
            self.spec = {"kind": "random-init", "size": self.size, "seed": req.seed}
            from .. import __version__

            text = f"random-init:{self.size}:{req.seed}:fastenc-{__version__}"
            self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:32]
        else:
            if req.size is not None:
                get_size(req.size)
            self.size = req.size
            self.path = weights.resolve_checkpoint(req.checkpoint)
            source = weights.open_source(self.path)
            layout, prefix = weights.detect_layout(source.keys)
            self.cfg = weights.read_config(self.path, source, layout, prefix)
            self.spec = {"kind": "checkpoint", "path": str(self.path.resolve()), "size": req.size}
            self.fingerprint = checkpoint_fingerprint(self.path)
        self._key: tuple[str, str] | None = None
        self._encoder = None

    def encoder(self, dtype: str, device: torch.device):
        """A torch-backend :class:`fastenc.Encoder` in ``dtype`` on ``device`` (one kept at a time)."""
        key = (dtype, str(device))
        if key != self._key:
            self._encoder = None
            gc.collect()
            from ..api import load

            if self.path is None:
                self._encoder = load(size=self.size, random_init=True, seed=self.req.seed, backend="torch",
                                     device=device, dtype=dtype, cache=False)
            else:
                self._encoder = load(self.path, size=self.size, backend="torch", device=device, dtype=dtype,
                                     tokenizer=self.req.tokenizer, cache=False)
            self._key = key
        return self._encoder

    def model(self, dtype: str, device: torch.device) -> T5Encoder:
        return self.encoder(dtype, device).model.eval()

    def tokenizer(self):
        from ..api import _find_tokenizer

        ckpt_dir = None if self.path is None else (self.path if self.path.is_dir() else self.path.parent)
        return _find_tokenizer(self.req.tokenizer, ckpt_dir)


def _validate(req: ExportRequest) -> tuple[str, Profile, torch.device]:
    max_len = max_length_for(req.target)
    dtype = dtype_name(req.dtype) or ("bf16" if req.trt else "fp32")
    profile = make_profile(req.max_batch, req.max_seq if req.max_seq is not None else max_len)
    aoti_device = torch.device(req.device or "cpu")
    if aoti_device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {req.device!r}")
    if req.aoti and aoti_device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--aoti --device cuda needs a CUDA GPU and none is visible")
    if req.trt:  # before anything is written
        from .tensorrt import import_tensorrt, require_gpu

        import_tensorrt()
        require_gpu()
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    return dtype, profile, aoti_device


def export(req: ExportRequest) -> ExportResult:
    """Run every requested step; raises :class:`~fastenc.exporters.verify.VerificationFailed` when an
    artifact misses its accuracy bound."""
    dtype, profile, aoti_device = _validate(req)
    src = _Source(req)
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out)
    _write_model_files(out, src)

    onnx_dtypes = [dtype] + (["fp32"] if req.int8 and dtype != "fp32" else [])
    onnx_meta: dict[str, dict[str, Any]] = {}
    for dt in onnx_dtypes:
        path, meta = _onnx_step(out, src, dt, profile, req, result)
        onnx_meta[dt] = meta
        _ort_step(out, path, meta, req, result)
    if req.int8:
        _int8_step(out, onnx_meta["fp32"], req, result)
    if req.trt:
        _trt_step(out, onnx_meta[dtype], dtype, profile, req, result)
    if req.aoti:
        _aoti_step(out, src, dtype, profile, aoti_device, req, result)
    write_manifest(out, source=src.spec, fingerprint=src.fingerprint, cfg=src.cfg, target=req.target,
                   profile=profile, artifacts=result.artifacts)
    src._encoder = None
    if req.verify:
        from .verify import raise_on_failure, verify

        result.report = verify(out)
        raise_on_failure(result.report)
    return result


def _write_model_files(out: Path, src: _Source) -> None:
    """config.json (+ tokenizer files) so that ``fastenc.load(out, backend=...)`` has config and tokenizer."""
    config = src.cfg.to_hf_dict()
    write_json(out / weights.CONFIG_NAME, config)
    tok = src.tokenizer()
    if tok is not None:
        tok.save(out)
        if src.path is not None:  # special-token names, when the checkpoint has them
            base = src.path if src.path.is_dir() else src.path.parent
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                for folder in (base, base / "tokenizer_2", base / "tokenizer"):
                    if (folder / name).is_file():
                        atomic_write(out / name, lambda p, f=folder / name: shutil.copyfile(f, p))
                        break


def _record(result: ExportResult, path: Path, built: bool) -> None:
    result.artifacts.append(path)
    if built:
        result.built.append(path)


def _onnx_step(out: Path, src: _Source, dtype: str, profile: Profile, req: ExportRequest,
               result: ExportResult) -> tuple[Path, dict[str, Any]]:
    from .onnx import EXTERNAL_DATA_THRESHOLD, export_onnx

    threshold = req.external_data_threshold if req.external_data_threshold is not None else EXTERNAL_DATA_THRESHOLD
    path = out / KIND_DIRS["onnxruntime"] / f"encoder.{dtype}.onnx"
    inputs = {"export_version": EXPORT_VERSION, "fingerprint": src.fingerprint, "dtype": dtype, "opset": req.opset,
              "profile": profile.to_dict(), "external_data_threshold": threshold}

    def build() -> dict[str, Any]:
        files = export_onnx(src.model(dtype, torch.device("cpu")), path, profile, opset=req.opset,
                            external_data_threshold=threshold)
        return write_sidecar(path, kind="onnx", backend="onnxruntime", dtype=dtype, inputs=inputs, profile=profile,
                             files=files, opset=req.opset, torch_version=torch.__version__)

    meta, built = build_step(path, inputs, build, force=req.force, what=f"ONNX export ({dtype})")
    _record(result, path, built)
    return path, meta


def _ort_step(out: Path, onnx_path: Path, onnx_meta: dict[str, Any], req: ExportRequest, result: ExportResult) -> None:
    from .onnx import _require_ort, optimize_for_ort

    ort = _require_ort()
    dtype = onnx_meta["dtype"]
    path = onnx_path.with_name(f"encoder.{dtype}.ort-cpu.onnx")
    inputs = {"source": onnx_meta["inputs"], "onnxruntime": ort.__version__, "level": "extended",
              "provider": "cpu"}
    profile = Profile.from_dict(onnx_meta["profile"])

    def build() -> dict[str, Any]:
        files = optimize_for_ort(onnx_path, path)
        return write_sidecar(path, kind="onnx-ort", backend="onnxruntime", dtype=dtype, inputs=inputs,
                             profile=profile, files=files, optimized_for="CPUExecutionProvider")

    try:
        meta, built = build_step(path, inputs, build, force=req.force, what=f"ONNX Runtime optimisation ({dtype})")
    except BackendUnavailable as exc:
        log.info("no CPU-optimised ONNX Runtime model for %s: %s (the plain model serves CUDA and TensorRT)", dtype, exc)
        return
    _record(result, path, built)


def _int8_step(out: Path, fp32_meta: dict[str, Any], req: ExportRequest, result: ExportResult) -> None:
    from .onnx import _require_ort, quantize_int8

    ort = _require_ort()
    src_path = out / KIND_DIRS["onnxruntime"] / "encoder.fp32.onnx"
    path = src_path.with_name("encoder.int8.onnx")
    inputs = {"source": fp32_meta["inputs"], "onnxruntime": ort.__version__,
              "scheme": "dynamic int8, per-channel weights, weight MatMuls only"}
    profile = Profile.from_dict(fp32_meta["profile"])

    def build() -> dict[str, Any]:
        files = quantize_int8(src_path, path)
        return write_sidecar(path, kind="onnx-int8", backend="onnxruntime", dtype="int8", inputs=inputs,
                             profile=profile, files=files, optimized_for="CPUExecutionProvider")

    meta, built = build_step(path, inputs, build, force=req.force, what="int8 dynamic quantisation")
    _record(result, path, built)


def _trt_step(out: Path, onnx_meta: dict[str, Any], dtype: str, profile: Profile, req: ExportRequest,
              result: ExportResult) -> None:
    from .tensorrt import TIMING_CACHE_NAME, build_engine, engine_name, gpu_metadata, import_tensorrt, require_gpu

    trt = import_tensorrt()
    capability = require_gpu()
    trt_dir = out / KIND_DIRS["tensorrt"]
    path = trt_dir / engine_name(trt.__version__, capability, dtype)
    onnx_path = out / KIND_DIRS["onnxruntime"] / f"encoder.{dtype}.onnx"
    build_info = gpu_metadata(trt.__version__)
    inputs = {"source": onnx_meta["inputs"], "tensorrt": trt.__version__,
              "compute_capability": build_info["compute_capability"], "profile": profile.to_dict(),
              "strongly_typed": True}

    def build() -> dict[str, Any]:
        build_engine(onnx_path, path, profile, timing_cache=trt_dir / TIMING_CACHE_NAME)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return write_sidecar(path, kind="tensorrt", backend="tensorrt", dtype=dtype, inputs=inputs, profile=profile,
                             files=[path], sha256=digest, onnx=onnx_path.name, **build_info)

    meta, built = build_step(path, inputs, build, force=req.force, what=f"TensorRT engine ({dtype})")
    _record(result, path, built)


def _aoti_step(out: Path, src: _Source, dtype: str, profile: Profile, device: torch.device, req: ExportRequest,
               result: ExportResult) -> None:
    from .aoti import compile_package, describe_build, host_isa, package_name, profile_metadata

    path = out / KIND_DIRS["aoti"] / package_name(dtype, device)
    target_hw = host_isa() if device.type == "cpu" else "sm{}{}".format(*torch.cuda.get_device_capability(device))
    inputs = {"export_version": EXPORT_VERSION, "fingerprint": src.fingerprint, "dtype": dtype,
              "device": device.type, "hardware": target_hw, "profile": profile.to_dict(),
              "torch": torch.__version__}

    def build() -> dict[str, Any]:
        path.parent.mkdir(parents=True, exist_ok=True)
        compile_package(src.model(dtype, device), path, profile, metadata=profile_metadata(profile))
        return write_sidecar(path, kind="aoti", backend="aoti", dtype=dtype, inputs=inputs, profile=profile,
                             files=[path], **describe_build(path, device))

    meta, built = build_step(path, inputs, build, force=req.force, what=f"AOTInductor package ({dtype}, {device.type})")
    _record(result, path, built)

