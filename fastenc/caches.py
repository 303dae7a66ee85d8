"""Where fastenc keeps files between runs, how big they are, and how to delete them (``fastenc cache``).

Everything lives under one root: ``$FASTENC_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastenc``, else
``~/.cache/fastenc``:

* ``cpu-plans/``   the ``cpu`` backend's plans, one small JSON per checkpoint (see
  :func:`fastenc.backends.cpu.plan_cache_dir`), and the OpenVINO graph of each plan that runs OpenVINO
  (IR, the weights in the compute precision: half the fp32 checkpoint's size in bf16);
* ``gpu-probes/``  the triton kernels' first-contact verdicts, one small JSON per GPU kind (name, compute
  capability, driver, torch and triton versions; see :mod:`fastenc.backends.probe`);
* ``gpu-tuning/``  the triton kernels' autotuning choices, one small JSON per GPU kind (name, compute
  capability, shared memory per block) and triton version (see :mod:`fastenc.kernels.tuning`);
* ``embeddings/``  the embedding cache's disk store, when it is turned on;
* ``fid-stats/``   reference statistics of ``python -m train.eval fid`` (mean and covariance of a folder's
  features, one ``<32 hex>.npz`` of ~32 MB per folder and extractor);
* ``bench/``       models and exports the benchmarks build once and reuse (``$FASTENC_BENCH_CACHE``
  overrides this one).

:func:`clear` deletes only regular files fastenc can tell it wrote itself, never a folder by its name,
so pointing ``$FASTENC_CACHE_DIR`` at a folder that holds other files (``$HOME``, say) cannot delete
those: in ``cpu-plans/`` and ``embeddings/`` the exact names the plan cache and the disk store give
their files (and their temporaries); in ``bench/<model>/`` the files ``fastenc.save`` writes in
``checkpoint/`` (its config.json and weights carry fastenc's layout mark) and, in ``export/``, the
files its ``export.json`` manifest lists with their sizes. A
path through a symbolic link is never followed. Folders are removed only when that left them empty.
This module imports no torch: ``fastenc cache info`` answers at once.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: What the embedding cache's disk store writes (:mod:`fastenc.cache`): entries, and the temporary
#: files of writes in progress or killed (``tempfile.mkstemp`` names).
ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")
TMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}\.safetensors")
#: What the cpu backend's plan cache writes: ``[engine-]<24 hex>.json`` and the temporaries of
#: :func:`fastenc.fileio.atomic_write` (``.<name>.<8 chars>.tmp``).
PLAN_NAME = re.compile(r"(engine-)?[0-9a-f]{24}\.json")
PLAN_TMP_NAME = re.compile(r"\.(engine-)?[0-9a-f]{24}\.json\.[a-z0-9_]{8}\.tmp")
#: The OpenVINO graph a plan runs (:mod:`fastenc.backends.cpu_openvino`): ``engine-<24 hex>.mask.{xml,bin}``, or
#: ``.int8.`` with int8 weights (and the ``.ids.`` graphs earlier versions kept too) and their temporaries (``.engine-<24 hex>.mask.<8 hex>.tmp.*``).
GRAPH_NAME = re.compile(r"engine-[0-9a-f]{24}\.(ids|mask|int8)\.(xml|bin)")
GRAPH_TMP_NAME = re.compile(r"\.engine-[0-9a-f]{24}\.(ids|mask|int8)\.[0-9a-f]{8}\.tmp\.(xml|bin)")
#: What the GPU probe writes (:mod:`fastenc.backends.probe`): ``<24 hex>.json`` and atomic_write's temporaries.
PROBE_NAME = re.compile(r"[0-9a-f]{24}\.json")
PROBE_TMP_NAME = re.compile(r"\.[0-9a-f]{24}\.json\.[a-z0-9_]{8}\.tmp")
#: What the tuning tables are named (:mod:`fastenc.kernels.tuning`): the same shapes as the probe's files.
TUNING_NAME, TUNING_TMP_NAME = PROBE_NAME, PROBE_TMP_NAME
#: FID reference statistics (``train/eval/fid.py``): ``<32 hex>.npz`` and atomic_write's temporaries.
FID_NAME = re.compile(r"[0-9a-f]{32}\.npz")
FID_TMP_NAME = re.compile(r"\.[0-9a-f]{32}\.npz\.[a-z0-9_]{8}\.tmp")
#: A benchmark model's folder under bench/ (``bench.exports.model_key``), and atomic_write's temporaries
#: of what fastenc.save writes in its ``checkpoint/`` subfolder.
BENCH_MODEL = re.compile(r"[a-z0-9]+-t5init-seed\d+|checkpoint-[0-9a-f]{12}")
_BENCH_CHECKPOINT_TMP = re.compile(r"\.(model\.safetensors|config\.json|tokenizer\.json)\.[a-z0-9_]{8}\.tmp")
_MANIFEST = "export.json"
_VERIFIED = ".fastenc-verified.json"

_WHAT = {
    "cpu-plans": "cpu backend plans (small JSON, one per checkpoint) and the OpenVINO graphs they run (weights in "
                 "the compute precision; rebuilt in seconds)",
    "gpu-probes": "triton first-contact verdicts (small JSON, one per GPU kind; probed again in seconds)",
    "gpu-tuning": "triton autotuning choices (small JSON, one per GPU kind; tuned again on the next launches)",
    "embeddings": "embedding cache disk store (when enabled; one safetensors file per prompt)",
    "fid-stats": "FID reference statistics (python -m train.eval fid; ~32 MB per reference folder, which is read again after a clear)",
    "bench": "benchmark models and exports (python -m bench.*; rebuilt on the next benchmark run)",
}


def cache_root() -> Path:
    """``$FASTENC_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastenc``, else ``~/.cache/fastenc``."""
    root = os.environ.get("FASTENC_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastenc"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except OSError:
        return None


def _is_plain_dir(path: Path) -> bool:
    st = _lstat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _is_plain_file(path: Path) -> bool:
    st = _lstat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def _names(folder: Path) -> list[str]:
    """Entries of ``folder`` when it is a real folder (not a link to one), else none."""
    if not _is_plain_dir(folder):
        return []
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _files_named(folder: Path, *patterns: re.Pattern[str]) -> list[Path]:
    return [folder / n for n in _names(folder)
            if any(p.fullmatch(n) for p in patterns) and _is_plain_file(folder / n)]


def _export_files(export: Path) -> list[Path]:
    """Files of a bench export folder that its manifest lists (same size), the manifest and the digest record."""
    manifest = export / _MANIFEST
    if not _is_plain_dir(export) or not _is_plain_file(manifest):
        return []
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(listed, dict):
        return []
    found = []
    for name, entry in listed.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if (not parts or name.startswith("/") or any(p in (".", "..") or "\\" in p or "\0" in p for p in parts)
                or not isinstance(entry, dict)):
            continue
        path, folder_ok = export, True
        for part in parts[:-1]:  # every folder on the way is a real folder, never a link
            path = path / part
            folder_ok = folder_ok and _is_plain_dir(path)
        path = path / parts[-1]
        st = _lstat(path)
        if folder_ok and st is not None and stat.S_ISREG(st.st_mode) and st.st_size == entry.get("size"):
            found.append(path)
    found.append(manifest)
    if _is_plain_file(export / _VERIFIED):
        found.append(export / _VERIFIED)
    return found


def _json_object(path: Path, limit: int = 1 << 20) -> dict | None:
    try:
        if path.stat().st_size > limit:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _safetensors_metadata(path: Path, limit: int = 1 << 24) -> dict:
    """The ``__metadata__`` of a safetensors file's header (empty when it has none or is not one)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= limit else {}
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _checkpoint_files(checkpoint: Path) -> list[Path]:
    """What ``fastenc.save`` wrote in a bench model's ``checkpoint/``: its config.json (marked with
    fastenc's layout), the weights whose header says the same, the tokenizer.json beside them, and
    atomic_write's temporaries. A folder fastenc did not write gives nothing."""
    config = checkpoint / "config.json"
    if not _is_plain_dir(checkpoint) or not _is_plain_file(config):
        return []
    marker = (_json_object(config) or {}).get("fastenc")
    if not isinstance(marker, dict) or marker.get("layout") != "fastenc":
        return []
    files = [config]
    weights = checkpoint / "model.safetensors"
    if _is_plain_file(weights) and _safetensors_metadata(weights).get("layout") == "fastenc":
        files.append(weights)
    if _is_plain_file(checkpoint / "tokenizer.json"):
        files.append(checkpoint / "tokenizer.json")
    return files + _files_named(checkpoint, _BENCH_CHECKPOINT_TMP)


@dataclass(frozen=True)
class CacheDir:
    name: str
    path: Path
    what: str

    def owned(self) -> list[Path]:
        """Regular files in this cache that fastenc wrote (see the module docstring); never a folder."""
        if self.name == "cpu-plans":
            return _files_named(self.path, PLAN_NAME, PLAN_TMP_NAME, GRAPH_NAME, GRAPH_TMP_NAME)
        if self.name == "gpu-probes":
            return _files_named(self.path, PROBE_NAME, PROBE_TMP_NAME)
        if self.name == "gpu-tuning":
            return _files_named(self.path, TUNING_NAME, TUNING_TMP_NAME)
        if self.name == "embeddings":
            return _files_named(self.path, ENTRY_NAME, TMP_NAME)
        if self.name == "fid-stats":
            return _files_named(self.path, FID_NAME, FID_TMP_NAME)
        files = []
        for model in _names(self.path):
            base = self.path / model
            if not BENCH_MODEL.fullmatch(model) or not _is_plain_dir(base):
                continue
            files += _checkpoint_files(base / "checkpoint")
            files += _export_files(base / "export")
        return files

    def usage(self) -> tuple[int, int]:
        """(files, bytes) of what fastenc wrote here."""
        files = self.owned()
        return len(files), sum(st.st_size for f in files if (st := _lstat(f)) is not None)


def cache_dirs() -> list[CacheDir]:
    root = cache_root()
    bench = os.environ.get("FASTENC_BENCH_CACHE")
    paths = {"cpu-plans": root / "cpu-plans", "gpu-probes": root / "gpu-probes", "gpu-tuning": root / "gpu-tuning",
             "embeddings": root / "embeddings", "fid-stats": root / "fid-stats",
             "bench": Path(bench).expanduser() if bench else root / "bench"}
    return [CacheDir(name, path, _WHAT[name]) for name, path in paths.items()]


def _remove_empty(folder: Path, stop: Path) -> None:
    """rmdir ``folder`` and its parents up to (not including) ``stop`` while they are empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()  # fails (and stops) when not empty, or a link
        except OSError:
            return
        folder = folder.parent


def clear(names: list[str] | None = None) -> list[tuple[CacheDir, int, int]]:
    """Delete what fastenc wrote in the named caches (all by default); returns (cache, files, bytes) freed."""
    done = []
    for cache in cache_dirs():
        if names and cache.name not in names:
            continue
        owned = cache.owned()
        files = size = 0
        for f in owned:
            st = _lstat(f)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            try:
                f.unlink()
            except FileNotFoundError:
                continue
            files, size = files + 1, size + st.st_size
        for folder in sorted({f.parent for f in owned}, key=lambda p: len(p.parts), reverse=True):
            _remove_empty(folder, cache.path)
        try:
            if _is_plain_dir(cache.path):
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
