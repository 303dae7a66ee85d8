"""Mode-collapse check (paper Fig. 9): do near concepts share one student embedding?

The probes (by default 'A rat', 'A cat', 'A man', 'A monkey', 'A woman', plus any the user adds) are
encoded by the teacher and each student and mean-pooled; the pairwise cosine matrices are compared with
the trainer's own probe (:func:`train.diagnostics.collapse_report`): a pair is flagged when the student's
similarity reaches the threshold while the teacher's stays below it. Writes a heat map of every matrix
(flagged cells outlined) and the reports as JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fastenc.errors import ConfigError

from ..config import PROBES
from ..diagnostics import collapse_report, cosine_matrix
from .defaults import DEFAULT_THRESHOLD
from .report import save_figure, write_json

log = logging.getLogger("fastenc.train")


def probe_list(extra: list[str] | None = None, *, defaults: bool = True) -> list[str]:
    out: list[str] = []
    for p in (list(PROBES) if defaults else []) + list(extra or []):
        p = p.strip()
        if p and p not in out:
            out.append(p)
    return out


def check_inputs(probes: list[str], threshold: float) -> None:
    if len(probes) < 2:
        raise ConfigError(f"the collapse check needs at least 2 probes, got {len(probes)}")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold}: must be in (0, 1]")


def heatmap(matrices: dict[str, np.ndarray], probes: list[str], flagged: dict[str, list[tuple[int, int]]],
            path: Path, *, threshold: float) -> Path:
    """One panel per encoder ([N, N] cosine matrices); flagged cells outlined in red."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(probes)
    labels = list(matrices)
    lo = min(0.0, min(float(m.min()) for m in matrices.values()))
    size = max(3.0, 0.55 * n + 1.5)
    fig, axes = plt.subplots(1, len(labels), figsize=(size * len(labels) + 1.5, size + 0.5), dpi=120, squeeze=False,
                             layout="constrained")
    try:
        im = None
        for ax, label in zip(axes[0], labels):
            m = matrices[label]
            im = ax.imshow(m, vmin=lo, vmax=1.0, cmap="viridis")
            ax.set_xticks(range(n), probes, rotation=60, ha="right", fontsize=8)
            ax.set_yticks(range(n), probes if ax is axes[0][0] else [], fontsize=8)
            ax.set_title(label, fontsize=9)
            if n <= 16:
                for i in range(n):
                    for j in range(n):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if m[i, j] < (lo + 1.0) / 2 else "black")
            for i, j in flagged.get(label, []):
                for a, b in ((i, j), (j, i)):
                    ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label=f"cosine (flag: >= {threshold:g})")
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def run(encoders: dict, probes: list[str], out: Path, *, threshold: float = DEFAULT_THRESHOLD,
        target: str = "flux-dev", batch_size: int = 16) -> dict:
    """``encoders``: {label: fastenc.Encoder}, teacher first. Writes ``collapse.png`` and ``collapse.json``;
    the result's ``collapsed`` is true when any student has a flagged pair."""
    from .encoders import pooled_embeddings

    check_inputs(probes, threshold)
    pooled = {label: pooled_embeddings(enc, probes, target=target, batch_size=batch_size)
              for label, enc in encoders.items()}  # {label: [N, P]}
    labels = list(pooled)
    teacher = labels[0]
    index = {p: i for i, p in enumerate(probes)}
    matrices = {teacher: cosine_matrix(pooled[teacher]).numpy()}
    flagged: dict[str, list[tuple[int, int]]] = {}
    students = []
    for label in labels[1:]:
        report = collapse_report(pooled[label], probes, threshold, teacher=pooled[teacher])
        matrices[label] = np.asarray(report.cos)
        flagged[label] = [(index[a], index[b]) for a, b, _ in report.collapsed_pairs]
        if report.groups:
            log.warning("collapse: %s maps %s onto one embedding (cosine >= %g; %s keeps them apart)", label,
                        "; ".join(" = ".join(repr(p) for p in g) for g in report.groups), threshold, teacher)
        else:
            log.info("collapse: %s: no probe pair at cosine >= %g that %s keeps below", label, threshold, teacher)
        d = report.to_dict()
        d.pop("teacher_cos", None)  # written once, under "teacher"
        d["collapsed_pairs"] = [{"a": a, "b": b, "cosine": c,
                                 "teacher_cosine": float(matrices[teacher][index[a], index[b]])}
                                for a, b, c in report.collapsed_pairs]
        students.append({"label": label, "collapsed": bool(report.groups), **d})
    png = heatmap(matrices, probes, flagged, out / "collapse.png", threshold=threshold)
    result = {"analysis": "collapse", "target": target, "threshold": threshold, "probes": probes,
              "teacher": {"label": teacher, "cos": matrices[teacher].round(6).tolist()}, "students": students,
              "collapsed": any(s["collapsed"] for s in students), "files": {"heatmap": png.name}}
    write_json(out / "collapse.json", result)
    return result
