"""TensorRT engine from the exported ONNX model, built with TensorRT's Python API.

The network is strongly typed: every tensor keeps the type the ONNX graph gives it, so a bf16
ONNX model gives a bf16 engine and an fp16 one keeps T5's FFN output projection and residual
stream in fp32. One optimisation profile spans min/opt/max batch and sequence; a timing cache
beside the engine makes rebuilds fast. Engine files are named for the TensorRT version and GPU
compute capability they were built with (``encoder.trt10.8.sm90.bf16.plan``) because an engine
only runs there; the sidecar JSON records the build and :func:`check_engine_compat` turns a
mismatch into one clear error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, CheckpointError, FastencError
from ..fileio import atomic_write
from .contract import INPUT_NAMES, Profile

log = logging.getLogger("fastenc")

TIMING_CACHE_NAME = "timing.cache"
_PLAN = re.compile(r"^encoder\.trt(?P<trt>\d+\.\d+)\.sm(?P<sm>\d+)\.(?P<dtype>fp32|fp16|bf16)\.plan$")


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`BackendUnavailable` saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT is not installed ({exc}); --trt and backend='tensorrt' need TensorRT's Python package "
            f"(pip install tensorrt, on a machine with an NVIDIA GPU)"
        ) from None
    return tensorrt


def require_gpu() -> tuple[int, int]:
    """Compute capability of the current CUDA device, or :class:`BackendUnavailable`."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU and none is visible to torch here")
    return torch.cuda.get_device_capability()


def trt_short_version(version: str) -> str:
    """``"10.8.0.43"`` -> ``"10.8"`` (engines are tied to major.minor)."""
    parts = str(version).split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise FastencError(f"unrecognised TensorRT version {version!r}")
    return ".".join(parts[:2])


def sm_tag(capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``"sm90"``."""
    major, minor = capability
    return f"sm{major}{minor}"


def engine_name(trt_version: str, capability: tuple[int, int], dtype: str) -> str:
    """``encoder.trt{major.minor}.sm{CC}.{dtype}.plan``."""
    return f"encoder.trt{trt_short_version(trt_version)}.{sm_tag(capability)}.{dtype}.plan"


def parse_engine_name(name: str) -> dict[str, str] | None:
    m = _PLAN.match(name)
    return m.groupdict() if m else None


def check_engine_compat(meta: dict[str, Any], *, trt_version: str, capability: tuple[int, int],
                        where: object) -> None:
    """Raise one :class:`CheckpointError` when the engine was built for another TensorRT or GPU."""
    built_trt = str(meta.get("tensorrt_version", "?"))
    built_sm = str(meta.get("compute_capability", "?"))
    gpu = meta.get("gpu_name", "another GPU")
    problems = []
    try:
        same_trt = trt_short_version(built_trt) == trt_short_version(trt_version)
    except FastencError:
        same_trt = False
    if not same_trt:
        problems.append(f"TensorRT {built_trt} (this machine has {trt_version})")
    if built_sm != sm_tag(capability):
        problems.append(f"{built_sm} / {gpu} (this GPU is {sm_tag(capability)})")
    if problems:
        raise CheckpointError(
            f"{where} was built for {' and '.join(problems)}; TensorRT engines only run on the TensorRT "
            f"version and GPU architecture they were built with: rebuild it here with `fastenc export ... --trt`"
        )


def gpu_metadata(trt_version: str) -> dict[str, Any]:
    import torch

    capability = require_gpu()
    return {
        "tensorrt_version": trt_version,
        "compute_capability": sm_tag(capability),
        "gpu_name": torch.cuda.get_device_name(),
        "cuda_version": torch.version.cuda,
    }


def _progress_monitor(trt):
    """A TensorRT IProgressMonitor that logs each top-level build phase (TensorRT >= 10)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log.info("TensorRT: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile, *, workspace_bytes: int | None = None,
                 timing_cache: Path | None = None) -> Path:
    """Parse ``onnx_path``, build a strongly typed engine for ``profile``, write it to ``plan_path``.

    Not run on the machines this was written on (no TensorRT there); written against TensorRT 10's
    documented Python API."""
    trt = import_tensorrt()
    require_gpu()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckpointError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors or 'no details'}")
    check_network_inputs([network.get_input(i).name for i in range(network.num_inputs)], onnx_path)
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT rejected the timing cache %s (another TensorRT or GPU); starting a new one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.input_shapes().items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    log.info("building TensorRT engine from %s (strongly typed; profile batch %d..%d, seq %d..%d)", onnx_path.name,
             profile.min_batch, profile.max_batch, profile.min_seq, profile.max_seq)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FastencError(f"TensorRT failed to build an engine from {onnx_path} (see TensorRT's log above)")
    atomic_write(plan_path, lambda p: p.write_bytes(memoryview(serialized)))
    if timing_cache is not None:
        updated = config.get_timing_cache().serialize()
        atomic_write(timing_cache, lambda p: p.write_bytes(memoryview(updated)))
    return plan_path


def check_network_inputs(names: list[str], where: object) -> None:
    """The network (or ONNX graph) must take exactly the contract's inputs."""
    if sorted(names) != sorted(INPUT_NAMES):
        raise CheckpointError(f"{where}: inputs {names}, expected {list(INPUT_NAMES)}; re-export it with `fastenc export`")
