"""Per-prompt embedding cache: an in-memory LRU bounded in bytes, with an optional on-disk store.

Entries are keyed by ``(model fingerprint, target, dtype, prompt)`` (see :func:`key`); the
fingerprint (:attr:`fastenc.Encoder.fingerprint`) covers the weights' content, the tokenizer, the
config, dtype and backend, so new weights or another tokenizer never get old entries. An entry holds
one prompt's ``embeds`` ``[L, P]`` and ``mask`` ``[L]``, stored **on the CPU** (detached copies);
:meth:`EmbeddingCache.get` returns CPU tensors unless a ``device`` is given.

Memory: the LRU keeps at most ``max_bytes`` of tensors (default :data:`DEFAULT_MAX_BYTES`, 1 GiB;
one flux-dev entry of the base student is 8 MiB in fp32) and, if given, at most ``max_entries``.

Disk (``disk_dir``; :func:`default_disk_dir` is ``$FASTENC_CACHE_DIR/embeddings``, else
``~/.cache/fastenc/embeddings``, the folder ``fastenc cache info|clear`` reports): each entry is
``disk_dir/<sha256 of the key>.safetensors``, written to a ``.tmp-*`` name and renamed, with the key
and a sha256 of the tensor bytes in its metadata. A file that is unreadable, for another key or
fails its checksum is deleted with a warning and recomputed. :func:`disk_usage` and
:func:`clear_disk` (and ``clear(disk=True)``) touch only files named like that, so pointing
``disk_dir`` at a folder holding other files (a checkpoint, say) never deletes them. A folder that
cannot be written turns the disk store off with one warning; the memory cache keeps working.
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

# ENTRY_NAME, TMP_NAME: the names the disk store writes (entries; temporaries of writes in progress or
# killed), defined beside ``fastenc cache clear`` (:mod:`fastenc.caches`), which deletes exactly these.
from .caches import ENTRY_NAME, TMP_NAME  # noqa: F401 (re-exported)
from .errors import ConfigError, InputError
from .fileio import umask_mode

logger = logging.getLogger("fastenc")

#: Default bound of the in-memory LRU, in bytes of cached tensors.
DEFAULT_MAX_BYTES = 1 << 30
FORMAT = "fastenc-embedding-cache/2"


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
    return hashlib.sha256(json.dumps(list(k), ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def _checksum(embeds: torch.Tensor, mask: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (embeds, mask):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()


def default_disk_dir() -> Path:
    """Where a disk store lives unless told otherwise: ``<fastenc cache root>/embeddings``."""
    from .caches import cache_root

    return cache_root() / "embeddings"


def _owned(disk_dir: Path) -> list[Path]:
    """Files in ``disk_dir`` the store wrote (entries and temporaries), never anything else."""
    try:
        entries = list(Path(disk_dir).iterdir())
    except OSError:
        return []
    return [p for p in entries if (ENTRY_NAME.fullmatch(p.name) or TMP_NAME.fullmatch(p.name))
            and not p.is_symlink() and p.is_file()]


def disk_usage(disk_dir: str | Path | None = None) -> tuple[int, int]:
    """``(files, bytes)`` of the disk store in ``disk_dir`` (default :func:`default_disk_dir`)."""
    files = _owned(Path(disk_dir) if disk_dir is not None else default_disk_dir())
    return len(files), sum(f.stat().st_size for f in files)


def clear_disk(disk_dir: str | Path | None = None) -> int:
    """Delete the disk store's files in ``disk_dir`` (default :func:`default_disk_dir`); returns how many."""
    files = _owned(Path(disk_dir) if disk_dir is not None else default_disk_dir())
    for f in files:
        f.unlink(missing_ok=True)
    return len(files)


@dataclass(frozen=True)
class CacheStats:
    hits: int  # memory or disk
    misses: int
    disk_hits: int  # hits served from disk_dir (included in hits)


def _check_limit(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer{' or None' if allow_none else ''}, got {value!r}")


class EmbeddingCache:
    """LRU cache of per-prompt ``(embeds [L, P], mask [L])`` pairs, stored on the CPU. Thread-safe.

    ``max_bytes`` bounds the tensors held in memory (an entry larger than it is kept on disk only);
    ``max_entries`` (optional) bounds their number as well.
    """

    def __init__(self, max_entries: int | None = None, disk_dir: str | Path | None = None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        _check_limit("max_entries", max_entries, allow_none=True)
        _check_limit("max_bytes", max_bytes, allow_none=False)
        if disk_dir is not None and not isinstance(disk_dir, (str, os.PathLike)):
            raise ConfigError(f"disk_dir must be a path, got {type(disk_dir).__name__}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[CacheKey, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._disk_hits = 0
        self._disk_warned = False
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None:
            try:
                self.disk_dir.mkdir(parents=True, exist_ok=True)
                if not os.access(self.disk_dir, os.W_OK | os.X_OK):
                    raise PermissionError(f"[Errno 13] Permission denied: '{self.disk_dir}'")
            except OSError as exc:
                self._disable_disk(exc)

    key = staticmethod(key)

    def __len__(self) -> int:
        """Entries held in memory (the disk store may hold more)."""
        return len(self._data)

    def __contains__(self, k: object) -> bool:
        return k in self._data

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held in memory (at most :attr:`max_bytes`)."""
        return self._nbytes

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
        """Drop the in-memory entries and reset the stats; ``disk=True`` also deletes the disk store's
        files (only names it writes: ``<64 hex>.safetensors`` and ``.tmp-*``)."""
        with self._lock:
            self._data.clear()
            self._nbytes = 0
            self._hits = self._misses = self._disk_hits = 0
        if disk and self.disk_dir is not None:
            clear_disk(self.disk_dir)

    # ---- internals ----------------------------------------------------------------------

    @staticmethod
    def _size(entry: tuple[torch.Tensor, torch.Tensor]) -> int:
        return entry[0].nbytes + entry[1].nbytes

    def _insert(self, k: CacheKey, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        old = self._data.pop(k, None)
        if old is not None:
            self._nbytes -= self._size(old)
        size = self._size(entry)
        if size > self.max_bytes or self.max_entries == 0:
            return  # larger than the whole budget: not kept in memory
        self._data[k] = entry
        self._nbytes += size
        while self._nbytes > self.max_bytes or (self.max_entries is not None and len(self._data) > self.max_entries):
            _, dropped = self._data.popitem(last=False)
            self._nbytes -= self._size(dropped)

    def _disable_disk(self, exc: BaseException) -> None:
        if not self._disk_warned:
            logger.warning("embedding cache folder %s is not writable (%s); caching in memory only",
                           self.disk_dir, getattr(exc, "strerror", None) or exc)
            self._disk_warned = True
        self.disk_dir = None

    def _path(self, k: CacheKey) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{_digest(k)}.safetensors"

    def _store(self, k: CacheKey, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        path = self._path(k)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            metadata = {"format": FORMAT, "key": json.dumps(list(k)),  # ASCII: any prompt fits the header
                        "sha256": _checksum(*entry)}
            save_file({"embeds": entry[0], "mask": entry[1]}, tmp, metadata=metadata)
            os.chmod(tmp, umask_mode())  # save_file recreates the file 0600
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:  # read-only, full, removed: memory-only from now on
            self._disable_disk(exc)
        except Exception as exc:  # safetensors reports I/O failures as its own errors
            self._disable_disk(exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _load(self, k: CacheKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.disk_dir is None:
            return None
        path = self._path(k)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                stored_key = meta.get("key")
                if stored_key is None or json.loads(stored_key) != list(k):
                    raise ValueError("stored key does not match")
                if set(f.keys()) != {"embeds", "mask"}:
                    raise ValueError(f"holds {sorted(f.keys())}, expected embeds and mask")
                embeds, mask = f.get_tensor("embeds"), f.get_tensor("mask")
            if embeds.dim() != 2 or mask.dim() != 1 or embeds.shape[0] != mask.shape[0]:
                raise ValueError(f"bad shapes {tuple(embeds.shape)} / {tuple(mask.shape)}")
            if meta.get("sha256") != _checksum(embeds, mask):
                raise ValueError("checksum mismatch (damaged or altered bytes)")
        except Exception as exc:  # corrupt/truncated file, foreign content: drop it and recompute
            logger.warning("ignoring unreadable embedding cache file %s (%s); deleted", path, exc)
            path.unlink(missing_ok=True)
            return None
        return embeds, mask
