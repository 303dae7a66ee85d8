"""Backends: each turns (input_ids [B, L], attention_mask [B, L] | None) into [B, L, P].

``torch`` runs :class:`fastenc.model.T5Encoder` with the reference op table; op-swapping
backends (``cpu``, ``triton``) run the same module with another op table; graph backends
(``onnxruntime``, ``tensorrt``, ``aoti``) consume an artifact exported from it.

Op-swapping backends follow the weights: :func:`follow_backend` names the one an encoder runs
with once its weights sit on a given device and dtype (``auto``: ``triton`` on CUDA, ``cpu`` on a
CPU with native bf16 when the weights are bf16, the ``torch`` reference elsewhere).

``triton`` on a CUDA device is checked on first contact (:mod:`fastenc.backends.probe`): ``auto`` runs
the torch reference where the kernels fail to compile, launch or match it (one warning says why), an
explicit ``backend="triton"`` raises :class:`~fastenc.errors.BackendUnavailable` with the cause chained.
On ROCm (torch reports AMD GPUs as ``cuda``) ``auto`` never picks ``triton``.

What an NVIDIA GPU gets by default depends on its compute capability (:data:`CUDA_DEFAULTS`): below
sm_80 (T4, RTX 20xx) fp16 with the ``torch`` op table (no bf16 tensor cores, and triton emits no MMA
instructions there, so its GEMM tiles run on FMAs), sm_80 and newer bf16 with ``triton``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailable, ConfigError

BACKENDS = ("torch", "cpu", "triton", "onnxruntime", "tensorrt", "aoti")
OP_BACKENDS = ("torch", "cpu", "triton")

log = logging.getLogger("fastenc")
_ROCM_LOGGED: list[bool] = []
_BELOW_LOGGED: list[bool] = []


@dataclass(frozen=True)
class CudaDefault:
    """What ``auto`` and a missing ``dtype`` mean on NVIDIA GPUs from compute capability ``since`` on."""

    since: tuple[int, int]
    dtype: torch.dtype
    backend: str  # the op table ``auto`` runs there (``triton`` only once its first-contact check passed)
    why: str


#: Lowest capability first; a GPU takes the last row whose ``since`` it reaches.
CUDA_DEFAULTS: tuple[CudaDefault, ...] = (
    CudaDefault((0, 0), torch.float16, "torch",
                "no bf16 tensor cores, and triton emits no MMA instructions below sm_80 (its tiles run on FMAs)"),
    CudaDefault((8, 0), torch.bfloat16, "triton", "bf16 tensor cores; triton's tiles compile to MMA"),
)


def cuda_default(device: torch.device | None = None) -> CudaDefault:
    """The :data:`CUDA_DEFAULTS` row of CUDA ``device`` (its index, else the current GPU), read from
    ``torch.cuda.get_device_capability``; ROCm GPUs, and a GPU whose capability cannot be read (the
    first-contact check then says why), take the newest row (``auto`` never runs triton on ROCm, see
    :func:`on_rocm`)."""
    if on_rocm():
        return CUDA_DEFAULTS[-1]
    index = None if device is None else torch.device(device).index
    try:
        capability = tuple(torch.cuda.get_device_capability(index))
    except (AssertionError, RuntimeError):  # torch without CUDA, no driver
        return CUDA_DEFAULTS[-1]
    return [row for row in CUDA_DEFAULTS if capability >= row.since][-1]


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype an encoder on ``device`` gets when none is asked for: fp32 off CUDA, else its
    :func:`cuda_default` row's (bf16 from sm_80 on, fp16 below)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return cuda_default(device).dtype


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


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def cpu_fast_path() -> tuple[bool, str]:
    """:func:`fastenc.backends.cpu.fast_path_supported`, read once per process (it parses /proc/cpuinfo)."""
    from .cpu import fast_path_supported

    return fast_path_supported()


def _interpreter_requested() -> bool:
    from ..kernels._common import interpreter_requested

    return interpreter_requested()


def on_rocm() -> bool:
    """True on a ROCm build of torch: its AMD GPUs report ``device.type == "cuda"``."""
    return getattr(torch.version, "hip", None) is not None


def _auto_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``auto`` runs triton on CUDA ``device`` in ``dtype``: never on ROCm (logged once) nor where
    :data:`CUDA_DEFAULTS` names another backend (below sm_80), else when the kernels passed their
    first-contact check (:func:`fastenc.backends.probe.auto_uses_triton`)."""
    if on_rocm():
        if not _ROCM_LOGGED:
            _ROCM_LOGGED.append(True)
            log.info("fastenc: ROCm GPU (torch %s, HIP %s): auto runs the torch op table; fastenc's Triton kernels "
                     "are tuned and checked on NVIDIA GPUs only (backend='triton' runs them anyway)",
                     torch.__version__, torch.version.hip)
        return False
    row = cuda_default(device)
    if row.backend != "triton":
        if not _BELOW_LOGGED:
            _BELOW_LOGGED.append(True)
            log.info("fastenc: CUDA GPU below sm_%d%d: auto runs the %s op table (%s); backend='triton' runs "
                     "fastenc's kernels anyway", *CUDA_DEFAULTS[CUDA_DEFAULTS.index(row) + 1].since, row.backend,
                     row.why)
        return False
    from .probe import auto_uses_triton

    return auto_uses_triton(device, dtype)


def _require_triton(device: torch.device, dtype: torch.dtype) -> None:
    """An explicit ``triton`` on CUDA: its first-contact check, raising BackendUnavailable (cause chained)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"backend 'triton' on {device}: no CUDA GPU is visible to torch")
        from .probe import require_triton

        require_triton(device, dtype)


def runs_on(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether op-swapping backend ``name`` can run weights of ``dtype`` on ``device``."""
    if name == "torch":
        return True
    if name == "triton":
        if not _triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and _interpreter_requested())
    if name == "cpu":  # bf16 compute (int8 GEMMs): it never changes the weights' dtype behind a caller's back
        return device.type == "cpu" and dtype == torch.bfloat16
    return False


def follow_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The op-swapping backend an encoder asked for with ``requested`` runs once its weights are on
    ``device`` in ``dtype``: the requested one where it runs, else what ``auto`` picks there.

    ``auto``: ``triton`` on CUDA (when triton imports), ``cpu`` on a CPU with native bf16 when the
    weights are bf16, the ``torch`` reference elsewhere (other CPUs, other dtypes, ``meta``, ...)."""
    device = torch.device(device)
    if requested not in ("auto", *OP_BACKENDS):
        raise ConfigError(f"backend {requested!r} does not follow the weights; choose one of auto, "
                          f"{', '.join(OP_BACKENDS)}")
    if requested != "auto" and runs_on(requested, device, dtype):
        if requested == "triton":
            _require_triton(device, dtype)
        return requested
    if device.type == "cuda" and runs_on("triton", device, dtype) and _auto_triton(device, dtype):
        return "triton"
    if device.type == "cpu" and runs_on("cpu", device, dtype) and cpu_fast_path()[0]:
        return "cpu"
    return "torch"


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Validate a backend name; ``auto`` picks the fastest one usable on ``device``.

    On the CPU that is ``cpu``, the planned CPU path (:mod:`fastenc.backends.cpu_plan`): in bf16 when the
    CPU has native bf16 and no dtype other than bf16 was asked for, in fp32 on other CPUs when no dtype
    was asked for (never emulated bf16); ``torch`` when fp32 or fp16 was asked for explicitly."""
    if name == "auto":
        if device.type == "cuda" and _triton_importable() and _auto_triton(device, dtype or default_dtype(device)):
            return "triton"
        if device.type == "cpu" and dtype is None:
            return "cpu"
        if device.type == "cpu" and dtype == torch.bfloat16 and cpu_fast_path()[0]:
            return "cpu"
        return "torch"
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "triton" and device.type == "cuda" and _triton_importable():
        _require_triton(device, dtype or default_dtype(device))
    return name
