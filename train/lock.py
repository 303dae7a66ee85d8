"""One trainer per output folder: ``<output_dir>/.train.lock`` names the process that trains there.

The lock is an ``flock`` on that file, held for as long as the trainer lives, and the file holds the
holder's pid (and host) for the message a second trainer gets. The kernel drops the lock when its
process dies however it dies, so a lock left by a killed trainer is simply taken over (and said so).
Where the filesystem has no ``flock``, the pid alone decides: a live pid refuses, a dead one is
taken over. Within one process the lock is shared (nested use of the Python API).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

from fastenc.errors import ConfigError

log = logging.getLogger("fastenc.train")

LOCK_NAME = ".train.lock"
_HELD: dict[str, list] = {}  # real path of a lock file -> [fd, users, folder made by us] (this process's locks)


def _read_owner(fd: int) -> tuple[int | None, str]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        lines = os.read(fd, 4096).decode("utf-8", "replace").split("\n")
    except OSError:
        return None, ""
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
    host = lines[1].strip() if len(lines) > 1 else ""
    return pid, host


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's live process
        return True
    except OSError:
        return False
    return True


def _owner_text(pid: int | None, host: str) -> str:
    if pid is None:
        return "pid unknown"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


class RunLock:
    """``RunLock(folder).acquire()`` ... ``release()``; ConfigError (one line) when a live trainer holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._key: str | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> "RunLock":
        if self._key is not None:
            return self
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            try:
                _HELD[key] = [self._take(), 1, created]
            except BaseException:
                if created:
                    _rmdir_if_empty(self.folder)
                raise
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        fd = entry[0]
        try:  # remove the file only while it is still ours (a taker re-checks the inode it locked)
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)
        if entry[2]:  # made for this run and left empty (a run refused before it wrote anything)
            _rmdir_if_empty(self.folder)

    def _refuse(self, pid: int | None, host: str) -> ConfigError:
        return ConfigError(f"{self.folder}: in use by another trainer ({_owner_text(pid, host)}; lock file "
                           f"{self.path}); wait for it to finish, stop it, or choose another run.output_dir")

    def _take(self) -> int:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                use_pid = fcntl is None
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise self._refuse(*_read_owner(fd)) from None
                    except OSError as exc:
                        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                            raise
                        use_pid = True  # no flock here: the pid alone decides
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # its holder removed it as we opened it: lock the new one
                    os.close(fd)
                    continue
                pid, host = _read_owner(fd)
                if use_pid and pid is not None and pid != os.getpid() and (host and host != socket.gethostname()
                                                                           or _alive(pid)):
                    raise self._refuse(pid, host)
                if pid is not None and pid != os.getpid():
                    log.warning("%s: lock left by %s, which is no longer running; taken over", self.path,
                                _owner_text(pid, host))
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"{os.getpid()}\n{socket.gethostname()}\n".encode())
                return fd
            except BaseException:
                os.close(fd)
                raise
        raise ConfigError(f"{self.path}: cannot take the trainer lock (the file keeps being replaced)")
