"""Teacher-vs-student PNG grids: the same prompts, seed and guidance, sampled through the frozen DiT.

Row 1 is sampled with the teacher's embeddings, row 2 with the student's. With a VAE configured
(``dit.vae_subfolder``) latents are decoded to pixels; without one the first three latent channels
are shown (normalised per image) — enough to see whether the two rows agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastenc.weights import atomic_write

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


def write_grid(path: Path, rows: list[np.ndarray], pad: int = 2) -> Path:
    """Tile rows of equally sized images ([B, H, W, 3] each) into one PNG, written atomically."""
    from PIL import Image

    n_rows, n_cols = len(rows), rows[0].shape[0]
    h, w = rows[0].shape[1:3]
    canvas = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = row[c]
    image = Image.fromarray(canvas)
    return atomic_write(Path(path), lambda p: image.save(p, format="PNG"))
