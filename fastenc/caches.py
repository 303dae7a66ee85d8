"""Where fastenc keeps files between runs, how big they are, and how to delete them (``fastenc cache``).

Everything lives under one root: ``$FASTENC_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastenc``, else
``~/.cache/fastenc``:

* ``cpu-plans/``   the ``cpu`` backend's int8 plans, one small JSON per checkpoint (see
  :func:`fastenc.backends.cpu.plan_cache_dir`);
* ``embeddings/``  the embedding cache's disk store, when it is turned on;
* ``bench/``       models and exports the benchmarks build once and reuse (``$FASTENC_BENCH_CACHE``
  overrides this one).

:func:`clear` deletes only entries whose names fastenc itself gives them, so pointing
``$FASTENC_CACHE_DIR`` at a folder that holds other files cannot delete those. This module imports
no torch: ``fastenc cache info`` answers at once.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

#: Names fastenc writes in each cache folder (anything else there is left alone).
_OWNED = {
    "cpu-plans": re.compile(r"\.?[0-9a-f]{24}\.json(\.[^/]+\.tmp)?"),  # plans and atomic_write leftovers
    "embeddings": re.compile(r"[0-9a-f]{64}\.(safetensors|json)|\.tmp-[^/]*"),
    "bench": re.compile(r"[a-z0-9]+-t5init-seed\d+|checkpoint-[0-9a-f]{12}"),
}
_WHAT = {
    "cpu-plans": "cpu backend int8 plans (small JSON, one per checkpoint; rebuilt in seconds)",
    "embeddings": "embedding cache disk store (when enabled; one safetensors file per prompt)",
    "bench": "benchmark models and exports (python -m bench.*; rebuilt on the next benchmark run)",
}


def cache_root() -> Path:
    """``$FASTENC_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastenc``, else ``~/.cache/fastenc``."""
    root = os.environ.get("FASTENC_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastenc"


@dataclass(frozen=True)
class CacheDir:
    name: str
    path: Path
    what: str

    def owned(self) -> list[Path]:
        """Entries of this folder that fastenc wrote (by name)."""
        try:
            entries = sorted(self.path.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        pattern = _OWNED[self.name]
        return [p for p in entries if pattern.fullmatch(p.name) and not p.is_symlink()]

    def usage(self) -> tuple[int, int]:
        """(files, bytes) of what fastenc wrote here."""
        files = size = 0
        for entry in self.owned():
            for f in ([entry] if entry.is_file() else entry.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    files += 1
                    size += f.stat().st_size
        return files, size


def cache_dirs() -> list[CacheDir]:
    root = cache_root()
    bench = os.environ.get("FASTENC_BENCH_CACHE")
    paths = {"cpu-plans": root / "cpu-plans", "embeddings": root / "embeddings",
             "bench": Path(bench).expanduser() if bench else root / "bench"}
    return [CacheDir(name, path, _WHAT[name]) for name, path in paths.items()]


def clear(names: list[str] | None = None) -> list[tuple[CacheDir, int, int]]:
    """Delete what fastenc wrote in the named caches (all by default); returns (cache, files, bytes) freed."""
    done = []
    for cache in cache_dirs():
        if names and cache.name not in names:
            continue
        files, size = cache.usage()
        for entry in cache.owned():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        try:
            cache.path.rmdir()  # only when now empty
        except OSError:
            pass
        done.append((cache, files, size))
    return done


def hub_cache() -> Path:
    """Hugging Face's own download cache (checkpoints and tokenizers fetched by hub id); not fastenc's."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when missing)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
