"""Writing analysis artifacts: JSON, matplotlib figures and images, each atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastenc.fileio import atomic_write


def write_json(path: Path, data: dict) -> Path:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def save_figure(fig, path: Path, dpi: int | None = None) -> Path:
    return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=dpi))


def write_png(path: Path, image: np.ndarray) -> Path:
    """image [H, W, 3] uint8."""
    from PIL import Image

    img = Image.fromarray(image)
    return atomic_write(Path(path), lambda p: img.save(p, format="PNG"))


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    def writer(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)

    return atomic_write(Path(path), writer)


def to_uint8(images) -> np.ndarray:
    """Pipeline output (``output_type="np"``: [B, H, W, 3] floats in [0, 1]) -> [B, H, W, 3] uint8."""
    arr = np.asarray(images, dtype=np.float32)
    return (arr.clip(0, 1) * 255).round().astype(np.uint8)
