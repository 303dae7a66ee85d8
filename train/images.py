"""Teacher-vs-student PNG grids: the same prompts, seed and guidance, sampled through the frozen DiT.

Row 1 is sampled with the teacher's embeddings, row 2 with the student's. With a VAE configured
(``dit.vae_subfolder``) latents are decoded to pixels; without one the first three latent channels
are shown (normalised per image) — enough to see whether the two rows agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastenc.fileio import atomic_write

from .dit import Cond, FrozenDiT


@torch.no_grad()
def sample(dit: FrozenDiT, cond: Cond, *, resolution: int, seed: int, guidance: float) -> tuple[object, torch.Tensor]:
    """Run the full schedule with ``cond``; returns (trajectory, final latents)."""
    batch = cond.embeds.shape[0]
    traj = dit.start(batch, resolution, torch.Generator().manual_seed(seed))
    traj.guidance = torch.full_like(traj.guidance, guidance)
    latents = traj.latents
    for t in traj.timesteps:
        pred = dit.predict(traj, latents, t, cond).float()
        latents = dit.step(traj, pred, t, latents)
    return traj, latents


@torch.no_grad()
def to_uint8(dit: FrozenDiT, traj, latents: torch.Tensor, vae=None, preview_size: int = 128) -> np.ndarray:
    """[B, H, W, 3] uint8 images (decoded, or a latent preview without a VAE)."""
    if vae is not None:
        img = dit.decode(traj, latents, vae).float().clamp(-1, 1)  # [B, 3, H, W]
        img = (img + 1) / 2
    else:
        lat = dit.spatial_latents(traj, latents).float()  # [B, C, h, w]
        lat = lat[:, :3] if lat.shape[1] >= 3 else lat[:, :1].expand(-1, 3, -1, -1)
        lo = lat.amin(dim=(1, 2, 3), keepdim=True)
        hi = lat.amax(dim=(1, 2, 3), keepdim=True)
        img = (lat - lo) / (hi - lo).clamp(min=1e-6)
        scale = max(1, preview_size // img.shape[-1])
        img = torch.nn.functional.interpolate(img, scale_factor=scale, mode="nearest")
    return (img.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def tile(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of equally sized images ([B, H, W, 3] uint8 each) on one white canvas [H', W', 3]."""
    n_rows, n_cols = len(rows), rows[0].shape[0]
    h, w = rows[0].shape[1:3]
    canvas = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = row[c]
    return canvas


def write_grid(path: Path, rows: list[np.ndarray], pad: int = 2) -> Path:
    """Tile rows of equally sized images ([B, H, W, 3] each) into one PNG, written atomically."""
    from PIL import Image

    image = Image.fromarray(tile(rows, pad))
    return atomic_write(Path(path), lambda p: image.save(p, format="PNG"))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line ends in an ellipsis when text is left over."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        if draw.textlength(line, font=font) > width:  # one over-long word: the rest goes to the next line
            cut = len(line) - 1
            while cut > 1 and draw.textlength(line[:cut], font=font) > width:
                cut -= 1
            words.insert(0, line[cut:])
            line = line[:cut]
        while words and draw.textlength(line + " " + words[0], font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words and lines:
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def labelled_grid(rows: list[np.ndarray], *, row_labels: list[str] | None = None,
                  col_labels: list[str] | None = None, pad: int = 2) -> np.ndarray:
    """:func:`tile` with column headers above and (wrapped) row labels to the left: [H', W', 3] uint8."""
    from PIL import Image, ImageDraw

    grid = tile(rows, pad)
    h, w = rows[0].shape[1:3]
    size = max(10, min(32, h // 16))
    font = _font(size)
    line_h = size + size // 3
    top = (line_h + 2 * pad) if col_labels else 0
    left = max(w, 8 * size) if row_labels else 0
    canvas = Image.new("RGB", (left + grid.shape[1], top + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(col_labels or []):
        x = left + pad + c * (w + pad)
        text = _wrap(draw, str(label), font, w, 1)
        draw.text((x, pad), text[0] if text else "", fill="black", font=font)
    for r, label in enumerate(row_labels or []):
        y = top + pad + r * (h + pad)
        for i, line in enumerate(_wrap(draw, str(label), font, left - 2 * pad, max(1, h // line_h))):
            draw.text((pad, y + i * line_h), line, fill="black", font=font)
    return np.asarray(canvas)


def write_labelled_grid(path: Path, rows: list[np.ndarray], *, row_labels: list[str] | None = None,
                        col_labels: list[str] | None = None, pad: int = 2) -> Path:
    """:func:`labelled_grid` written atomically as a PNG."""
    from PIL import Image

    image = Image.fromarray(labelled_grid(rows, row_labels=row_labels, col_labels=col_labels, pad=pad))
    return atomic_write(Path(path), lambda p: image.save(p, format="PNG"))
