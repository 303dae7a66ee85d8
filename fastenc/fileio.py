"""File utilities shared by the runtime, the exporters, the cache and the trainer."""

from __future__ import annotations

import hashlib
import os
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
