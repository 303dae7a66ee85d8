"""Compile every Triton kernel x autotune config for sm_75..sm_90 in bf16, fp16 and fp32, without a GPU.

    python scripts/compile_matrix.py [--arch 75,80,86,89,90] [--dtype bf16,fp16,fp32] [--jobs N]

Each kernel's launch at the base student's widths (fastenc/kernels/offline.py) is compiled with
triton's bundled ptxas and the JIT's specialisation; the table gives the shared memory each build asks
for against the architecture's per-block limit (``over`` when it does not fit: the autotuner skips such
a config on that GPU). Exit status 1 when a build fails, when a kernel has no config that fits an
architecture, or when a kernel's untuned config (``FASTENC_AUTOTUNE=0``, the first-contact probe) does
not fit every architecture; 2 without ptxas.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _one(job):
    op, dtype, arch = job
    from fastenc.kernels import offline

    launch = offline.record_launch(op, offline.DTYPES[dtype])
    kernel = launch[0]
    single = kernel.single
    return [(offline.build(op, dtype, arch, c, launch), c is single and single is not None)
            for c in (kernel.all_configs or [None])]


def main(argv=None) -> int:
    from fastenc.kernels import offline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="75,80,86,89,90")
    p.add_argument("--dtype", default="bf16,fp16,fp32")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="compiler processes (1: in this process)")
    args = p.parse_args(argv)
    if not offline.have_ptxas():
        print(f"skipped: triton's bundled ptxas is missing ({offline.ptxas()})")
        return 2
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in offline.SMEM_PER_BLOCK]
    if unknown:
        p.error(f"unknown arch {unknown}; choose from {sorted(offline.SMEM_PER_BLOCK)}")
    dtypes = args.dtype.split(",")
    jobs = [(op, dt, arch) for op in offline.OPS for dt in dtypes for arch in archs]
    if args.jobs <= 1:
        results = {job: _one(job) for job in jobs}
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = dict(zip(jobs, pool.map(_one, jobs)))

    bad = []
    head = f"{'kernel':12} {'dtype':5} {'config':22} " + " ".join(f"{f'sm_{a} KB':>9}" for a in archs)
    print(head)
    print(" " * 41 + " ".join(f"{f'/{offline.SMEM_PER_BLOCK[a] // 1024}':>9}" for a in archs))
    for op in offline.OPS:
        for dt in dtypes:
            rows = list(zip(*(results[(op, dt, a)] for a in archs)))
            for row in rows:
                first = row[0][0]
                cells = []
                for b, _ in row:
                    kb = f"{b.shared / 1024:.0f}" if b.shared >= 1024 or not b.shared else "<1"
                    cell = "FAIL" if b.error else f"{kb}{'' if b.fits else ' over'}"
                    cells.append(f"{cell:>9}")
                    if b.error:
                        bad.append(f"{op} {dt} {b.config} sm_{b.arch}: {b.error}")
                mark = " *" if row[0][1] else ""
                print(f"{op:12} {dt:5} {first.config + mark:22} " + " ".join(cells))
            for i, a in enumerate(archs):
                column = [r[i] for r in rows]
                if not any(b.fits for b, _ in column):
                    bad.append(f"{op} {dt} sm_{a}: no config fits {offline.SMEM_PER_BLOCK[a] // 1024} KB")
                if any(s and not b.fits for b, s in column):
                    bad.append(f"{op} {dt} sm_{a}: the untuned config (*) does not fit")
    total = sum(len(v) for v in results.values())
    print(f"{total} builds; * = the config run without autotuning (FASTENC_AUTOTUNE=0, the first-contact probe)")
    for line in bad:
        print("PROBLEM", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
