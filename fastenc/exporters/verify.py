"""``fastenc verify``: every artifact of an export against the torch model it came from.

Inputs: the bundled tokenizer on a fixed prompt set (padded to the longest prompt, with the mask
as PixArt passes it, and without a mask as Flux calls T5) plus one full-length sequence; fixed
random token ids when the export has no tokenizer. fp32 artifacts are compared with the fp32
torch model, fp16/bf16 ones with the torch model in the same dtype, the int8 model with fp32.

Bounds: fp32 max abs error <= 1e-4; fp16/bf16 mean cos-sim >= 0.9999; int8 mean cos-sim >= 0.995.

Before anything runs, every file of the folder is checked against the export manifest (sizes and
sha256, :func:`~.artifacts.check_export`): a tampered, truncated or mixed folder is refused with one
error, not reported as a row.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import EncoderConfig
from ..errors import BackendUnavailable, CheckpointError, FastencError
from .artifacts import (changed_source, check_export, checkpoint_fingerprint, find_artifacts, read_config,
                        source_changed)
from .contract import INPUT_DTYPE, Profile

log = logging.getLogger("fastenc")

PROMPTS = [
    "a cat",
    "A photo of a red fox sitting in the snow, highly detailed.",
    "A sculptor waving a poster stating 'user'.",
    "an astronaut riding a horse on the moon, digital art, cinematic lighting, dramatic clouds",
]
#: (metric, threshold) each artifact dtype must meet.
BOUNDS: dict[str, tuple[str, float]] = {
    "fp32": ("max_abs", 1e-4),
    "fp16": ("mean_cos", 0.9999),
    "bf16": ("mean_cos", 0.9999),
    "int8": ("mean_cos", 0.995),
}
#: Largest ONNX model (bytes) checked with onnx's reference evaluator when ONNX Runtime cannot run it.
REFERENCE_EVALUATOR_LIMIT = 64 << 20


class VerificationFailed(FastencError):
    """An artifact missed its accuracy bound; ``report`` holds the whole table."""

    def __init__(self, message: str, report: "Report"):
        super().__init__(message)
        self.report = report


@dataclass
class Row:
    backend: str
    dtype: str
    artifact: str
    max_abs: float | None = None
    mean_cos: float | None = None
    worst_cos: float | None = None
    status: str = "skip"  # pass | FAIL | skip
    note: str = ""

    @property
    def bound(self) -> str:
        metric, value = BOUNDS[self.dtype]
        return f"max abs <= {value:g}" if metric == "max_abs" else f"cos >= {value:g}"


@dataclass
class Report:
    rows: list[Row]

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.rows)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def table(self) -> str:
        head = ("backend", "dtype", "artifact", "max abs err", "mean cos-sim", "worst-token cos", "bound", "result")
        body = [(r.backend, r.dtype, r.artifact, _fmt(r.max_abs, "{:.2e}"), _fmt(r.mean_cos, "{:.6f}"),
                 _fmt(r.worst_cos, "{:.6f}"), r.bound, r.status + (f" ({r.note})" if r.note else "")) for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
        return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def check_bound(dtype: str, max_abs: float, mean_cos: float) -> bool:
    metric, threshold = BOUNDS[dtype]
    value = max_abs if metric == "max_abs" else mean_cos
    if math.isnan(value):
        return False
    return value <= threshold if metric == "max_abs" else value >= threshold


# ---------------------------------------------------------------------------- inputs


def prompt_inputs(directory: Path, cfg: EncoderConfig, profile: Profile) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(input_ids [B, L], attention_mask [B, L] | None) pairs within the profile."""
    batch = min(profile.max_batch, len(PROMPTS))
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(directory)
    if tokenizer is not None:
        fastenc_log, level = logging.getLogger("fastenc"), logging.getLogger("fastenc").level
        fastenc_log.setLevel(logging.ERROR)  # truncating the long prompt to a short --max-seq is intended
        try:
            tok = tokenizer(PROMPTS[:batch], max_length=profile.max_seq, padding="longest")
            full = tokenizer(PROMPTS[-1:], max_length=profile.max_seq).input_ids  # [1, max_seq]
        finally:
            fastenc_log.setLevel(level)
        ids, mask = tok.input_ids, tok.attention_mask
    else:
        gen = torch.Generator().manual_seed(0)
        seq = min(profile.max_seq, 24)
        ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for i in range(batch):
            mask[i, max(1, seq - 5 * i):] = 0
        full = torch.randint(3, cfg.vocab_size, (1, profile.max_seq), generator=gen)
    if int(ids.max()) >= cfg.vocab_size or int(full.max()) >= cfg.vocab_size:
        raise CheckpointError(f"{directory}: the bundled tokenizer produces ids beyond the model's vocabulary "
                              f"({cfg.vocab_size})")
    return [(ids, mask), (ids, None), (full, None)]


# ---------------------------------------------------------------------------- references


class _References:
    """Torch outputs of the source model per (dtype, device), computed once."""

    def __init__(self, manifest: dict[str, Any], inputs, checkpoint: str | None):
        self.manifest = manifest
        self.source = dict(manifest["source"])
        self.fingerprint = manifest.get("fingerprint")
        self.inputs = inputs
        self.cache: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.checked = checkpoint is not None  # a checkpoint passed in is compared below
        if checkpoint is not None:
            from ..weights import resolve_checkpoint

            path = resolve_checkpoint(checkpoint)
            if self.source.get("kind") == "checkpoint" and checkpoint_fingerprint(path) != self.fingerprint:
                raise CheckpointError(f"{checkpoint}: not the checkpoint these artifacts were exported from "
                                      f"(fingerprint differs)")
            self.source = {"kind": "checkpoint", "path": str(path), "size": self.source.get("size")}

    def outputs(self, dtype: str, device: torch.device) -> list[torch.Tensor]:
        key = (dtype, str(device))
        if key not in self.cache:
            from ..api import load

            src = self.source
            if src.get("kind") == "random-init":
                enc = load(size=src["size"], random_init=True, seed=int(src.get("seed", 0)), backend="torch",
                           device=device, dtype=dtype, cache=False)
            else:
                path = src.get("path")
                if not path or not Path(path).exists():
                    raise CheckpointError(f"the checkpoint the artifacts came from ({path}) is gone; "
                                          f"pass it with `fastenc verify DIR --checkpoint PATH`")
                self._check_unchanged(Path(path))
                enc = load(path, size=src.get("size"), backend="torch", device=device, dtype=dtype, cache=False)
            with torch.no_grad():
                self.cache[key] = [enc(ids, mask).float().cpu() for ids, mask in self.inputs]  # [B, L, P] each
            del enc
        return self.cache[key]

    def _check_unchanged(self, path: Path) -> None:
        """The recorded checkpoint is still the one exported (export.json keeps its fingerprint): edited
        in place since, every artifact would only FAIL against it, so that is said instead."""
        if self.checked:
            return
        if changed_source(self.manifest) is not None:
            raise CheckpointError(f"{source_changed(path)}: re-export with `fastenc export --checkpoint {path} ...`, "
                                  "or pass the original with `fastenc verify DIR --checkpoint PATH`")
        self.checked = True


# ---------------------------------------------------------------------------- runners


class _OnnxReferenceRunner:
    """onnx's numpy reference evaluator, for small models ONNX Runtime's CPU provider cannot run (bf16)."""

    backend = "onnx-reference"

    def __init__(self, path: Path):
        from onnx.reference import ReferenceEvaluator

        self.session = ReferenceEvaluator(str(path))

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        import numpy as np

        mask = torch.ones_like(ids) if mask is None else mask
        feeds = {"input_ids": ids.to(INPUT_DTYPE).numpy(), "attention_mask": mask.to(INPUT_DTYPE).numpy()}
        out = self.session.run(None, feeds)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _device_for(meta: dict[str, Any], device: torch.device) -> torch.device:
    backend, kind = meta.get("backend"), meta.get("kind")
    if backend == "tensorrt":
        return torch.device("cuda")
    if backend == "aoti":
        return torch.device(meta.get("device", "cpu"))
    if kind in ("onnx-ort", "onnx-int8"):
        return torch.device("cpu")
    if device.type == "cuda":
        from ..backends.onnxruntime import has_cuda_provider

        return device if has_cuda_provider() else torch.device("cpu")
    return device


def _open(path: Path, meta: dict[str, Any], cfg: EncoderConfig, device: torch.device):
    backend = str(meta.get("backend"))
    module = importlib.import_module(f"fastenc.backends.{backend}")
    if backend == "tensorrt" and not torch.cuda.is_available():
        from .tensorrt import import_tensorrt

        import_tensorrt()  # BackendUnavailable names what is missing
        raise BackendUnavailable("no CUDA GPU visible")
    if backend == "aoti" and device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("package compiled for CUDA; no GPU visible")
    try:
        return module.open_artifact(path, meta, cfg, device)
    except BackendUnavailable:
        if (backend == "onnxruntime" and meta.get("dtype") == "bf16"
                and sum((path.parent / f).stat().st_size for f in meta.get("files", {})) <= REFERENCE_EVALUATOR_LIMIT):
            return _OnnxReferenceRunner(path)
        raise


def verify(directory: str | os.PathLike, *, checkpoint: str | None = None,
           device: str | torch.device | None = None) -> Report:
    """Run every artifact under ``directory`` against the torch model; returns the report (never raises
    for a missed bound: see :attr:`Report.ok`)."""
    directory = Path(directory)
    manifest = check_export(directory)  # every file against the manifest's sha256 before anything runs
    cfg = read_config(directory)
    profile = Profile.from_dict(manifest.get("profile"), where=directory / "export.json")
    found = find_artifacts(directory)
    if not found:
        raise CheckpointError(f"{directory}: no artifacts to verify (run `fastenc export` first)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = prompt_inputs(directory, cfg, profile)
    refs = _References(manifest, inputs, checkpoint)
    rows = []
    for path, meta in found:
        dtype = str(meta.get("dtype"))
        row = Row(str(meta.get("backend")), dtype, str(path.relative_to(directory)))
        if dtype not in BOUNDS:
            row.note = f"unknown dtype {dtype!r}"
            row.status = "FAIL"
            rows.append(row)
            continue
        run_on = _device_for(meta, dev)
        try:
            runner = _open(path, meta, cfg, run_on)
        except BackendUnavailable as exc:
            row.note = str(exc).split(";")[0][:120]
            rows.append(row)
            continue
        except FastencError as exc:
            row.status, row.note = "FAIL", str(exc)[:160]
            rows.append(row)
            continue
        if isinstance(runner, _OnnxReferenceRunner):
            row.backend, row.note = runner.backend, "ONNX Runtime CPU has no bf16 kernels"
        ref_dtype = "fp32" if dtype in ("fp32", "int8") else dtype
        expected = refs.outputs(ref_dtype, run_on if dtype != "int8" else torch.device("cpu"))
        errs, coss = [], []
        with torch.no_grad():
            for (ids, mask), ref in zip(inputs, expected):
                out = runner(ids.to(run_on), None if mask is None else mask.to(run_on)).float().cpu()  # [B, L, P]
                errs.append(float((out - ref).abs().max()))
                coss.append(F.cosine_similarity(out, ref, dim=-1).flatten())  # [B*L]
        cos = torch.cat(coss)
        row.max_abs, row.mean_cos, row.worst_cos = max(errs), float(cos.mean()), float(cos.min())
        row.status = "pass" if check_bound(dtype, row.max_abs, row.mean_cos) else "FAIL"
        rows.append(row)
        del runner
    report = Report(rows)
    log.info("verify %s: %d artifacts, %d failed", directory, len(rows), len(report.failures()))
    return report


def raise_on_failure(report: Report) -> None:
    if not report.ok:
        missed = "; ".join(
            f"{r.backend} {r.dtype} {r.artifact}: " + (r.note if r.max_abs is None else
                                                       f"max abs {r.max_abs:.2e}, mean cos {r.mean_cos:.6f} ({r.bound})")
            for r in report.failures())
        raise VerificationFailed(f"verification failed: {missed}", report)
