"""Where the teacher's embeddings come from: the precomputed cache, or T5-XXL run live.

Both paths share :func:`tokenize` and :func:`teacher_forward`, so a cached embedding equals what the
live teacher returns for the same prompt. When a cache is present it is used; prompts it lacks are
encoded by the live teacher (loaded on first need) if ``teacher.path`` is set, else training refuses
to start and names the first missing prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import fastenc
from fastenc.errors import ConfigError

from .config import TrainConfig
from .student import TORCH_DTYPES
from .teacher_cache import TeacherCache, tokenizer_fingerprint

log = logging.getLogger("fastenc.train")


def tokenize(tokenizer, prompts: list[str], max_length: int, prepare=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask: [B, L] long, padded to ``max_length`` as the pipelines do; ``prepare`` is the
    target's prompt clean-up (Wan's ``prompt_clean``), applied first as the pipeline applies it."""
    if prepare is not None:
        prompts = prepare(list(prompts))
    batch = tokenizer(prompts, max_length=max_length, warn=False)  # the data report counts over-length prompts
    return batch.input_ids, batch.attention_mask


@torch.no_grad()
def teacher_forward(model, ids: torch.Tensor, mask: torch.Tensor, masked: bool) -> torch.Tensor:
    device = model.embed.weight.device
    return model(ids.to(device), mask.to(device) if masked else None)  # [B, L, D]


@dataclass
class TeacherOut:
    embeds: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L]
    pooled: torch.Tensor | None  # [B, Dp]


def load_live_teacher(cfg: TrainConfig, device: torch.device):
    if not cfg.teacher.path:
        raise ConfigError("teacher.path is not set (needed to encode prompts the teacher cache lacks)")
    enc = fastenc.load(cfg.teacher.path, subfolder=cfg.teacher.subfolder, backend="torch", device=device,
                       dtype=TORCH_DTYPES[cfg.teacher.dtype], cache=False)
    enc.model.requires_grad_(False)
    log.info("teacher: %s (%s, width %d) loaded live", cfg.teacher.path, cfg.teacher.dtype, enc.config.output_dim)
    return enc


class TeacherSource:
    """Teacher embeddings (+ pooled CLIP) for prompts, from the cache when present, else live."""

    def __init__(self, cfg: TrainConfig, tokenizer, *, device: torch.device, dim: int, pooled_dim: int | None,
                 clip=None, pooled_mode: str | None = None, cache: TeacherCache | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.dim = dim
        self.pooled_dim = pooled_dim
        self.max_length = cfg.max_length()
        self.masked = cfg.masked
        self.mode = pooled_mode or cfg.pooled
        self.clip = clip
        self._live = None
        self.cache = cache
        if self.cache is None and TeacherCache.present(cfg.teacher.cache):
            self.cache = TeacherCache(cfg.teacher.cache)
        if self.cache is not None:
            self.cache.check(target=cfg.target, max_length=self.max_length, masked=self.masked,
                             tokenizer=tokenizer_fingerprint(tokenizer), dim=dim)
            if self.mode == "clip" and self.cache.has_pooled and self.cache.meta.pooled_dim != pooled_dim:
                raise ConfigError(f"{cfg.teacher.cache}: cached pooled width {self.cache.meta.pooled_dim} != the "
                                  f"DiT's {pooled_dim}")
            log.info("teacher: reading %d cached embeddings from %s", len(self.cache), cfg.teacher.cache)
        elif cfg.teacher.cache and not cfg.teacher.path:
            raise ConfigError(f"teacher.cache {cfg.teacher.cache}: no index.json there and teacher.path is not set; "
                              "build it with `python -m train.cache_teacher` or set teacher.path")
        elif not cfg.teacher.path:
            raise ConfigError("no teacher: set teacher.path (T5-XXL) or teacher.cache (built by "
                              "`python -m train.cache_teacher`)")

    def require(self, prompts) -> None:
        """Fail before training if the cache lacks prompts and no live teacher can fill in."""
        if self.cache is None:
            return
        missing = self.cache.missing(prompts)
        if missing and not self.cfg.teacher.path:
            raise ConfigError(f"{self.cfg.teacher.cache}: teacher cache lacks {len(missing)} of the training prompts "
                              f"(first: {missing[0]!r}) and teacher.path is not set; rebuild the cache with "
                              "`python -m train.cache_teacher --force`")
        if missing:
            log.info("teacher: %d prompts are not cached; they will be encoded live", len(missing))

    @property
    def live(self):
        if self._live is None:
            self._live = load_live_teacher(self.cfg, self.device)
            if self._live.config.output_dim != self.dim:
                raise ConfigError(f"teacher.path {self.cfg.teacher.path}: width {self._live.config.output_dim} != "
                                  f"the DiT's text width {self.dim}")
        return self._live

    def _pooled(self, prompts: list[str], cached: torch.Tensor | None) -> torch.Tensor | None:
        if self.mode == "none":
            return None
        if self.mode == "zeros":
            return torch.zeros(len(prompts), self.pooled_dim, device=self.device)
        if cached is not None:
            return cached.to(self.device)
        if self.clip is None:
            raise ConfigError("dit.pooled=clip but neither the teacher cache holds pooled vectors nor a CLIP text "
                              "encoder is loaded (set dit.clip_path)")
        return self.clip(prompts)

    def get(self, prompts: list[str]) -> TeacherOut:
        ids, mask = tokenize(self.tokenizer, prompts, self.max_length, self.cfg.target_row.prepare)
        if self.cache is not None and not self.cache.missing(prompts):
            embeds, _, pooled = self.cache.get(prompts)
            return TeacherOut(embeds.to(self.device), mask.to(self.device), self._pooled(prompts, pooled))
        embeds = teacher_forward(self.live.model, ids, mask, self.masked)
        return TeacherOut(embeds, mask.to(self.device), self._pooled(prompts, None))
