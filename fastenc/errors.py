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
