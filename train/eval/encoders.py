"""Which encoders an analysis compares, how they are loaded, and their mean-pooled prompt embeddings.

An encoder is given as ``[LABEL=]PATH``: anything ``fastenc.load`` reads (a fastenc / DistillT5 /
transformers-T5 checkpoint folder, a ``.safetensors`` file, a hub id), or a diffusers pipeline folder, in
which case its T5 slot is used (``text_encoder_2`` + ``tokenizer_2`` for Flux, ``text_encoder_3`` for SD3,
``text_encoder`` for PixArt-α) — the usual way to name T5-XXL as the teacher.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

import fastenc
from fastenc.errors import ConfigError
from fastenc.integrations.diffusers import T5_SLOTS
from fastenc.tokenizer import Tokenizer

from ..data import read_prompts
from ..diagnostics import mean_pool

log = logging.getLogger("fastenc.train")

#: Checkpoint folder names too generic to label a column (``runs/flux-base/student`` -> ``flux-base/student``).
GENERIC_NAMES = frozenset({"student", "student-ema", "model", "checkpoint", "final", "text_encoder", "text_encoder_2"})


@dataclass(frozen=True)
class EncoderSpec:
    label: str
    path: str


def default_label(path: str) -> str:
    p = Path(path)
    if p.name in GENERIC_NAMES and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name or str(path)


def parse_spec(text: str, default: str | None = None) -> EncoderSpec:
    """``LABEL=PATH`` or ``PATH`` (a path that exists is never split at '=')."""
    if "=" in text and not Path(text).exists():
        label, path = text.split("=", 1)
        if not label or not path:
            raise ConfigError(f"encoder {text!r}: expected LABEL=PATH or PATH")
        return EncoderSpec(label, path)
    return EncoderSpec(default or default_label(text), text)


def unique_labels(specs: list[EncoderSpec]) -> list[EncoderSpec]:
    """Labels must tell columns apart: repeated ones get ``#2``, ``#3``."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        n = seen.get(spec.label, 0) + 1
        seen[spec.label] = n
        out.append(spec if n == 1 else EncoderSpec(f"{spec.label}#{n}", spec.path))
    return out


def pipeline_t5_slot(path: Path) -> tuple[str, str] | None:
    """``(encoder subfolder, tokenizer subfolder)`` of the T5 in a diffusers pipeline folder, else None."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        meta = json.loads(index.read_text())
        name = str(meta.get("_class_name", ""))
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{index}: unreadable ({exc})") from None
    for prefix, enc_slot, tok_slot in T5_SLOTS:
        if name.startswith(prefix):
            if not (path / enc_slot).is_dir():
                raise ConfigError(f"{path}: {name} pipeline folder has no {enc_slot}/ (its T5 text encoder)")
            return enc_slot, tok_slot
    raise ConfigError(f"{index}: pipeline class {name!r} has no known T5 slot "
                      f"(known: {', '.join(p + '*' for p, _, _ in T5_SLOTS)})")


def load_encoder(spec: EncoderSpec, *, tokenizer: str | None = None, fallback_tokenizer=None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 backend: str = "torch", need_tokenizer: bool = True) -> fastenc.Encoder:
    """Load one encoder for analysis (no embedding cache). Its tokenizer: ``tokenizer`` when given, else its
    own (beside the checkpoint, or the pipeline's T5 tokenizer), else ``fallback_tokenizer``; inside a
    pipeline (``need_tokenizer=False``) the pipeline's tokenizer makes the ids and none is required."""
    path = Path(spec.path)
    subfolder, own_tok = None, None
    slot = pipeline_t5_slot(path) if path.is_dir() else None
    if slot is not None:
        subfolder, tok_sub = slot
        if (path / tok_sub).is_dir():
            own_tok = path / tok_sub
    enc = fastenc.load(spec.path, subfolder=subfolder, backend=backend, device=device, dtype=dtype, cache=False,
                       tokenizer=tokenizer or own_tok)
    if enc.tokenizer is None and need_tokenizer:
        if fallback_tokenizer is None:
            raise ConfigError(f"{spec.label} ({spec.path}): no tokenizer beside the checkpoint; pass --tokenizer "
                              "(e.g. a Flux pipeline's tokenizer_2 folder)")
        enc.tokenizer = fallback_tokenizer
    enc.requires_grad_(False)
    log.info("%s: %s (%s, %d-dim output, %s, %s)", spec.label, spec.path, enc.config.name, enc.config.output_dim,
             enc.backend, enc.dtype)
    return enc


def load_encoders(teacher: EncoderSpec, students: list[EncoderSpec], *, tokenizer: str | None = None,
                  device=None, dtype=None, backend: str = "torch") -> dict[str, fastenc.Encoder]:
    """Teacher first, then students (which fall back to the teacher's tokenizer); keyed by label."""
    specs = unique_labels([teacher, *students])
    tok = Tokenizer.from_pretrained(tokenizer) if tokenizer else None
    out: dict[str, fastenc.Encoder] = {}
    first = load_encoder(specs[0], tokenizer=tokenizer, device=device, dtype=dtype, backend=backend)
    out[specs[0].label] = first
    for spec in specs[1:]:
        out[spec.label] = load_encoder(spec, tokenizer=tokenizer, fallback_tokenizer=tok or first.tokenizer,
                                       device=device, dtype=dtype, backend=backend)
    return out


@torch.no_grad()
def pooled_embeddings(encoder: fastenc.Encoder, prompts: list[str], *, target: str = "flux-dev",
                      batch_size: int = 16) -> torch.Tensor:
    """[N, P] float32 on the CPU: each prompt's embeddings, tokenised as ``target``'s pipeline does, averaged
    over its tokens (``</s>`` included, padding left out)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        emb = encoder.encode(prompts[i:i + batch_size], target=target)  # embeds [b, L, P], mask [b, L]
        out.append(mean_pool(emb.embeds, emb.mask).cpu())
    return torch.cat(out)  # [N, P]


def gather_prompts(files: list[str] | None, inline: list[str] | None) -> list[str]:
    """Prompts from files (TXT / JSON / JSONL, as the trainer reads them) then inline ones; blanks and
    repeats left out, order kept."""
    prompts: list[str] = []
    for f in files or []:
        prompts += [p for p in read_prompts(Path(f)) if p is not None]
    prompts += list(inline or [])
    seen, out = set(), []
    for p in prompts:
        p = p.strip()
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of ``text``."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].rstrip("-") or "x"
