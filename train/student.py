"""The trained student: fastenc's own :class:`~fastenc.model.T5Encoder` (torch ops), plus its EMA.

Initialisation: ``fastenc.load`` reads any supported checkpoint. A plain T5 checkpoint (e.g. flan-t5-base
in transformers layout) has no projector: the encoder weights are moved into a ``T5Encoder`` whose config
has ``projection_dim`` set to the DiT's text width, and the projector is freshly initialised (seeded).
A fastenc / DistillT5 checkpoint keeps its projector, which must already have the DiT's width.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import fastenc
from fastenc.errors import ConfigError
from fastenc.model import T5Encoder
from fastenc.tokenizer import Tokenizer

from .config import TrainConfig

log = logging.getLogger("fastenc.train")

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def with_projector(model: T5Encoder, projection_dim: int, seed: int) -> T5Encoder:
    """A copy of ``model``'s encoder weights under a fresh, seeded projector of width ``projection_dim``."""
    cfg = model.config.replace(projection_dim=projection_dim)
    with torch.device("meta"):
        new = T5Encoder(cfg, ops=model.ops)
    state = model.state_dict()
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not k.startswith("projector.") for k in missing):
        raise ConfigError(f"cannot move encoder weights under a projector: missing {missing}, unexpected {unexpected}")
    device = model.embed.weight.device
    new.projector.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in (new.projector.fc1, new.projector.fc2):
            layer.reset_parameters()  # nn.Linear's default (Kaiming-uniform) init
    new.projector.to(model.compute_dtype)
    return new


def load_student(cfg: TrainConfig, projection_dim: int) -> T5Encoder:
    """The student module (train mode, grads on), with a projector of width ``projection_dim``."""
    enc = fastenc.load(cfg.student.init, subfolder=cfg.student.subfolder, backend="torch", device="cpu",
                       dtype=TORCH_DTYPES[cfg.student.dtype], cache=False)
    model = enc.model
    if model.config.projection_dim is None:
        log.info("student: %s has no projector; adding a fresh %d -> %d projector", cfg.student.init,
                 model.config.d_model, projection_dim)
        model = with_projector(model, projection_dim, cfg.run.seed)
    elif model.config.projection_dim != projection_dim:
        raise ConfigError(f"student.init {cfg.student.init}: projector width {model.config.projection_dim} != the "
                          f"DiT's text width {projection_dim}")
    model.requires_grad_(True)
    model.train()
    n = sum(p.numel() for p in model.parameters())
    log.info("student: %s, %.1fM parameters (d_model %d, %d layers)", cfg.student.init, n / 1e6,
             model.config.d_model, model.config.num_layers)
    return model


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """``student.tokenizer`` if set, else the one beside the student checkpoint, else the DiT pipeline's T5
    tokenizer (``tokenizer_2/`` for Flux, ``tokenizer/`` for PixArt)."""
    if cfg.student.tokenizer:
        return Tokenizer.from_pretrained(cfg.student.tokenizer)
    looked = []
    init = Path(cfg.student.init)
    for folder in ((init / cfg.student.subfolder) if cfg.student.subfolder else init, Path(cfg.dit.path or "")):
        if str(folder) in ("", ".") or not folder.is_dir():
            continue
        try:
            return Tokenizer.from_pretrained(folder)
        except ConfigError as exc:
            looked.append(str(exc))
    raise ConfigError("no T5 tokenizer found beside student.init or in dit.path"
                      + (f" ({'; '.join(looked)})" if looked else "") + "; set student.tokenizer")


class EMA:
    """Exponential moving average of the student's parameters (fp32 shadow copies)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def copy_to(self, model: T5Encoder) -> T5Encoder:
        """Write the averaged weights into ``model`` (same architecture)."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadow[n].to(p.dtype))
        return model

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.shadow = {n: t.clone() for n, t in state["shadow"].items()}
