"""Targets: one row per diffusion pipeline family, saying how that pipeline feeds its T5 (or umT5) encoder
and what it does with the output. ``Encoder.encode(prompts, target=...)`` follows the row, so its
``embeds`` are the tensor the pipeline hands its transformer; ``use_in_pipeline`` finds the encoder slot
and checks the width through the same row. Every pipeline is a row here, never a branch in code.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError

if TYPE_CHECKING:  # torch is not imported by the table itself (fastenc --help stays fast)
    import torch


def _wan_clean(text: str) -> str:
    """Wan's ``prompt_clean``: ftfy (when installed, as diffusers does), HTML entities unescaped twice,
    runs of whitespace collapsed to one space, stripped."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


#: Prompt clean-ups a pipeline applies before tokenising, by the name a row gives.
CLEANERS: dict[str, Callable[[str], str]] = {"wan": _wan_clean}


@dataclass(frozen=True)
class Target:
    """How one pipeline family uses its T5 encoder (``diffusers`` 0.42).

    ``pipelines``: class-name prefixes of the diffusers pipelines served (matched along the class's MRO);
    ``encoder_slot``: the component holding T5 (its tokenizer is ``tokenizer`` + the same suffix);
    ``max_length``: the pipeline's default ``max_sequence_length``; ``masked``: it passes the attention
    mask to the encoder (else padding is encoded like any token); ``width_field``: the transformer config
    attribute holding the text width the encoder must produce; ``zero_padding``: it zeroes the embeddings
    past each prompt's length; ``clean``: a :data:`CLEANERS` name it applies to prompts first;
    ``family``: the teacher encoder (``t5`` T5-v1.1-XXL, ``umt5`` umT5-XXL)."""

    name: str
    pipelines: tuple[str, ...]
    encoder_slot: str
    max_length: int
    masked: bool
    width_field: str
    zero_padding: bool = False
    clean: str | None = None
    family: str = "t5"

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 1:
            raise ConfigError(f"Target {self.name!r}: max_length must be a positive integer, got {self.max_length!r}")
        if self.clean is not None and self.clean not in CLEANERS:
            raise ConfigError(f"Target {self.name!r}: clean must be one of {', '.join(CLEANERS)} or None, "
                              f"got {self.clean!r}")
        if not self.encoder_slot.startswith("text_encoder"):
            raise ConfigError(f"Target {self.name!r}: encoder_slot must be a text_encoder* component, "
                              f"got {self.encoder_slot!r}")

    @property
    def tokenizer_slot(self) -> str:
        return "tokenizer" + self.encoder_slot.removeprefix("text_encoder")

    def prepare(self, prompts: list[str]) -> list[str]:
        """The prompts as the pipeline tokenises them."""
        return prompts if self.clean is None else [CLEANERS[self.clean](p) for p in prompts]

    def finish(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's output ``embeds`` [B, L, P] as the pipeline hands it on (``mask`` [B, L] of 0/1)."""
        if self.zero_padding:
            embeds = embeds.masked_fill(mask.to(embeds.device).unsqueeze(-1) == 0, 0)
        return embeds


_ROWS = (
    Target("flux-dev", ("Flux",), "text_encoder_2", 512, masked=False, width_field="joint_attention_dim"),
    Target("flux-schnell", ("Flux",), "text_encoder_2", 256, masked=False, width_field="joint_attention_dim"),
    Target("sd3", ("StableDiffusion3",), "text_encoder_3", 256, masked=False, width_field="joint_attention_dim"),
    Target("sd3.5", ("StableDiffusion3",), "text_encoder_3", 256, masked=False, width_field="joint_attention_dim"),
    Target("pixart-alpha", ("PixArtAlpha",), "text_encoder", 120, masked=True, width_field="caption_channels"),
    Target("pixart-sigma", ("PixArtSigma",), "text_encoder", 300, masked=True, width_field="caption_channels"),
    Target("chroma", ("Chroma",), "text_encoder", 512, masked=True, width_field="joint_attention_dim"),
    Target("wan", ("Wan",), "text_encoder", 512, masked=True, width_field="text_dim", zero_padding=True,
           clean="wan", family="umt5"),
    Target("ltx-video", ("LTX",), "text_encoder", 128, masked=False, width_field="caption_channels"),
    Target("cogvideox", ("CogVideoX",), "text_encoder", 226, masked=False, width_field="text_embed_dim"),
    Target("mochi", ("Mochi",), "text_encoder", 256, masked=True, width_field="text_embed_dim"),
)

#: Every target by name.
TARGETS: dict[str, Target] = {t.name: t for t in _ROWS}


def get_target(target: str | Target) -> Target:
    """The :class:`Target` named ``target`` (exact name), or ``target`` itself when it is one."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str):
        raise ConfigError(f"target must be a string, one of {', '.join(TARGETS)}; got {target!r:.60}")
    try:
        return TARGETS[target]
    except KeyError:
        raise ConfigError(f"unknown target {target!r:.60}; choose one of {', '.join(TARGETS)}") from None

