"""Fréchet Inception Distance between generated images and a reference set (supplement Table 7).

``FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` over the 2048-dim pool features of
pytorch-fid's Inception-v3 (:mod:`.inception`; same network, weights, resizing and statistics as
``python -m pytorch_fid``: features in float32, mean and ``np.cov`` (N - 1) in float64).

The trace of the matrix square root is taken from the eigenvalues of the symmetric positive
semi-definite product ``S_1^{1/2} S_2 S_1^{1/2}``, which has the eigenvalues of ``S_1 S_2``
(:func:`trace_sqrt_product`): where ``scipy.linalg.sqrtm(S_1 @ S_2)`` converges it is the same number,
and where the covariances are near-singular (fewer images than 2048 dimensions, duplicated images) it
stays real and finite without pytorch-fid's ``eps * I`` offset. A set of N <= 2048 images takes the
same eigenvalues from an [N, N] matrix (its centred features B with ``S = BᵀB``), which is faster and
adds no rounding from the 2048 - N empty dimensions.

Reference statistics (a folder's) are cached under ``$FASTENC_CACHE_DIR/fid-stats/`` (``--cache-dir``),
keyed by the folder's file list with sizes and modification times and by the extractor (its weights'
sha256 and the resizing), so a 40k-image reference set is read once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastenc.errors import ConfigError

from .encoders import slug
from .report import write_json, write_npz

log = logging.getLogger("fastenc.train")

#: pytorch-fid's image extensions (it reads a folder's files with these, not recursing).
IMAGE_EXTENSIONS = frozenset({".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})
DEFINITION = "||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))"


# ------------------------------------------------------------------------------ the metric


def _psd_eigenvalues_floor(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those within rounding of zero (below
    ``D * eps * max``, negative ones included) set to zero: their square roots would be noise."""
    tol = w.size * np.finfo(np.float64).eps * float(np.abs(w).max(initial=0.0))
    return np.where(w > tol, w, 0.0)


def sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """``S^{1/2}`` of a symmetric PSD matrix (eigh; eigenvalues within rounding of zero taken as zero)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(_psd_eigenvalues_floor(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, *, root1: np.ndarray | None = None,
                       centred2: np.ndarray | None = None) -> float:
    """``Tr((S_1 S_2)^{1/2})`` for symmetric positive semi-definite S_1, S_2 ([D, D]).

    ``S_1 S_2`` and ``R S_2 R`` (``R = S_1^{1/2}``, or ``root1`` when given) have the same eigenvalues, and
    ``R S_2 R`` is symmetric PSD, so its ``eigvalsh`` are real. With ``centred2`` = B ([N, D], N <= D: the
    centred features over sqrt(N - 1), so S_2 = BᵀB) the non-zero eigenvalues are those of the small
    ``B S_1 Bᵀ`` ([N, N]) instead. Eigenvalues within rounding of zero count as zero, so a rank-deficient
    covariance (fewer images than dimensions) adds no ``sqrt(rounding noise)`` per missing dimension.
    """
    if centred2 is not None:
        m = centred2 @ sigma1 @ centred2.T  # [N, N]
    else:
        root = sqrt_psd(sigma1) if root1 is None else root1
        m = root @ sigma2 @ root  # [D, D]
    ev = _psd_eigenvalues_floor(np.linalg.eigvalsh((m + m.T) / 2))
    return float(np.sqrt(ev).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     root1: np.ndarray | None = None, centred2: np.ndarray | None = None) -> float:
    """FID of two Gaussians (float64). ``root1`` (``sqrt_psd(sigma1)``, shared by every set compared with one
    reference) and ``centred2`` (see :func:`trace_sqrt_product`) only save time. Rounding can only push an
    exact 0 to ±1e-12, so it is floored at 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ConfigError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
                          f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    tr = trace_sqrt_product(sigma1, sigma2, root1=root1, centred2=centred2)
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr), 0.0)


class RunningStats:
    """Mean and covariance (N - 1) of feature batches, merged as they come (Chan et al.), float64. While
    N <= D the features are kept too (no more memory than the covariance) for :meth:`centred`."""

    def __init__(self, dims: int):
        self.n = 0
        self.mu = np.zeros(dims)
        self.m2 = np.zeros((dims, dims))
        self.rows: list[np.ndarray] | None = []

    def add(self, x: np.ndarray) -> None:  # x: [B, D]
        x = np.asarray(x, np.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        c = x - mb
        delta = mb - self.mu
        total = self.n + nb
        self.m2 += c.T @ c + np.outer(delta, delta) * (self.n * nb / total)
        self.mu = self.mu + delta * (nb / total)
        self.n = total
        if self.rows is not None:
            self.rows = self.rows + [x] if total <= self.mu.size else None

    def result(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ConfigError(f"{what}: {self.n} image(s); FID needs at least 2 (a covariance)")
        return self.mu.copy(), self.m2 / (self.n - 1)

    def centred(self) -> np.ndarray | None:
        """B = (X - mu) / sqrt(N - 1) ([N, D], so the covariance is BᵀB) while N <= D, else None."""
        if self.rows is None or self.n < 2:
            return None
        return (np.concatenate(self.rows) - self.mu) / np.sqrt(self.n - 1)


# ------------------------------------------------------------------------------ image sets


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, by pytorch-fid's extensions), in name order."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ConfigError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it or its subfolders")
    return files


def _generate_sets(folder: Path, label: str | None) -> dict[str, list[Path]] | None:
    manifest = folder / "generate.json"
    if not manifest.is_file():
        return None
    try:
        images = json.loads(manifest.read_text(encoding="utf-8"))["files"]["images"]
        sets = {str(k): [folder / str(f) for f in v] for k, v in images.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{manifest}: not a generate.json ({exc})") from None
    if not any(sets.values()):
        raise ConfigError(f"{manifest}: lists no images")
    for files in sets.values():
        for f in files:
            if not f.is_file():
                raise ConfigError(f"{manifest} lists {f.relative_to(folder)}, which is missing")
    if label:
        return {label: sets[next(iter(sets))]} if len(sets) == 1 else {f"{label}/{k}": v for k, v in sets.items()}
    return sets


def image_sets(specs: list[str]) -> dict[str, list[Path]]:
    """``{label: files}`` from ``[LABEL=]DIR`` specs; a ``generate`` output gives one set per encoder."""
    sets: dict[str, list[Path]] = {}
    for spec in specs:
        label, text = (spec.split("=", 1) if "=" in spec and not Path(spec).exists() else (None, spec))
        folder = Path(text)
        if not folder.is_dir():
            raise ConfigError(f"--images {text}: not a directory")
        found = _generate_sets(folder, label) or {label or folder.resolve().name: list_images(folder)}
        for name, files in found.items():
            if name in sets:
                raise ConfigError(f"--images {spec}: the label {name!r} is given twice (name them LABEL=DIR)")
            sets[name] = files
    return sets


def _load(path: Path) -> torch.Tensor:
    """[3, 299, 299] float in [0, 1]: RGB, resized as the FID network does itself (bilinear, no antialias)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable image ({exc})") from None
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W]
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)[0]


def feature_stats(files: list[Path], extractor, *, what: str, batch_size: int = 50,
                  workers: int = 4) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(mu [D], sigma [D, D], N, centred features [N, D] while N <= D else None) of ``extractor``'s features."""
    stats = RunningStats(extractor.dims)
    next_log = len(files) // 10
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes outside the GIL
        for start in range(0, len(files), batch_size):
            batch = torch.stack(list(pool.map(_load, files[start:start + batch_size])))  # [B, 3, 299, 299]
            feats = np.asarray(extractor(batch), np.float64)
            if feats.shape != (batch.shape[0], extractor.dims) or not np.isfinite(feats).all():
                raise ConfigError(f"{what}: the feature extractor gave {feats.shape} (finite: "
                                  f"{bool(np.isfinite(feats).all())}), expected ({batch.shape[0]}, {extractor.dims})")
            stats.add(feats)
            if stats.n >= next_log and stats.n < len(files):
                log.info("fid: %s: %d / %d images", what, stats.n, len(files))
                next_log = stats.n + len(files) // 10
    mu, sigma = stats.result(what)
    return mu, sigma, stats.n, stats.centred()


# ------------------------------------------------------------------------------ reference statistics


def read_stats(path: Path, dims: int, extractor_name: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """A ``.npz`` with ``mu`` [D] and ``sigma`` [D, D] (pytorch-fid's ``--save-stats`` format, or ours)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
            n = int(z["n"]) if "n" in z.files else None
            made_by = str(z["extractor"]) if "extractor" in z.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--ref {path}: not FID statistics (an .npz with mu and sigma): {exc}") from None
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        raise ConfigError(f"--ref {path}: mu {mu.shape} and sigma {sigma.shape}; this extractor gives {dims} "
                          f"dimensions: expected ({dims},) and ({dims}, {dims})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"--ref {path}: mu or sigma holds NaN or inf")
    if made_by is not None and made_by != extractor_name:
        raise ConfigError(f"--ref {path}: statistics of the extractor {made_by!r}, not this run's {extractor_name!r}")
    return mu, sigma, n


def stats_key(files: list[Path], root: Path, extractor_name: str, resize: str) -> str:
    """Digest of the folder's file list (relative names, sizes, mtimes) and the extractor."""
    h = hashlib.sha256(json.dumps({"extractor": extractor_name, "resize": resize}).encode())
    for f in files:
        st = f.stat()
        row = f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
        h.update(row.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def write_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, n: int, extractor_name: str) -> Path:
    return write_npz(path, mu=mu, sigma=sigma, n=np.asarray(n), extractor=np.asarray(extractor_name))


def reference_stats(ref: Path, extractor, *, cache_dir: Path | None, batch_size: int, workers: int) -> tuple:
    """(mu, sigma, info) of ``--ref``: an .npz as it is, a folder from the cache or read once."""
    if ref.is_file():
        mu, sigma, n = read_stats(ref, extractor.dims, extractor.name)
        return mu, sigma, {"path": str(ref), "kind": "statistics", "images": n}
    if not ref.is_dir():
        raise ConfigError(f"--ref {ref}: neither an image folder nor an .npz of statistics")
    files = list_images(ref)
    key = stats_key(files, ref, extractor.name, extractor.resize)
    cached = cache_dir / f"{key}.npz" if cache_dir is not None else None
    info = {"path": str(ref), "kind": "images", "images": len(files), "cache_file": str(cached) if cached else None}
    if cached is not None and cached.is_file():
        try:
            mu, sigma, _ = read_stats(cached, extractor.dims, extractor.name)
            log.info("fid: reference statistics of %s from the cache (%s)", ref, cached)
            return mu, sigma, {**info, "cached": True}
        except ConfigError as exc:  # a damaged cache entry is computed again and replaced
            log.warning("fid: ignoring the cache entry %s (%s)", cached, exc)
    mu, sigma, n, _ = feature_stats(files, extractor, what=f"reference {ref}", batch_size=batch_size,
                                    workers=workers)
    if cached is not None:
        try:
            write_stats(cached, mu, sigma, n, extractor.name)
        except OSError as exc:
            log.warning("fid: cannot cache the reference statistics in %s (%s)", cached, exc)
    return mu, sigma, {**info, "cached": False}


def default_cache_dir() -> Path:
    """``fid-stats/`` of fastenc's cache root (``fastenc cache info`` lists it, ``fastenc cache clear`` empties it)."""
    from fastenc.caches import cache_dirs

    return next(c.path for c in cache_dirs() if c.name == "fid-stats")


# ------------------------------------------------------------------------------ the analysis


def run(sets: dict[str, list[Path]], ref: Path, extractor, out: Path, *, cache_dir: Path | None,
        batch_size: int = 50, workers: int = 4, save_stats: bool = False) -> dict:
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    ref_mu, ref_sigma, ref_info = reference_stats(ref, extractor, cache_dir=cache_dir, batch_size=batch_size,
                                                  workers=workers)
    fid, details, warnings = {}, {}, []
    ref_root = None  # S_ref^(1/2), computed once when a set has more images than dimensions
    for label, files in sets.items():
        mu, sigma, n, centred = feature_stats(files, extractor, what=label, batch_size=batch_size, workers=workers)
        if centred is None and ref_root is None:
            ref_root = sqrt_psd(ref_sigma)
        fid[label] = frechet_distance(ref_mu, ref_sigma, mu, sigma, root1=ref_root, centred2=centred)
        details[label] = {"images": n, "fid": fid[label]}
        if n <= extractor.dims:
            warnings.append(f"{label}: {n} images for {extractor.dims} dimensions: the covariance is singular and "
                            f"FID is biased upwards (published values use 10k-50k images)")
        if save_stats:
            rel = f"stats/{slug(label)}.npz"
            write_stats(out / rel, mu, sigma, n, extractor.name)
            details[label]["stats"] = rel
        log.info("fid: %s: %.4f (%d images)", label, fid[label], n)
    for w in warnings:
        log.warning("fid: %s", w)
    result = {"analysis": "fid", "definition": DEFINITION, "fid": fid, "sets": details, "reference": ref_info,
              "extractor": extractor.describe(), "warnings": warnings}
    write_json(out / "fid.json", result)
    return result
