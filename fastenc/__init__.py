"""fastenc: small, fast distilled T5 text encoders for diffusion transformers.

Names are imported on first use (PEP 562), so ``import fastenc`` and ``fastenc --help`` stay fast:
torch is loaded only when something that needs it is touched.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import BackendUnavailable, CheckpointError, ConfigError, FastencError, InputError

__version__ = "0.1.0"

_LAZY = {
    "load": "api", "save": "api", "Encoder": "api", "Embeddings": "api",
    "SIZES": "config", "TARGET_MAX_LENGTH": "config", "EncoderConfig": "config",
    "T5Encoder": "model",
}

__all__ = [
    "load", "save", "Encoder", "Embeddings", "EncoderConfig", "T5Encoder", "SIZES", "TARGET_MAX_LENGTH",
    "FastencError", "ConfigError", "CheckpointError", "InputError", "BackendUnavailable",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import Embeddings, Encoder, load, save
    from .config import SIZES, TARGET_MAX_LENGTH, EncoderConfig
    from .model import T5Encoder


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastenc' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
