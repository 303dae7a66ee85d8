"""t-SNE of mean-pooled teacher and student embeddings (paper Fig. 6) and how well neighbours agree.

Every prompt is encoded by each encoder and mean-pooled over its tokens (padding left out). All points
go through one t-SNE (scikit-learn), so teacher and student land in one plane; the plot marks each
encoder and joins each prompt's teacher point to its student point.

Neighbour agreement is measured in the original embedding spaces (cosine similarity), not in the plane:

* ``nn_agreement`` — fraction of prompts whose nearest other prompt is the same for teacher and student;
* ``knn_overlap`` — mean fraction of the ``k`` nearest other prompts the two spaces share;
* ``retrieval`` — fraction of prompts whose student embedding is closer to its own teacher embedding
  than to any other prompt's (needs equal widths, which the projector provides).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastenc.errors import ConfigError

from ..diagnostics import cosine_matrix
from .report import save_figure, write_json

log = logging.getLogger("fastenc.train")


def nearest(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, P] -> [N, k] indices of each row's k most cosine-similar other rows (most similar first)."""
    sim = cosine_matrix(x)  # [N, N]
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


@dataclass
class Agreement:
    k: int
    nn_match: list[bool]  # [N]
    knn_overlap: list[float]  # [N], in [0, 1]
    retrieved: list[bool] | None  # [N]
    teacher_nn: list[int]
    student_nn: list[int]

    def summary(self) -> dict:
        out = {"k": self.k, "nn_agreement": float(np.mean(self.nn_match)),
               "knn_overlap": float(np.mean(self.knn_overlap))}
        if self.retrieved is not None:
            out["retrieval"] = float(np.mean(self.retrieved))
        return out


def neighbour_agreement(teacher: torch.Tensor, student: torch.Tensor, k: int = 5) -> Agreement:
    """teacher [N, P], student [N, P'] mean-pooled embeddings of the same N prompts."""
    n = teacher.shape[0]
    if n < 2:
        raise ConfigError("neighbour agreement needs at least 2 prompts")
    k = max(1, min(k, n - 1))
    nt, ns = nearest(teacher, k), nearest(student, k)  # [N, k]
    overlap = [len(set(nt[i].tolist()) & set(ns[i].tolist())) / k for i in range(n)]
    retrieved = None
    if teacher.shape[1] == student.shape[1]:
        t = torch.nn.functional.normalize(teacher.float(), dim=-1)
        s = torch.nn.functional.normalize(student.float(), dim=-1)
        retrieved = ((s @ t.T).argmax(dim=1) == torch.arange(n)).tolist()  # [N]
    return Agreement(k, (nt[:, 0] == ns[:, 0]).tolist(), overlap, retrieved, nt[:, 0].tolist(), ns[:, 0].tolist())


def embed_2d(pooled: dict[str, torch.Tensor], *, perplexity: float = 30.0, seed: int = 0,
             metric: str = "euclidean") -> tuple[dict[str, np.ndarray], float]:
    """One joint t-SNE over every encoder's points: ({label: [N, 2]}, the perplexity used)."""
    from sklearn.manifold import TSNE

    widths = {label: x.shape[1] for label, x in pooled.items()}
    if len(set(widths.values())) != 1:
        raise ConfigError(f"t-SNE puts all encoders in one space, so their widths must match: {widths} "
                          "(compare projected students with the teacher)")
    labels = list(pooled)
    x = torch.cat([pooled[label] for label in labels]).double().numpy()  # [E*N, P]
    if x.shape[0] < 3:
        raise ConfigError("t-SNE needs at least 3 points")
    perp = min(perplexity, (x.shape[0] - 1) / 3)  # scikit-learn requires perplexity < n_samples
    if perp != perplexity:
        log.info("tsne: perplexity lowered from %g to %g for %d points", perplexity, perp, x.shape[0])
    y = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, metric=metric).fit_transform(x)
    n = pooled[labels[0]].shape[0]
    return {label: y[i * n:(i + 1) * n] for i, label in enumerate(labels)}, perp


MARKERS = ["o", "^", "s", "D", "v", "P", "X", "*"]


def plot(points: dict[str, np.ndarray], path: Path, *, title: str, links: bool = True) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = list(points)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=150)
    try:
        if links and len(labels) > 1:
            t = points[labels[0]]
            for label in labels[1:]:
                s = points[label]
                for i in range(len(t)):
                    ax.plot([t[i, 0], s[i, 0]], [t[i, 1], s[i, 1]], color="0.75", lw=0.5, zorder=1)
        for i, label in enumerate(labels):
            p = points[label]
            if i == 0:  # the teacher: hollow, on top, so a student lying on it stays visible
                ax.scatter(p[:, 0], p[:, 1], s=36, marker="o", label=label, facecolors="none", edgecolors="C0",
                           linewidths=1.2, zorder=3)
            else:
                ax.scatter(p[:, 0], p[:, 1], s=14, marker=MARKERS[i % len(MARKERS)], label=label, alpha=0.8,
                           color=f"C{i}", zorder=2)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_title(title)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def run(encoders: dict, prompts: list[str], out: Path, *, target: str = "flux-dev", perplexity: float = 30.0,
        k: int = 5, seed: int = 0, metric: str = "euclidean", batch_size: int = 16, links: bool = True) -> dict:
    """``encoders``: {label: fastenc.Encoder}, teacher first. Writes ``tsne.png`` and ``tsne.json``."""
    from .encoders import pooled_embeddings

    if len(prompts) < 2:
        raise ConfigError(f"tsne needs at least 2 prompts, got {len(prompts)}")
    pooled = {label: pooled_embeddings(enc, prompts, target=target, batch_size=batch_size)
              for label, enc in encoders.items()}  # {label: [N, P]}
    labels = list(pooled)
    teacher = labels[0]
    points, used = embed_2d(pooled, perplexity=perplexity, seed=seed, metric=metric)
    agreement = {}
    for label in labels[1:]:
        a = neighbour_agreement(pooled[teacher], pooled[label], k)
        per_prompt = []
        for i, prompt in enumerate(prompts):
            row = {"prompt": prompt, "teacher_nn": prompts[a.teacher_nn[i]], "student_nn": prompts[a.student_nn[i]],
                   "nn_match": a.nn_match[i], "knn_overlap": a.knn_overlap[i]}
            if a.retrieved is not None:
                row["retrieved"] = a.retrieved[i]
            per_prompt.append(row)
        agreement[label] = {**a.summary(), "per_prompt": per_prompt}
        log.info("tsne: %s vs %s: nearest-neighbour agreement %.3f, %d-NN overlap %.3f", label, teacher,
                 agreement[label]["nn_agreement"], a.k, agreement[label]["knn_overlap"])
    png = plot(points, out / "tsne.png", title=f"t-SNE of mean-pooled embeddings ({len(prompts)} prompts)",
               links=links)
    result = {"analysis": "tsne", "target": target, "teacher": teacher, "encoders": labels, "prompts": prompts,
              "perplexity": used, "metric": metric, "seed": seed,
              "points": {label: points[label].round(5).tolist() for label in labels}, "agreement": agreement,
              "files": {"plot": png.name}}
    write_json(out / "tsne.json", result)
    return result
