"""Launch machinery shared by the kernels: one source, compiled on CUDA, interpreted on CPU.

Each kernel body is a plain Python function wrapped twice when its module is imported:
``triton.jit`` (under ``triton.autotune`` where there are GPU configs) runs CUDA tensors, and
triton's interpreter runs CPU tensors. The choice is made per launch from the tensors' device,
so it never depends on whether ``TRITON_INTERPRET`` was set before something imported triton.

For that to hold, kernel bodies call triton *builtins* only: triton's own standard-library
helpers (``tl.sum``, ``tl.max``, ``tl.zeros``, ``tl.sigmoid``, ``tl.cdiv``) are decorated once, for
one mode, when triton is imported. Reductions therefore go through ``tl.reduce`` with the
standard combine functions (:data:`SUM`, :data:`MAX`; the interpreter maps those two to numpy),
and zeros through ``tl.full``.

Under the interpreter, bf16 arithmetic and ``tl.dot`` on 16-bit inputs give wrong numbers, so
every kernel takes an ``UPCAST`` switch: loaded tiles go to fp32 before any arithmetic. (Its
fp32 -> bf16 conversion also truncates where the GPU rounds to nearest: one bf16 step at most.)

:meth:`Kernel.compile_for` builds a recorded launch for a GPU architecture with triton's bundled
``ptxas`` and no GPU, which is how the tests check the CUDA path on CPU-only machines. It applies
the specialisation triton's JIT applies at launch (:func:`jit_specialization`), so it compiles the
kernel a GPU would run.

The first launch of a new specialisation (and, for an autotuned kernel, the tuning of a new key)
runs under one process-wide lock, :data:`TUNING_LOCK`: triton's autotuner is not thread-safe and
these kernels are shared by every encoder in the process. Later launches of a key take no lock.

Each autotuned kernel runs one triton autotuner per device kind (GPU name, compute capability,
shared memory per block): a config tuned on one kind of GPU is never replayed on another in the same
process, and the choices are kept between processes in a small table per device kind under fastenc's
cache folder (:mod:`fastenc.kernels.tuning`). :func:`tunings` counts the keys benchmarked in this process.

``FASTENC_AUTOTUNE=0`` hands ``triton.autotune`` one config per kernel, the first of its list whose
software-pipeline buffers fit :data:`SMEM_LIMIT` (the 99 KB an sm_86/sm_89 block may use, the
smallest of the architectures fastenc runs on) in the widest dtype the kernel runs in
(:func:`single_config`); the first-contact probe (:mod:`fastenc.backends.probe`) launches that
config too (:func:`single_config_launches`), so it compiles one config per kernel, not a tuning sweep.

On ROCm (``torch.version.hip`` set) :func:`dot_precision` asks for ``"ieee"`` dots: triton rejects
``"tf32"`` on AMD GPUs.

CUDA launches run under a device guard for the tensors' device (``cuda:1`` launches on GPU 1 even
when GPU 0 is current). When ``TRITON_INTERPRET=1`` was set as these kernels were imported, triton
hands out interpreted kernels only; a launch on CUDA tensors then fails with
:class:`~fastenc.errors.BackendUnavailable` instead of interpreting them silently.

Only public triton names that exist in triton 3.6 and 3.7 are used (``tl.standard``'s two combine
functions, ``triton.runtime.jit.JITFunction`` and ``triton.runtime.interpreter.InterpretedFunction``
included: they are the same in both).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from ..errors import BackendUnavailable

log = logging.getLogger("fastenc")

#: ``tl.reduce`` combine functions (what ``tl.sum`` / ``tl.max`` use internally).
SUM = tl.standard._sum_combine
MAX = tl.standard._elementwise_max

#: Activation codes shared by the GEMM epilogues (``ACT: tl.constexpr``); constexpr so kernels may read them.
ACT_NONE, ACT_RELU, ACT_GELU_TANH, ACT_GELU_ERF = (tl.constexpr(i) for i in range(4))
ACTIVATION_CODES = {None: 0, "relu": 1, "gelu_new": 2, "gelu": 3}

TORCH_TO_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
               torch.int64: "i64"}


def autotune_enabled() -> bool:
    """False when ``FASTENC_AUTOTUNE=0`` (read as the kernels are imported): each kernel then compiles its
    first GPU config only, which keeps correctness runs on a fresh GPU machine short."""
    return os.environ.get("FASTENC_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def interpreter_requested() -> bool:
    """True when the user asked for triton's CPU interpreter (``TRITON_INTERPRET=1``), read now."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_hip() -> bool:
    """True on a ROCm build of torch (its AMD GPUs report ``device.type == "cuda"``)."""
    return getattr(torch.version, "hip", None) is not None


def dot_precision(dtype: torch.dtype, *, hip: bool | None = None) -> str:
    """fp32 GEMMs stay IEEE (the torch reference does not use TF32); 16-bit inputs ignore this on NVIDIA.

    On ROCm (``hip``; default: :func:`is_hip`) always ``"ieee"``: triton rejects ``"tf32"`` on AMD."""
    if hip is None:
        hip = is_hip()
    return "ieee" if dtype == torch.float32 or hip else "tf32"


#: Shared memory one block may use on every architecture fastenc's kernels run on: 99 KB on sm_86 and
#: sm_89 (A10, RTX 30xx/40xx, L4, L40), the smallest of them (sm_80: 163 KB, sm_90: 227 KB).
SMEM_LIMIT = 99 * 1024


def gemm_smem(meta: dict, num_stages: int, elsize: int, b_tiles: int = 1) -> int:
    """Bytes of shared memory a pipelined GEMM config buffers: ``num_stages`` copies of the
    [BLOCK_M, BLOCK_K] A tile and ``b_tiles`` [BLOCK_K, BLOCK_N] B tiles, ``elsize`` bytes each."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    return num_stages * (bm * bk + b_tiles * bk * bn) * elsize


def attention_smem(meta: dict, num_stages: int, elsize: int, head_dim: int = 64) -> int:
    """Bytes of shared memory an attention config buffers: the resident [BLOCK_M, D] Q tile and
    ``num_stages`` copies of the [D, BLOCK_N] K^T and [BLOCK_N, D] V tiles (D: 64, every named size's)."""
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    return (bm * head_dim + num_stages * 2 * bn * head_dim) * elsize


def single_config(configs: Sequence[triton.Config], smem: Callable[[triton.Config], int] | None,
                  limit: int = SMEM_LIMIT) -> triton.Config | None:
    """The config a kernel runs without autotuning: the first of ``configs`` (they are listed best first)
    whose shared-memory need ``smem(config)`` fits ``limit``; the smallest need when none does."""
    if not configs:
        return None
    if smem is None:
        return configs[0]
    fitting = [c for c in configs if smem(c) <= limit]
    return fitting[0] if fitting else min(configs, key=smem)


#: Held while a kernel compiles, tunes or first launches a new key (see the module docstring).
TUNING_LOCK = threading.RLock()
_MODE = threading.local()
_TUNED = [0]  # keys benchmarked by the autotuners in this process (recorded choices not counted)
_NEW = object()


def tunings() -> int:
    """How many tuning keys the kernels benchmarked in this process so far (a choice read from the
    tuning table costs no benchmark and is not counted)."""
    return _TUNED[0]


@contextlib.contextmanager
def single_config_launches() -> Iterator[None]:
    """In this thread, autotuned kernels launch their :attr:`Kernel.single` config without tuning."""
    before = getattr(_MODE, "single", False)
    _MODE.single = True
    try:
        yield
    finally:
        _MODE.single = before


def _arg_key(value: Any, tuned: bool) -> Any:
    """What of one launch argument can make triton compile (or tune) anew: a tensor's dtype and 16-byte
    alignment; an integer's value when it is an autotune key (``tuned``), else whether it is 1 or a
    multiple of 16 (what the JIT specialises on); constexpr values (bools, strings, ...)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool) and not tuned:
        return value == 1, value % 16 == 0
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value if tuned or not isinstance(value, float) else float
    return type(value)


def _finite_timing(timing: Any) -> bool:
    """Whether a triton benchmark timing (a number or [p50, p20, p80]) is finite (failed configs time inf)."""
    first = timing[0] if isinstance(timing, (list, tuple)) and timing else timing
    try:
        return float(first) < float("inf")
    except (TypeError, ValueError):
        return True


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class Kernel:
    """A kernel source launched compiled (CUDA tensors) or interpreted (CPU tensors).

    ``configs``/``key`` autotune the compiled kernel; ``interpret_meta`` is the single config the
    interpreter uses (autotuning needs a GPU). Grids are callables of the meta-parameters.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        configs: Sequence[triton.Config] | None = None,
        key: Sequence[str] = (),
        interpret_meta: dict | None = None,
        smem: Callable[[dict, int, int], int] | None = None,
        elsize: int = 4,
        autotune: bool | None = None,
    ):
        """``smem(meta, num_stages, elsize)``: a config's shared-memory bytes; ``elsize``: the widest element
        (bytes) the kernel loads (4 when it runs fp32); ``autotune``: default :func:`autotune_enabled`."""
        self.name = fn.__name__
        self.fn = fn
        self.elsize = elsize
        self._smem = smem
        all_configs = list(configs or [])
        #: every GPU config (what autotuning chooses among; :attr:`configs` is one of them when it is off)
        self.all_configs = all_configs
        #: the config run without autotuning (``FASTENC_AUTOTUNE=0``, the first-contact probe)
        self.single = single_config(all_configs, self.smem_bytes if smem is not None else None)
        tune = autotune_enabled() if autotune is None else autotune
        self.configs = all_configs if tune or not all_configs else [self.single]
        self.interpret_meta = dict(interpret_meta or {})
        self._recording: list | None = None
        self._interpreted = InterpretedFunction(fn)
        jitted = triton.jit(fn)  # an InterpretedFunction when TRITON_INTERPRET was set at import
        self._jitted = jitted
        self._gpu_compiled = isinstance(jitted, JITFunction)
        self.autotuned = bool(self.configs) and self._gpu_compiled
        self._key = list(key)
        self._compiled = self._new_tuner() if self.autotuned else jitted
        self._tuners: dict = {}  # device kind -> its autotuner (see fastenc.kernels.tuning)
        self._tuning_id: str | None = None
        params = inspect.signature(fn).parameters
        self._arg_names = tuple(params)
        # read by value in a launch key: autotune keys and constexprs (each value compiles anew)
        self._key_names = frozenset(key) | {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        self._by_value = tuple(n in self._key_names for n in self._arg_names)  # per positional parameter
        self._launched: dict = {}  # launch key -> its device's autotuner (None: none), launched once: no lock later

    def smem_bytes(self, config: triton.Config) -> int:
        """Shared memory ``config`` buffers at :attr:`elsize` (0 without an estimator)."""
        return self._smem(config.kwargs, config.num_stages, self.elsize) if self._smem is not None else 0

    def interpreting(self, device: torch.device) -> bool:
        return device.type != "cuda" or not self._gpu_compiled

    @property
    def compiled(self):
        """The jitted kernel, or (autotuned) an autotuner as triton is handed it; launches run one
        autotuner per device kind (:meth:`tuner_for`)."""
        return self._compiled

    def _new_tuner(self):
        return triton.autotune(configs=list(self.configs), key=self._key)(self._jitted)

    @property
    def tuning_id(self) -> str:
        """This kernel's name in the tuning tables (function name + hash of source, configs and key)."""
        if self._tuning_id is None:
            from .tuning import kernel_id

            try:
                source = inspect.getsource(self.fn)
            except (OSError, TypeError):
                source = self.fn.__qualname__
            self._tuning_id = kernel_id(self.name, source, self.configs, self._key)
        return self._tuning_id

    def tuner_for(self, index: int):
        """The autotuner of GPU ``index``'s device kind, its recorded choices loaded (made on first use)."""
        from . import tuning

        kind = tuning.kind_of(index)
        tuner = self._tuners.get(kind)
        if tuner is None:
            tuner = self._new_tuner()
            cache = getattr(tuner, "cache", None)
            if isinstance(cache, dict) and len(self.configs) > 1:
                cache.update(tuning.choices(kind, self.tuning_id, self.configs))
            self._tuners[kind] = tuner
        return tuner

    def __call__(self, device: torch.device, grid: Callable[[dict], tuple], *args, **kwargs) -> None:
        if self._recording is not None:
            self._recording.append((args, kwargs))
            return
        if device.type != "cuda":
            meta = {**self.interpret_meta, **kwargs}
            self._interpreted[grid(meta)](*args, **meta)
            return
        if not self._gpu_compiled:
            raise BackendUnavailable(
                f"fastenc's Triton kernels were imported with TRITON_INTERPRET=1, so {self.name} would run in "
                f"triton's CPU interpreter on {device} tensors (silently, and orders of magnitude slower); unset "
                "TRITON_INTERPRET before importing fastenc to run them compiled on the GPU")
        if device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # launch on the tensors' GPU, not the current one
                self._launch(device, grid, args, kwargs)
        else:
            self._launch(device, grid, args, kwargs)

    def launch_key(self, device: torch.device, args: Sequence, kwargs: dict) -> tuple:
        """A key that changes whenever triton could compile or tune anew for this launch (a superset of
        the autotuner's key and the JIT's specialisation; per device and launch mode)."""
        single = self.autotuned and getattr(_MODE, "single", False)
        by_value = self._by_value
        if len(args) > len(by_value):
            by_value = by_value + (True,) * (len(args) - len(by_value))
        positional = tuple(
            (a.dtype, a.data_ptr() % 16 == 0) if type(a) is torch.Tensor or isinstance(a, torch.Tensor)
            else _arg_key(a, v) for a, v in zip(args, by_value))
        index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
        return (index, single, positional, tuple(sorted((k, _arg_key(v, True)) for k, v in kwargs.items())))

    def _launch(self, device: torch.device, grid, args, kwargs) -> None:
        key = self.launch_key(device, args, kwargs)
        tuner = self._launched.get(key, _NEW)
        if tuner is not _NEW:
            self._run(grid, args, kwargs, key[1], tuner)
            return
        with TUNING_LOCK:  # first launch of this key: compile / tune one thread at a time
            tuner = self.tuner_for(key[0]) if self.autotuned and not key[1] else None
            cache = getattr(tuner, "cache", None)
            before = set(cache) if isinstance(cache, dict) else set()
            self._run(grid, args, kwargs, key[1], tuner)
            if isinstance(cache, dict) and len(cache) > len(before):
                self._remember(key[0], tuner, {k: c for k, c in cache.items() if k not in before})
            self._launched[key] = tuner

    def _remember(self, index: int, tuner, chosen: dict) -> None:
        """Count and record choices the autotuner just benchmarked (never one whose every config failed)."""
        from . import tuning

        _TUNED[0] += len(chosen)
        timings = getattr(tuner, "configs_timings", None) or {}
        kept = {k: c for k, c in chosen.items() if _finite_timing(timings.get(c, 0.0))}
        try:
            tuning.record(tuning.kind_of(index), self.tuning_id, kept)
        except Exception as exc:  # noqa: BLE001 - keeping a choice must never fail a launch
            log.debug("fastenc: could not record %s's tuning choice: %s", self.name, exc)

    def _run(self, grid, args, kwargs, single: bool, tuner=None) -> None:
        if single:
            config = self.single
            self._jitted[grid({**kwargs, **config.kwargs})](*args, **kwargs, **config.all_kwargs())
        elif tuner is not None:
            tuner[grid](*args, **kwargs)
        else:
            self._compiled[grid(kwargs)](*args, **kwargs)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list]:
        """Record launches as ``(args, kwargs)`` instead of running them (see :meth:`compile_for`)."""
        self._recording = calls = []
        try:
            yield calls
        finally:
            self._recording = None

    def compile_for(self, args: Sequence, kwargs: dict, *, arch: int = 90, config: triton.Config | None = None,
                    **constexprs):
        """Compile a recorded launch ahead of time for ``sm_<arch>`` (no GPU needed; triton's ptxas).

        ``config`` supplies the autotuned meta-parameters (default: the first GPU config);
        ``constexprs`` override recorded ones (e.g. ``UPCAST=False`` for a launch recorded on CPU).
        Returns triton's compiled kernel (``.asm`` holds ``ttgir``, ``ptx``, ``cubin``).
        """
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = JITFunction(self.fn)
        config = config or (self.configs[0] if self.configs else None)
        values = dict(zip(fn.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
        values.update(config.kwargs if config else {})
        values.update(constexprs)
        signature, consts, attrs = jit_specialization(fn, values)
        options = {"num_warps": config.num_warps if config else kwargs.get("num_warps", 4),
                   "num_stages": config.num_stages if config else kwargs.get("num_stages", 3)}
        return triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)


#: what triton's JIT marks as divisible: integers that are multiples of 16, pointers aligned to 16 bytes
DIVISIBILITY = 16


def jit_specialization(fn: JITFunction, values: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for :class:`triton.compiler.ASTSource`, specialised the way
    triton's JIT specialises a launch with these argument values (triton 3.6 and 3.7 alike):

    * ``tl.constexpr`` parameters are constants;
    * an integer equal to 1 becomes the constant 1;
    * an integer divisible by 16, and a tensor whose address is, get ``tt.divisibility = 16``
      (the JIT's "D" specialisation), which is what lets the compiler vectorise loads and stores;
    * bools are ``u1`` and floats ``fp32``, never specialised.

    Parameters marked ``do_not_specialize`` are not supported (fastenc's kernels have none).
    """
    signature: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, param in enumerate(fn.params):
        name = param.name
        value = values[name]
        divisible = False
        if param.is_constexpr:
            signature[name], consts[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TORCH_TO_TL[value.dtype]
            divisible = value.data_ptr() % DIVISIBILITY == 0
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], consts[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
            divisible = value % DIVISIBILITY == 0
        else:
            signature[name] = "fp32"
        if divisible:
            attrs[(i,)] = [["tt.divisibility", DIVISIBILITY]]
    return signature, consts, attrs


def rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as [M, N] with a unit stride on the last dim (copies only when it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
