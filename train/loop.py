"""Step-following distillation (and the naive embedding baseline), run through accelerate.

Per batch: draw latents and guidance, set up the DiT's schedule, then at each of its steps:

1. teacher prediction (no grad) with the teacher's embeddings;
2. student prediction with the student's embeddings (gradients flow through the frozen DiT);
3. loss = MSE(student prediction, teacher prediction); backward; clip; optimizer + LR step; EMA;
4. advance the latent with the *teacher's* prediction, so the trajectory follows the teacher.

``run.loss = "embedding"`` instead takes one step per batch on MSE(student embeds, teacher embeds).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fastenc.errors import ConfigError, NumericsError
from fastenc.fileio import atomic_write

from . import checkpoint
from .config import TrainConfig
from .data import PromptStream, all_prompts, derive_seed, load_components, report
from .diagnostics import collapse_report, log_report, mean_pool, probe_embeddings
from .distributed import make_accelerator
from .dit import Cond, FrozenDiT, PooledCLIP, dit_widths, load_dit, load_vae
from .lock import RunLock
from .student import EMA, TORCH_DTYPES, load_student, load_tokenizer
from .teacher import TeacherSource, tokenize
from .teacher_cache import TeacherCache

log = logging.getLogger("fastenc.train")


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1, then linear decay to 0 at ``total`` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class StepRecord:
    """What one vision step saw (passed to ``on_step`` observers)."""

    step: int
    index: int  # position in the trajectory
    t: torch.Tensor
    latents_in: torch.Tensor
    latents_out: torch.Tensor
    teacher_pred: torch.Tensor
    student_pred: torch.Tensor
    loss: float
    scheduler: object = None


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    collapse: dict | None = None
    student_dir: Path | None = None


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator=None):
        cfg.validate()
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)
        acc = self.acc
        self.out = Path(cfg.run.output_dir)
        self.device = acc.device
        # one trainer per output folder, taken before anything is loaded or written there
        self._lock = RunLock(self.out)
        if acc.is_main_process:
            self._lock.acquire()
            weakref.finalize(self, self._lock.release)
        try:
            self._setup(cfg)
        except BaseException:
            self._lock.release()
            raise

    def _setup(self, cfg: TrainConfig) -> None:
        acc = self.acc
        # the checkpoint to resume from is checked before anything is loaded (a damaged one fails in seconds)
        self._choice: tuple[Path | None, list[Path]] | None = checkpoint.choose_checkpoint(self.out, cfg.run.resume)
        # so is the teacher cache (names, sizes, shapes, rows): a damaged one fails before any model is loaded
        self._cache = TeacherCache(cfg.teacher.cache) if TeacherCache.present(cfg.teacher.cache) else None
        dist = acc.distributed_type.name
        if dist == "FSDP" and cfg.optim.ema_decay is not None:
            raise ConfigError("optim.ema_decay under FSDP is not supported (EMA keeps full weights per process)")
        if cfg.run.distributed == "fsdp" and dist != "FSDP":
            log.warning("run.distributed=fsdp, but accelerate runs %s (FSDP needs GPU processes, e.g. "
                        "`accelerate launch --num_processes 8 -m train ...`)", dist)
        from accelerate.utils import set_seed

        set_seed(cfg.run.seed)
        self.vision = cfg.run.loss == "vision"
        self.on_step: list[Callable[[StepRecord], None]] = []

        # frozen DiT (the embedding baseline loads it only for image grids; its width comes from config.json)
        uses_dit = self.vision or bool(cfg.run.image_every)
        self.dit: FrozenDiT | None = load_dit(cfg, self.device) if uses_dit else None
        dim, pooled_dim = self._widths()
        self.text_dim = dim

        # student + tokenizer
        student = load_student(cfg, dim)
        self.tokenizer = load_tokenizer(cfg)
        if self.tokenizer.vocab_size > student.config.vocab_size:
            raise ConfigError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the student's table only "
                              f"{student.config.vocab_size}")
        self.max_length = cfg.max_length()

        # data
        comps = load_components(cfg.data, tokenizer=self.tokenizer, max_length=self.max_length)
        self.stream = PromptStream(cfg.data, comps, seed=cfg.run.seed, num_processes=acc.num_processes,
                                   process_index=acc.process_index)
        self.data_report = report(comps, self.stream)
        self.probes = list(cfg.run.probes)
        needed = all_prompts(comps, [cfg.dit.negative_prompt] * cfg.negative + self.probes
                             + (list(cfg.run.image_prompts) if cfg.run.image_every else []))

        # teacher (cache or live) and pooled CLIP (needed only where the DiT runs)
        pooled_mode = cfg.pooled if uses_dit else "none"
        cache = self._cache
        self.teacher = TeacherSource(cfg, self.tokenizer, device=self.device, dim=dim, pooled_dim=pooled_dim,
                                     pooled_mode=pooled_mode, cache=cache)
        self.teacher.require(needed)
        if pooled_mode == "clip" and (cache is None or not cache.has_pooled or cache.missing(needed)):
            clip = PooledCLIP(cfg.dit.clip_path or cfg.dit.path, self.device, TORCH_DTYPES[cfg.dit.dtype])
            if clip.dim != pooled_dim:
                raise ConfigError(f"dit.clip_path: CLIP width {clip.dim} != the DiT's pooled width {pooled_dim}")
            self.teacher.clip = clip
        elif pooled_mode == "zeros":
            log.warning("dit.pooled=zeros: Flux's pooled CLIP input is zero during training (the pipeline "
                        "passes CLIP's pooled vector at inference)")

        # optimisation
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.steps_per_batch = cfg.dit.num_inference_steps if self.vision else 1
        self.max_steps = cfg.run.max_steps or self.stream.total_batches * self.steps_per_batch
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
            lr_factor, warmup=cfg.optim.warmup_steps, total=self.max_steps, schedule=cfg.optim.schedule))
        self.student, self.optimizer = acc.prepare(student, optimizer)
        self.ema = EMA(acc.unwrap_model(self.student), cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.state = checkpoint.TrainState(self.stream, self.ema)
        self.vae = load_vae(cfg, self.device) if cfg.run.image_every and self.dit is not None else None

        # constant inputs: negative prompt (classifier-free guidance) and probe tokens
        self.neg_ids, self.neg_mask = self.tokenize([cfg.dit.negative_prompt])
        self.probe_ids, self.probe_mask = self.tokenize(self.probes)
        self._teacher_probe = None
        self._neg_teacher = None

        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.json", lambda p: p.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n"))
            atomic_write(self.out / "data_report.json",
                         lambda p: p.write_text(json.dumps(self.data_report, indent=2) + "\n"))
        if cfg.run.log_with:
            acc.init_trackers("train", config={"lr": cfg.optim.lr, "loss": cfg.run.loss, "dit": cfg.dit.kind})
        log.info("train: %s loss, %d optimizer steps, %d process(es) (%s) x batch %d, %s, mixed precision %s",
                 cfg.run.loss, self.max_steps, acc.num_processes, dist, cfg.data.batch_size, self.device,
                 cfg.run.mixed_precision)

    # ------------------------------------------------------------------------------ setup

    def _widths(self) -> tuple[int, int | None]:
        if self.dit is not None:
            return self.dit.text_dim, self.dit.pooled_dim
        if self.cfg.dit.path:
            return dit_widths(self.cfg)
        if self._cache is not None:
            return self._cache.meta.dim, self._cache.meta.pooled_dim
        if self.cfg.teacher.path:
            from fastenc.weights import open_source, detect_layout, read_config, resolve_checkpoint

            path = resolve_checkpoint(self.cfg.teacher.path, subfolder=self.cfg.teacher.subfolder)
            src = open_source(path)
            return read_config(path, src, *detect_layout(src.keys)).output_dim, None
        raise ConfigError("cannot tell the text width: set dit.path, teacher.cache or teacher.path")

    @property
    def step(self) -> int:
        return self.state.step

    def batch_generator(self) -> torch.Generator:
        """Latents and guidance of a batch: a function of (seed, process, batch index) only, so resumed and
        uninterrupted runs draw the same, and every process draws its own."""
        return torch.Generator().manual_seed(
            derive_seed(self.cfg.run.seed, "latents", self.acc.process_index, self.state.batches))

    # ------------------------------------------------------------------------------ conditioning

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask [B, L] of ``prompts`` as the pipeline tokenises them (after the target's clean-up)."""
        return tokenize(self.tokenizer, prompts, self.max_length, self.cfg.target_row.prepare)

    def teacher_cond(self, prompts: list[str]) -> Cond:
        """The teacher's embeddings as the pipeline hands them to its DiT (the target's ``finish``: Wan zeroes
        them past each prompt's length), with the negative prompt's where the DiT guides against it."""
        out = self.teacher.get(prompts)
        finish = self.cfg.target_row.finish
        cond = Cond(finish(out.embeds, out.mask), out.mask, out.pooled)
        if self.cfg.negative:
            if self._neg_teacher is None:
                self._neg_teacher = self.teacher.get([self.cfg.dit.negative_prompt])
            n = self._neg_teacher
            B = len(prompts)
            cond.neg_embeds = finish(n.embeds, n.mask).expand(B, -1, -1)
            cond.neg_mask = n.mask.expand(B, -1)
        return cond

    def student_cond(self, ids: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None) -> Cond:
        """Student embeddings with grad, prepared as :meth:`teacher_cond` prepares the teacher's; the negative
        prompt goes through the same forward."""
        B = ids.shape[0]
        negative, masked = self.cfg.negative, self.cfg.masked
        if negative:
            ids = torch.cat([self.neg_ids, ids])
            mask = torch.cat([self.neg_mask, mask])
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.cfg.target_row.finish(self.student(ids, mask if masked else None), mask)  # [B(+1), L, P]
        if not negative:
            return Cond(out, mask, pooled)
        return Cond(out[1:], mask[1:], pooled, out[:1].expand(B, -1, -1), mask[:1].expand(B, -1))

    # ------------------------------------------------------------------------------ one optimizer step

    def _optimizer_step(self, loss: torch.Tensor) -> float | None:
        self._lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step uses
        self.acc.backward(loss)
        grad_norm = None
        if self.cfg.optim.max_grad_norm > 0:
            grad_norm = float(self.acc.clip_grad_norm_(self.student.parameters(), self.cfg.optim.max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.acc.unwrap_model(self.student))
        self.state.step += 1
        return grad_norm

    def _log_step(self, loss: torch.Tensor, grad_norm: float | None, batch, **extra) -> float:
        value = float(self.acc.reduce(loss.detach().float(), reduction="mean"))
        if not math.isfinite(value):
            raise NumericsError(f"step {self.step}: the loss is {value}; training stopped without saving this state "
                                f"(the last checkpoint is kept). Lower optim.lr (it was {self._lr:.3g}) or check "
                                "the data and dtypes")
        if self.acc.is_main_process:
            rec = {"kind": "train", "step": self.step, "loss": value, "lr": self._lr,
                   "grad_norm": grad_norm, "stage": batch.stage, "batch": self.state.batches, **extra}
            self._metrics(rec)
            if self.cfg.run.log_with:
                self.acc.log({"train/loss": value, "train/lr": rec["lr"]}, step=self.step)
            if self.step % self.cfg.run.log_every == 0:
                log.info("step %d/%d loss %.6f lr %.3g (%s)", self.step, self.max_steps, value, rec["lr"], batch.stage)
        return value

    def _metrics(self, rec: dict) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------ batches

    def train_batch(self, batch, limit: int) -> list[float]:
        """One batch: a full trajectory (vision) or one step (embedding); stops at ``limit`` steps."""
        if self.vision:
            return self._vision_batch(batch, limit)
        return self._embedding_batch(batch)

    def _embedding_batch(self, batch) -> list[float]:
        teacher = self.teacher.get(batch.prompts)
        ids, mask = self.tokenize(batch.prompts)
        mask = mask.to(self.device)
        with self.acc.autocast():
            out = self.student(ids.to(self.device), mask if self.cfg.masked else None)  # [B, L, P]
            loss = embedding_loss(out, teacher.embeds, mask if self.cfg.masked else None)
        grad_norm = self._optimizer_step(loss)
        return [self._log_step(loss, grad_norm, batch)]

    def _vision_batch(self, batch, limit: int) -> list[float]:
        dit = self.dit
        resolution = batch.resolution or self.cfg.dit.resolution
        tcond = self.teacher_cond(batch.prompts)
        ids, mask = self.tokenize(batch.prompts)
        traj = dit.start(len(batch.prompts), resolution, self.batch_generator())
        latents = traj.latents
        losses = []
        for i, t in enumerate(traj.timesteps):
            if self.step >= limit:
                break
            with self.acc.autocast():
                with torch.no_grad():
                    t_pred = dit.predict(traj, latents, t, tcond).float()
                scond = self.student_cond(ids, mask, tcond.pooled)
                s_pred = dit.predict(traj, latents, t, scond).float()
                loss = F.mse_loss(s_pred, t_pred)
            grad_norm = self._optimizer_step(loss)
            new_latents = dit.step(traj, t_pred, t, latents)  # the trajectory follows the teacher
            value = self._log_step(loss, grad_norm, batch, t_index=i, timestep=float(t),
                                   guidance=traj.guidance.tolist())
            losses.append(value)
            for fn in self.on_step:
                fn(StepRecord(self.step, i, t, latents, new_latents, t_pred.detach(), s_pred.detach(), value,
                              traj.scheduler))
            latents = new_latents
        return losses

    # ------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def fixed_batch_loss(self, prompts: list[str], *, seed: int = 1234, resolution: int | None = None,
                         steps: int | None = None) -> float:
        """Mean loss over a fixed batch (fixed latents, guidance, schedule) with dropout off; no update."""
        was = self.student.training
        self.student.eval()
        try:
            if not self.vision:
                teacher = self.teacher.get(prompts)
                ids, mask = self.tokenize(prompts)
                mask = mask.to(self.device)
                with self.acc.autocast():
                    out = self.student(ids.to(self.device), mask if self.cfg.masked else None)
                    return float(embedding_loss(out, teacher.embeds, mask if self.cfg.masked else None))
            dit = self.dit
            tcond = self.teacher_cond(prompts)
            ids, mask = self.tokenize(prompts)
            traj = dit.start(len(prompts), resolution or self.cfg.dit.resolution, torch.Generator().manual_seed(seed))
            latents, total, n = traj.latents, 0.0, 0
            for i, t in enumerate(traj.timesteps):
                if steps is not None and i >= steps:
                    break
                with self.acc.autocast():
                    t_pred = dit.predict(traj, latents, t, tcond).float()
                    s_pred = dit.predict(traj, latents, t, self.student_cond(ids, mask, tcond.pooled)).float()
                total += float(F.mse_loss(s_pred, t_pred))
                n += 1
                latents = dit.step(traj, t_pred, t, latents)
            return total / max(n, 1)
        finally:
            self.student.train(was)

    def diagnose(self) -> dict:
        if self._teacher_probe is None:
            t = self.teacher.get(self.probes)
            self._teacher_probe = mean_pool(t.embeds, t.mask)
        with self.acc.autocast():
            pooled = probe_embeddings(self.student, self.probe_ids, self.probe_mask, self.cfg.masked)
        rep = collapse_report(pooled, self.probes, self.cfg.run.collapse_threshold, self._teacher_probe)
        if self.acc.is_main_process:
            log_report(rep, self.step)
            self._metrics({"kind": "collapse", "step": self.step, **rep.to_dict()})
            if self.cfg.run.log_with:
                self.acc.log({"collapse/pairs": rep.num_collapsed_pairs}, step=self.step)
        return rep.to_dict()

    @torch.no_grad()
    def write_images(self) -> Path | None:
        from .images import sample, to_uint8, write_grid

        if self.dit is None:
            return None
        prompts = list(self.cfg.run.image_prompts)
        guidance = sorted(self.cfg.guidance)[len(self.cfg.guidance) // 2]
        tcond = self.teacher_cond(prompts)
        ids, mask = self.tokenize(prompts)
        was = self.student.training
        self.student.eval()
        try:
            with self.acc.autocast():
                scond = self.student_cond(ids, mask, tcond.pooled)
                rows = []
                for cond in (tcond, scond):
                    traj, lat = sample(self.dit, cond, resolution=self.cfg.dit.resolution, seed=self.cfg.run.image_seed,
                                       guidance=guidance)
                    rows.append(to_uint8(self.dit, traj, lat, self.vae))
        finally:
            self.student.train(was)
        if not self.acc.is_main_process:
            return None
        path = write_grid(self.out / "images" / f"step-{self.step:08d}.png", rows)
        log.info("images: %s (top: teacher, bottom: student)", path)
        return path

    # ------------------------------------------------------------------------------ driver

    def _resumable(self) -> checkpoint.Resumable:
        return checkpoint.Resumable(self.student, self.optimizer, self.lr_scheduler, self.state, self.tokenizer)

    def save(self) -> Path:
        return checkpoint.save(self.acc, self._resumable(), self.out, keep=self.cfg.run.keep_checkpoints,
                               extra={"stage": self.stream.stages[self.stream.stage_index].name})

    def resume(self, path: Path) -> None:
        checkpoint.load(self.acc, self._resumable(), path)
        if self.acc.is_main_process:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)

    def close(self) -> None:
        """Release the output folder (done by :meth:`fit`; for a trainer that is built and not fitted)."""
        self._lock.release()

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.acc.is_main_process:
            self._lock.acquire()
        choice, self._choice = self._choice, None  # chosen at setup; a later fit chooses afresh
        path, damaged = choice or checkpoint.choose_checkpoint(self.out, cfg.run.resume)
        if damaged:
            self.acc.wait_for_everyone()  # every process chose before the damaged ones are renamed
            if self.acc.is_main_process:
                checkpoint.set_aside(damaged)
        if path is not None:
            self.resume(path)  # restores every RNG as it was at the checkpoint
        else:
            from accelerate.utils import set_seed

            set_seed(cfg.run.seed, device_specific=True)  # dropout masks independent of what setup consumed
            if self.acc.is_main_process:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
        start = self.step
        limit = self.max_steps if cfg.run.stop_after_steps is None else min(self.max_steps,
                                                                            start + cfg.run.stop_after_steps)
        result = TrainResult(step=start)
        if start == 0:
            result.collapse = self.diagnose()
        bar = tqdm(total=self.max_steps, initial=start, disable=not self.acc.is_local_main_process, unit="step",
                   dynamic_ncols=True)
        t0, last_saved, last_image = time.time(), start, None
        try:
            while self.step < limit:
                prev = self.step
                batch = self.stream.next_batch()
                losses = self.train_batch(batch, limit)
                self.state.batches += 1
                result.losses.extend(losses)
                bar.update(self.step - prev)
                if losses:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", stage=batch.stage)
                if _crossed(prev, self.step, cfg.run.save_every) and self.step < limit:
                    self.save()
                    last_saved = self.step
                if cfg.run.diagnostic_every and _crossed(prev, self.step, cfg.run.diagnostic_every):
                    result.collapse = self.diagnose()
                if cfg.run.image_every and _crossed(prev, self.step, cfg.run.image_every):
                    self.write_images()
                    last_image = self.step
        finally:
            bar.close()  # before any error line
        if self.step != last_saved:
            self.save()
        result.step = self.step
        if self.step >= self.max_steps:
            result.collapse = self.diagnose()
            result.student_dir = self.export()
            if cfg.run.image_every and last_image != self.step:
                self.write_images()
        log.info("train: stopped at step %d/%d after %.1fs", self.step, self.max_steps, time.time() - t0)
        if cfg.run.log_with:
            self.acc.end_training()
        return result

    def export(self) -> Path | None:
        """Final student (and EMA) in fastenc format under ``<output_dir>/student``."""
        full = checkpoint.full_student(self.acc, self.student)
        path = None
        if full is not None:
            path = checkpoint.save_student(full, self.out / checkpoint.STUDENT, self.tokenizer)
            if self.ema is not None:
                import copy

                checkpoint.save_student(self.ema.copy_to(copy.deepcopy(full)), self.out / checkpoint.STUDENT_EMA,
                                        self.tokenizer)
            log.info("student: written to %s (load with fastenc.load)", path)
        self.acc.wait_for_everyone()
        return path


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Naive baseline: MSE between projected student embeddings and teacher embeddings [B, L, P]
    (over the prompt's tokens when the pipeline masks padding)."""
    diff = (student.float() - teacher.to(student.device).float()).pow(2)  # [B, L, P]
    if mask is None:
        return diff.mean()
    m = mask.to(diff.device, torch.float32).unsqueeze(-1)  # [B, L, 1]
    return (diff * m).sum() / (m.sum() * diff.shape[-1]).clamp(min=1.0)


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and prev // every != now // every


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resumed run restarts from), and any
    line that does not parse (the torn last line of a killed run): each dropped one is said once."""
    if not path.is_file():
        return
    raw = path.read_bytes().split(b"\n")
    keep, torn = [], []
    for n, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            at = rec.get("step", 0) if isinstance(rec, dict) else None
            if at is not None and not isinstance(at, (int, float)):
                at = None
        except (UnicodeDecodeError, ValueError, RecursionError):
            at = None
        if at is None:
            torn.append(n)
        elif at <= step:
            keep.append(line.decode("utf-8"))
    for n in torn:
        last = n == len(raw) or (n == len(raw) - 1 and not raw[-1].strip())
        log.warning("%s: dropped line %d, which is not a JSON record (%s)", path, n,
                    "the torn last line of an interrupted run" if last else "damaged")
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep), encoding="utf-8"))


def train(cfg: TrainConfig, accelerator=None) -> TrainResult:
    return Trainer(cfg, accelerator).fit()
