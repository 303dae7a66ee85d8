"""Autotuning choices per device kind, kept between processes.

Triton's autotuner keeps its choice per tuning key in one dict per kernel, whatever GPU a launch runs
on: a config tuned on an sm_90 GPU (227 KB of shared memory per block) would be replayed on an sm_86
one (99 KB) in the same process, where it may not fit. Its own on-disk record
(``TRITON_CACHE_AUTOTUNING``) is keyed by architecture, not shared memory, and stops the launch when
the file is damaged. So each :class:`~fastenc.kernels._common.Kernel` runs one triton autotuner per
:class:`DeviceKind` (GPU name, compute capability, shared memory a block may use), and the choices
are kept in one small JSON table per device kind (and triton version) under
``<cache>/gpu-tuning/`` (:func:`tuning_dir`):

* read when a kernel first launches on such a device in a process: its recorded keys launch their
  recorded config without benchmarking (``tuned()`` does not count them);
* rewritten, atomically, when a kernel tunes a key it did not have (a choice whose benchmark failed
  for every config is not kept);
* a table that cannot be read as one (not JSON, truncated, another layout, another device kind) is
  ignored with one warning per process; the kernels tune again and the next choice replaces it.

``fastenc cache clear gpu-tuning`` forgets every choice. The device facts come from
:func:`device_kind` (a module attribute, so tests on a CPU choose them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

log = logging.getLogger("fastenc")

#: Bumped when the table's layout changes (older tables are then not read).
TABLE_VERSION = 1


@dataclass(frozen=True)
class DeviceKind:
    """What a tuning choice is valid for: configs are replayed only on devices of the same kind."""

    name: str
    capability: str  # "9.0"
    smem_per_block: int  # bytes of shared memory one block may use (the opt-in maximum)

    def key(self) -> str:
        """The table's file name (without ``.json``): this kind, the table layout and triton's version."""
        text = json.dumps({"table": TABLE_VERSION, "triton": _triton_version(), **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def label(self) -> str:
        return f"{self.name} (sm_{self.capability.replace('.', '')}, {self.smem_per_block // 1024} KB shared memory " \
               "per block)"


def _triton_version() -> str:
    import triton

    return str(triton.__version__)


def device_kind(index: int) -> DeviceKind:
    """The kind of CUDA GPU ``index`` (torch's device properties; triton's driver for the shared memory
    where torch does not report it)."""
    props = torch.cuda.get_device_properties(index)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    if not smem:
        from triton.runtime import driver

        smem = int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    return DeviceKind(str(props.name), f"{props.major}.{props.minor}", smem)


def tuning_dir() -> Path:
    """``<cache>/gpu-tuning`` (see :func:`fastenc.caches.cache_root`)."""
    from ..caches import cache_root

    return cache_root() / "gpu-tuning"


_LOCK = threading.RLock()
_KINDS: dict[int, DeviceKind] = {}
_TABLES: dict[DeviceKind, dict[str, dict[str, dict]]] = {}  # kind -> kernel id -> key (JSON) -> config record
_WARNED: set[str] = set()


def forget() -> None:
    """Drop this process's device kinds, tables and warnings (the files stay)."""
    with _LOCK:
        _KINDS.clear()
        _TABLES.clear()
        _WARNED.clear()


def kind_of(index: int) -> DeviceKind:
    """:func:`device_kind` of GPU ``index``, read once per process."""
    with _LOCK:
        kind = _KINDS.get(index)
        if kind is None:
            kind = _KINDS[index] = device_kind(index)
        return kind


def config_record(config: Any) -> dict:
    """A triton ``Config`` as JSON: its meta-parameters and launch options."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def kernel_id(name: str, source: str, configs: Sequence[Any], key: Sequence[str]) -> str:
    """A kernel's name in the tables: its function name and a hash of its source, configs and tuning key
    (so a changed kernel or config list tunes afresh)."""
    text = json.dumps([source, [config_record(c) for c in configs], list(key)], sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _plain(key: Iterable) -> bool:
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in key)


class _Damaged(ValueError):
    pass


def _parse(data: object, kind: DeviceKind) -> dict[str, dict[str, dict]]:
    if not isinstance(data, dict):
        raise _Damaged("not a JSON object")
    if data.get("version") != TABLE_VERSION:
        raise _Damaged(f"table version {data.get('version')!r}, this fastenc reads {TABLE_VERSION}")
    if data.get("device") != asdict(kind) or data.get("triton") != _triton_version():
        raise _Damaged("it names another device kind or triton version")
    kernels = data.get("kernels")
    if not isinstance(kernels, dict):
        raise _Damaged("no 'kernels' object")
    for kid, entries in kernels.items():
        if not isinstance(entries, dict):
            raise _Damaged(f"kernel {kid!r}: not an object")
        for key, rec in entries.items():
            try:
                ok = isinstance(json.loads(key), list) and isinstance(rec, dict) and isinstance(rec.get("kwargs"), dict)
            except ValueError:
                ok = False
            if not ok:
                raise _Damaged(f"kernel {kid!r}: a malformed entry {key[:80]!r}")
    return kernels


def _read(kind: DeviceKind) -> dict[str, dict[str, dict]]:
    """The table on disk for ``kind`` (empty when missing, unreadable or damaged; damage warns once)."""
    path = tuning_dir() / f"{kind.key()}.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        reason = f"unreadable: {exc}"
    else:
        try:
            return _parse(json.loads(text), kind)
        except ValueError as exc:  # JSONDecodeError and _Damaged
            reason = str(exc) if isinstance(exc, _Damaged) else f"not JSON: {exc}"
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning("fastenc: ignoring the damaged autotuning table %s (%s); the kernels tune again on %s and "
                    "the table is rewritten", path, reason, kind.label())
    return {}


def _table(kind: DeviceKind) -> dict[str, dict[str, dict]]:
    table = _TABLES.get(kind)
    if table is None:
        table = _TABLES[kind] = _read(kind)
    return table


def choices(kind: DeviceKind, kid: str, configs: Sequence[Any]) -> dict[tuple, Any]:
    """The recorded choices of kernel ``kid`` on ``kind``: tuning key -> the config of ``configs`` chosen
    (entries naming a config not in ``configs`` are left out)."""
    with _LOCK:
        entries = dict(_table(kind).get(kid, {}))
    found = {}
    for key, rec in entries.items():
        match = next((c for c in configs if config_record(c) == rec), None)
        if match is not None:
            found[tuple(json.loads(key))] = match
    return found


def record(kind: DeviceKind, kid: str, chosen: Mapping[tuple, Any]) -> int:
    """Add ``chosen`` (tuning key -> config) for kernel ``kid`` to ``kind``'s table and rewrite its file
    (merged with what other processes wrote since); returns how many choices were kept."""
    from ..fileio import atomic_write

    new = {json.dumps(list(k)): config_record(c) for k, c in chosen.items() if _plain(k)}
    if not new:
        return 0
    with _LOCK:
        table = _table(kind)
        on_disk = _read(kind)
        for name, entries in on_disk.items():  # what other processes recorded meanwhile
            table.setdefault(name, {}).update({k: v for k, v in entries.items() if k not in table.get(name, {})})
        table.setdefault(kid, {}).update(new)
        data = {"version": TABLE_VERSION, "device": asdict(kind), "triton": _triton_version(),
                "kernels": {name: dict(sorted(entries.items())) for name, entries in sorted(table.items())}}
        path = tuning_dir() / f"{kind.key()}.json"
        try:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))
        except OSError as exc:  # a read-only cache folder costs a tuning per process, nothing else
            log.debug("fastenc: could not record autotuning choices in %s: %s", path, exc)
    return len(new)
