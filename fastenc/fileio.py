"""File utilities shared by the runtime, the exporters, the cache and the trainer."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(target: Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` on a temporary name beside ``target``, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        os.chmod(tmp, umask_mode())  # mkstemp makes 0600; artifacts are read by other accounts too
        writer(Path(tmp))
        os.chmod(tmp, umask_mode())  # again: some writers (safetensors' save_file) recreate the file 0600
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def plain_file_name(name: object, suffix: str = "") -> bool:
    """Whether ``name`` (read from an index file) is a bare file name ending in ``suffix``: no folder part,
    not ``.`` or ``..``, not absolute, no NUL: a file inside the index's own folder, never elsewhere."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and not os.path.isabs(name) and name.endswith(suffix))


def check_parent(flag: str, path: str | os.PathLike) -> None:
    """``path`` (a file or folder fastenc is told to write) must be in a folder that exists: a typo is not a
    request for new folders, so missing parents are never created (one ConfigError naming ``flag``)."""
    parent = Path(path).expanduser().absolute().parent
    if not os.path.lexists(parent):
        from .errors import ConfigError

        raise ConfigError(f"{flag} {path}: the folder {Path(path).expanduser().parent} does not exist (create it "
                          "first)")


def check_utf8_path(path: str | bytes | os.PathLike, error: type[Exception] | None = None) -> None:
    """Refuse a path whose name is not valid UTF-8 (a folder made from bytes in another encoding): safetensors
    and tokenizers take only UTF-8 paths, and would call the file unreadable or invalid. The one ``error``
    (ConfigError by default) shows the path with its bytes escaped, as in ``/data/caf\\xe9``."""
    text = os.fsdecode(os.fspath(path))
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(text)  # the bytes on disk (Python keeps undecodable bytes as surrogates)
    except UnicodeEncodeError:  # lone surrogates that no file system gave: a str built in Python
        shown, why = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace"), "a lone surrogate"
    else:
        shown = raw.decode("utf-8", "backslashreplace")
        try:
            raw.decode("utf-8")
            why = "a lone surrogate"
        except UnicodeDecodeError as exc:
            why = f"byte 0x{raw[exc.start]:02x} at position {exc.start}"
    if error is None:
        from .errors import ConfigError as error
    raise error(f"{shown}: the path is not valid UTF-8 ({why}); fastenc reads checkpoints and tokenizers "
                "through UTF-8 paths only: rename it, or link to it from a UTF-8 name")


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied (what ``open()`` would create)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def content_identity(files: list[Path], sample: int = 1 << 20) -> str:
    """A cheap identity of files' content: name, size, mtime and the first and last ``sample`` bytes of each.

    Reads at most ``2 * sample`` bytes per file (so it costs milliseconds on multi-GB weights); a file
    rewritten in place gets a new mtime, and a different header or tail changes the digest.
    """
    h = hashlib.sha256()
    for file in files:
        file = Path(file)
        st = file.stat()
        h.update(f"{file.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
        with open(file, "rb") as f:
            h.update(f.read(sample))
            if st.st_size > sample:
                f.seek(max(sample, st.st_size - sample))
                h.update(f.read(sample))
    return h.hexdigest()[:32]


def looks_local(text: str) -> bool:
    """Whether ``text`` names a path on this machine rather than a Hugging Face hub id: it starts with
    ``./``, ``../``, ``/`` or ``~`` (or is ``.``, ``..``, ``~``), is a symbolic link (one that leads
    nowhere, or in a loop, included), or its first folder exists here (``models/t5`` beside ``models/``)."""
    text = os.fspath(text)
    if text in (".", "..", "~") or text.startswith(("./", "../", "/", "~")) or os.path.islink(text):
        return True
    head = text.split("/", 1)[0]
    return "/" in text and bool(head) and os.path.lexists(head)


def missing_path_message(text: str) -> str:
    """One line on why the local path ``text`` is not there: missing, a link to nothing, a link loop."""
    text = os.fspath(text)
    if os.path.islink(text):
        try:
            os.stat(text)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{text}: a symbolic link loop ({os.strerror(errno.ELOOP).lower()})"
            return f"{text}: a symbolic link to {os.readlink(text)}, which does not exist"
    return f"{text}: no such file or directory"


def not_a_file(path: str | os.PathLike) -> str | None:
    """None when ``path`` is missing or a regular file (through links); else what it is instead, as in
    "a FIFO" or "a symbolic link to /dev/zero (a character device)", for a one-line refusal."""
    path = os.fspath(path)
    try:
        lst = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISREG(lst.st_mode):
        return None
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "a symbolic link loop"
            return f"a symbolic link to a missing {os.readlink(path)}"
        if stat.S_ISREG(st.st_mode):
            return None
        return f"a symbolic link to {os.path.realpath(path)} ({_kind(st.st_mode)})"
    return _kind(lst.st_mode)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"
