"""Which torch build a pip resolution would install, read from pip's dry-run report.

    pip install --dry-run --quiet --report - -c constraints-cpu.txt torch==2.13.0 | python scripts/torch_build.py

prints one word: ``cuda`` (the resolution pulls the CUDA build: a torch whose local version names CUDA, or
NVIDIA / CUDA runtime packages such as ``nvidia-cublas`` or ``cuda-toolkit``), ``cpu`` (a torch without
them), or ``unknown`` (no report, not a report, or no torch in it: pip failed, e.g. offline). It always
exits 0; ``scripts/bootstrap.sh`` installs the CPU build from PyTorch's CPU index on ``cuda``.
Standard library only (it runs before anything is installed).
"""

from __future__ import annotations

import json
import re
import sys

#: Distribution names of the CUDA runtime pip pulls in with PyPI's Linux torch (normalised, PEP 503).
CUDA_PACKAGE = re.compile(r"^(nvidia-.+|cuda-(toolkit|bindings|runtime|python).*)$")


def _name(entry: dict) -> str:
    meta = entry.get("metadata") if isinstance(entry, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return re.sub(r"[-_.]+", "-", name).lower() if isinstance(name, str) else ""


def decide(report: object) -> str:
    """``cuda``, ``cpu`` or ``unknown`` for a parsed pip installation report (format version 1)."""
    install = report.get("install") if isinstance(report, dict) else None
    if not isinstance(install, list):
        return "unknown"
    torch = [e for e in install if _name(e) == "torch"]
    if not torch:
        return "unknown"
    version = str(torch[0]["metadata"].get("version", ""))
    local = version.partition("+")[2].lower()
    if local.startswith("cu") or any(CUDA_PACKAGE.match(_name(e)) for e in install):
        return "cuda"
    return "cpu"


def decide_text(text: str) -> str:
    """:func:`decide` for the report's JSON text (empty or not JSON: ``unknown``)."""
    try:
        return decide(json.loads(text))
    except (ValueError, RecursionError):
        return "unknown"


if __name__ == "__main__":
    sys.stdout.write(decide_text(sys.stdin.read()) + "\n")
