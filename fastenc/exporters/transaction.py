"""An export folder is one transaction: after a kill at any moment it holds the previous complete
export or the new complete one, never a mix.

``fastenc export ... --out DIR`` runs like this (:class:`Transaction`):

1. Under a lock on DIR's parent: finish an interrupted swap (:func:`recover`) and remove what killed
   runs left beside DIR (``.DIR.{staging,new,old}-<pid>-<token>`` folders whose process is gone).
2. Build the whole new export in the sibling folder ``.DIR.staging-<pid>-<token>`` (same filesystem,
   so renames are atomic). Artifacts whose inputs did not change are hard-linked from DIR after their
   content was checked against DIR's manifest. The manifest is written last; then every folder and
   file gets the mode the user's umask gives (``mkdtemp``-style 0700 folders would not).
3. Swap, under the lock. Where the kernel offers an atomic exchange of two names (Linux
   ``renameat2(RENAME_EXCHANGE)``), staging and DIR trade places in one step; the staging name then
   holds the previous export, which is removed. Elsewhere: staging is renamed to
   ``.DIR.new-<pid>-<token>`` (complete and ready), DIR to ``.DIR.old-<pid>-<token>``, the new folder to
   DIR, and the old one is removed. A run killed between those two renames leaves no DIR for a moment:
   the next export, or any reader (:func:`~.artifacts.read_manifest`), renames the ready folder into
   place (roll forward) or, without one, the old folder back.

A leftover is removed only when its name is one of ours for this DIR and the process id in it is
not a live process on this machine (a folder of a running export is never touched). Process ids are
local: two machines exporting to one shared folder at once are not supported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError
from ..fileio import check_parent

log = logging.getLogger("fastenc")

STAGING_TAG, READY_TAG, OLD_TAG = "staging", "new", "old"
#: Fault injection for the kill tests: ``FASTENC_TEST_KILL_AT=<point>`` SIGKILLs the process there.
KILL_ENV = "FASTENC_TEST_KILL_AT"
#: Use the atomic exchange where available (tests turn it off to exercise the two-rename swap).
USE_EXCHANGE = True

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fault_point(name: str) -> None:
    """Die here (SIGKILL, no cleanup) when the kill tests ask for it."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def umask() -> int:
    """The process umask, read without changing it where /proc tells it (no window for other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fix_modes(root: Path) -> None:
    """Give ``root`` and everything below it the modes a plain ``mkdir``/``open`` would under the umask
    (folders 0777 & ~umask, files 0666 & ~umask, executable bits kept where set)."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o7777
        want = (0o777 & ~mask) if path.is_dir() else ((0o666 | (mode & 0o111)) & ~mask)
        if mode != want:
            os.chmod(path, want)


def _pattern(stem: str, tags: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(stem)}({'|'.join(tags)})-(\d+)-[0-9a-f]{{8}}$")


def _name(stem: str, tag: str, pid: int | None = None) -> str:
    return f".{stem}{tag}-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # another user's process, or a pid we cannot ask about: leave its files alone
    return True


def make_private_dir(parent: Path, tag: str, stem: str = "") -> Path:
    """A new folder ``parent/.{stem}{tag}-<pid>-<token>`` with the umask's mode."""
    while True:
        path = parent / _name(stem, tag)
        try:
            os.mkdir(path, 0o777)  # the umask applies, unlike mkdtemp's 0700
            return path
        except FileExistsError:
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(parent: Path, *tags: str, stem: str = "") -> list[Path]:
    """Remove ``parent/.{stem}{tag}-<pid>-<token>`` entries whose process is gone; returns what went."""
    pattern = _pattern(stem, tags or (STAGING_TAG,))
    gone = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return gone
    for path in entries:
        m = pattern.match(path.name)
        if m and not pid_alive(int(m.group(2))):
            _remove(path)
            gone.append(path)
    if gone:
        log.info("removed %d leftover(s) of killed runs: %s", len(gone), ", ".join(p.name for p in gone))
    return gone


@contextlib.contextmanager
def _locked(parent: Path) -> Iterator[None]:
    """An exclusive lock on the folder ``parent`` (flock on the folder itself: nothing left behind)."""
    try:
        import fcntl
    except ImportError:  # no flock here: a single exporter per folder is assumed
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (both must exist); False where the system cannot."""
    if not USE_EXCHANGE:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def recover(directory: Path) -> None:
    """Finish or undo a swap that a killed run left half done, then remove its leftovers."""
    directory = Path(os.path.abspath(directory))
    parent = directory.parent
    if not parent.is_dir():
        return
    with _locked(parent):
        _recover_locked(directory)


def _recover_locked(directory: Path) -> None:
    parent, stem = directory.parent, directory.name + "."
    if not os.path.lexists(directory):
        for tag in (READY_TAG, OLD_TAG):  # roll forward to a complete new export, else back to the old one
            pattern = _pattern(stem, (tag,))
            found = sorted(p for p in parent.iterdir() if (m := pattern.match(p.name)) and not pid_alive(int(m.group(2))))
            if found:
                os.rename(found[-1], directory)
                log.warning("%s: finished the swap of an interrupted export (%s)", directory, found[-1].name)
                break
    remove_stale(parent, STAGING_TAG, READY_TAG, OLD_TAG, stem=stem)


def check_target(out: Path, allowed: frozenset[str], *, maker: str = "an export",
                 why: str = "an export replaces its whole folder", example: str = "exported",
                 ignore: re.Pattern[str] | None = None) -> None:
    """``--out`` may be new, empty, or a folder holding only what an export writes: the swap replaces
    the whole folder, so anything else in it would be lost. ``fastenc demo`` holds its ``--out`` to the
    same rule (``maker``, ``why`` and ``example`` word the refusal; names matching ``ignore`` are its own
    leftovers)."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    check_parent("--out", out)
    resolved = out.resolve()
    if resolved.parent == resolved:
        raise ConfigError(f"--out {out}: the root folder cannot be {maker} folder")
    cwd = Path.cwd().resolve()
    if cwd == resolved or cwd.is_relative_to(resolved):
        raise ConfigError(f"--out {out}: is the current folder or one above it; {why}, so choose a folder of its "
                          f"own (e.g. --out {example})")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in allowed and not p.name.startswith(".staging-") and not p.name.endswith(".tmp")
                     and not (ignore is not None and ignore.fullmatch(p.name)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ConfigError(f"--out {out}: holds files {maker} does not write ({shown}); {why}, so choose a new or "
                          f"empty folder")


class Transaction:
    """Build a new export beside ``out`` and swap it in: ``with Transaction(out) as t: ...; t.commit()``.

    Leaving the block without :meth:`commit` (an error) removes the staging folder and leaves ``out``
    as it was."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        self.parent = self.out.parent
        self.stem = self.out.name + "."
        self.staging: Path | None = None
        self.committed = False

    def __enter__(self) -> "Transaction":
        self.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.parent):
            _recover_locked(self.out)
            self.staging = make_private_dir(self.parent, STAGING_TAG, self.stem)
        return self

    @property
    def previous(self) -> Path | None:
        """The export being replaced (its artifacts may be reused), if any."""
        return self.out if self.out.is_dir() else None

    def commit(self) -> None:
        """Swap the finished staging folder in (its manifest already written), then drop the old export."""
        assert self.staging is not None and not self.committed
        fix_modes(self.staging)
        fault_point("before-swap")
        old: Path | None = None
        with _locked(self.parent):
            if not self.out.is_dir():
                os.rename(self.staging, self.out)
            elif exchange(self.staging, self.out):
                old = self.staging
                fault_point("after-swap")
            else:
                ready = self.parent / _name(self.stem, READY_TAG)
                os.rename(self.staging, ready)
                old = self.parent / _name(self.stem, OLD_TAG)
                os.rename(self.out, old)
                fault_point("between-renames")
                os.rename(ready, self.out)
                fault_point("after-swap")
            self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if not self.committed and self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
