"""Side-by-side generation (paper Figs. 11-14): prompts x encoders, same seed and guidance.

Writes ``grid.png`` (one row per prompt, one column per encoder, labelled), every image as
``images/<encoder>/<NNN>-<prompt>.png`` and ``generate.json`` (settings, prompts, files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fastenc.errors import ConfigError

from ..images import write_labelled_grid
from .encoders import slug
from .pipelines import EncoderSwitch, GenerationSettings, generate
from .report import write_json, write_png

log = logging.getLogger("fastenc.train")


def run(switch: EncoderSwitch, prompts: list[str], out: Path, settings: GenerationSettings) -> dict:
    if not prompts:
        raise ConfigError("generate: no prompts (give --prompt or --prompts FILE)")
    labels = switch.labels
    images: dict[str, list[np.ndarray]] = {}
    files: dict[str, list[str]] = {}
    try:
        for label in labels:
            pipe = switch.use(label)
            images[label], files[label] = [], []
            for i, prompt in enumerate(prompts):
                img = generate(pipe, prompt, settings)  # [H, W, 3] uint8
                rel = Path("images") / slug(label) / f"{i:03d}-{slug(prompt)}.png"
                write_png(out / rel, img)
                images[label].append(img)
                files[label].append(rel.as_posix())
            log.info("generate: %s: %d image(s)", label, len(prompts))
    finally:
        switch.restore()
    rows = [np.stack([images[label][i] for label in labels]) for i in range(len(prompts))]  # [E, H, W, 3] each
    grid = write_labelled_grid(out / "grid.png", rows, row_labels=prompts, col_labels=labels)
    result = {"analysis": "generate", "pipeline": type(switch.pipe).__name__, "encoders": labels, "prompts": prompts,
              "settings": settings.to_dict(), "files": {"grid": grid.name, "images": files}}
    write_json(out / "generate.json", result)
    return result
