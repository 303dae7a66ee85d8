"""A diffusers pipeline whose T5 slot takes turns: the teacher (the pipeline's own T5, or a checkpoint
given for it) and each fastenc student, through :func:`fastenc.integrations.use_in_pipeline`.

Every encoder is run with the same seed, guidance, step count and resolution, one prompt per call,
with the pipeline's own tokenizer producing the ids.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import fastenc
from fastenc.api import default_device, parse_dtype
from fastenc.errors import ConfigError
from fastenc.integrations import find_t5_slot, use_in_pipeline

from .encoders import EncoderSpec, load_encoder, pipeline_t5_slot, unique_labels
from .report import to_uint8

log = logging.getLogger("fastenc.train")


def load_pipeline(path: str | Path, *, device=None, dtype=None, without_t5: bool = False):
    """``DiffusionPipeline.from_pretrained`` on a local folder (or hub id), moved to ``device``.
    ``without_t5`` leaves the T5 slot of a local pipeline folder empty (saves T5-XXL's memory when only
    students, or a teacher loaded separately, are compared)."""
    from diffusers import DiffusionPipeline

    dev = default_device(device)
    dt = parse_dtype(dtype, dev)
    skip = {}
    if without_t5 and Path(path).is_dir():
        slot = pipeline_t5_slot(Path(path))
        if slot is not None:
            skip[slot[0]] = None
    try:
        with warnings.catch_warnings():  # newer diffusers prefer dtype=, older ones know only torch_dtype=
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dt, **skip)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"--pipeline {path}: cannot load a diffusers pipeline ({exc})") from None
    pipe.set_progress_bar_config(disable=True)
    log.info("pipeline: %s from %s (%s, %s)", type(pipe).__name__, path, dt, dev)
    return pipe.to(dev)


@dataclass
class GenerationSettings:
    seed: int = 0
    guidance: float = 3.5
    steps: int = 28
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    extra: dict = field(default_factory=dict)

    def resolved_size(self, pipe) -> tuple[int, int]:
        """(height, width) in pixels: the given ones, else the pipeline's default."""
        sample = getattr(pipe, "default_sample_size", None)
        if sample is None:
            sample = pipe.transformer.config.sample_size
        default = int(sample) * int(pipe.vae_scale_factor)
        return int(self.height or default), int(self.width or default)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "guidance": self.guidance, "steps": self.steps, "height": self.height,
                "width": self.width, "max_sequence_length": self.max_sequence_length, **self.extra}


class EncoderSwitch:
    """The pipeline with one of several text encoders in its T5 slot at a time.

    ``teacher``: None keeps the pipeline's own T5 under the label ``"teacher"`` (``include_teacher=False``
    leaves it out); an :class:`EncoderSpec` loads that checkpoint for the teacher instead.
    """

    def __init__(self, pipe, students: list[EncoderSpec], *, teacher: EncoderSpec | None = None,
                 include_teacher: bool = True, tokenizer: str | None = None, backend: str = "torch"):
        self.pipe = pipe
        self.slot, self.tok_slot = find_t5_slot(pipe)
        self.original = getattr(pipe, self.slot, None)
        device = pipe.device
        dtype = getattr(pipe, "transformer", None)
        dtype = dtype.dtype if isinstance(dtype, torch.nn.Module) else None
        specs: list[EncoderSpec] = []
        if include_teacher:
            specs.append(teacher or EncoderSpec("teacher", ""))
        specs += students
        specs = unique_labels(specs)
        if not specs:
            raise ConfigError("nothing to compare: give --student, or keep the teacher")
        self.encoders: dict[str, fastenc.Encoder | None] = {}
        for spec in specs:
            if not spec.path:  # the pipeline's own T5
                if self.original is None:
                    raise ConfigError(f"{type(pipe).__name__}.{self.slot} is empty: pass --teacher PATH or "
                                      "--no-teacher")
                self.encoders[spec.label] = None
                continue
            self.encoders[spec.label] = load_encoder(spec, tokenizer=tokenizer, device=device, dtype=dtype,
                                                     backend=backend, need_tokenizer=False)
        self.current: str | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.encoders)

    def use(self, label: str):
        """Put ``label``'s encoder into the T5 slot; returns the pipeline."""
        if label == self.current:
            return self.pipe
        enc = self.encoders[label]
        if enc is None:
            self.pipe.register_modules(**{self.slot: self.original})
        else:
            use_in_pipeline(self.pipe, enc, slot=self.slot)
        self.current = label
        return self.pipe

    def restore(self) -> None:
        if self.original is not None:
            self.pipe.register_modules(**{self.slot: self.original})
        self.current = None


@torch.no_grad()
def generate(pipe, prompt: str, settings: GenerationSettings, *, seed: int | None = None, **kwargs) -> np.ndarray:
    """One image [H, W, 3] uint8 for ``prompt``; the noise comes from a CPU generator seeded with ``seed``
    (default ``settings.seed``), so it is the same on every device and for every encoder."""
    call = dict(prompt=prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance, output_type="np",
                generator=torch.Generator("cpu").manual_seed(settings.seed if seed is None else seed))
    if settings.height is not None:
        call["height"] = settings.height
    if settings.width is not None:
        call["width"] = settings.width
    if settings.max_sequence_length is not None:
        call["max_sequence_length"] = settings.max_sequence_length
    call.update(settings.extra)
    call.update(kwargs)
    images = pipe(**call).images  # [1, H, W, 3] in [0, 1]
    return to_uint8(images)[0]
