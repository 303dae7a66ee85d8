"""Checkpoints that resume exactly, with the student in fastenc's own format and nothing pickled.

``<output_dir>/checkpoints/step-XXXXXXXX/`` holds

* ``student/`` — ``fastenc.save`` output (config.json, model.safetensors, tokenizer.json): loadable by
  ``fastenc.load`` and exportable by ``fastenc export`` without conversion;
* ``student-ema/`` — the EMA weights, same format (when EMA is on);
* ``optimizer.{safetensors,json}`` — the optimizer's full state keyed by parameter name
  (``torch.distributed.checkpoint.state_dict``; gathered from every process under FSDP);
* ``scheduler.json`` — the LR scheduler; ``scaler.json`` — the fp16 gradient scaler, when there is one;
* ``trainer.{safetensors,json}`` — :class:`TrainState`: step, batch count, data position, EMA weights
  (latents and guidance are drawn from a generator seeded by (seed, process, batch): no state needed);
* ``rng-<process>.{safetensors,json}`` — each process's python, numpy, torch and CUDA RNG states;
* ``trainer_state.json`` — a readable summary (step, stage, data position), written last.

Tensors go to safetensors files, everything else to JSON (:func:`save_tree` / :func:`load_tree`):
resuming reads no pickle, so a checkpoint folder from elsewhere cannot run code. A value that is
neither a tensor nor JSON-able is an error at save time, never a pickle.

The folder is written under a temporary name and renamed when complete, so a crash never leaves a
half-written ``step-*`` (leftover temporary folders are removed by the next save); ``resume = "auto"``
picks the newest complete one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import fastenc
from fastenc.errors import CheckpointError, ConfigError
from fastenc.fileio import atomic_write
from fastenc.model import T5Encoder

log = logging.getLogger("fastenc.train")

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_DIR = re.compile(r"^\.step-\d{8}\.tmp$")
STUDENT = "student"
STUDENT_EMA = "student-ema"
SUMMARY = "trainer_state.json"
OPTIMIZER, SCHEDULER, SCALER, TRAINER = "optimizer", "scheduler", "scaler", "trainer"


class TrainState:
    """Everything beyond model, optimizer and scheduler that exact resume needs."""

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


def choose_checkpoint(output_dir: str | Path, resume: str | None) -> tuple[Path | None, list[Path]]:
    """The checkpoint to resume from, and (for ``auto``) the newer ones skipped as damaged.

    ``auto`` takes the newest checkpoint whose every file is complete and readable (:func:`verify`),
    logging each newer one it skips and the file that disqualified it; a named folder must pass as is.
    """
    if not resume:
        return None, []
    if resume == "auto":
        found = list_checkpoints(output_dir)
        if not found:
            log.info("resume=auto: no checkpoint under %s/checkpoints; starting fresh", output_dir)
            return None, []
        skipped: list[Path] = []
        first_error = None
        for path in reversed(found):
            try:
                verify(path)
            except CheckpointError as exc:
                first_error = first_error or exc
                log.warning("resume=auto: skipping %s: %s", path, exc)
                skipped.append(path)
                continue
            if skipped:
                log.warning("resume=auto: resuming from %s, the newest complete and readable checkpoint", path)
            return path, skipped
        root = Path(output_dir) / "checkpoints"
        raise CheckpointError(f"resume=auto: none of the {len(found)} checkpoint(s) under {root} is complete and "
                              f"readable (newest: {first_error})")
    path = Path(resume)
    if not (path / SUMMARY).is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {SUMMARY})")
    verify(path)
    return path, []


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    return choose_checkpoint(output_dir, resume)[0]


def set_aside(paths: list[Path]) -> None:
    """Rename damaged checkpoints ``step-X`` to ``step-X.damaged`` so that rotation never keeps them in
    place of good ones (and a later save of the same step writes afresh)."""
    for path in paths:
        target = path.with_name(path.name + ".damaged")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(path, target)
            log.warning("checkpoint: %s set aside as %s", path, target.name)
        except OSError as exc:
            log.warning("checkpoint: cannot set %s aside (%s)", path, exc.strerror or exc)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable (too deeply nested)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def check_safetensors(path: Path) -> None:
    """The file's header parses and describes exactly the file's length (a truncated or padded file fails)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes; not even a safetensors header)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes; its header alone claims {n})")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({type(exc).__name__}: {exc})") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: unreadable safetensors header (no data_offsets)") from None
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "damaged"
        raise CheckpointError(f"{path}: {what} ({size} bytes; its header describes {8 + n + end})")


def verify(path: Path) -> dict:
    """Every file a resume reads exists and is readable: each JSON file parses, each safetensors file is
    whole. Returns the summary; raises one CheckpointError naming the first bad file."""
    path = Path(path)
    summary = _read_json(path / SUMMARY)
    processes = summary.get("processes", 1) if isinstance(summary, dict) else None
    if (not isinstance(summary, dict) or isinstance(summary.get("step"), bool)
            or not isinstance(summary.get("step"), int) or isinstance(processes, bool)
            or not isinstance(processes, int) or processes < 1):
        raise CheckpointError(f"{path / SUMMARY}: not a training checkpoint summary (no step / processes)")
    needed = [f"{STUDENT}/model.safetensors"] + [f"{name}.json" for name in (OPTIMIZER, SCHEDULER, TRAINER)]
    needed += [f"rng-{i}.json" for i in range(processes)]
    for name in needed:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing; the checkpoint is incomplete")
    for file in sorted(path.rglob("*")):
        if not file.is_file():
            continue
        if file.suffix == ".json":
            _read_json(file)
        elif file.suffix == ".safetensors":
            check_safetensors(file)
    return summary


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except Exception as exc:  # safetensors' SafetensorError, OSError
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


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


# ---------------------------------------------------------------------------- tensors + JSON, no pickle


def _encode(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``obj`` with each tensor (or numpy array) replaced by a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{len(tensors):06d}:{where}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # own storage: safetensors refuses shared ones
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{len(tensors):06d}:{where}"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{where}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{where}.key{i}", tensors), _encode(v, f"{where}.{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store {type(obj).__name__} at {where} without pickle (tensors and JSON values only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        key = obj.get("__tensor__", obj.get("__ndarray__"))
        if key not in tensors:
            raise CheckpointError(f"{where}: refers to tensor {key!r}, which its .safetensors file lacks")
        if "__tensor__" in obj:
            return tensors[key]
        return tensors[key].numpy().astype(np.dtype(str(obj.get("dtype"))))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def save_tree(folder: Path, name: str, obj: Any) -> None:
    """``folder/name.json`` (+ ``name.safetensors`` when ``obj`` holds tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    data = _encode(obj, name, tensors)
    if tensors:
        atomic_write(folder / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(folder / f"{name}.json", lambda p: p.write_text(json.dumps(data) + "\n"))


def load_tree(folder: Path, name: str) -> Any:
    """What :func:`save_tree` wrote (safetensors and JSON only; no pickle is read)."""
    path = folder / f"{name}.json"
    data = _read_json(path)
    tensors_path = folder / f"{name}.safetensors"
    tensors = _load_tensors(tensors_path) if tensors_path.is_file() else {}
    try:
        return _decode(data, tensors, path)
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable (too deeply nested)") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, where: Path) -> None:
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: malformed RNG state ({exc})") from None


# ---------------------------------------------------------------------------- save / load


@dataclass
class Resumable:
    """What a checkpoint restores: the (prepared) student, optimizer and scheduler, the train state."""

    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState
    tokenizer: Any = None


def _is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def _model_and_optimizer(accelerator, parts: Resumable):
    model = parts.student if _is_fsdp(accelerator) else accelerator.unwrap_model(parts.student)
    return model, getattr(parts.optimizer, "optimizer", parts.optimizer)  # accelerate wraps the optimizer


def _options(full: bool = True, broadcast: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=True, broadcast_from_rank0=broadcast)


def save(accelerator, parts: Resumable, output_dir: str | Path, *, keep: int, extra: dict | None = None) -> Path:
    """Write ``step-XXXXXXXX`` atomically (temporary folder, then rename); keep the newest ``keep``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = parts.state
    final = step_dir(output_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    main = accelerator.is_main_process
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        for old in final.parent.iterdir():  # this step's, or left by a run killed while saving
            if TMP_DIR.match(old.name):
                shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    full = full_student(accelerator, parts.student)  # collective under FSDP
    model, optimizer = _model_and_optimizer(accelerator, parts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_options())  # collective under FSDP
    if main:
        save_student(full, tmp / STUDENT, parts.tokenizer)
        if state.ema is not None:
            save_student(state.ema.copy_to(copy.deepcopy(full)), tmp / STUDENT_EMA, parts.tokenizer)
        save_tree(tmp, OPTIMIZER, optim_state)
        save_tree(tmp, SCHEDULER, parts.scheduler.state_dict())
        save_tree(tmp, TRAINER, state.state_dict())
        if getattr(accelerator, "scaler", None) is not None:
            save_tree(tmp, SCALER, accelerator.scaler.state_dict())
    del optim_state
    save_tree(tmp, f"rng-{accelerator.process_index}", rng_state())
    accelerator.wait_for_everyone()
    if main:
        summary = {"step": state.step, "batches": state.batches, "stream": state.stream.state_dict(),
                   "processes": accelerator.num_processes, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   **(extra or {})}
        atomic_write(tmp / SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, parts: Resumable, path: Path) -> None:
    """Restore everything :func:`save` wrote (and every process's RNG) from ``path``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    fsdp = _is_fsdp(accelerator)
    main = accelerator.is_main_process
    summary = _read_json(path / SUMMARY)
    if not isinstance(summary, dict):
        raise CheckpointError(f"{path / SUMMARY}: not a training checkpoint summary")
    if summary.get("processes", accelerator.num_processes) != accelerator.num_processes:
        raise ConfigError(f"{path} was written by {summary['processes']} processes and this run has "
                          f"{accelerator.num_processes}; resume with the same number of processes")
    weights = path / STUDENT / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {STUDENT}/model.safetensors")
    model, optimizer = _model_and_optimizer(accelerator, parts)
    if fsdp:  # the main process reads, the others receive
        state = _load_tensors(weights) if main else {}
        _apply(weights, lambda: set_model_state_dict(model, state, options=_options(broadcast=True)))
    else:
        module = accelerator.unwrap_model(parts.student)
        state = _load_tensors(weights, device=str(module.embed.weight.device))
        _same_shapes(path, weights, state, module.state_dict())
        _apply(weights, lambda: module.load_state_dict(state, strict=True))
    optim_state = load_tree(path, OPTIMIZER) if (main or not fsdp) else {}
    _apply(path / f"{OPTIMIZER}.json",
           lambda: set_optimizer_state_dict(model, optimizer, optim_state, options=_options(broadcast=fsdp)))
    scheduler_state = load_tree(path, SCHEDULER)
    _apply(path / f"{SCHEDULER}.json", lambda: parts.scheduler.load_state_dict(scheduler_state))
    trainer_state = load_tree(path, TRAINER)
    _apply(path / f"{TRAINER}.json", lambda: parts.state.load_state_dict(trainer_state))
    if getattr(accelerator, "scaler", None) is not None:
        scaler_state = load_tree(path, SCALER)
        _apply(path / f"{SCALER}.json", lambda: accelerator.scaler.load_state_dict(scaler_state))
    set_rng_state(load_tree(path, f"rng-{accelerator.process_index}"), path)
    log.info("resumed from %s", path)


def _shape(t) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _same_shapes(path: Path, weights: Path, saved: dict, own: dict) -> None:
    """Refuse another run's checkpoint in one line, before anything is overwritten."""
    where = f"{path}: written by another run ({weights.relative_to(path)}"
    advice = "; resume it with the config that wrote it, or train without --resume / in another output folder"
    for key, tensor in own.items():
        if key not in saved:
            raise CheckpointError(f"{where} lacks {key!r}, which this run's student has){advice}")
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: {key!r} has shape {_shape(saved[key])}, this run's student "
                                  f"{_shape(tensor)}){advice}")
    extra = sorted(set(saved) - set(own))
    if extra:
        raise CheckpointError(f"{where} holds {len(extra)} tensor(s) this run's student lacks, e.g. {extra[0]!r})"
                              f"{advice}")


def _apply(source: Path, fn) -> None:
    """Restore one piece; a state that does not fit this run is one CheckpointError naming its file."""
    try:
        fn()
    except (ConfigError, CheckpointError):
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        text = " ".join(str(exc).split())
        raise CheckpointError(f"{source}: does not fit this run ({type(exc).__name__}: {text[:300]})") from None
