"""Kernel micro-benchmark: each fused Triton op vs its torch reference and torch.compile of it.

    python -m bench.kernels [--size base] [--dtype bf16] [--shapes 1x512 8x512 1x77]

Shapes are the student's (``--size``) at each batch x sequence length. Throughput is measured
against what the op needs: TFLOP/s for the GEMMs and attention (2 flops per multiply-add; the
gated FFN counts both halves of ``wi``), GB/s for the norm (bytes each output and input must move
once). Prints a table and appends long-format rows (name, provider, metric, unit, x, p20, p50,
p80, dtype, device, version, timestamp) to ``bench/results/kernels.csv``. Needs a CUDA GPU;
without one it prints a one-line reason and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.csv"
COLUMNS = ["name", "provider", "metric", "unit", "x", "p20", "p50", "p80", "dtype", "device", "version", "timestamp"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cases(cfg, B: int, L: int, dtype: torch.dtype, device: torch.device):
    """(name, work, unit, triton_fn, reference_fn) for every fused op at [B, L]."""
    from fastenc.kernels import attention, gated_ffn, linear_relu, rms_norm

    D, F, H, dk, P = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.projection_dim or cfg.d_model
    M = B * L
    el = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    x, delta, w = rnd(B, L, D), rnd(B, L, D), rnd(D, scale=0.1) + 1
    norm_bytes = 4 * M * D * el + D * el  # read residual, delta; write sum, normed; weight

    qkv = rnd(B, L, 3 * H * dk)
    q, k, v = qkv.view(B, L, 3, H, dk).permute(2, 0, 3, 1, 4).unbind(0)
    table = rnd(cfg.num_buckets, H)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    rel = attention.RelativePositionBias.build(table, mask, cfg.num_buckets, cfg.max_distance, dtype)
    from fastenc.ops import TORCH_OPS

    dense = TORCH_OPS.position_bias(table, L, mask, cfg.num_buckets, cfg.max_distance, dtype)  # once per forward
    attn_flops = 4 * B * H * L * L * dk

    h = rnd(B, L, D)
    wi = rnd(2 * F, D, scale=D**-0.5)
    fc1 = rnd(P, D, scale=D**-0.5)
    return [
        ("add_rms_norm", norm_bytes, "GB/s",
         lambda: rms_norm.add_rms_norm(x, delta, w, cfg.eps),
         lambda: TORCH_OPS.add_rms_norm(x, delta, w, cfg.eps)),
        ("rel_attention", attn_flops, "TFLOP/s",
         lambda: attention.rel_attention(q, k, v, rel),
         lambda: TORCH_OPS.attention(q, k, v, dense)),
        ("gated_ffn", 2 * M * D * 2 * F, "TFLOP/s",
         lambda: gated_ffn.gated_ffn(h, wi, cfg.activation, dtype),
         lambda: TORCH_OPS.gated_act_linear(h, wi, cfg.activation, dtype)),
        ("linear_relu", 2 * M * D * P, "TFLOP/s",
         lambda: linear_relu.linear_relu(h, fc1),
         lambda: TORCH_OPS.act_linear(h, fc1, None, "relu", dtype)),
    ]


def _time(fn: Callable[[], object]) -> list[float]:
    """p20, p50, p80 milliseconds (triton's do_bench: L2 flushed, CUDA events)."""
    import triton.testing

    return list(triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8]))


def _append_rows(path: Path, rows: list[dict]) -> None:
    from fastenc.fileio import atomic_write

    old = path.read_text() if path.exists() else ""

    def write(tmp: Path) -> None:
        buf = io.StringIO()
        out = csv.DictWriter(buf, fieldnames=COLUMNS)
        if not old:
            out.writeheader()
        out.writerows(rows)
        tmp.write_text(old + buf.getvalue())

    atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", help="student size whose shapes are used (default: base)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shapes", nargs="+", default=["1x512", "8x512", "1x77"], metavar="BxL")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                        help="torch.compile mode for the compiled reference ('none' skips it)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"CSV to append to (default: {RESULTS})")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("skipped: the kernel micro-benchmark needs a CUDA GPU and torch sees none")
        return 0

    import triton

    from fastenc.config import get_size

    cfg = get_size(args.size)
    dtype = DTYPES[args.dtype]
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    version = f"fastenc-kernels triton {triton.__version__} torch {torch.__version__}"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows, table = [], []
    with torch.inference_mode():
        for shape in args.shapes:
            B, L = (int(s) for s in shape.lower().split("x"))
            x_label = f"{args.size} B={B} L={L}"
            for name, work, unit, fused, ref in _cases(cfg, B, L, dtype, device):
                providers = {"triton": fused, "torch": ref}
                if args.compile_mode != "none":
                    providers["torch.compile"] = torch.compile(ref, mode=args.compile_mode, dynamic=False)
                times = {}
                for provider, fn in providers.items():
                    fn()  # compile / autotune outside the timing
                    times[provider] = _time(fn)
                scale = 1e-9 if unit == "GB/s" else 1e-12
                for provider, ms in times.items():
                    thr = [work * scale / (t * 1e-3) for t in reversed(ms)]  # p20 throughput from p80 time
                    common = {"name": name, "provider": provider, "x": x_label, "dtype": args.dtype,
                              "device": gpu, "version": version, "timestamp": stamp}
                    rows.append({**common, "metric": "time", "unit": "ms",
                                 **{f"p{p}": f"{v:.5f}" for p, v in zip((20, 50, 80), ms)}})
                    rows.append({**common, "metric": "throughput", "unit": unit,
                                 **{f"p{p}": f"{v:.2f}" for p, v in zip((20, 50, 80), thr)}})
                    table.append((name, x_label, provider, ms[1], thr[1], unit, times["torch"][1] / ms[1]))
    print(f"{'op':<14} {'shape':<20} {'provider':<14} {'p50 ms':>9} {'throughput':>16} {'vs torch':>9}")
    for name, x_label, provider, ms, thr, unit, speedup in table:
        print(f"{name:<14} {x_label:<20} {provider:<14} {ms:>9.4f} {thr:>9.1f} {unit:<6} {speedup:>8.2f}x")
    _append_rows(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out} ({gpu})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
