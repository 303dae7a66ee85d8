"""Per-prompt embedding cache: an in-memory LRU with an optional on-disk safetensors store.

Entries are keyed by ``(model fingerprint, target, dtype, prompt)`` (see :func:`key`) and hold
one prompt's ``embeds`` ``[L, P]`` and ``mask`` ``[L]``. Tensors are stored **on the CPU**
(detached copies, so device memory is not pinned by the cache and later in-place edits by the
caller cannot change a cached value); :meth:`EmbeddingCache.get` returns CPU tensors unless a
``device`` is given. With ``disk_dir`` each entry is also written to
``disk_dir/<sha256 of the key>.safetensors`` (temp file, then ``os.replace``), and a memory miss
falls back to that file; unreadable or mismatching files are ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ConfigError, InputError

logger = logging.getLogger("fastenc")


class CacheKey(NamedTuple):
    fingerprint: str
    target: str
    dtype: str
    prompt: str


def key(fingerprint: str, target: str, dtype: str | torch.dtype, prompt: str) -> CacheKey:
    """Cache key; a ``torch.dtype`` is normalised to its short name (``torch.bfloat16`` -> ``"bfloat16"``)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype)
    dtype = dtype.removeprefix("torch.")
    return CacheKey(str(fingerprint), str(target), dtype, str(prompt))


def _digest(k: CacheKey) -> str:
    return hashlib.sha256(json.dumps(list(k), ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheStats:
    hits: int  # memory or disk
    misses: int
    disk_hits: int  # hits served from disk_dir (included in hits)


class EmbeddingCache:
    """LRU cache of per-prompt ``(embeds [L, P], mask [L])`` pairs, stored on the CPU. Thread-safe."""

    def __init__(self, max_entries: int = 1024, disk_dir: str | Path | None = None) -> None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 0:
            raise ConfigError(f"max_entries must be a non-negative integer, got {max_entries!r}")
        self.max_entries = max_entries
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self._data: OrderedDict[CacheKey, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = self._disk_hits = 0

    key = staticmethod(key)

    def __len__(self) -> int:
        """Entries held in memory (the disk store may hold more)."""
        return len(self._data)

    def __contains__(self, k: object) -> bool:
        return k in self._data

    @property
    def stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses, self._disk_hits)

    def get(self, k: CacheKey, *, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(embeds, mask)`` for ``k`` (on the CPU, or on ``device``), or ``None`` on a miss."""
        with self._lock:
            entry = self._data.get(k)
            if entry is not None:
                self._data.move_to_end(k)
                self._hits += 1
        if entry is None:
            entry = self._load(k)
            with self._lock:
                if entry is None:
                    self._misses += 1
                    return None
                self._hits += 1
                self._disk_hits += 1
                self._insert(k, entry)
        if device is not None:
            return entry[0].to(device), entry[1].to(device)
        return entry

    def put(self, k: CacheKey, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """Store one prompt's ``embeds [L, P]`` and ``mask [L]`` (copied to the CPU)."""
        if embeds.dim() != 2 or mask.dim() != 1 or embeds.shape[0] != mask.shape[0]:
            raise InputError(
                f"cache entries are embeds [L, P] and mask [L], got {tuple(embeds.shape)} and {tuple(mask.shape)}"
            )
        entry = (embeds.detach().to("cpu", copy=True).contiguous(), mask.detach().to("cpu", copy=True).contiguous())
        with self._lock:
            self._insert(k, entry)
        if self.disk_dir is not None:
            self._store(k, entry)

    def clear(self, *, disk: bool = False) -> None:
        """Drop the in-memory entries and reset the stats; ``disk=True`` also deletes the disk store's files."""
        with self._lock:
            self._data.clear()
            self._hits = self._misses = self._disk_hits = 0
        if disk and self.disk_dir is not None:
            for file in self.disk_dir.glob("*.safetensors"):
                file.unlink(missing_ok=True)

    # ---- internals ----------------------------------------------------------------------

    def _insert(self, k: CacheKey, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._data[k] = entry
        self._data.move_to_end(k)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def _path(self, k: CacheKey) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{_digest(k)}.safetensors"

    def _store(self, k: CacheKey, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        path = self._path(k)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            metadata = {"key": json.dumps(list(k), ensure_ascii=False)}
            save_file({"embeds": entry[0], "mask": entry[1]}, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, k: CacheKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.disk_dir is None:
            return None
        path = self._path(k)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                stored_key = (f.metadata() or {}).get("key")
                if stored_key is None or json.loads(stored_key) != list(k):
                    raise ValueError("stored key does not match")
                embeds, mask = f.get_tensor("embeds"), f.get_tensor("mask")
            if embeds.dim() != 2 or mask.dim() != 1 or embeds.shape[0] != mask.shape[0]:
                raise ValueError(f"bad shapes {tuple(embeds.shape)} / {tuple(mask.shape)}")
        except Exception as exc:  # corrupt/truncated file, foreign content: recompute instead
            logger.warning("ignoring unreadable embedding cache file %s (%s)", path, exc)
            return None
        return embeds, mask
