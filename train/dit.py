"""Frozen diffusion transformers the student is distilled through: Flux and PixArt-α.

Each wrapper reproduces what its diffusers pipeline does at inference — latent shapes and packing,
the 20-step schedule, guidance, text conditioning — using the pipeline's own helpers, so the student
is trained on exactly the inputs it will see:

* Flux (``FluxTransformer2DModel`` + ``FlowMatchEulerDiscreteScheduler``): packed latents, sigmas
  ``linspace(1, 1/N, N)`` shifted by ``mu(image_seq_len)``, embedded guidance, the pooled CLIP vector
  as ``pooled_projections`` (``dit.pooled = clip``; ``zeros`` is an explicit choice), no T5 mask.
* PixArt-α (``PixArtTransformer2DModel`` + its scheduler, DPM-Solver++ by default): classifier-free
  guidance against the negative prompt's embedding, the T5 attention mask, learned-sigma channels
  dropped, resolution/aspect micro-conditions for the 1024 px model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastenc.errors import ConfigError

from .config import TrainConfig
from .student import TORCH_DTYPES

log = logging.getLogger("fastenc.train")

#: FLUX.1-dev's scheduler config, used when the pipeline folder has no scheduler/.
FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


@dataclass
class Cond:
    """Text conditioning for one batch (teacher's or student's)."""

    embeds: torch.Tensor  # [B, L, P]
    mask: torch.Tensor | None = None  # [B, L] (PixArt passes it to the DiT)
    pooled: torch.Tensor | None = None  # [B, Dp] pooled CLIP (Flux)
    neg_embeds: torch.Tensor | None = None  # [B, L, P] negative prompt (PixArt CFG)
    neg_mask: torch.Tensor | None = None  # [B, L]


@dataclass
class Trajectory:
    """State of one batch's denoising run: latents, a private scheduler, guidance per sample."""

    latents: torch.Tensor  # Flux: packed [B, S, 4C]; PixArt: [B, C, h, w]
    scheduler: Any
    timesteps: torch.Tensor  # [N]
    guidance: torch.Tensor  # [B]
    height: int  # pixels
    width: int
    extra: dict = field(default_factory=dict)


def _subfolder(path: Path, name: str | None) -> tuple[Path, str | None]:
    """``(path, name)`` when ``path/name`` exists, else ``(path, None)`` (a bare model folder)."""
    if name and (path / name).is_dir():
        return path, name
    return path, None


def draw_guidance(values: list[float], batch: int, generator: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(values), (batch,), generator=generator)
    return torch.tensor(values, dtype=torch.float32)[idx]  # [B]


class FrozenDiT:
    kind = ""

    def __init__(self, transformer, scheduler, cfg: TrainConfig, device: torch.device):
        self.transformer = transformer
        self.scheduler_template = scheduler
        self.num_steps = cfg.dit.num_inference_steps
        self.guidance_values = cfg.guidance
        self.vae_scale_factor = cfg.dit.vae_scale_factor
        self.device = device
        self.dtype = transformer.dtype

    def new_scheduler(self):
        return type(self.scheduler_template).from_config(self.scheduler_template.config)

    # subclass API ------------------------------------------------------------------------
    text_dim: int
    pooled_dim: int | None = None

    def start(self, batch: int, resolution: int, generator: torch.Generator) -> Trajectory:
        raise NotImplementedError

    def predict(self, traj: Trajectory, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def step(self, traj: Trajectory, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Advance the latent with ``pred`` (the teacher's prediction during training)."""
        return traj.scheduler.step(pred, t, latents, return_dict=False)[0]

    def spatial_latents(self, traj: Trajectory, latents: torch.Tensor) -> torch.Tensor:
        return latents  # [B, C, h, w]

    def decode(self, traj: Trajectory, latents: torch.Tensor, vae) -> torch.Tensor:
        raise NotImplementedError


class FluxDiT(FrozenDiT):
    kind = "flux"

    def __init__(self, transformer, scheduler, cfg, device):
        super().__init__(transformer, scheduler, cfg, device)
        self.text_dim = int(transformer.config.joint_attention_dim)
        self.pooled_dim = int(transformer.config.pooled_projection_dim)
        self.channels = int(transformer.config.in_channels) // 4

    def latent_hw(self, resolution: int) -> tuple[int, int]:
        h = 2 * (int(resolution) // (self.vae_scale_factor * 2))
        if h == 0:
            raise ConfigError(f"resolution {resolution}px is smaller than one Flux latent patch "
                              f"({self.vae_scale_factor * 2}px)")
        return h, h

    def start(self, batch, resolution, generator):
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

        h, w = self.latent_hw(resolution)
        noise = torch.randn((batch, self.channels, h, w), generator=generator)  # [B, C, h, w]
        latents = FluxPipeline._pack_latents(noise, batch, self.channels, h, w).to(self.device)  # [B, S, 4C]
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, self.dtype)  # [S, 3]
        scheduler = self.new_scheduler()
        sigmas = np.linspace(1.0, 1 / self.num_steps, self.num_steps)
        conf = scheduler.config
        kwargs = {}
        if conf.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(latents.shape[1], conf.get("base_image_seq_len", 256),
                                           conf.get("max_image_seq_len", 4096), conf.get("base_shift", 0.5),
                                           conf.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, **kwargs)
        guidance = draw_guidance(self.guidance_values, batch, generator).to(self.device)
        return Trajectory(latents, scheduler, scheduler.timesteps, guidance, resolution, resolution,
                          {"img_ids": img_ids, "h": h, "w": w})

    def predict(self, traj, latents, t, cond):
        B, L = latents.shape[0], cond.embeds.shape[1]
        txt_ids = torch.zeros(L, 3, device=self.device, dtype=self.dtype)
        timestep = t.expand(B).to(self.dtype) / 1000
        guidance = traj.guidance.to(self.dtype) if self.transformer.config.guidance_embeds else None
        pooled = cond.pooled.to(self.device, self.dtype) if cond.pooled is not None else None
        return self.transformer(
            hidden_states=latents.to(self.dtype), timestep=timestep, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=cond.embeds.to(self.dtype), txt_ids=txt_ids, img_ids=traj.extra["img_ids"],
            return_dict=False,
        )[0]  # [B, S, 4C]

    def spatial_latents(self, traj, latents):
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        return FluxPipeline._unpack_latents(latents, traj.height, traj.width, self.vae_scale_factor)

    def decode(self, traj, latents, vae):
        lat = self.spatial_latents(traj, latents)
        lat = lat / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(lat.to(vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]


class PixArtDiT(FrozenDiT):
    kind = "pixart"

    def __init__(self, transformer, scheduler, cfg, device):
        super().__init__(transformer, scheduler, cfg, device)
        self.text_dim = int(transformer.config.caption_channels)
        self.channels = int(transformer.config.in_channels)
        self.learned_sigma = int(transformer.config.out_channels) // 2 == self.channels

    def start(self, batch, resolution, generator):
        h = int(resolution) // self.vae_scale_factor
        if h == 0:
            raise ConfigError(f"resolution {resolution}px is smaller than one latent pixel")
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(self.num_steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        noise = torch.randn((batch, self.channels, h, h), generator=generator)  # [B, C, h, w]
        latents = noise.to(self.device) * scheduler.init_noise_sigma
        guidance = draw_guidance(self.guidance_values, batch, generator).to(self.device)
        extra = {"added": {"resolution": None, "aspect_ratio": None}}
        if self.transformer.config.sample_size == 128:  # the 1024 px model's micro-conditions (as the pipeline)
            res = torch.tensor([resolution, resolution], dtype=self.dtype, device=self.device).repeat(2 * batch, 1)
            ar = torch.tensor([1.0], dtype=self.dtype, device=self.device).repeat(2 * batch, 1)
            extra["added"] = {"resolution": res, "aspect_ratio": ar}
        return Trajectory(latents, scheduler, scheduler.timesteps, guidance, resolution, resolution, extra)

    def predict(self, traj, latents, t, cond):
        if cond.neg_embeds is None:
            raise ValueError("PixArt needs the negative prompt's embedding for classifier-free guidance")
        B = latents.shape[0]
        x = traj.scheduler.scale_model_input(torch.cat([latents, latents]), t)  # [2B, C, h, w]
        embeds = torch.cat([cond.neg_embeds, cond.embeds]).to(self.dtype)  # [2B, L, P]
        mask = torch.cat([cond.neg_mask, cond.mask]) if cond.mask is not None else None  # [2B, L]
        out = self.transformer(
            x.to(self.dtype), encoder_hidden_states=embeds, encoder_attention_mask=mask,
            timestep=t.expand(2 * B), added_cond_kwargs=traj.extra["added"], return_dict=False,
        )[0]  # [2B, C or 2C, h, w]
        if self.learned_sigma:
            out = out[:, : self.channels]
        uncond, text = out.chunk(2)
        g = traj.guidance.view(B, 1, 1, 1).to(out.dtype)
        return uncond + g * (text - uncond)  # [B, C, h, w]

    def decode(self, traj, latents, vae):
        return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]


def _load_scheduler(cfg: TrainConfig, kind: str):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin

    path = Path(cfg.dit.path)
    folder = path / cfg.dit.scheduler_subfolder
    config_file = folder / "scheduler_config.json"
    if config_file.is_file():
        import diffusers

        try:
            name = json.loads(config_file.read_text()).get("_class_name", "")
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise ConfigError(f"{config_file}: unreadable scheduler config ({exc})") from None
        cls = getattr(diffusers, name, None)
        if not isinstance(cls, type) or not issubclass(cls, SchedulerMixin):
            raise ConfigError(f"{config_file}: unknown scheduler class {name!r}")
        return cls.from_pretrained(str(folder))
    if kind == "flux":
        log.info("dit: %s has no %s/; using FLUX.1-dev's flow-match Euler schedule", path, cfg.dit.scheduler_subfolder)
        return FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    log.info("dit: %s has no %s/; using PixArt-α's DPM-Solver++ schedule", path, cfg.dit.scheduler_subfolder)
    return DPMSolverMultistepScheduler()


def _transformer_folder(cfg: TrainConfig) -> Path:
    path = Path(cfg.dit.path)
    if not path.is_dir():
        raise ConfigError(f"dit.path {path}: not a directory (a diffusers pipeline or transformer folder)")
    root, sub = _subfolder(path, cfg.dit.transformer_subfolder)
    where = root / sub if sub else root
    if not (where / "config.json").is_file():
        raise ConfigError(f"dit.path {path}: no {cfg.dit.transformer_subfolder}/config.json (or config.json)")
    return where


def dit_widths(cfg: TrainConfig) -> tuple[int, int | None]:
    """(text width, pooled width) from the transformer's config.json, without loading its weights."""
    where = _transformer_folder(cfg)
    try:
        conf = json.loads((where / "config.json").read_text())
        if cfg.dit.kind == "flux":
            return int(conf.get("joint_attention_dim", 4096)), int(conf.get("pooled_projection_dim", 768))
        return int(conf.get("caption_channels", 4096)), None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{where}/config.json: unreadable ({exc})") from None


def load_dit(cfg: TrainConfig, device: torch.device) -> FrozenDiT:
    """The frozen transformer (no grads, eval, optional gradient checkpointing) and its scheduler."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    where = _transformer_folder(cfg)
    cls = FluxTransformer2DModel if cfg.dit.kind == "flux" else PixArtTransformer2DModel
    try:
        transformer = cls.from_pretrained(str(where), torch_dtype=TORCH_DTYPES[cfg.dit.dtype])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"dit.path {where}: cannot load a {cls.__name__} ({exc})") from None
    transformer.requires_grad_(False)
    transformer.eval()
    transformer.to(device)
    if cfg.dit.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    scheduler = _load_scheduler(cfg, cfg.dit.kind)
    wrapper = (FluxDiT if cfg.dit.kind == "flux" else PixArtDiT)(transformer, scheduler, cfg, device)
    log.info("dit: %s from %s (%s, text width %d), %d-step %s", cls.__name__, where, cfg.dit.dtype, wrapper.text_dim,
             cfg.dit.num_inference_steps, type(scheduler).__name__)
    return wrapper


def load_vae(cfg: TrainConfig, device: torch.device):
    if not cfg.dit.vae_subfolder:
        return None
    from diffusers import AutoencoderKL

    folder = Path(cfg.dit.path) / cfg.dit.vae_subfolder
    if not (folder / "config.json").is_file():
        raise ConfigError(f"dit.vae_subfolder: {folder}/config.json not found")
    vae = AutoencoderKL.from_pretrained(str(cfg.dit.path), subfolder=cfg.dit.vae_subfolder,
                                        torch_dtype=TORCH_DTYPES[cfg.dit.dtype])
    return vae.requires_grad_(False).eval().to(device)


class PooledCLIP:
    """Flux's pooled text input: ``CLIPTextModel(ids).pooler_output`` with the pipeline's tokenisation
    (pad to the tokenizer's max length, 77 for CLIP, truncating)."""

    def __init__(self, path: str | Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer, CLIPTextModel

        path = Path(path)
        te = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        tk = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not (te / "config.json").is_file():
            raise ConfigError(f"dit.clip_path {path}: no text_encoder/config.json (Flux's CLIP text encoder)")
        try:
            self.model = CLIPTextModel.from_pretrained(str(te), torch_dtype=dtype).requires_grad_(False).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(tk))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"dit.clip_path {path}: cannot load the CLIP text encoder/tokenizer ({exc})") from None
        self.max_length = min(int(self.tokenizer.model_max_length), int(self.model.config.max_position_embeddings))
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        return self.model(ids.to(self.device), output_hidden_states=False).pooler_output  # [B, Dp]
