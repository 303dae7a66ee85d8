"""Checkpoints that resume exactly, with the student in fastenc's own format.

``<output_dir>/checkpoints/step-XXXXXXXX/`` holds

* ``student/`` — ``fastenc.save`` output (config.json, model.safetensors, tokenizer.json): loadable by
  ``fastenc.load`` and exportable by ``fastenc export`` without conversion;
* ``student-ema/`` — the EMA weights, same format (when EMA is on);
* accelerate's state: optimizer, per-process RNG states (python, numpy, torch, CUDA), and the
  registered objects (LR scheduler, :class:`TrainState`: step, batch count, data position, EMA;
  latents and guidance are drawn from a generator seeded by (seed, process, batch), so they need no state);
* ``trainer_state.json`` — a readable summary (step, stage, data position).

The folder is written under a temporary name and renamed when complete, so a crash never leaves a
half-written ``step-*``; ``resume = "auto"`` picks the newest complete one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import fastenc
from fastenc.errors import CheckpointError, ConfigError
from fastenc.model import T5Encoder
from fastenc.fileio import atomic_write

log = logging.getLogger("fastenc.train")

STEP_DIR = re.compile(r"^step-(\d{8})$")
STUDENT = "student"
STUDENT_EMA = "student-ema"
SUMMARY = "trainer_state.json"


class TrainState:
    """Everything beyond model/optimizer that exact resume needs; registered with accelerate."""

    def __init__(self, stream, ema=None):
        self.step = 0
        self.batches = 0
        self.stream = stream
        self.ema = ema

    def state_dict(self) -> dict:
        return {"step": self.step, "batches": self.batches, "stream": self.stream.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.batches = int(state["batches"])
        self.stream.load_state_dict(state["stream"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ConfigError("optim.ema_decay is set but the checkpoint has no EMA state")
            self.ema.load_state_dict(state["ema"])


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / SUMMARY).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        if not found:
            log.info("resume=auto: no checkpoint under %s/checkpoints; starting fresh", output_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not (path / SUMMARY).is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {SUMMARY})")
    return path


def full_student(accelerator, student) -> T5Encoder | None:
    """The student's full weights as a plain T5Encoder (gathered under FSDP; None off the main process)."""
    unwrapped = accelerator.unwrap_model(student)
    if accelerator.distributed_type.name != "FSDP":
        return unwrapped if accelerator.is_main_process else None
    state = accelerator.get_state_dict(student)  # collective: every process must call it
    if not accelerator.is_main_process:
        return None
    with torch.device("meta"):
        model = T5Encoder(unwrapped.config)
    model.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True, assign=True)
    return model


def save_student(model: T5Encoder, directory: Path, tokenizer=None, source: str = "train") -> Path:
    """``fastenc.save`` (weights + config + tokenizer.json) of a bare module."""
    return fastenc.save(fastenc.Encoder(model, tokenizer=tokenizer, source=source), directory)


def install_hooks(accelerator, tokenizer, get_ema) -> None:
    """Make accelerate store the student as ``student/`` in fastenc format instead of model.safetensors."""
    fsdp = accelerator.distributed_type.name == "FSDP"

    def save_hook(models, weights, output_dir):
        for model in models:
            full = full_student(accelerator, model)
            if full is not None:
                save_student(full, Path(output_dir) / STUDENT, tokenizer)
            ema = get_ema()
            if ema is not None and accelerator.is_main_process:
                save_student(ema.copy_to(copy.deepcopy(accelerator.unwrap_model(model))),
                             Path(output_dir) / STUDENT_EMA, tokenizer)
        if not fsdp:
            weights.clear()

    def load_hook(models, input_dir):
        if fsdp:
            return
        for model in list(models):
            path = Path(input_dir) / STUDENT / "model.safetensors"
            if not path.is_file():
                raise CheckpointError(f"{input_dir}: no {STUDENT}/model.safetensors")
            module = accelerator.unwrap_model(model)
            module.load_state_dict(load_file(str(path), device=str(module.embed.weight.device)), strict=True)
            models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save(accelerator, state: TrainState, output_dir: str | Path, *, keep: int, extra: dict | None = None) -> Path:
    """Write ``step-XXXXXXXX`` atomically (temporary folder, then rename); keep the newest ``keep``."""
    final = step_dir(output_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        summary = {"step": state.step, "batches": state.batches, "stream": state.stream.state_dict(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
        atomic_write(tmp / SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> None:
    accelerator.load_state(str(path))
    log.info("resumed from %s", path)
