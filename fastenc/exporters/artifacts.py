"""Artifact bookkeeping: sidecar JSON per artifact, the export manifest, fingerprints, atomic writes.

Every artifact file ``X`` has a sidecar ``X.json`` holding what it was built from (``inputs``) and
how to run it (backend, dtype, profile, files). The sidecar is written last, so an artifact
without one is incomplete; an artifact whose sidecar ``inputs`` equal the current ones (and whose
files still have their recorded sizes) is reused instead of rebuilt.

Layout of an export directory::

    config.json  tokenizer.json (if any)  export.json
    onnx/encoder.{dtype}.onnx[.data]        encoder.{dtype}.ort-cpu.onnx   encoder.int8.onnx
    trt/encoder.trt{X.Y}.sm{CC}.{dtype}.plan   trt/timing.cache
    aoti/encoder.{dtype}.{device}.pt2
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import EncoderConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write
from ..weights import CONFIG_NAME
from .contract import Profile

log = logging.getLogger("fastenc")

SIDECAR_FORMAT = "fastenc-artifact"
MANIFEST_NAME = "export.json"
MANIFEST_FORMAT = "fastenc-export"
#: Bumped when the exported graph or the sidecar schema changes (part of every artifact's inputs).
EXPORT_VERSION = 1
KIND_DIRS = {"onnxruntime": "onnx", "tensorrt": "trt", "aoti": "aoti"}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (exporters and runtimes raise pages of trace)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def sidecar_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def read_json(path: Path, *, what: str = "file") -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


# ---------------------------------------------------------------------------- sidecars


def write_sidecar(artifact: Path, *, kind: str, backend: str, dtype: str, inputs: dict[str, Any],
                  profile: Profile, files: list[Path], **extra: Any) -> dict[str, Any]:
    """Record a finished artifact; ``files`` are the artifact and its companions (external data)."""
    meta = {
        "format": SIDECAR_FORMAT,
        "kind": kind,
        "backend": backend,
        "dtype": dtype,
        "file": artifact.name,
        "files": {f.name: f.stat().st_size for f in files},
        "inputs": inputs,
        "profile": profile.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    write_json(sidecar_path(artifact), meta)
    return meta


def read_sidecar(artifact: Path) -> dict[str, Any]:
    meta = read_json(sidecar_path(artifact), what="artifact sidecar")
    if meta.get("format") != SIDECAR_FORMAT or "file" not in meta or "profile" not in meta:
        raise CheckpointError(f"{sidecar_path(artifact)}: not a fastenc artifact sidecar")
    return meta


def check_files(artifact: Path, meta: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` when a file of the artifact is missing or has another size."""
    for name, size in meta.get("files", {}).items():
        path = artifact.parent / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {sidecar_path(artifact).name}); re-run `fastenc export`")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{path}: {actual} bytes but {size} were written (truncated or replaced); "
                f"re-run `fastenc export --force`"
            )


def is_current(artifact: Path, inputs: dict[str, Any]) -> bool:
    """True when ``artifact`` exists, its sidecar records exactly ``inputs`` and its files are intact."""
    if not sidecar_path(artifact).is_file():
        return False
    try:
        meta = read_sidecar(artifact)
        check_files(artifact, meta)
    except CheckpointError as exc:
        log.info("rebuilding %s: %s", artifact.name, exc)
        return False
    if meta.get("inputs") != json.loads(json.dumps(inputs)):
        log.info("rebuilding %s: its recorded inputs differ from this export's", artifact.name)
        return False
    return True


def build_step(artifact: Path, inputs: dict[str, Any], build: Callable[[], dict[str, Any]], *, force: bool,
               what: str) -> tuple[dict[str, Any], bool]:
    """Reuse ``artifact`` if current (and not ``force``), else run ``build()`` which writes the files and
    returns the sidecar. Returns ``(sidecar, built)``."""
    if not force and is_current(artifact, inputs):
        log.info("reusing %s (inputs unchanged; --force rebuilds)", artifact)
        return read_sidecar(artifact), False
    sidecar_path(artifact).unlink(missing_ok=True)  # the old record must not vouch for new files
    log.info("%s -> %s ...", what, artifact)
    start = time.perf_counter()
    meta = build()
    log.info("%s done in %.1f s", what, time.perf_counter() - start)
    return meta, True


@contextmanager
def staged(directory: Path) -> Iterator[Path]:
    """A temporary folder inside ``directory``: write multi-file artifacts there, then :func:`commit`.
    Removed (with anything left in it) on exit, also on errors."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit(tmp: Path, directory: Path, main: str) -> list[Path]:
    """Rename every file of ``tmp`` into ``directory``, the main file last; returns the final paths."""
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    if main not in names:
        raise CheckpointError(f"{tmp}: {main} was not written")
    names.remove(main)
    out = []
    for name in [*names, main]:
        os.replace(tmp / name, directory / name)
        out.append(directory / name)
    return out


def find_artifacts(directory: Path, backend: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every complete artifact (one with a readable sidecar) under ``directory``, optionally one backend's."""
    found = []
    dirs = [directory / KIND_DIRS[backend]] if backend else [directory / d for d in KIND_DIRS.values()]
    for sub in dirs:
        if not sub.is_dir():
            continue
        for side in sorted(sub.glob("*.json")):
            try:
                data = json.loads(side.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                log.warning("ignoring unreadable sidecar %s", side)
                continue
            if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
                continue
            if backend is None or data.get("backend") == backend:
                found.append((sub / str(data.get("file")), data))
    return found


# ---------------------------------------------------------------------------- fingerprints


def file_digest(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(path: Path) -> str:
    """sha256 over the checkpoint's config and weight files (names and contents)."""
    if path.is_file():
        files = [path] + ([path.parent / CONFIG_NAME] if (path.parent / CONFIG_NAME).is_file() else [])
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
        files = [p for p in files if not p.name.startswith(("tokenizer", "special_tokens"))]
    if not files:
        raise CheckpointError(f"{path}: no config or weight files to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------- manifest


def write_manifest(directory: Path, *, source: dict[str, Any], fingerprint: str, cfg: EncoderConfig,
                   target: str, profile: Profile, artifacts: list[Path]) -> Path:
    data = {
        "format": MANIFEST_FORMAT,
        "version": EXPORT_VERSION,
        "source": source,
        "fingerprint": fingerprint,
        "config": cfg.to_hf_dict(),
        "target": target,
        "profile": profile.to_dict(),
        "artifacts": sorted(str(a.relative_to(directory)) for a in artifacts),
    }
    return write_json(directory / MANIFEST_NAME, data)


def read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such export directory")
    data = read_json(directory / MANIFEST_NAME, what="export manifest (run `fastenc export` first)")
    if data.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{directory / MANIFEST_NAME}: not a fastenc export manifest")
    return data


def read_config(directory: Path) -> EncoderConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this a `fastenc export` directory?")
    try:
        return EncoderConfig.from_json_file(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
