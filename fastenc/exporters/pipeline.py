"""``fastenc export``: checkpoint -> ONNX (+ ORT-optimised, int8) -> TensorRT engine / AOTInductor package.

Every flag is checked (:func:`_validate`) before anything is loaded or written. The whole export
folder is one transaction (:mod:`.transaction`): the new export is built in a staging folder beside
``--out``, each artifact one idempotent step (hard-linked from the previous export when its recorded
inputs match and its files match that export's manifest; rebuilt with ``force``), the manifest with
every file's sha256 is written last, and the staging folder is swapped in. ``verify`` runs at the end
(and checks every file against the manifest); with ``verify=False`` the manifest check still runs.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
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
from .artifacts import (EXPORT_VERSION, KIND_DIRS, MANIFEST_NAME, VERIFIED_NAME, build_step, check_export,
                        checkpoint_fingerprint, checkpoint_identity, write_json, write_manifest, write_sidecar)
from .contract import Profile, dtype_name, make_profile
from .transaction import Transaction, check_target

log = logging.getLogger("fastenc")

DEFAULT_MAX_BATCH = 4
_UNSET = object()
MIN_OPSET = 17
#: Names an export folder holds (``--out`` may hold nothing else: the swap replaces the whole folder).
EXPORT_NAMES = frozenset({weights.CONFIG_NAME, MANIFEST_NAME, VERIFIED_NAME, "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", *KIND_DIRS.values()})


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
            self.fingerprint = checkpoint_fingerprint(self.path)
            self.spec = {"kind": "checkpoint", "path": str(self.path.resolve()), "size": req.size,
                         "identity": checkpoint_identity(self.path)}  # lets a load tell "unchanged" cheaply
        self._key: tuple[str, str] | None = None
        self._encoder = None
        self._tokenizer: Any = _UNSET

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
        """The tokenizer to bundle (``--tokenizer``, else the checkpoint's), loaded once; refused when its
        ids do not fit the model's embedding table (the export would fail on them at run time)."""
        if self._tokenizer is _UNSET:
            from ..api import _find_tokenizer

            ckpt_dir = None if self.path is None else (self.path if self.path.is_dir() else self.path.parent)
            tok = _find_tokenizer(self.req.tokenizer, ckpt_dir)
            size = getattr(tok, "vocab_size", None)
            if isinstance(size, int) and size > self.cfg.vocab_size:
                what = f"--tokenizer {self.req.tokenizer}" if self.req.tokenizer is not None else \
                    f"the checkpoint's tokenizer ({ckpt_dir})"
                raise ConfigError(f"{what}: {size} token ids, but the model's embedding table has "
                                  f"{self.cfg.vocab_size} rows: not this model's tokenizer (an export bundling it "
                                  "would fail on its ids); pass the tokenizer the model was trained with")
            self._tokenizer = tok
        return self._tokenizer


def _validate(req: ExportRequest) -> tuple[str, Profile, torch.device]:
    """Every flag, before anything is loaded, allocated or written: one ConfigError naming the flag."""
    if req.out is None or not isinstance(req.out, (str, os.PathLike)) or not str(req.out):
        raise ConfigError(f"--out must be a folder path, got {req.out!r}")
    max_len = max_length_for(req.target)
    try:
        dtype = dtype_name(req.dtype) or ("bf16" if req.trt else "fp32")
    except ConfigError as exc:
        raise ConfigError(f"--dtype: {exc}") from None
    profile = make_profile(req.max_batch, req.max_seq if req.max_seq is not None else max_len)
    if not isinstance(req.seed, int) or isinstance(req.seed, bool) or not 0 <= req.seed < 2**63:
        raise ConfigError(f"--seed must be an integer in 0..2**63-1, got {req.seed!r}")
    max_opset = _max_opset()
    if not isinstance(req.opset, int) or isinstance(req.opset, bool) or not MIN_OPSET <= req.opset <= max_opset:
        raise ConfigError(f"opset must be an integer in {MIN_OPSET}..{max_opset}, got {req.opset!r}")
    threshold = req.external_data_threshold
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0):
        raise ConfigError(f"external_data_threshold must be a byte count >= 0, got {threshold!r}")
    if req.device is not None and not isinstance(req.device, (str, torch.device)):
        raise ConfigError(f"--device must be cpu or cuda, got {req.device!r}")
    try:
        aoti_device = torch.device(req.device or "cpu")
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device must be cpu or cuda, got {req.device!r}") from None
    if aoti_device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {req.device!r}")
    if req.aoti and aoti_device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--aoti --device cuda needs a CUDA GPU and none is visible")
    check_target(Path(req.out), EXPORT_NAMES)
    if req.trt:  # before anything is written
        from .tensorrt import import_tensorrt, require_gpu

        import_tensorrt()
        require_gpu()
    return dtype, profile, aoti_device


def _max_opset() -> int:
    try:
        import onnx

        return int(onnx.defs.onnx_opset_version())
    except ImportError:  # the export step says what is missing
        return 23


def export(req: ExportRequest) -> ExportResult:
    """Run every requested step; raises :class:`~fastenc.exporters.verify.VerificationFailed` when an
    artifact misses its accuracy bound (the new export is in place then, for inspection)."""
    dtype, profile, aoti_device = _validate(req)
    src = _Source(req)
    src.tokenizer()  # a tokenizer that does not fit the model: refused before anything is written
    out = Path(req.out)
    result = ExportResult(out)
    with Transaction(out) as txn:
        stage = txn.staging
        steps = _Steps(stage, txn.previous, req)
        _write_model_files(stage, src)
        onnx_dtypes = [dtype] + (["fp32"] if req.int8 and dtype != "fp32" else [])
        onnx_meta: dict[str, dict[str, Any]] = {}
        for dt in onnx_dtypes:
            path, meta = _onnx_step(steps, src, dt, profile)
            onnx_meta[dt] = meta
            _ort_step(steps, path, meta)
        if req.int8:
            _int8_step(steps, onnx_meta["fp32"])
        if req.trt:
            _trt_step(steps, onnx_meta[dtype], dtype, profile)
        if req.aoti:
            _aoti_step(steps, src, dtype, profile, aoti_device)
        src._encoder = None
        write_manifest(stage, source=src.spec, fingerprint=src.fingerprint, cfg=src.cfg, target=req.target,
                       profile=profile, artifacts=steps.artifacts)
        txn.commit()
    result.artifacts = [out / p.relative_to(stage) for p in steps.artifacts]
    result.built = [out / p.relative_to(stage) for p in steps.built]
    if req.verify:
        from .verify import raise_on_failure, verify

        result.report = verify(out)
        raise_on_failure(result.report)
    else:
        check_export(out)  # and remembers the digests, so the first load does not hash again
    return result


class _Steps:
    """Where the steps write (the staging folder) and what they may reuse (the previous export)."""

    def __init__(self, stage: Path, previous: Path | None, req: ExportRequest):
        self.stage, self.previous, self.req = stage, previous, req
        self.artifacts: list[Path] = []
        self.built: list[Path] = []

    def path(self, backend: str, name: str) -> Path:
        return self.stage / KIND_DIRS[backend] / name

    def prior(self, path: Path) -> Path | None:
        """The same artifact in the previous export, when there is one to reuse from."""
        if self.previous is None or self.req.force:
            return None
        return self.previous / path.relative_to(self.stage)

    def run(self, path: Path, inputs: dict[str, Any], build, what: str) -> tuple[dict[str, Any], bool]:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta, built = build_step(path, inputs, build, force=self.req.force, what=what, previous=self.prior(path))
        self.artifacts.append(path)
        if built:
            self.built.append(path)
        return meta, built


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


def _onnx_step(steps: _Steps, src: _Source, dtype: str, profile: Profile) -> tuple[Path, dict[str, Any]]:
    from .onnx import EXTERNAL_DATA_THRESHOLD, export_onnx

    req = steps.req
    threshold = req.external_data_threshold if req.external_data_threshold is not None else EXTERNAL_DATA_THRESHOLD
    path = steps.path("onnxruntime", f"encoder.{dtype}.onnx")
    inputs = {"export_version": EXPORT_VERSION, "fingerprint": src.fingerprint, "dtype": dtype, "opset": req.opset,
              "profile": profile.to_dict(), "external_data_threshold": threshold}

    def build() -> dict[str, Any]:
        files = export_onnx(src.model(dtype, torch.device("cpu")), path, profile, opset=req.opset,
                            external_data_threshold=threshold)
        return write_sidecar(path, kind="onnx", backend="onnxruntime", dtype=dtype, inputs=inputs, profile=profile,
                             files=files, opset=req.opset, torch_version=torch.__version__)

    meta, _ = steps.run(path, inputs, build, f"ONNX export ({dtype})")
    return path, meta


def _ort_step(steps: _Steps, onnx_path: Path, onnx_meta: dict[str, Any]) -> None:
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
        steps.run(path, inputs, build, f"ONNX Runtime optimisation ({dtype})")
    except BackendUnavailable as exc:
        log.info("no CPU-optimised ONNX Runtime model for %s: %s (the plain model serves CUDA and TensorRT)", dtype, exc)


def _int8_step(steps: _Steps, fp32_meta: dict[str, Any]) -> None:
    from .onnx import _require_ort, quantize_int8

    ort = _require_ort()
    src_path = steps.path("onnxruntime", "encoder.fp32.onnx")
    path = src_path.with_name("encoder.int8.onnx")
    inputs = {"source": fp32_meta["inputs"], "onnxruntime": ort.__version__,
              "scheme": "dynamic int8, per-channel 7-bit weights, weight MatMuls only"}
    profile = Profile.from_dict(fp32_meta["profile"])

    def build() -> dict[str, Any]:
        files = quantize_int8(src_path, path)
        return write_sidecar(path, kind="onnx-int8", backend="onnxruntime", dtype="int8", inputs=inputs,
                             profile=profile, files=files, optimized_for="CPUExecutionProvider")

    steps.run(path, inputs, build, "int8 dynamic quantisation")


def _trt_step(steps: _Steps, onnx_meta: dict[str, Any], dtype: str, profile: Profile) -> None:
    from .tensorrt import TIMING_CACHE_NAME, build_engine, engine_name, gpu_metadata, import_tensorrt, require_gpu

    trt = import_tensorrt()
    capability = require_gpu()
    path = steps.path("tensorrt", engine_name(trt.__version__, capability, dtype))
    onnx_path = steps.path("onnxruntime", f"encoder.{dtype}.onnx")
    timing_cache = path.parent / TIMING_CACHE_NAME
    build_info = gpu_metadata(trt.__version__)
    inputs = {"source": onnx_meta["inputs"], "tensorrt": trt.__version__,
              "compute_capability": build_info["compute_capability"], "profile": profile.to_dict(),
              "strongly_typed": True}

    def build() -> dict[str, Any]:
        build_engine(onnx_path, path, profile, timing_cache=timing_cache)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return write_sidecar(path, kind="tensorrt", backend="tensorrt", dtype=dtype, inputs=inputs, profile=profile,
                             files=[path], sha256=digest, onnx=onnx_path.name, **build_info)

    old_cache = steps.prior(timing_cache)
    if old_cache is not None and old_cache.is_file():  # a copy: TensorRT rewrites it
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(timing_cache, lambda p: shutil.copyfile(old_cache, p))
    steps.run(path, inputs, build, f"TensorRT engine ({dtype})")


def _aoti_step(steps: _Steps, src: _Source, dtype: str, profile: Profile, device: torch.device) -> None:
    from .aoti import compile_package, describe_build, host_isa, package_name, profile_metadata

    path = steps.path("aoti", package_name(dtype, device))
    target_hw = host_isa() if device.type == "cpu" else "sm{}{}".format(*torch.cuda.get_device_capability(device))
    inputs = {"export_version": EXPORT_VERSION, "fingerprint": src.fingerprint, "dtype": dtype,
              "device": device.type, "hardware": target_hw, "profile": profile.to_dict(),
              "torch": torch.__version__}

    def build() -> dict[str, Any]:
        compile_package(src.model(dtype, device), path, profile, metadata=profile_metadata(profile))
        return write_sidecar(path, kind="aoti", backend="aoti", dtype=dtype, inputs=inputs, profile=profile,
                             files=[path], **describe_build(path, device))

    steps.run(path, inputs, build, f"AOTInductor package ({dtype}, {device.type})")
