"""Encoder configuration: a frozen dataclass plus the registry of named sizes.

The student sizes follow the T5 v1.1 / flan-T5 family; ``xxl`` is the T5-v1.1-XXL
teacher, which has no projector and returns its 4096-dim hidden states.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Sequence length each diffusion pipeline feeds its T5 encoder.
TARGET_MAX_LENGTH: dict[str, int] = {
    "flux-dev": 512,
    "flux-schnell": 256,
    "sd3": 256,
    "pixart-alpha": 120,
}

ACTIVATIONS = ("gelu_new", "gelu", "relu")


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

    def __post_init__(self) -> None:
        for field in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size", "num_buckets", "max_distance"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"EncoderConfig.{field} must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"EncoderConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ConfigError(f"EncoderConfig.projection_dim must be positive or None, got {self.projection_dim!r}")

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
        """Build from a transformers T5 config dict (optionally with DistillT5's projector keys)."""
        try:
            d_model = int(cfg["d_model"])
            d_ff = int(cfg["d_ff"])
            num_layers = int(cfg["num_layers"])
            num_heads = int(cfg["num_heads"])
        except KeyError as exc:
            raise ConfigError(f"{source}: missing key {exc.args[0]!r} (not a T5 config?)") from None
        proj = cfg.get("feed_forward_proj", "gated-gelu")
        gated = proj.startswith("gated-")
        act = proj.split("-", 1)[1] if gated else proj
        if act == "gelu" and gated:
            act = "gelu_new"  # transformers maps 'gated-gelu' to the tanh approximation
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported feed_forward_proj {proj!r}")
        fastenc = cfg.get("fastenc", {})
        if "projection_dim" in fastenc:
            projection_dim = fastenc["projection_dim"]
        elif "project_out_dim" in cfg:
            projection_dim = int(cfg["project_out_dim"])
            in_dim = int(cfg.get("project_in_dim", d_model))
            if in_dim != d_model:
                raise ConfigError(f"{source}: project_in_dim {in_dim} != d_model {d_model}")
        else:
            projection_dim = None
        return cls(
            d_model=d_model,
            d_ff=d_ff,
            num_layers=num_layers,
            num_heads=num_heads,
            d_kv=int(cfg.get("d_kv", d_model // num_heads)),
            vocab_size=int(cfg.get("vocab_size", 32128)),
            num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
            max_distance=int(cfg.get("relative_attention_max_distance", 128)),
            eps=float(cfg.get("layer_norm_epsilon", 1e-6)),
            gated=gated,
            activation=act,
            projection_dim=projection_dim,
            projector_bias=bool(fastenc.get("projector_bias", cfg.get("project_bias", False))),
            name=str(fastenc.get("name", "custom")),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-compatible T5 config dict (DistillT5 keys when there is a projector)."""
        act = "gelu" if self.activation == "gelu_new" else self.activation
        cfg: dict[str, Any] = {
            "model_type": "t5",
            "architectures": ["T5EncoderWithProjection" if self.projection_dim else "T5EncoderModel"],
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
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data, source=str(path))


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


def max_length_for(target: str) -> int:
    try:
        return TARGET_MAX_LENGTH[target]
    except KeyError:
        raise ConfigError(f"unknown target {target!r}; choose one of {', '.join(TARGET_MAX_LENGTH)}") from None
