"""fastenc: small, fast distilled T5 text encoders for diffusion transformers.

Names are imported on first use (PEP 562), so ``import fastenc`` and ``fastenc --help`` stay fast:
torch is loaded only when something that needs it is touched.
"""

from __future__ import annotations

import os as _os
import sys as _sys
from importlib import import_module
from typing import TYPE_CHECKING

#: OpenMP's idle worker threads spin by default; on a machine whose other cores are busy they take the
#: core a working thread needs (torch's op-table path ran 6-10x slower with one of two cores busy, 1.2-1.6x
#: with PASSIVE). The setting is read once, when torch's OpenMP runtime loads, so it can be given only
#: when fastenc is imported before torch; a value the user set is kept (OMP_WAIT_POLICY=ACTIVE restores
#: spinning).
OMP_WAIT_POLICY_DEFAULT = "PASSIVE"
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)

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
