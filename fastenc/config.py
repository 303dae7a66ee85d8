"""Encoder configuration: a frozen dataclass plus the registry of named sizes.

The student sizes follow the T5 v1.1 / flan-T5 family; ``xxl`` is the T5-v1.1-XXL
teacher, which has no projector and returns its 4096-dim hidden states.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .targets import TARGETS, get_target

#: Sequence length each diffusion pipeline feeds its T5 encoder (by target; :mod:`fastenc.targets` has the rows).
TARGET_MAX_LENGTH: dict[str, int] = {name: t.max_length for name, t in TARGETS.items()}

ACTIVATIONS = ("gelu_new", "gelu", "relu")

#: Upper bounds on config values (generous: T5-XXL is 4096 / 10240 / 24 / 64, mT5's vocabulary 250k).
#: Checkpoint configs are also checked against the tensors in the file before anything is built.
LIMITS: dict[str, int] = {
    "d_model": 1 << 16,
    "d_ff": 1 << 18,
    "num_layers": 1024,
    "num_heads": 1024,
    "d_kv": 4096,
    "vocab_size": 1 << 22,
    "num_buckets": 4096,
    "max_distance": 1 << 20,
}
MAX_PROJECTION_DIM = 1 << 16
MAX_PARAMETERS = 1 << 37  # ~137 B parameters: far past any T5 encoder
MAX_JSON_BYTES = 16 << 20  # config files are a few KiB
#: transformers ``model_type`` values fastenc reads: T5 and mT5 (one relative-attention-bias table shared by
#: every layer) and umT5 (a table per layer; :attr:`EncoderConfig.per_layer_bias`).
MODEL_TYPES = ("t5", "mt5", "umt5")


@dataclass(frozen=True)
class EncoderConfig:
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    d_kv: int = 64
    vocab_size: int = 32128
    num_buckets: int = 32  # relative-attention buckets
    max_distance: int = 128  # relative-attention max distance
    eps: float = 1e-6  # RMSNorm epsilon
    gated: bool = True  # gated FFN (T5 v1.1) or plain (original T5)
    activation: str = "gelu_new"  # tanh-approximated GELU in T5 v1.1
    projection_dim: int | None = 4096  # projector output; None = no projector (teacher)
    projector_bias: bool = False
    projector_dropout: float = 0.1
    name: str = "custom"
    per_layer_bias: bool = False  # umT5: every layer has its own relative-attention-bias table (T5: one, shared)

    def __post_init__(self) -> None:
        for field, hi in LIMITS.items():
            value = getattr(self, field)
            if not _is_int(value) or not 0 < value <= hi:
                raise ConfigError(f"EncoderConfig.{field} must be an integer in 1..{hi}, got {_short(value)}")
        if self.num_buckets < 4:  # half per direction, a quarter exact: fewer leaves no bucket to use
            raise ConfigError(f"EncoderConfig.num_buckets must be at least 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ConfigError(f"EncoderConfig.max_distance must exceed num_buckets // 4 = {self.num_buckets // 4}, "
                              f"got {self.max_distance}")
        if not _is_number(self.eps) or not 0.0 < float(self.eps) <= 1.0:
            raise ConfigError(f"EncoderConfig.eps must be a finite number in (0, 1], got {_short(self.eps)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"EncoderConfig.activation must be one of {ACTIVATIONS}, got {_short(self.activation)}")
        if self.projection_dim is not None and (not _is_int(self.projection_dim)
                                                or not 0 < self.projection_dim <= MAX_PROJECTION_DIM):
            raise ConfigError(f"EncoderConfig.projection_dim must be an integer in 1..{MAX_PROJECTION_DIM} or None, "
                              f"got {_short(self.projection_dim)}")
        for field in ("gated", "projector_bias", "per_layer_bias"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"EncoderConfig.{field} must be a bool, got {_short(getattr(self, field))}")
        if not _is_number(self.projector_dropout) or not 0.0 <= float(self.projector_dropout) < 1.0:
            raise ConfigError(f"EncoderConfig.projector_dropout must be in [0, 1), got {_short(self.projector_dropout)}")
        if not isinstance(self.name, str):
            raise ConfigError(f"EncoderConfig.name must be a string, got {_short(self.name)}")
        if self.num_parameters > MAX_PARAMETERS:
            raise ConfigError(f"EncoderConfig describes {self.num_parameters:,} parameters, more than fastenc "
                              f"accepts ({MAX_PARAMETERS:,})")

    @property
    def num_parameters(self) -> int:
        """Parameter count of the encoder this config builds (computed, nothing allocated)."""
        ffn_in = (2 if self.gated else 1) * self.d_ff
        block = 2 * self.d_model + 4 * self.d_model * self.inner_dim + self.d_model * (ffn_in + self.d_ff)
        tables = self.num_layers if self.per_layer_bias else 1
        total = self.vocab_size * self.d_model + tables * self.num_buckets * self.num_heads + self.d_model
        total += self.num_layers * block
        if self.projection_dim:
            P = self.projection_dim
            total += self.d_model * P + P * P + (2 * P if self.projector_bias else 0)
        return total

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def output_dim(self) -> int:
        return self.projection_dim if self.projection_dim is not None else self.d_model

    def replace(self, **changes: Any) -> "EncoderConfig":
        return dataclasses.replace(self, **changes)

    # ---- transformers-style config.json -------------------------------------------------

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], *, source: str = "config.json") -> "EncoderConfig":
        """Build from a transformers T5 or umT5 config dict (optionally with DistillT5's projector keys).

        Every value is checked for type and range before use; a bad one raises :class:`ConfigError`
        naming ``source`` and the key. A ``model_type`` other than :data:`MODEL_TYPES` is refused.
        """
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type", "t5")  # configs written before model_type existed are T5
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {_short(model_type)} is not a model fastenc reads; "
                              f"supported model types: {', '.join(MODEL_TYPES)}")
        get = _Reader(cfg, source)
        for key in ("d_model", "d_ff", "num_layers", "num_heads"):
            if key not in cfg:
                raise ConfigError(f"{source}: missing key {key!r} (not a T5 config?)")
        d_model = get.int("d_model", LIMITS["d_model"])
        d_ff = get.int("d_ff", LIMITS["d_ff"])
        num_layers = get.int("num_layers", LIMITS["num_layers"])
        num_heads = get.int("num_heads", LIMITS["num_heads"])
        d_kv = get.int("d_kv", LIMITS["d_kv"], default=max(1, d_model // num_heads))
        proj = get.str("feed_forward_proj", default="gated-gelu")
        gated = proj.startswith("gated-")
        act = proj.split("-", 1)[1] if gated else proj
        if act == "gelu" and gated:
            act = "gelu_new"  # transformers maps 'gated-gelu' to the tanh approximation
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported feed_forward_proj {proj!r}; fastenc runs "
                              f"{', '.join(['gated-gelu', 'gated-relu', *ACTIVATIONS])}")
        fastenc = cfg.get("fastenc", {})
        if not isinstance(fastenc, dict):
            raise ConfigError(f"{source}: key 'fastenc' must be a JSON object, got {_short(fastenc)}")
        sub = _Reader(fastenc, source, prefix="fastenc.")
        if "projection_dim" in fastenc:
            projection_dim = sub.int("projection_dim", MAX_PROJECTION_DIM, allow_none=True)
        elif "project_out_dim" in cfg:
            projection_dim = get.int("project_out_dim", MAX_PROJECTION_DIM)
            in_dim = get.int("project_in_dim", LIMITS["d_model"], default=d_model)
            if in_dim != d_model:
                raise ConfigError(f"{source}: project_in_dim {in_dim} != d_model {d_model}")
        else:
            projection_dim = None
        if "projector_bias" in fastenc:
            projector_bias = sub.bool("projector_bias")
        else:
            projector_bias = get.bool("project_bias", default=False)
        num_buckets = get.int("relative_attention_num_buckets", LIMITS["num_buckets"], default=32)
        max_distance = get.int("relative_attention_max_distance", LIMITS["max_distance"], default=128)
        if num_buckets < 4:
            raise ConfigError(f"{source}: key 'relative_attention_num_buckets' must be at least 4 (T5's "
                              f"bidirectional buckets), got {num_buckets}")
        if max_distance <= num_buckets // 4:
            raise ConfigError(f"{source}: key 'relative_attention_max_distance' must exceed "
                              f"relative_attention_num_buckets // 4 = {num_buckets // 4}, got {max_distance}")
        fields = dict(
            d_model=d_model,
            d_ff=d_ff,
            num_layers=num_layers,
            num_heads=num_heads,
            d_kv=d_kv,
            vocab_size=get.int("vocab_size", LIMITS["vocab_size"], default=32128),
            num_buckets=num_buckets,
            max_distance=max_distance,
            eps=get.eps("layer_norm_epsilon", default=1e-6),
            gated=gated,
            activation=act,
            projection_dim=projection_dim,
            projector_bias=projector_bias,
            name=sub.str("name", default="custom"),
            per_layer_bias=model_type == "umt5",
        )
        try:
            return cls(**fields)
        except ConfigError as exc:  # a combination the dataclass refuses (e.g. too many parameters)
            raise ConfigError(f"{source}: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-compatible T5 (umT5 with ``per_layer_bias``) config dict (DistillT5 keys when
        there is a projector)."""
        act = "gelu" if self.activation == "gelu_new" else self.activation
        family = "UMT5" if self.per_layer_bias else "T5"
        cfg: dict[str, Any] = {
            "model_type": "umt5" if self.per_layer_bias else "t5",
            "architectures": [f"{family}EncoderWithProjection" if self.projection_dim else f"{family}EncoderModel"],
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "d_kv": self.d_kv,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "vocab_size": self.vocab_size,
            "relative_attention_num_buckets": self.num_buckets,
            "relative_attention_max_distance": self.max_distance,
            "layer_norm_epsilon": self.eps,
            "feed_forward_proj": f"gated-{act}" if self.gated else act,
            "is_gated_act": self.gated,
            "dense_act_fn": "gelu_new" if self.activation == "gelu_new" else self.activation,
            "dropout_rate": 0.1,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "fastenc": {
                "name": self.name,
                "projection_dim": self.projection_dim,
                "projector_bias": self.projector_bias,
            },
        }
        if self.projection_dim:
            cfg["project_in_dim"] = self.d_model
            cfg["project_out_dim"] = self.projection_dim
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "EncoderConfig":
        return cls.from_hf_dict(read_json_object(path, ConfigError), source=str(path))


def read_json_object(path: str | Path, error: type[Exception] = ConfigError, *,
                     max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Read a small JSON object file; any problem (missing, unreadable, too large, not UTF-8, not JSON,
    not an object) raises one ``error`` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: larger than {max_bytes // (1 << 20)} MiB; not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer longer than Python's digit limit, deep nesting
        raise error(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------- checked values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MISSING = object()


class _Reader:
    """Typed, range-checked reads from a config dict; errors name the file and the key."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = ""):
        self.data, self.source, self.prefix = data, source, prefix

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: missing key {self.prefix + key!r}")
            return default
        return value

    def _fail(self, key: str, want: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: key {self.prefix + key!r} must be {want}, got {_short(value)}")

    def int(self, key: str, hi: int, *, default: Any = _MISSING, allow_none: bool = False) -> Any:
        value = self._get(key, default)
        if value is None and allow_none:
            return None
        if not _is_int(value) or not 0 < value <= hi:
            raise self._fail(key, f"an integer in 1..{hi}" + (" or null" if allow_none else ""), value)
        return value

    def bool(self, key: str, *, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def str(self, key: str, *, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or len(value) > 200:
            raise self._fail(key, "a string (at most 200 characters)", value)
        return value

    def eps(self, key: str, *, default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if not _is_number(value) or not 0.0 < float(value) <= 1.0:
            raise self._fail(key, "a finite number in (0, 1]", value)
        return float(value)


SIZES: dict[str, EncoderConfig] = {
    "small": EncoderConfig(d_model=512, d_ff=1024, num_layers=8, num_heads=6, name="small"),
    "base": EncoderConfig(d_model=768, d_ff=2048, num_layers=12, num_heads=12, name="base"),
    "large": EncoderConfig(d_model=1024, d_ff=2816, num_layers=24, num_heads=16, name="large"),
    "xl": EncoderConfig(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, name="xl"),
    "xxl": EncoderConfig(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, projection_dim=None, name="xxl"),
}


def get_size(name: str) -> EncoderConfig:
    """Exact lookup in :data:`SIZES` (no fuzzy matching)."""
    try:
        return SIZES[name]
    except KeyError:
        raise ConfigError(f"unknown size {name!r}; choose one of {', '.join(SIZES)}") from None


def max_length_for(target) -> int:
    """The default sequence length of ``target`` (a name in :data:`fastenc.targets.TARGETS`, or a Target)."""
    return get_target(target).max_length
