"""fastenc: small, fast distilled T5 text encoders for diffusion transformers."""

from .api import Embeddings, Encoder, load, save
from .config import SIZES, TARGET_MAX_LENGTH, EncoderConfig
from .errors import BackendUnavailable, CheckpointError, ConfigError, FastencError, InputError
from .model import T5Encoder

__version__ = "0.1.0"
__all__ = [
    "load", "save", "Encoder", "Embeddings", "EncoderConfig", "T5Encoder", "SIZES", "TARGET_MAX_LENGTH",
    "FastencError", "ConfigError", "CheckpointError", "InputError", "BackendUnavailable",
]
