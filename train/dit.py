"""Frozen diffusion transformers the student is distilled through: Flux, PixArt-α, Wan and LTX-Video.

Each wrapper reproduces what its diffusers pipeline does at inference — latent shapes and packing,
the 20-step schedule, guidance, text conditioning — using the pipeline's own helpers, so the student
is trained on exactly the inputs it will see. A wrapper is a few facts (its transformer class, the config
field holding its text width, its default scheduler) and the pipeline's ``start`` / ``predict`` / ``decode``;
the loop in :mod:`train.loop` is the same for all of them:

* Flux (``FluxTransformer2DModel`` + ``FlowMatchEulerDiscreteScheduler``): packed latents, sigmas
  ``linspace(1, 1/N, N)`` shifted by ``mu(image_seq_len)``, embedded guidance, the pooled CLIP vector
  as ``pooled_projections`` (``dit.pooled = clip``; ``zeros`` is an explicit choice), no T5 mask.
* PixArt-α (``PixArtTransformer2DModel`` + its scheduler, DPM-Solver++ by default): classifier-free
  guidance against the negative prompt's embedding, the T5 attention mask, learned-sigma channels
  dropped, resolution/aspect micro-conditions for the 1024 px model.
* Wan (``WanTransformer3DModel`` + UniPC with flow sigmas): 5-D latents ``[B, C, F, h, w]``, the umT5
  embeddings zeroed past each prompt's length (the ``wan`` target), classifier-free guidance against the
  negative prompt, per-token timesteps where the pipeline expands them (``expand_timesteps``).
* LTX-Video (``LTXVideoTransformer3DModel`` + flow-match Euler): latents packed to ``[B, S, C·p·p·p_t]``
  as ``LTXPipeline`` packs them, sigmas shifted by ``mu(frames·h·w)``, the T5 mask passed to the
  transformer (not to T5), classifier-free guidance, the rotary-position scale from the frame rate.
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
#: Wan 2.1 (480p)'s scheduler config: UniPC over flow-matching sigmas.
WAN_SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
                 "num_train_timesteps": 1000}
#: LTX-Video's scheduler config.
LTX_SCHEDULER = {"base_image_seq_len": 1024, "base_shift": 0.95, "max_image_seq_len": 4096, "max_shift": 2.05,
                 "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.1, "use_dynamic_shifting": True}


@dataclass
class Cond:
    """Text conditioning for one batch (teacher's or student's)."""

    embeds: torch.Tensor  # [B, L, P]
    mask: torch.Tensor | None = None  # [B, L] (PixArt and LTX-Video pass it to the DiT)
    pooled: torch.Tensor | None = None  # [B, Dp] pooled CLIP (Flux)
    neg_embeds: torch.Tensor | None = None  # [B, L, P] negative prompt (classifier-free guidance)
    neg_mask: torch.Tensor | None = None  # [B, L]


@dataclass
class Trajectory:
    """State of one batch's denoising run: latents, a private scheduler, guidance per sample."""

    latents: torch.Tensor  # Flux: packed [B, S, 4C]; PixArt: [B, C, h, w]; Wan: [B, C, F, h, w]; LTX: [B, S, C']
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
    """The frozen transformer and its pipeline's conventions; one subclass per ``dit.kind``."""

    kind = ""
    transformer_class = ""  # the diffusers class its transformer/ folder holds
    width_field = ""  # the transformer config field holding the text width
    pooled_field: str | None = None  # ... and the pooled text width (Flux)
    scheduler_default: tuple[str, dict] = ("", {})  # used when the pipeline folder has no scheduler/

    def __init__(self, transformer, scheduler, cfg: TrainConfig, device: torch.device, pipeline: dict | None = None):
        self.transformer = transformer
        self.scheduler_template = scheduler
        self.num_steps = cfg.dit.num_inference_steps
        self.guidance_values = cfg.guidance
        self.vae_scale_factor = cfg.vae_scale_factor
        self.vae_temporal_factor = cfg.vae_temporal_factor
        self.num_frames = cfg.num_frames
        self.pipeline = pipeline or {}  # the pipeline's model_index.json (empty for a bare transformer folder)
        self.device = device
        self.dtype = transformer.dtype
        self.text_dim = int(transformer.config[self.width_field])
        self.pooled_dim = int(transformer.config[self.pooled_field]) if self.pooled_field else None

    def new_scheduler(self):
        return type(self.scheduler_template).from_config(self.scheduler_template.config)

    def latent_video(self, resolution: int, patch: tuple[int, int] = (1, 1)) -> tuple[int, int]:
        """(latent frames, latent height = width) of a ``resolution``-pixel video of ``num_frames`` frames; the
        height is rounded down to a multiple of the transformer's spatial patch, as the pipelines do."""
        h = int(resolution) // (self.vae_scale_factor * patch[1]) * patch[1]
        if h == 0:
            raise ConfigError(f"resolution {resolution}px is smaller than one latent patch "
                              f"({self.vae_scale_factor * patch[1]}px)")
        frames = (self.num_frames - 1) // self.vae_temporal_factor + 1
        if frames % patch[0]:
            raise ConfigError(f"dit.num_frames={self.num_frames}: {frames} latent frames are not a multiple of the "
                              f"transformer's temporal patch {patch[0]}")
        return frames, h

    # subclass API ------------------------------------------------------------------------
    def start(self, batch: int, resolution: int, generator: torch.Generator) -> Trajectory:
        raise NotImplementedError

    def predict(self, traj: Trajectory, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def step(self, traj: Trajectory, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Advance the latent with ``pred`` (the teacher's prediction during training)."""
        return traj.scheduler.step(pred, t, latents, return_dict=False)[0]

    def spatial_latents(self, traj: Trajectory, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] for a preview (a video's first latent frame)."""
        return latents

    def decode(self, traj: Trajectory, latents: torch.Tensor, vae) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] (a video's first frame)."""
        raise NotImplementedError


def flow_match_timesteps(scheduler, seq_len: int, steps: int, device: torch.device) -> torch.Tensor:
    """Flux's and LTX-Video's schedule: sigmas ``linspace(1, 1/N, N)``, shifted by ``mu(seq_len)`` when the
    scheduler shifts dynamically."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    conf = scheduler.config
    kwargs = {}
    if conf.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(seq_len, conf.get("base_image_seq_len", 256), conf.get("max_image_seq_len", 4096),
                                       conf.get("base_shift", 0.5), conf.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, **kwargs)
    return scheduler.timesteps


def multistep_timesteps(scheduler, steps: int, device: torch.device) -> torch.Tensor:
    """PixArt-α's and Wan's schedule: the scheduler's own ``steps`` timesteps, from the first."""
    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler.timesteps


def guided_inputs(cond: Cond, dtype: torch.dtype, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Classifier-free guidance's text inputs: [negative; prompt] embeddings [2B, L, P] and masks [2B, L]."""
    if cond.neg_embeds is None:
        raise ValueError(f"{kind} needs the negative prompt's embedding for classifier-free guidance")
    embeds = torch.cat([cond.neg_embeds, cond.embeds]).to(dtype)
    mask = torch.cat([cond.neg_mask, cond.mask]) if cond.mask is not None else None
    return embeds, mask


def guide(out: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """``uncond + g (text - uncond)`` of a [negative; prompt] batch [2B, ...], with one scale per sample."""
    uncond, text = out.chunk(2)
    g = guidance.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
    return uncond + g * (text - uncond)


class FluxDiT(FrozenDiT):
    kind = "flux"
    transformer_class = "FluxTransformer2DModel"
    width_field = "joint_attention_dim"
    pooled_field = "pooled_projection_dim"
    scheduler_default = ("FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels = int(self.transformer.config.in_channels) // 4

    def latent_hw(self, resolution: int) -> tuple[int, int]:
        h = 2 * (int(resolution) // (self.vae_scale_factor * 2))
        if h == 0:
            raise ConfigError(f"resolution {resolution}px is smaller than one Flux latent patch "
                              f"({self.vae_scale_factor * 2}px)")
        return h, h

    def start(self, batch, resolution, generator):
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        h, w = self.latent_hw(resolution)
        noise = torch.randn((batch, self.channels, h, w), generator=generator)  # [B, C, h, w]
        latents = FluxPipeline._pack_latents(noise, batch, self.channels, h, w).to(self.device)  # [B, S, 4C]
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, self.dtype)  # [S, 3]
        scheduler = self.new_scheduler()
        timesteps = flow_match_timesteps(scheduler, latents.shape[1], self.num_steps, self.device)
        guidance = draw_guidance(self.guidance_values, batch, generator).to(self.device)
        return Trajectory(latents, scheduler, timesteps, guidance, resolution, resolution,
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
    transformer_class = "PixArtTransformer2DModel"
    width_field = "caption_channels"
    scheduler_default = ("DPMSolverMultistepScheduler", {})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels = int(self.transformer.config.in_channels)
        self.learned_sigma = int(self.transformer.config.out_channels) // 2 == self.channels

    def start(self, batch, resolution, generator):
        h = int(resolution) // self.vae_scale_factor
        if h == 0:
            raise ConfigError(f"resolution {resolution}px is smaller than one latent pixel")
        scheduler = self.new_scheduler()
        timesteps = multistep_timesteps(scheduler, self.num_steps, self.device)
        noise = torch.randn((batch, self.channels, h, h), generator=generator)  # [B, C, h, w]
        latents = noise.to(self.device) * scheduler.init_noise_sigma
        guidance = draw_guidance(self.guidance_values, batch, generator).to(self.device)
        extra = {"added": {"resolution": None, "aspect_ratio": None}}
        if self.transformer.config.sample_size == 128:  # the 1024 px model's micro-conditions (as the pipeline)
            res = torch.tensor([resolution, resolution], dtype=self.dtype, device=self.device).repeat(2 * batch, 1)
            ar = torch.tensor([1.0], dtype=self.dtype, device=self.device).repeat(2 * batch, 1)
            extra["added"] = {"resolution": res, "aspect_ratio": ar}
        return Trajectory(latents, scheduler, timesteps, guidance, resolution, resolution, extra)

    def predict(self, traj, latents, t, cond):
        B = latents.shape[0]
        embeds, mask = guided_inputs(cond, self.dtype, "PixArt")
        x = traj.scheduler.scale_model_input(torch.cat([latents, latents]), t)  # [2B, C, h, w]
        out = self.transformer(
            x.to(self.dtype), encoder_hidden_states=embeds, encoder_attention_mask=mask,
            timestep=t.expand(2 * B), added_cond_kwargs=traj.extra["added"], return_dict=False,
        )[0]  # [2B, C or 2C, h, w]
        if self.learned_sigma:
            out = out[:, : self.channels]
        return guide(out, traj.guidance)  # [B, C, h, w]

    def decode(self, traj, latents, vae):
        return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]


class WanDiT(FrozenDiT):
    kind = "wan"
    transformer_class = "WanTransformer3DModel"
    width_field = "text_dim"
    scheduler_default = ("UniPCMultistepScheduler", WAN_SCHEDULER)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.pipeline.get("boundary_ratio") is not None:
            raise ConfigError("dit.path: a two-expert Wan pipeline (model_index.json sets boundary_ratio): distil "
                              "through one of its transformers — point dit.transformer_subfolder at transformer or "
                              "transformer_2 of a copy whose model_index.json has no boundary_ratio")
        self.channels = int(self.transformer.config.in_channels)
        self.patch = tuple(int(p) for p in self.transformer.config.patch_size)  # (t, h, w)
        self.expand_timesteps = bool(self.pipeline.get("expand_timesteps", False))

    def start(self, batch, resolution, generator):
        frames, h = self.latent_video(resolution, self.patch[:2] if len(self.patch) > 1 else (1, 1))
        noise = torch.randn((batch, self.channels, frames, h, h), generator=generator)  # [B, C, F, h, w]
        scheduler = self.new_scheduler()
        timesteps = multistep_timesteps(scheduler, self.num_steps, self.device)
        guidance = draw_guidance(self.guidance_values, batch, generator).to(self.device)
        return Trajectory(noise.to(self.device), scheduler, timesteps, guidance, resolution, resolution,
                          {"frames": frames, "h": h})

    def predict(self, traj, latents, t, cond):
        B = latents.shape[0]
        embeds, _ = guided_inputs(cond, self.dtype, "Wan")  # no mask: the embeddings are zero past each prompt
        x = torch.cat([latents, latents]).to(self.dtype)  # [2B, C, F, h, w]
        if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per token (F * h/2 * w/2), as the pipeline builds it
            per_token = (torch.ones(x.shape[2:], device=x.device)[:, ::2, ::2] * t).flatten()
            timestep = per_token.unsqueeze(0).expand(2 * B, -1)
        else:
            timestep = t.expand(2 * B)
        out = self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                               return_dict=False)[0]  # [2B, C, F, h, w]
        return guide(out, traj.guidance)

    def spatial_latents(self, traj, latents):
        return latents[:, :, 0]

    def decode(self, traj, latents, vae):
        conf = vae.config
        shape = (1, conf.z_dim, 1, 1, 1)
        mean = torch.tensor(conf.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(conf.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]  # [B, 3, F, H, W]
        return video[:, :, 0]


class LTXDiT(FrozenDiT):
    kind = "ltx"
    transformer_class = "LTXVideoTransformer3DModel"
    width_field = "caption_channels"
    scheduler_default = ("FlowMatchEulerDiscreteScheduler", LTX_SCHEDULER)

    def __init__(self, transformer, scheduler, cfg, device, pipeline=None):
        super().__init__(transformer, scheduler, cfg, device, pipeline)
        conf = transformer.config
        self.channels = int(conf.in_channels)
        self.patch = (int(conf.patch_size_t), int(conf.patch_size))
        self.frame_rate = float(cfg.dit.frame_rate)

    def start(self, batch, resolution, generator):
        from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline

        frames, h = self.latent_video(resolution, self.patch)
        noise = torch.randn((batch, self.channels, frames, h, h), generator=generator)  # [B, C, F, h, w]
        latents = LTXPipeline._pack_latents(noise, self.patch[1], self.patch[0]).to(self.device)  # [B, S, C']
        scheduler = self.new_scheduler()
        timesteps = flow_match_timesteps(scheduler, frames * h * h, self.num_steps, self.device)
        guidance = draw_guidance(self.guidance_values, batch, generator).to(self.device)
        scale = (self.vae_temporal_factor / self.frame_rate, self.vae_scale_factor, self.vae_scale_factor)
        return Trajectory(latents, scheduler, timesteps, guidance, resolution, resolution,
                          {"frames": frames, "h": h, "rope_interpolation_scale": scale})

    def predict(self, traj, latents, t, cond):
        B = latents.shape[0]
        embeds, mask = guided_inputs(cond, self.dtype, "LTX-Video")
        x = torch.cat([latents, latents]).to(self.dtype)  # [2B, S, C']
        out = self.transformer(
            hidden_states=x, encoder_hidden_states=embeds, timestep=t.expand(2 * B), encoder_attention_mask=mask,
            num_frames=traj.extra["frames"], height=traj.extra["h"], width=traj.extra["h"],
            rope_interpolation_scale=traj.extra["rope_interpolation_scale"], return_dict=False,
        )[0].float()  # [2B, S, C']
        return guide(out, traj.guidance)

    def unpack(self, traj, latents):
        from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline

        h = traj.extra["h"]
        return LTXPipeline._unpack_latents(latents, traj.extra["frames"] // self.patch[0], h // self.patch[1],
                                           h // self.patch[1], self.patch[1], self.patch[0])  # [B, C, F, h, w]

    def spatial_latents(self, traj, latents):
        return self.unpack(traj, latents)[:, :, 0]

    def decode(self, traj, latents, vae):
        from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline

        lat = LTXPipeline._denormalize_latents(self.unpack(traj, latents), vae.latents_mean, vae.latents_std,
                                               vae.config.scaling_factor)
        timestep = None
        if vae.config.timestep_conditioning:  # the pipeline's decode_timestep 0.0 (and no decode noise)
            timestep = torch.zeros(lat.shape[0], device=lat.device, dtype=lat.dtype)
        return vae.decode(lat.to(vae.dtype), timestep, return_dict=False)[0][:, :, 0]  # [B, 3, H, W]


#: The wrapper of each ``dit.kind`` (:data:`train.config.KINDS` holds the kinds' defaults).
WRAPPERS: dict[str, type[FrozenDiT]] = {w.kind: w for w in (FluxDiT, PixArtDiT, WanDiT, LTXDiT)}


def _diffusers_class(config_file: Path, base_name: str, default: str | None = None) -> type:
    """The diffusers class a component's config file names (``_class_name``), checked to derive from
    ``base_name`` (``SchedulerMixin``, ``ModelMixin``)."""
    import diffusers

    try:
        name = json.loads(config_file.read_text()).get("_class_name", default)
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"{config_file}: unreadable config ({exc})") from None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type) or not issubclass(cls, getattr(diffusers, base_name)):
        raise ConfigError(f"{config_file}: unknown {base_name.removesuffix('Mixin').lower()} class {name!r}")
    return cls


def _load_scheduler(cfg: TrainConfig, kind: str):
    import diffusers

    path = Path(cfg.dit.path)
    folder = path / cfg.dit.scheduler_subfolder
    config_file = folder / "scheduler_config.json"
    if config_file.is_file():
        return _diffusers_class(config_file, "SchedulerMixin").from_pretrained(str(folder))
    name, config = WRAPPERS[kind].scheduler_default
    log.info("dit: %s has no %s/; using %s's default schedule (%s)", path, cfg.dit.scheduler_subfolder,
             cfg.kind.label, name)
    return getattr(diffusers, name).from_config(config)


def _transformer_folder(cfg: TrainConfig) -> Path:
    path = Path(cfg.dit.path)
    if not path.is_dir():
        raise ConfigError(f"dit.path {path}: not a directory (a diffusers pipeline or transformer folder)")
    root, sub = _subfolder(path, cfg.dit.transformer_subfolder)
    where = root / sub if sub else root
    if not (where / "config.json").is_file():
        raise ConfigError(f"dit.path {path}: no {cfg.dit.transformer_subfolder}/config.json (or config.json)")
    return where


def _transformer_config(cfg: TrainConfig) -> tuple[Path, dict]:
    """The transformer folder and its config.json, checked to be the class ``dit.kind`` runs."""
    where = _transformer_folder(cfg)
    try:
        conf = json.loads((where / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}/config.json: unreadable ({exc})") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"{where}/config.json: not a JSON object")
    want = WRAPPERS[cfg.dit.kind].transformer_class
    found = conf.get("_class_name")
    if isinstance(found, str) and found != want:
        kinds = {w.transformer_class: k for k, w in WRAPPERS.items()}
        hint = f" (dit.kind={kinds[found]} runs it)" if found in kinds else ""
        raise ConfigError(f"dit.path {where}: holds a {found}{hint}; dit.kind={cfg.dit.kind} needs a {want}")
    return where, conf


def dit_widths(cfg: TrainConfig) -> tuple[int, int | None]:
    """(text width, pooled width) from the transformer's config.json, without loading its weights."""
    where, conf = _transformer_config(cfg)
    wrapper = WRAPPERS[cfg.dit.kind]
    try:
        pooled = int(conf.get(wrapper.pooled_field, 768)) if wrapper.pooled_field else None
        return int(conf.get(wrapper.width_field, 4096)), pooled
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}/config.json: unreadable ({exc})") from None


def _pipeline_index(cfg: TrainConfig) -> dict:
    """The pipeline folder's model_index.json ({} for a bare transformer folder)."""
    index = Path(cfg.dit.path) / "model_index.json"
    if not index.is_file():
        return {}
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{index}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{index}: not a JSON object")
    return data


def load_dit(cfg: TrainConfig, device: torch.device) -> FrozenDiT:
    """The frozen transformer (no grads, eval, optional gradient checkpointing) and its scheduler."""
    import diffusers

    where, _ = _transformer_config(cfg)
    wrapper_cls = WRAPPERS[cfg.dit.kind]
    cls = getattr(diffusers, wrapper_cls.transformer_class)
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
    wrapper = wrapper_cls(transformer, scheduler, cfg, device, _pipeline_index(cfg))
    log.info("dit: %s from %s (%s, text width %d), %d-step %s", cls.__name__, where, cfg.dit.dtype, wrapper.text_dim,
             cfg.dit.num_inference_steps, type(scheduler).__name__)
    return wrapper


def load_vae(cfg: TrainConfig, device: torch.device):
    """The pipeline's VAE (``AutoencoderKL``, ``AutoencoderKLWan``, ... as its config.json names it)."""
    if not cfg.dit.vae_subfolder:
        return None
    folder = Path(cfg.dit.path) / cfg.dit.vae_subfolder
    if not (folder / "config.json").is_file():
        raise ConfigError(f"dit.vae_subfolder: {folder}/config.json not found")
    cls = _diffusers_class(folder / "config.json", "ModelMixin", default="AutoencoderKL")
    vae = cls.from_pretrained(str(cfg.dit.path), subfolder=cfg.dit.vae_subfolder,
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
