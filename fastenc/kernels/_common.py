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
import logging
import os
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


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs stay IEEE (the torch reference does not use TF32); 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


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
    ):
        self.name = fn.__name__
        self.fn = fn
        self.configs = list(configs or [])
        if self.configs and not autotune_enabled():
            self.configs = self.configs[:1]
        self.interpret_meta = dict(interpret_meta or {})
        self._recording: list | None = None
        self._interpreted = InterpretedFunction(fn)
        jitted = triton.jit(fn)  # an InterpretedFunction when TRITON_INTERPRET was set at import
        self._gpu_compiled = isinstance(jitted, JITFunction)
        self.autotuned = bool(configs) and self._gpu_compiled
        self._compiled = triton.autotune(configs=list(configs), key=list(key))(jitted) if self.autotuned else jitted

    def interpreting(self, device: torch.device) -> bool:
        return device.type != "cuda" or not self._gpu_compiled

    @property
    def compiled(self):
        """The compiled (possibly autotuned) kernel, e.g. to read ``best_config`` after a launch."""
        return self._compiled

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
                self._launch(grid, args, kwargs)
        else:
            self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs) -> None:
        if self.autotuned:
            self._compiled[grid](*args, **kwargs)
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
