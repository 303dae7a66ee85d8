"""First contact with a GPU: are fastenc's Triton kernels usable here, before a user's call depends on them?

Nothing compiles or launches a Triton kernel when an encoder loads, so without a check the first launch
happens inside the user's pipeline call, and whatever goes wrong there (no C compiler for triton's
launcher stub, a driver too old for the PTX triton emits, a ``CompilationError``, ``OutOfResources``)
reaches them raw. The first time an encoder would run ``triton`` on a CUDA device, :func:`check` compiles
and launches every kernel the op table uses on a tiny probe model (:data:`PROBE_CONFIG`, in the
encoder's dtype, on that device; each autotuned kernel with its single untuned config, see
:func:`fastenc.kernels._common.single_config_launches`) and compares the result with the torch reference
op table on the same weights (relative error within :data:`TOLERANCE` for the dtype).

* ``backend="auto"``: a failed check installs the torch op table instead; one warning per process names
  the cause and ``fastenc info --probe``, and the call goes on.
* ``backend="triton"``: a failed check raises :class:`~fastenc.errors.BackendUnavailable` with the cause
  chained (a failure read from the cache is probed again first, so the chained cause is the real one).

The verdict is kept per (GPU name, compute capability, driver version, torch and triton versions) as a
small JSON under ``<cache>/gpu-probes/`` (:func:`probe_dir`), one file per GPU kind holding a verdict per
dtype, so later processes skip the probe. ``fastenc info --probe`` probes each visible GPU again and
records what it finds; ``fastenc cache clear gpu-probes`` forgets every verdict.

The device facts (:func:`gpu_facts`) and the probe itself (:func:`run_probe`) are module attributes,
so tests on a CPU run the real decision code with the facts and failures they choose.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import subprocess
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import EncoderConfig
from ..errors import BackendUnavailable

log = logging.getLogger("fastenc")

#: Bumped when what the probe checks changes (older verdict files are then probed again).
PROBE_VERSION = 1

#: The probe model: every named size's head dim (64), a gated GELU FFN and the ReLU projector, so each
#: kernel compiles with the specialisation a real encoder launches (one layer; a few hundred KB).
PROBE_CONFIG = EncoderConfig(d_model=128, d_ff=256, num_layers=1, num_heads=2, d_kv=64, vocab_size=128,
                             num_buckets=32, max_distance=128, projection_dim=64, name="gpu-probe")
#: Relative L2 error (vs the torch reference op table) the probe accepts per compute dtype.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ProbeMismatch(RuntimeError):
    """The kernels ran but their result differs from the torch reference beyond the dtype's tolerance."""


class ProbeFailed(RuntimeError):
    """A failure recorded by an earlier process's probe (the verdict file's cause and traceback)."""


@dataclass(frozen=True)
class GpuFacts:
    """What a probe's verdict is valid for."""

    name: str
    capability: str  # "8.6"
    driver: str
    torch: str
    triton: str

    def key(self) -> str:
        text = json.dumps({"probe": PROBE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def label(self) -> str:
        return f"{self.name} (sm_{self.capability.replace('.', '')}, driver {self.driver})"


@dataclass
class Verdict:
    ok: bool
    dtype: str
    kind: str = ""  # failure kind: CompilationError, OutOfResources, no C compiler, RuntimeError, ...
    cause: str = ""  # one line
    detail: str = ""  # the traceback, shortened
    seconds: float = 0.0
    when: float = field(default_factory=time.time)

    def describe(self) -> str:
        if self.ok:
            return f"ok ({self.dtype}, {self.seconds:.1f} s)"
        return f"FAILED ({self.dtype}): {self.kind}: {self.cause}"


# ---- device facts ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def driver_version() -> str:
    """The NVIDIA driver's version (nvidia-smi), else the CUDA driver API version torch reports."""
    exe = shutil.which("nvidia-smi")
    if exe is not None:
        try:
            out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    fn = getattr(torch._C, "_cuda_getDriverVersion", None)
    try:
        v = int(fn()) if fn is not None else 0
    except Exception:  # noqa: BLE001 - a facts read must never fail a load
        v = 0
    return f"cuda {v // 1000}.{v % 1000 // 10}" if v else "unknown"


def _triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return "none"


def gpu_facts(device: torch.device) -> GpuFacts:
    """The facts of the CUDA GPU ``device`` names (its index, else the current GPU)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return GpuFacts(torch.cuda.get_device_name(index), f"{major}.{minor}", driver_version(), torch.__version__,
                    _triton_version())


# ---- the probe ---------------------------------------------------------------------------------


def run_probe(device: torch.device, dtype: torch.dtype) -> None:
    """Compile and launch every kernel of the triton op table on :data:`PROBE_CONFIG` on ``device`` in
    ``dtype``, with and without a padding mask; raise what fails, :class:`ProbeMismatch` on wrong numbers."""
    from ..kernels import triton_ops
    from ..kernels._common import single_config_launches
    from ..model import T5Encoder
    from ..ops import TORCH_OPS

    cfg = PROBE_CONFIG
    with torch.random.fork_rng(devices=[]):  # the caller's CPU RNG is left as it was
        torch.manual_seed(0)
        model = T5Encoder(cfg)
        ids = torch.randint(2, cfg.vocab_size, (2, 80))
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0  # padding on one row: the masked attention path
    model = model.to(device).cast(dtype).eval()
    ids, mask = ids.to(device), mask.to(device)
    ops = triton_ops(device)
    # the caller's autocast (a pipeline's) must not change what either side computes
    with torch.no_grad(), torch.autocast(device.type, enabled=False), single_config_launches():
        for m in (mask, None):
            model.ops = TORCH_OPS
            want = model(ids, m).float()
            model.ops = ops
            got = model(ids, m).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous launch failure surfaces here, not later
            if not torch.isfinite(got).all():
                raise ProbeMismatch(f"non-finite output in {_DTYPE_NAMES.get(dtype, dtype)}")
            rel = float((got - want).norm() / want.norm().clamp_min(1e-12))
            if rel > TOLERANCE.get(dtype, 6e-2):
                raise ProbeMismatch(f"relative error {rel:.3g} vs the torch reference in "
                                    f"{_DTYPE_NAMES.get(dtype, dtype)} (tolerance {TOLERANCE.get(dtype, 6e-2):g})")


def failure_kind(exc: BaseException) -> str:
    """A short name for why the probe failed."""
    if isinstance(exc, ProbeMismatch):
        return "wrong results"
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except ImportError:
        pass
    else:
        if isinstance(exc, CompilationError):
            return "CompilationError"
        if isinstance(exc, OutOfResources):
            return "OutOfResources"
    if "C compiler" in str(exc):  # triton's launcher stub is built with the system's C compiler
        return "no C compiler"
    if isinstance(exc, FileNotFoundError) and Path(str(exc.filename or "")).name in _COMPILERS:
        return "no C compiler"
    if isinstance(exc, subprocess.CalledProcessError) and exc.cmd and Path(str(exc.cmd[0])).name in _COMPILERS:
        return "C compiler failed"  # e.g. no Python headers (Python.h) for the launcher stub
    return type(exc).__name__


_COMPILERS = {"cc", "gcc", "clang", "c99"}


def _first_line(exc: BaseException) -> str:
    # a CompilationError's own message (its str() starts with the source location)
    text = str(getattr(exc, "error_message", None) or exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ---- verdicts: this process, then the cache folder ---------------------------------------------


def probe_dir() -> Path:
    """``<cache>/gpu-probes`` (see :func:`fastenc.caches.cache_root`)."""
    from ..caches import cache_root

    return cache_root() / "gpu-probes"


_LOCK = threading.RLock()
_VERDICTS: dict[tuple[str, str], Verdict] = {}
_ERRORS: dict[tuple[str, str], BaseException] = {}
_WARNED: set[tuple[str, str]] = set()


def forget() -> None:
    """Drop this process's verdicts, errors and warnings (the files stay)."""
    with _LOCK:
        _VERDICTS.clear()
        _ERRORS.clear()
        _WARNED.clear()


def read_verdicts(facts: GpuFacts) -> dict[str, Verdict]:
    """The verdicts recorded for ``facts`` (dtype name -> verdict); none when the file is missing or bad."""
    try:
        data = json.loads((probe_dir() / f"{facts.key()}.json").read_text(encoding="utf-8"))
        if data.get("version") != PROBE_VERSION or data.get("facts") != asdict(facts):
            return {}
        return {name: Verdict(**v) for name, v in data["verdicts"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_verdict(facts: GpuFacts, verdict: Verdict) -> None:
    from ..fileio import atomic_write

    verdicts = read_verdicts(facts)
    verdicts[verdict.dtype] = verdict
    data = {"version": PROBE_VERSION, "facts": asdict(facts),
            "verdicts": {name: asdict(v) for name, v in sorted(verdicts.items())}}
    try:
        atomic_write(probe_dir() / f"{facts.key()}.json",
                     lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))
    except OSError as exc:  # a read-only cache folder costs a probe per process, nothing else
        log.debug("fastenc: could not record the GPU probe verdict: %s", exc)


def check(device: torch.device, dtype: torch.dtype, *, fresh: bool = False,
          facts: GpuFacts | None = None) -> tuple[GpuFacts, Verdict]:
    """The verdict for triton on ``device`` in ``dtype``: this process's, else the cache file's, else
    a probe's (recorded in both). ``fresh``: probe again whatever is known."""
    device = torch.device(device)
    if facts is None:
        try:
            facts = gpu_facts(device)
        except Exception as exc:  # noqa: BLE001 - no GPU facts (no GPU visible): nothing to run triton on
            facts = GpuFacts(f"unreadable GPU {device}", "0.0", "unknown", torch.__version__, _triton_version())
            verdict = Verdict(False, _DTYPE_NAMES.get(dtype, str(dtype)), failure_kind(exc), _first_line(exc),
                              "".join(traceback.format_exception(exc))[-4000:])
            with _LOCK:
                _ERRORS[(facts.key(), verdict.dtype)] = exc
            return facts, verdict  # not recorded: it says nothing about a GPU kind
    dtype_name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    key = (facts.key(), dtype_name)
    with _LOCK:  # one probe at a time per process; the others wait for its verdict
        if not fresh:
            if key in _VERDICTS:
                return facts, _VERDICTS[key]
            recorded = read_verdicts(facts).get(dtype_name)
            if recorded is not None:
                _VERDICTS[key] = recorded
                return facts, recorded
        start = time.perf_counter()
        record = True
        try:
            run_probe(device, dtype)
        except Exception as exc:  # noqa: BLE001 - every failure is the verdict
            verdict = Verdict(False, dtype_name, failure_kind(exc), _first_line(exc),
                              "".join(traceback.format_exception(exc))[-4000:], time.perf_counter() - start)
            _ERRORS[key] = exc
            # fastenc's own refusal (TRITON_INTERPRET=1 at import, no GPU visible) is this process's, not the GPU's
            record = not isinstance(exc, BackendUnavailable)
        else:
            verdict = Verdict(True, dtype_name, seconds=time.perf_counter() - start)
            _ERRORS.pop(key, None)
        _VERDICTS[key] = verdict
        if record:
            _write_verdict(facts, verdict)
        return facts, verdict


def auto_uses_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """``auto`` on CUDA: whether triton passed its check here; on a failure the torch op table runs and
    one warning per process (per GPU kind and dtype) says why."""
    facts, verdict = check(device, dtype)
    if verdict.ok:
        return True
    key = (facts.key(), verdict.dtype)
    with _LOCK:
        first = key not in _WARNED
        _WARNED.add(key)
    if first:
        log.warning("fastenc: the triton kernels failed their first-contact check on %s in %s: %s: %s; running the "
                    "torch reference op table instead (correct, slower). `fastenc info --probe` shows the full cause "
                    "and probes again; backend='triton' raises it", facts.label(), verdict.dtype, verdict.kind,
                    verdict.cause)
    else:
        log.debug("fastenc: triton failed its check on %s in %s (%s): torch op table", facts.label(), verdict.dtype,
                  verdict.kind)
    return False


def require_triton(device: torch.device, dtype: torch.dtype) -> None:
    """``backend="triton"`` on CUDA: raise :class:`BackendUnavailable` (cause chained) unless the check passes."""
    facts, verdict = check(device, dtype)
    key = (facts.key(), verdict.dtype)
    if not verdict.ok and key not in _ERRORS:  # a failure read from the cache: probe again for the real cause
        facts, verdict = check(device, dtype, fresh=True, facts=facts)
    if verdict.ok:
        return
    cause = _ERRORS.get(key) or ProbeFailed(f"{verdict.kind}: {verdict.cause}\n{verdict.detail}")
    raise BackendUnavailable(
        f"backend 'triton' on {device}: the kernels failed their first-contact check on {facts.label()} in "
        f"{verdict.dtype}: {verdict.kind}: {verdict.cause} (backend='auto' runs the torch op table here)") from cause
