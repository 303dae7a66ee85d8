"""Exceptions fastenc raises for bad input. Each carries one message naming the culprit."""


class FastencError(Exception):
    """Base class of every error fastenc raises on purpose."""


class ConfigError(FastencError, ValueError):
    """Unknown size/target, malformed config.json, bad flag value."""


class CheckpointError(FastencError, ValueError):
    """Missing/corrupt checkpoint files, missing/unexpected keys, shape mismatches."""


class InputError(FastencError, ValueError):
    """Bad prompts or token tensors passed to an encoder."""


class BackendUnavailable(FastencError, RuntimeError):
    """A backend's runtime (Triton, ONNX Runtime, TensorRT, a GPU) is not usable here."""


class NumericsError(FastencError, ArithmeticError):
    """An encoder produced non-finite values (NaN/inf): a result fastenc refuses to return."""


class OutOfMemory(FastencError, MemoryError):
    """An allocation fastenc asked for (weights, a mapped checkpoint) did not fit: the message names its size."""


#: What allocators say when memory ran out: torch's CPU allocator ("DefaultCPUAllocator: not enough memory",
#: "can't allocate memory"), safetensors' mmap ("Cannot allocate memory (os error 12)"), CUDA ("out of memory").
_OOM_WORDS = ("not enough memory", "can't allocate memory", "cannot allocate memory", "os error 12", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is memory exhaustion, whatever the library that raised it calls it."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError) and exc.errno == 12:  # ENOMEM
        return True
    return any(word in str(exc).lower() for word in _OOM_WORDS)


def out_of_memory(what: str, nbytes: int, exc: BaseException | None = None) -> OutOfMemory:
    """The one error for memory exhaustion while ``what`` needed ``nbytes`` (said in GB)."""
    cause = f" ({' '.join(str(exc).split())[:160]})" if exc is not None and str(exc) else ""
    return OutOfMemory(f"out of memory: {what} needs {nbytes / 1e9:.1f} GB, which this process could not "
                       f"allocate{cause}; free memory or raise the limit, or use a smaller size or dtype")
