"""Latency and memory against parameter count (log x), one line per backend.

    python -m bench.plot [--csv bench/results/latency.csv] [--out bench/results/latency.png]
                         [--batch 1] [--seq 512] [--all-runs]

Reads the long-format rows ``bench.latency`` appends (by default only the latest run: the rows
with the newest timestamp) at one batch x sequence point, and draws two panels: p50 latency with
its p20-p80 band, and peak memory, each against the model's parameter count, every point
labelled with its model name (the layout of the paper's Figure 1).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from . import common


def _select(rows: list[dict], batch: int | None, seq: int | None, all_runs: bool) -> tuple[list[dict], int, int]:
    if not rows:
        raise ValueError("no rows to plot")
    if not all_runs:
        latest = max(r["timestamp"] for r in rows)
        rows = [r for r in rows if r["timestamp"] == latest]
    batches = sorted({int(r["batch"]) for r in rows})
    seqs = sorted({int(r["seq"]) for r in rows})
    batch = batch if batch is not None else batches[0]
    seq = seq if seq is not None else seqs[-1]
    rows = [r for r in rows if int(r["batch"]) == batch and int(r["seq"]) == seq]
    if not rows:
        raise ValueError(f"no rows at batch {batch}, seq {seq} (have batches {batches}, seqs {seqs})")
    return rows, batch, seq


def _human(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def plot_rows(rows: list[dict], out: Path, *, batch: int | None = None, seq: int | None = None,
              all_runs: bool = False) -> Path:
    """Draw the two panels from CSV-shaped rows (dicts with the ``common.CSV_COLUMNS`` keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, batch, seq = _select(rows, batch, seq, all_runs)
    series: dict[tuple[str, str], dict[str, dict[str, object]]] = defaultdict(dict)
    for r in rows:
        key = (r["backend"], r["dtype"])
        point = series[key].setdefault(r["model"], {"params": int(r["params"])})
        point[r["metric"]] = (float(r["p20"]), float(r["p50"]), float(r["p80"]))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = "osD^v<>p*h"
    for i, ((backend, dtype), points) in enumerate(sorted(series.items())):
        models = sorted(points, key=lambda m: points[m]["params"])
        label = f"{backend} ({dtype})"
        for ax, metric in ((ax_t, "latency"), (ax_m, "memory")):
            have = [m for m in models if metric in points[m]]
            if not have:
                continue
            x = [points[m]["params"] for m in have]
            lo, mid, hi = zip(*(points[m][metric] for m in have))
            ax.plot(x, mid, marker=markers[i % len(markers)], label=label)
            if metric == "latency":
                ax.fill_between(x, lo, hi, alpha=0.15)
            for m, xv, yv in zip(have, x, mid):
                ax.annotate(m, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    device = rows[0].get("device", "")
    from matplotlib.ticker import FuncFormatter

    for ax, title, unit in ((ax_t, "Latency (p50, p20-p80 band)", "ms"), (ax_m, "Peak memory of the encoder", "MB")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    weights = rows[0].get("weights", "")
    fig.suptitle(f"Text encoders at batch {batch}, sequence {seq} on {device}"
                 + (" (random weights)" if weights == "random" else ""), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from fastenc.fileio import atomic_write

    atomic_write(out, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=str(common.RESULTS_DIR / "latency.csv"))
    p.add_argument("--out", default=str(common.RESULTS_DIR / "latency.png"))
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--all-runs", action="store_true", help="every run in the file, not only the latest")
    args = p.parse_args(argv)
    try:
        rows = common.read_csv(Path(args.csv))
        out = plot_rows(rows, Path(args.out), batch=args.batch, seq=args.seq, all_runs=args.all_runs)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"bench.plot: error: {exc}\n")
        return 2
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
