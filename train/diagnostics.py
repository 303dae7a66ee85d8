"""Mode-collapse probe: do distinct concepts map onto one embedding?

Naive (embedding-MSE) distillation maps 'rat', 'cat' and 'man' to one embedding. The probe encodes a
fixed set of prompts, mean-pools each over its tokens, and reports the pairwise cosine similarities;
a pair whose similarity reaches the threshold — while the teacher keeps it below, when the teacher's
embeddings are known — counts as collapsed, and a warning is logged.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger("fastenc.train")


def mean_pool(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """embeds [B, L, P], mask [B, L] -> [B, P]: mean over the prompt's tokens (``</s>`` included)."""
    m = mask.to(embeds.device, torch.float32).unsqueeze(-1)  # [B, L, 1]
    return (embeds.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """x [N, P] -> [N, N] pairwise cosine similarity."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    return x @ x.T


@dataclass
class CollapseReport:
    probes: list[str]
    threshold: float
    cos: list[list[float]]  # student, [N][N]
    teacher_cos: list[list[float]] | None
    collapsed_pairs: list[tuple[str, str, float]]
    groups: list[list[str]]  # probes that collapsed onto one another (connected components, size >= 2)

    @property
    def num_collapsed_pairs(self) -> int:
        return len(self.collapsed_pairs)

    @property
    def num_collapsed_probes(self) -> int:
        return sum(len(g) for g in self.groups)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["num_collapsed_pairs"] = self.num_collapsed_pairs
        out["num_collapsed_probes"] = self.num_collapsed_probes
        return out


def collapse_report(student: torch.Tensor, probes: list[str], threshold: float,
                    teacher: torch.Tensor | None = None) -> CollapseReport:
    """student/teacher: mean-pooled probe embeddings [N, P]."""
    cos = cosine_matrix(student)
    tcos = cosine_matrix(teacher) if teacher is not None else None
    n = len(probes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            c = float(cos[i, j])
            if c >= threshold and (tcos is None or float(tcos[i, j]) < threshold):
                pairs.append((probes[i], probes[j], c))
                parent[find(i)] = find(j)
    comps: dict[int, list[str]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(probes[i])
    groups = [g for g in comps.values() if len(g) > 1]
    return CollapseReport(probes, threshold, cos.tolist(), tcos.tolist() if tcos is not None else None, pairs, groups)


@torch.no_grad()
def probe_embeddings(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, masked: bool) -> torch.Tensor:
    """Mean-pooled embeddings [N, P] of the probe batch, dropout off (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(ids.to(device), mask.to(device) if masked else None)  # [N, L, P]
    finally:
        model.train(was_training)
    return mean_pool(out, mask)


def log_report(report: CollapseReport, step: int) -> None:
    if report.groups:
        groups = "; ".join(" = ".join(repr(p) for p in g) for g in report.groups)
        log.warning("mode collapse at step %d: %d probe pair(s) at cosine >= %.3f: %s", step,
                    report.num_collapsed_pairs, report.threshold, groups)
    else:
        n = len(report.probes)
        worst = max((report.cos[i][j] for i in range(n) for j in range(i + 1, n)), default=float("nan"))
        log.info("collapse probe at step %d: no collapse (max pairwise cosine %.4f)", step, worst)
