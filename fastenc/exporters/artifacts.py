"""Artifact bookkeeping: sidecar JSON per artifact, the export manifest with content hashes, safe names.

Every artifact file ``X`` has a sidecar ``X.json`` holding what it was built from (``inputs``) and
how to run it (backend, dtype, profile, files). An artifact whose sidecar ``inputs`` equal the
current ones (and whose files still match the previous export's manifest) is reused instead of rebuilt.

The manifest ``export.json`` is written last, when every other file of the export is in place. It
lists every file of the folder (config, tokenizer files, models, external data, engines, packages,
sidecars, timing cache) with its size and sha256. What is checked when:

* ``fastenc.load(dir, backend=...)`` (:func:`fastenc.backends.graph.pick`) and ``fastenc triton-repo``:
  the manifest, every listed file's presence and size, and the sha256 of the files they read: the
  root files (config, tokenizer) and the chosen artifact with its companions and sidecar.
* ``fastenc verify`` and the end of ``fastenc export``: the sha256 of every listed file.
* before an artifact of the previous export is reused: the sha256 of its files.

A mismatch is one :class:`~fastenc.errors.CheckpointError` that names the file and says to re-export
with ``--force``. Hashing a 1 GB model takes about a second, so a verified digest is remembered, in
memory and in ``.fastenc-verified.json`` inside the folder (best effort; skipped where the folder is
read-only), keyed by the file's (device, inode, size, mtime_ns, ctime_ns). Any write to a file changes
its ctime, and ctime cannot be set back by a user (``touch``/``utime`` change it too), so a rewritten
file, even of the same size and with its mtime restored, is hashed again and refused. The manifest is
an integrity record against interrupted, mixed, truncated or corrupted folders, not a signature:
whoever can write the folder can write a new manifest too.

Names read from files (a sidecar's ``file``/``files``, the manifest's ``files``/``artifacts``) go
through :func:`safe_member` before any path is built from them: relative, plain components, no ``..``,
and the resolved path stays inside the folder.

Layout of an export directory::

    config.json  tokenizer.json (if any)  export.json
    onnx/encoder.{dtype}.onnx[.data]        encoder.{dtype}.ort-cpu.onnx   encoder.int8.onnx
    trt/encoder.trt{X.Y}.sm{CC}.{dtype}.plan   trt/timing.cache
    aoti/encoder.{dtype}.{device}.pt2

How a whole export folder is replaced (one transaction) is described in :mod:`.transaction`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..config import EncoderConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write, content_identity
from ..weights import CONFIG_NAME
from .contract import Profile

log = logging.getLogger("fastenc")

SIDECAR_FORMAT = "fastenc-artifact"
MANIFEST_NAME = "export.json"
MANIFEST_FORMAT = "fastenc-export"
#: Bumped when the exported graph, the sidecar or the manifest schema changes (part of every artifact's inputs).
EXPORT_VERSION = 2
KIND_DIRS = {"onnxruntime": "onnx", "tensorrt": "trt", "aoti": "aoti"}
#: Digests of files verified earlier, keyed by their stat identity (see the module docstring).
VERIFIED_NAME = ".fastenc-verified.json"
REEXPORT = "re-export with `fastenc export ... --force`"

_verified: dict[tuple, str] = {}  # (realpath, dev, ino, size, mtime_ns, ctime_ns) -> sha256


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
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


# ---------------------------------------------------------------------------- names read from files


def safe_member(directory: Path, name: object, *, where: object, nested: bool = False) -> Path:
    """``directory / name`` for a ``name`` read from a file, after checking that it cannot leave ``directory``.

    ``name`` must be a non-empty relative path of plain components separated by ``/`` (one component
    unless ``nested``): no absolute path, no ``.``/``..``, no backslash, NUL or drive letter; and the
    resolved path (symlinks followed) must stay inside the resolved ``directory``. Raises one
    :class:`CheckpointError` naming ``where`` the name came from."""
    bad = not isinstance(name, str) or not name or len(name) > 255 * 4
    if not bad:
        parts = name.split("/")
        bad = (name.startswith("/") or any(c in name for c in "\\\0:") or any(p in ("", ".", "..") for p in parts)
               or (not nested and len(parts) != 1) or len(parts) > 4 or any(len(p) > 255 for p in parts))
    if bad:
        raise CheckpointError(f"{where}: refusing file name {name!r}: not a plain name inside {directory} "
                              f"(a tampered or crafted file; {REEXPORT})")
    path = Path(directory) / name
    base = Path(directory).resolve()
    if not path.resolve().is_relative_to(base):
        raise CheckpointError(f"{where}: refusing file name {name!r}: it resolves outside {directory} "
                              f"(a symlink?); {REEXPORT}")
    return path


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


def _check_sidecar(artifact: Path, meta: dict[str, Any]) -> dict[str, Any]:
    side = sidecar_path(artifact)
    if meta.get("format") != SIDECAR_FORMAT or "file" not in meta or "profile" not in meta:
        raise CheckpointError(f"{side}: not a fastenc artifact sidecar")
    if meta["file"] != artifact.name:
        raise CheckpointError(f"{side}: describes {meta['file']!r}, not {artifact.name!r}; {REEXPORT}")
    files = meta.get("files", {artifact.name: 0})
    if not isinstance(files, dict) or artifact.name not in files:
        raise CheckpointError(f"{side}: malformed 'files' (must map file names to sizes, the artifact included)")
    for name, size in files.items():
        safe_member(artifact.parent, name, where=side)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CheckpointError(f"{side}: size of {name!r} is {size!r}, not a byte count")
    return meta


def read_sidecar(artifact: Path) -> dict[str, Any]:
    return _check_sidecar(artifact, read_json(sidecar_path(artifact), what="artifact sidecar"))


def artifact_files(artifact: Path, meta: dict[str, Any]) -> list[Path]:
    """The artifact's files (itself + companions), every name checked with :func:`safe_member`."""
    side = sidecar_path(artifact)
    return [safe_member(artifact.parent, name, where=side) for name in meta.get("files", {artifact.name: 0})]


def check_files(artifact: Path, meta: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` when a file of the artifact is missing or has another size."""
    for path, size in zip(artifact_files(artifact, meta), meta.get("files", {}).values()):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {sidecar_path(artifact).name}); {REEXPORT}")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path}: {actual} bytes but {size} were written (truncated or replaced); {REEXPORT}")


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


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no copy of a multi-GB model), or copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_step(artifact: Path, inputs: dict[str, Any], build: Callable[[], dict[str, Any]], *, force: bool,
               what: str, previous: Path | None = None) -> tuple[dict[str, Any], bool]:
    """Reuse the artifact if current (and not ``force``), else run ``build()`` which writes the files and
    returns the sidecar. Returns ``(sidecar, built)``.

    ``previous`` is the same artifact in the previous export (``artifact`` being in a staging folder):
    when it is current and its files match that export's manifest, they are hard-linked into place.
    Without ``previous`` an ``artifact`` already in place is reused as it is."""
    if not force:
        if previous is None and is_current(artifact, inputs):
            log.info("reusing %s (inputs unchanged; --force rebuilds)", artifact)
            return read_sidecar(artifact), False
        if previous is not None and is_current(previous, inputs):
            try:
                meta = read_sidecar(previous)
                check_export(_export_root(previous), members=[previous], hash_root=False)
            except CheckpointError as exc:
                log.info("rebuilding %s: %s", artifact.name, exc)
            else:
                for src in [*artifact_files(previous, meta), sidecar_path(previous)]:
                    link_or_copy(src, artifact.parent / src.name)
                log.info("reusing %s (inputs unchanged; --force rebuilds)", previous)
                return meta, False
    sidecar_path(artifact).unlink(missing_ok=True)  # the old record must not vouch for new files
    log.info("%s -> %s ...", what, artifact)
    start = time.perf_counter()
    meta = build()
    log.info("%s done in %.1f s", what, time.perf_counter() - start)
    return meta, True


def _export_root(artifact: Path) -> Path:
    """The export folder of an artifact (``DIR/onnx/x.onnx`` -> ``DIR``)."""
    return artifact.parent.parent


@contextmanager
def staged(directory: Path) -> Iterator[Path]:
    """A temporary folder inside ``directory``: write multi-file artifacts there, then :func:`commit`.
    Removed (with anything left in it) on exit, also on errors; the name carries the process id, so
    a folder left by a killed process is removed by the next one (:func:`~.transaction.remove_stale`)."""
    from .transaction import STAGING_TAG, make_private_dir, remove_stale

    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory, STAGING_TAG)
    tmp = make_private_dir(directory, STAGING_TAG)
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
    """Every artifact the manifest of ``directory`` lists, optionally one backend's, with its sidecar.

    A folder without a manifest has no artifacts when it holds no sidecar either (not an export);
    with sidecars but no manifest it is an interrupted or pre-manifest export: :class:`CheckpointError`."""
    directory = Path(directory)
    if not (directory / MANIFEST_NAME).is_file():
        dirs = [directory / KIND_DIRS[backend]] if backend else [directory / d for d in KIND_DIRS.values()]
        if any(sub.is_dir() and any(sub.glob("*.json")) for sub in dirs):
            raise CheckpointError(f"{directory}: artifacts without an export manifest ({MANIFEST_NAME}): an "
                                  f"interrupted export or one written by an older fastenc; {REEXPORT}")
        return []
    manifest = read_manifest(directory)
    found = []
    for path in _manifest_artifacts(directory, manifest):
        if not sidecar_path(path).is_file():
            raise CheckpointError(f"{sidecar_path(path)}: missing (listed in {MANIFEST_NAME}); {REEXPORT}")
        meta = read_sidecar(path)
        if backend is None or meta.get("backend") == backend:
            found.append((path, meta))
    return found


def _manifest_artifacts(directory: Path, manifest: dict[str, Any]) -> list[Path]:
    where = directory / MANIFEST_NAME
    names = manifest.get("artifacts")
    if not isinstance(names, list):
        raise CheckpointError(f"{where}: 'artifacts' is not a list; {REEXPORT}")
    paths = []
    for name in names:
        path = safe_member(directory, name, where=where, nested=True)
        if len(Path(name).parts) != 2 or Path(name).parts[0] not in KIND_DIRS.values():
            raise CheckpointError(f"{where}: artifact {name!r} is not in one of {sorted(KIND_DIRS.values())}")
        if name not in manifest["files"] or f"{name}.json" not in manifest["files"]:
            raise CheckpointError(f"{where}: artifact {name!r} or its sidecar is not among the listed files; {REEXPORT}")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- fingerprints


def file_digest(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint's fingerprint covers: its config and weight files (not the tokenizer's)."""
    if path.is_file():
        files = [path] + ([path.parent / CONFIG_NAME] if (path.parent / CONFIG_NAME).is_file() else [])
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
        files = [p for p in files if not p.name.startswith(("tokenizer", "special_tokens"))]
    if not files:
        raise CheckpointError(f"{path}: no config or weight files to fingerprint")
    return files


def checkpoint_fingerprint(path: Path) -> str:
    """sha256 over the checkpoint's config and weight files (names and contents)."""
    h = hashlib.sha256()
    for f in checkpoint_files(path):
        h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()[:32]


def checkpoint_identity(path: Path) -> str:
    """A cheap identity of the same files (:func:`fastenc.fileio.content_identity`: milliseconds on GBs);
    export.json records it beside the fingerprint so that a load can tell "unchanged" without hashing."""
    return content_identity(checkpoint_files(path))


def changed_source(manifest: dict[str, Any], *, quick: bool = False) -> Path | None:
    """The checkpoint an export was made from when it changed since the export (its fingerprint is not
    the one export.json recorded); None when it is unchanged, gone, or the export has no checkpoint source.

    ``quick``: an unchanged :func:`checkpoint_identity` is trusted, so only a changed one costs a full
    fingerprint (an export that recorded no identity is not hashed at all)."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    recorded = manifest.get("fingerprint")
    if source.get("kind") != "checkpoint" or not isinstance(source.get("path"), str) or not recorded:
        return None
    path = Path(source["path"])
    if not path.exists():
        return None
    if quick and (not source.get("identity") or source["identity"] == checkpoint_identity(path)):
        return None
    return path if checkpoint_fingerprint(path) != recorded else None


def source_changed(path: Path) -> str:
    """The sentence every reader of export.json says for :func:`changed_source`'s answer."""
    return (f"the checkpoint the artifacts came from ({path}) changed since the export (its fingerprint is not the "
            f"one {MANIFEST_NAME} recorded)")


# ---------------------------------------------------------------------------- manifest


def export_files(directory: Path) -> list[str]:
    """Relative names of every file of an export folder that the manifest covers (all regular files but
    the manifest, the digest cache and hidden temporaries), sorted."""
    names = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() == MANIFEST_NAME:
            continue
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symlink inside an export folder; exports hold regular files only")
        if path.is_file():
            names.append(rel.as_posix())
    return names


def write_manifest(directory: Path, *, source: dict[str, Any], fingerprint: str, cfg: EncoderConfig,
                   target: str, profile: Profile, artifacts: list[Path]) -> Path:
    """Write ``export.json`` last: what the export came from and the size + sha256 of every file in it."""
    files = {}
    for name in export_files(directory):
        path = directory / name
        files[name] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    data = {
        "format": MANIFEST_FORMAT,
        "version": EXPORT_VERSION,
        "source": source,
        "fingerprint": fingerprint,
        "config": cfg.to_hf_dict(),
        "target": target,
        "profile": profile.to_dict(),
        "artifacts": sorted(a.relative_to(directory).as_posix() for a in artifacts),
        "files": files,
    }
    return write_json(directory / MANIFEST_NAME, data)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an export folder, its structure and every name in it checked (not the files)."""
    directory = Path(directory)
    if not directory.is_dir():
        from .transaction import recover

        recover(directory)  # an export killed between the two renames of its swap
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such export directory")
    where = directory / MANIFEST_NAME
    data = read_json(where, what="export manifest (run `fastenc export` first)")
    if data.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{where}: not a fastenc export manifest")
    if data.get("version") != EXPORT_VERSION or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{where}: written by another fastenc version (export format "
                              f"{data.get('version')!r}, this one reads {EXPORT_VERSION}); {REEXPORT}")
    for name, entry in data["files"].items():
        safe_member(directory, name, where=where, nested=True)
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or isinstance(entry["size"], bool)
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64):
            raise CheckpointError(f"{where}: malformed entry for {name!r} (needs size and sha256); {REEXPORT}")
    _manifest_artifacts(directory, data)
    return data


def check_export(directory: Path, *, members: Iterable[Path] | None = None, hash_root: bool = True) -> dict[str, Any]:
    """Check an export folder against its manifest; returns the manifest.

    Every listed file must exist with its recorded size. Content (sha256) is checked for every file
    when ``members`` is None, else for the files of those artifacts (with their sidecars) plus, with
    ``hash_root``, the files at the top of the folder (config, tokenizer)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files: dict[str, dict[str, Any]] = manifest["files"]
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_NAME}); {REEXPORT}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes but {entry['size']} were written (truncated or "
                                  f"replaced); {REEXPORT}")
    if members is None:
        wanted = list(files)
    else:
        wanted = [n for n in files if hash_root and "/" not in n]
        for artifact in members:
            rel = Path(artifact).relative_to(directory).as_posix()
            if rel not in manifest["artifacts"]:
                raise CheckpointError(f"{artifact}: not listed in {directory / MANIFEST_NAME}; {REEXPORT}")
            meta = read_sidecar(Path(artifact))
            for path in [*artifact_files(Path(artifact), meta), sidecar_path(Path(artifact))]:
                name = path.relative_to(directory).as_posix()
                if name not in files:
                    raise CheckpointError(f"{path}: not listed in {directory / MANIFEST_NAME}; {REEXPORT}")
                wanted.append(name)
    _check_digests(directory, {n: files[n]["sha256"] for n in dict.fromkeys(wanted)})
    return manifest


def _stat_key(path: Path) -> tuple[str, list[int]]:
    st = path.stat()
    return os.path.realpath(path), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _check_digests(directory: Path, expected: dict[str, str]) -> None:
    """sha256 of each file against ``expected``, trusting a digest remembered for the same stat identity."""
    cache_path = directory / VERIFIED_NAME
    try:
        remembered = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        if not isinstance(remembered, dict):
            remembered = {}
    except (OSError, UnicodeDecodeError, ValueError):
        remembered = {}
    fresh = {}
    for name, want in expected.items():
        path = directory / name
        real, key = _stat_key(path)
        got = _verified.get((real, *key))
        entry = remembered.get(name)
        if got is None and isinstance(entry, list) and len(entry) == 6 and entry[:5] == key:
            got = entry[5]
        if got is None:
            got = file_digest(path)
            real, key = _stat_key(path)  # as it was when read (a concurrent write changes ctime)
        if got != want:
            raise CheckpointError(f"{path}: content differs from the export manifest (sha256 mismatch: tampered, "
                                  f"corrupted or mixed with another export); {REEXPORT}")
        _verified[(real, *key)] = got
        fresh[name] = [*key, got]
    if fresh and any(remembered.get(n) != v for n, v in fresh.items()):
        try:
            merged = {k: v for k, v in remembered.items() if isinstance(k, str) and isinstance(v, list)}
            merged.update(fresh)
            write_json(cache_path, merged)
        except OSError:  # a read-only folder: the in-memory record still saves the next check
            pass


def read_config(directory: Path) -> EncoderConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this a `fastenc export` directory?")
    try:
        return EncoderConfig.from_json_file(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
