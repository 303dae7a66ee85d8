"""Teacher embeddings precomputed into safetensors shards, so training needs no T5-XXL.

Layout of a cache folder::

    index.json                     format, version, what the embeddings depend on (target, max_length,
                                   mask use, tokenizer fingerprint, teacher, width, dtype), shard list,
                                   and prompt key -> [shard, row]
    shard-g000-r000-00000.safetensors  embeds [n, L, D], mask [n, L] (uint8), pooled [n, Dp] (when present)

A prompt's key is the first 32 hex digits of the SHA-256 of its UTF-8 text. Shards and the index are
written atomically (temporary name, then rename); the index is written last, so a folder with an
``index.json`` is complete. The index records each shard's size in bytes; opening a cache checks names,
sizes, shapes and rows (:class:`TeacherCache`). Size: ``L x D x 2`` bytes per prompt in bf16 (4 MiB at L=512, D=4096).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastenc.config import read_json_object
from fastenc.errors import CheckpointError, ConfigError
from fastenc.fileio import atomic_write, not_a_file, plain_file_name
from fastenc.weights import open_safetensors

log = logging.getLogger("fastenc.train")

INDEX_NAME = "index.json"
FORMAT = "fastenc-teacher-cache"
VERSION = 1
MAX_INDEX_BYTES = 1 << 30  # ~80 bytes a prompt
REBUILD = "; rebuild it with `python -m train.cache_teacher --force`"


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class CacheMeta:
    """What the cached embeddings depend on; training checks it against its own settings."""

    target: str
    max_length: int
    masked: bool  # the teacher saw the attention mask (PixArt) or not (Flux)
    tokenizer: str  # tokenizer fingerprint
    teacher: str  # teacher checkpoint (informational)
    dim: int
    pooled_dim: int | None
    dtype: str


def write_shards(directory: Path, prompts: list[str], encode, *, meta: CacheMeta, batch_size: int,
                 shard_size: int, prefix: str = "shard-r000", progress=None) -> dict[str, list]:
    """Encode ``prompts`` with ``encode(list[str]) -> (embeds [b,L,D], mask [b,L], pooled [b,Dp] | None)``
    into shards ``{prefix}-00000.safetensors``, ...; returns ``{key: [shard file, row]}``."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, meta.dtype)
    entries: dict[str, list] = {}
    pending: dict[str, list[torch.Tensor]] = {"embeds": [], "mask": [], "pooled": []}
    keys: list[str] = []
    shard_no = 0

    def flush() -> None:
        nonlocal shard_no
        if not keys:
            return
        name = f"{prefix}-{shard_no:05d}.safetensors"
        tensors = {"embeds": torch.cat(pending["embeds"]).to(dtype).contiguous(),  # [n, L, D]
                   "mask": torch.cat(pending["mask"]).to(torch.uint8).contiguous()}  # [n, L]
        if pending["pooled"]:
            tensors["pooled"] = torch.cat(pending["pooled"]).to(dtype).contiguous()  # [n, Dp]
        atomic_write(directory / name, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
        for row, k in enumerate(keys):
            entries[k] = [name, row]
        for v in pending.values():
            v.clear()
        keys.clear()
        shard_no += 1

    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        embeds, mask, pooled = encode(chunk)
        if embeds.shape[-1] != meta.dim or embeds.shape[1] != meta.max_length:
            raise ConfigError(f"teacher produced {tuple(embeds.shape)}, expected [*, {meta.max_length}, {meta.dim}]")
        pending["embeds"].append(embeds.detach().cpu())
        pending["mask"].append(mask.detach().cpu())
        if pooled is not None:
            pending["pooled"].append(pooled.detach().cpu())
        keys.extend(prompt_key(p) for p in chunk)
        if len(keys) >= shard_size:
            flush()
        if progress is not None:
            progress.update(len(chunk))
    flush()
    return entries


def write_index(directory: Path, meta: CacheMeta, entries: dict[str, list], generation: int = 0) -> Path:
    shards = sorted({shard for shard, _ in entries.values()})
    sizes = {shard: (directory / shard).stat().st_size for shard in shards}  # checked when the cache is opened
    index = {"format": FORMAT, "version": VERSION, "generation": generation, "meta": asdict(meta),
             "count": len(entries), "shards": shards, "sizes": sizes, "entries": entries}
    return atomic_write(directory / INDEX_NAME, lambda p: p.write_text(json.dumps(index) + "\n"))


#: Names write_shards and cache_teacher give their files; clear() deletes nothing else.
SHARD_NAME = re.compile(r"shard-g\d{3}-r\d{3}-\d{5}\.safetensors")
PART_NAME = re.compile(r"\.part-g\d{3}-r\d{3}\.json")


def clear(directory: Path) -> int:
    """Delete a teacher cache's own files from ``directory``: ``index.json``, the shards (``shard-gNNN-rNNN-
    NNNNN.safetensors``) and the ``.part-*.json`` of an interrupted run; never a folder, a file of another
    name, or what a link points to. The folder itself stays. Returns how many files were deleted."""
    removed = 0
    for entry in os.scandir(directory):
        name = entry.name
        if (name == INDEX_NAME or SHARD_NAME.fullmatch(name) or PART_NAME.fullmatch(name)) \
                and not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.path)  # a link is removed itself, its target left alone
            removed += 1
    return removed


class TeacherCache:
    """Read side: look prompts up and return their teacher embeddings.

    Opening a cache checks it like any artifact before training starts: every shard name is a plain file
    name inside the cache folder, every shard is a complete safetensors file of the size the index records
    with ``embeds`` [n, L, D] / ``mask`` [n, L] / ``pooled`` [n, Dp] of the index's widths, and every index
    row lies inside its shard. Any damage is one :class:`CheckpointError` naming the file (and the row)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / INDEX_NAME
        if not path.exists():
            raise ConfigError(f"{path}: not found (build the cache with `python -m train.cache_teacher`)")
        index = read_json_object(path, CheckpointError, max_bytes=MAX_INDEX_BYTES)
        if index.get("format") != FORMAT:
            raise ConfigError(f"{path}: not a teacher cache index (format {index.get('format')!r})")
        if index.get("version") != VERSION:
            raise ConfigError(f"{path}: cache version {index.get('version')!r}, this trainer reads {VERSION}")
        try:
            self.meta = CacheMeta(**index["meta"])
            self.entries: dict[str, list] = index["entries"]
            self.generation = int(index.get("generation", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed teacher cache index ({exc!r}){REBUILD}") from None
        self._handles: dict[str, object] = {}
        self._check(path, index)

    def _check(self, path: Path, index: dict) -> None:
        shards, sizes = index.get("shards", []), index.get("sizes", {})
        if not isinstance(shards, list) or not isinstance(sizes, dict) or not isinstance(self.entries, dict):
            raise CheckpointError(f"{path}: malformed teacher cache index ('shards' must be a list, 'sizes' and "
                                  f"'entries' objects){REBUILD}")
        if index.get("count", len(self.entries)) != len(self.entries):
            raise CheckpointError(f"{path}: lists {len(self.entries)} prompts but records count "
                                  f"{index.get('count')!r} (a damaged or hand-edited index){REBUILD}")
        rows = {shard: self._shard_rows(path, shard, sizes.get(shard)) for shard in shards}
        for key, entry in self.entries.items():
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int)
                    and not isinstance(entry[1], bool) and entry[1] >= 0):
                raise CheckpointError(f"{path}: entries[{key!r:.40}] = {entry!r:.80} is not [shard, row]{REBUILD}")
            shard, row = entry
            if shard not in rows:
                raise CheckpointError(f"{path}: entries[{key!r:.40}] names shard {shard!r:.80}, which 'shards' "
                                      f"does not list{REBUILD}")
            if row >= rows[shard]:
                raise CheckpointError(f"{path}: entries[{key!r:.40}]: row {row} is past the end of {shard} "
                                      f"({rows[shard]} rows){REBUILD}")

    def _shard_rows(self, path: Path, shard: object, size: object) -> int:
        """The number of rows of ``shard`` after checking its name, size, tensors and their shapes."""
        if not plain_file_name(shard, ".safetensors"):
            raise CheckpointError(f"{path}: shard {shard!r:.80} is not a .safetensors file name inside the cache "
                                  "folder (paths and '..' are refused)")
        file = self.directory / shard
        what = not_a_file(file)
        if what is not None:
            raise CheckpointError(f"{file}: is {what}, not a teacher cache shard{REBUILD}")
        if not file.is_file():
            raise CheckpointError(f"{path}: shard {shard} is missing{REBUILD}")
        actual = file.stat().st_size
        if size is not None and actual != size:
            raise CheckpointError(f"{file}: {actual} bytes, {INDEX_NAME} records {size} (truncated or rewritten "
                                  f"since the cache was built){REBUILD}")
        m = self.meta
        want = {"embeds": [None, m.max_length, m.dim], "mask": [None, m.max_length]}
        if m.pooled_dim is not None:
            want["pooled"] = [None, m.pooled_dim]
        with open_safetensors(file) as f:  # a truncated file fails here: its header promises more bytes
            try:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in want if k in set(f.keys())}
            except Exception as exc:
                raise CheckpointError(f"{file}: not a readable safetensors file ({str(exc)[:200]}){REBUILD}") from None
        n = shapes.get("embeds", [0])[0]
        for key, shape in want.items():
            got = shapes.get(key)
            if got is None:
                raise CheckpointError(f"{file}: no tensor {key!r} (not a teacher cache shard){REBUILD}")
            expected = [n] + shape[1:]
            if got != expected:
                raise CheckpointError(f"{file}: {key} is {got}, the cache index says {expected}{REBUILD}")
        return n

    @staticmethod
    def present(directory: str | Path | None) -> bool:
        return directory is not None and (Path(directory) / INDEX_NAME).is_file()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt_key(prompt) in self.entries

    @property
    def has_pooled(self) -> bool:
        return self.meta.pooled_dim is not None

    def check(self, *, target: str, max_length: int, masked: bool, tokenizer: str, dim: int) -> None:
        """Refuse a cache built for other settings (one message naming every mismatch)."""
        want = {"target": target, "max_length": max_length, "masked": masked, "tokenizer": tokenizer, "dim": dim}
        bad = [f"{k}: cache {getattr(self.meta, k)!r}, training {v!r}" for k, v in want.items()
               if getattr(self.meta, k) != v]
        if bad:
            raise ConfigError(f"{self.directory}: teacher cache built for other settings ({'; '.join(bad)}); "
                              "rebuild it with `python -m train.cache_teacher --force`")

    def missing(self, prompts) -> list[str]:
        return [p for p in prompts if prompt_key(p) not in self.entries]

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / shard), framework="pt")
        return self._handles[shard]

    def get(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """embeds [B, L, D], mask [B, L] (long), pooled [B, Dp] or None — on the CPU."""
        embeds, masks, pooled = [], [], []
        for p in prompts:
            try:
                shard, row = self.entries[prompt_key(p)]
            except KeyError:
                raise KeyError(p) from None
            try:
                f = self._handle(shard)
                embeds.append(f.get_slice("embeds")[row:row + 1])
                masks.append(f.get_slice("mask")[row:row + 1])
                if self.has_pooled:
                    pooled.append(f.get_slice("pooled")[row:row + 1])
            except Exception as exc:  # changed under a running trainer (it was checked when opened)
                raise CheckpointError(f"{self.directory / shard}: row {row} is unreadable ({str(exc)[:200]})"
                                      f"{REBUILD}") from None
        return (torch.cat(embeds), torch.cat(masks).long(), torch.cat(pooled) if pooled else None)
