"""The export contract every artifact follows: I/O names, dtypes, dynamic axes, shape profile.

Inputs ``input_ids`` (int32, [B, L]) and ``attention_mask`` (int32, [B, L]; 1 = token, 0 = padding),
output ``text_embeddings`` ([B, L, P]) — the names NVIDIA's TensorRT demo/Diffusion uses for its T5
engine. Batch and sequence are dynamic; the :class:`Profile` bounds them (min/opt/max per axis,
the optimisation profile of a TensorRT engine and the range every runner accepts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..config import EncoderConfig
from ..errors import ConfigError, InputError
from ..model import T5Encoder

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
INPUT_NAMES = (INPUT_IDS, ATTENTION_MASK)
OUTPUT_NAME = "text_embeddings"
INPUT_DTYPE = torch.int32
BATCH_AXIS, SEQ_AXIS = "batch", "seq"

#: Artifact dtypes (``int8`` only for the dynamically quantised ONNX Runtime model).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def dtype_name(dtype: str | torch.dtype | None, *, allow_int8: bool = False) -> str | None:
    """Normalise ``torch.bfloat16`` / ``"bfloat16"`` / ``"bf16"`` to ``"bf16"`` (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ConfigError(f"unsupported dtype {dtype}; choose one of fp32, bf16, fp16")
        return DTYPE_NAMES[dtype]
    name = str(dtype).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    choices = [*DTYPES, "int8"] if allow_int8 else list(DTYPES)
    if name not in choices:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(choices)}")
    return name


@dataclass(frozen=True)
class Profile:
    """Shape range of an artifact: min/opt/max batch and sequence length."""

    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int

    def __post_init__(self) -> None:
        for axis in ("batch", "seq"):
            lo, opt, hi = (getattr(self, f"{k}_{axis}") for k in ("min", "opt", "max"))
            for v in (lo, opt, hi):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"profile {axis} sizes must be positive integers, got {v!r}")
            if not lo <= opt <= hi:
                raise ConfigError(f"profile {axis} must satisfy min <= opt <= max, got {lo}/{opt}/{hi}")

    def min_shape(self) -> tuple[int, int]:
        return (self.min_batch, self.min_seq)

    def opt_shape(self) -> tuple[int, int]:
        return (self.opt_batch, self.opt_seq)

    def max_shape(self) -> tuple[int, int]:
        return (self.max_batch, self.max_seq)

    def input_shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """``{input name: (min, opt, max)}`` as a TensorRT optimisation profile takes them."""
        return {name: (self.min_shape(), self.opt_shape(), self.max_shape()) for name in INPUT_NAMES}

    def contains(self, batch: int, seq: int) -> bool:
        return self.min_batch <= batch <= self.max_batch and self.min_seq <= seq <= self.max_seq

    def check(self, batch: int, seq: int, where: object) -> None:
        """Raise :class:`InputError` when ``[batch, seq]`` is outside the profile ``where`` was built for."""
        if not self.contains(batch, seq):
            raise InputError(
                f"input shape [batch={batch}, seq={seq}] is outside the profile {where} was built for "
                f"(batch {self.min_batch}..{self.max_batch}, seq {self.min_seq}..{self.max_seq}); "
                f"split the batch or re-export with a larger --max-batch/--max-seq"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, where: object = "sidecar") -> "Profile":
        try:
            return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: malformed shape profile {data!r} ({exc!r})") from None


#: Largest ``--max-batch`` / ``--max-seq`` an export accepts. T5's relative position buckets work at any
#: length, but attention memory grows with the square of the length (verify runs a full-length
#: sequence: 12 heads x 4096^2 x 4 bytes = 0.8 GB of scores for the base model); the targets use <= 512.
MAX_BATCH_LIMIT = 1024
MAX_SEQ_LIMIT = 4096


def make_profile(max_batch: int, max_seq: int, *, opt_batch: int | None = None, opt_seq: int | None = None) -> Profile:
    """Profile for ``--max-batch``/``--max-seq``: min 1, opt batch 1 (one prompt per call, as diffusers
    encodes) and opt seq = max seq (pipelines pad every prompt to the target's length)."""
    for flag, value, limit in (("--max-batch", max_batch, MAX_BATCH_LIMIT), ("--max-seq", max_seq, MAX_SEQ_LIMIT)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if value > limit:
            raise ConfigError(f"{flag} {value} is more than {limit}, the largest an export supports "
                              f"(attention memory grows with batch x length^2)")
    opt_b = 1 if opt_batch is None else opt_batch
    opt_l = max_seq if opt_seq is None else opt_seq
    return Profile(1, opt_b, max_batch, 1, opt_l, max_seq)


class ExportModule(nn.Module):
    """The contract around the one model: int32 ``input_ids``/``attention_mask`` in, ``text_embeddings`` out."""

    def __init__(self, model: T5Encoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [B, L] int32 (nn.Embedding takes int32 indices directly)
        return self.model(input_ids, attention_mask)  # [B, L, P]


def sample_inputs(cfg: EncoderConfig, profile: Profile, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Example ``(input_ids, attention_mask)`` for tracing: batch and seq >= 2 where the profile allows
    (size-1 example axes get specialised), the first row partly padded."""
    batch, seq = min(2, profile.max_batch), min(8, profile.max_seq)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen, dtype=INPUT_DTYPE)  # [B, L]
    mask = torch.ones(batch, seq, dtype=INPUT_DTYPE)  # [B, L]
    if seq > 2:
        mask[0, seq - seq // 3 :] = 0
    return ids, mask


def dynamic_shapes(profile: Profile) -> tuple[dict[int, Any], dict[int, Any]]:
    """``torch.export`` dynamic shapes for (input_ids, attention_mask): batch and seq as ``Dim``s
    bounded by the profile (an axis whose max is 1 stays static)."""
    dims: dict[int, Any] = {}
    if profile.max_batch > 1:
        dims[0] = torch.export.Dim(BATCH_AXIS, min=1, max=profile.max_batch)
    if profile.max_seq > 1:
        dims[1] = torch.export.Dim(SEQ_AXIS, min=1, max=profile.max_seq)
    return dict(dims), dict(dims)
