"""Side-by-side CPU comparison: the plain fp32 ONNX Runtime export against every CPU candidate.

    python -m bench.cpu_path [--size base] [--batch 1] [--seq 512] [--threads N] [--rounds 7]
                             [--with-transformers] [--with-compile] [--checkpoint DIR]

All candidates hold the same weights (random T5-initialised unless ``--checkpoint``) and are
timed in interleaved rounds (each round runs every candidate once), so a change in machine load
hits all of them alike. Reported per candidate: wall-clock min and median (ms), process CPU time
min (ms; equals wall time with one thread on an idle core, and is robust to other processes
taking the core), speed-up against ``ort-fp32`` on both, and the cosine similarity of the
embeddings to the fp32 model (mean and min over tokens). Rows are appended to
``bench/results/cpu_path.csv``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fastenc.config import SIZES
from fastenc.errors import BackendUnavailable
from fastenc.ops import TorchOps

from . import common, exports

log = logging.getLogger("fastenc")

DEFAULT = ["ort-fp32", "ort-int8", "torch-fp32", "torch-bf16", "torch-bf16-sdpa", "cpu-bf16", "cpu-int8-all", "cpu"]
OPTIONAL = ["transformers-fp32", "transformers-bf16", "compile-bf16"]
BASELINE = "ort-fp32"
CHOSEN = "cpu"

DESCRIPTIONS = {
    "ort-fp32": "plain fp32 ONNX export, ONNX Runtime defaults",
    "ort-int8": "ONNX Runtime dynamic int8 (per-channel weights, per-tensor activations)",
    "torch-fp32": "fastenc torch backend, fp32",
    "torch-bf16": "fastenc torch backend, bf16",
    "torch-bf16-sdpa": "bf16, attention via scaled_dot_product_attention",
    "cpu-bf16": "fastenc cpu backend without int8",
    "cpu-int8-all": "fastenc cpu backend, every linear int8",
    "cpu": "fastenc cpu backend, planned int8 (the default on CPU)",
    "transformers-fp32": "transformers T5EncoderModel + projector, fp32",
    "transformers-bf16": "transformers T5EncoderModel + projector, bf16",
    "compile-bf16": "torch.compile (inductor, freezing) of the bf16 model",
}


class SdpaOps(TorchOps):
    """Reference ops with attention through ``scaled_dot_product_attention`` (T5: no scaling)."""

    name = "torch-sdpa"

    def attention(self, q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # [B, H, L, dk]


@dataclass
class Candidate:
    name: str
    run: Callable[[], torch.Tensor]
    note: str = ""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    cos: tuple[float, float] = (float("nan"), float("nan"))


def build_candidates(names: list[str], model32, ids: torch.Tensor, args, say: Callable[[str], None]) -> list[Candidate]:
    """Build each requested candidate; unavailable ones are reported with a one-line reason."""
    from fastenc.backends import cpu as fcpu

    out: list[Candidate] = []

    def export(int8: bool):
        name = exports.model_key(args.size, args.seed, args.checkpoint)
        ckpt = args.checkpoint or exports.saved_checkpoint(model32, name)
        out_dir = exports.export_dir(name)
        exports.ensure_export(ckpt, out_dir, int8=int8, max_batch=max(4, args.batch), max_seq=max(512, args.seq))
        return out_dir

    for name in names:
        t0 = time.perf_counter()
        try:
            if name in ("ort-fp32", "ort-int8"):
                dtype = "fp32" if name == "ort-fp32" else "int8"
                out_dir = export(int8=True)
                sess = exports.OrtSession(exports.onnx_file(out_dir, dtype), threads=args.threads)
                run = (lambda s: lambda: s(ids))(sess)
            elif name in ("torch-fp32", "torch-bf16", "torch-bf16-sdpa"):
                m = model32 if name == "torch-fp32" else copy.deepcopy(model32).cast(torch.bfloat16)
                if name.endswith("sdpa"):
                    m.ops = SdpaOps()
                run = (lambda m: lambda: m(ids))(m)
            elif name.split("@")[0] in ("cpu", "cpu-bf16", "cpu-int8-all"):
                m = copy.deepcopy(model32)
                kind, _, min_cos = name.partition("@")  # cpu@0.9993: a plan searched with another bound
                mode = {"cpu": "auto", "cpu-bf16": "none", "cpu-int8-all": "all"}[kind]
                source = f"bench:{args.size}:seed{args.seed}" if not args.checkpoint else None
                if args.checkpoint:
                    source = fcpu.source_fingerprint(args.checkpoint)
                fcpu.prepare(m, int8=mode, min_cos=float(min_cos) if min_cos else args.min_cos, source=source)
                note = m.int8_plan.summary(m.config) if kind == "cpu" else ""
                run = (lambda m: lambda: m(ids))(m)
                out.append(Candidate(name, run, note))
                say(f"  built {name} in {time.perf_counter() - t0:.1f} s {note}")
                continue
            elif name.startswith("transformers-"):
                dt = torch.float32 if name.endswith("fp32") else torch.bfloat16
                m = model32 if dt == torch.float32 else copy.deepcopy(model32).cast(dt)
                tm = common.TransformersEncoder(m)
                run = (lambda tm: lambda: tm(ids))(tm)
            elif name == "compile-bf16":
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
                m = copy.deepcopy(model32).cast(torch.bfloat16)
                compiled = torch.compile(m, dynamic=False)
                with torch.no_grad():
                    compiled(ids)
                run = (lambda c: lambda: c(ids))(compiled)
            else:
                raise BackendUnavailable(f"unknown candidate {name!r}")
        except BackendUnavailable as exc:
            say(f"  skip {name}: {exc}")
            continue
        out.append(Candidate(name, run))
        say(f"  built {name} in {time.perf_counter() - t0:.1f} s")
    return out


def run_rounds(cands: list[Candidate], ref: torch.Tensor, rounds: int, warmup: int = 1) -> None:
    with torch.inference_mode():
        for c in cands:
            out = c.run()
            for _ in range(warmup - 1):
                c.run()
            cos = F.cosine_similarity(out.float(), ref.float(), dim=-1)  # [B, L]
            c.cos = (float(cos.mean()), float(cos.min()))
        for _ in range(rounds):
            for c in cands:
                w0, c0 = time.perf_counter(), time.process_time()
                c.run()
                c.cpu.append((time.process_time() - c0) * 1e3)
                c.wall.append((time.perf_counter() - w0) * 1e3)


def report(cands: list[Candidate]) -> tuple[list[str], list[list[str]]]:
    base = next((c for c in cands if c.name == BASELINE), None)
    header = ["candidate", "wall min ms", "wall p50 ms", "cpu min ms", "x ort-fp32 (wall)", "x ort-fp32 (cpu)",
              "cos mean", "cos min", "what"]
    rows = []
    for c in cands:
        wmin, wmed, cmin = min(c.wall), common.Stats.of(c.wall).p50, min(c.cpu)
        sw = f"{min(base.wall) / wmin:.2f}" if base else "n/a"
        sc = f"{min(base.cpu) / cmin:.2f}" if base else "n/a"
        rows.append([c.name, f"{wmin:.1f}", f"{wmed:.1f}", f"{cmin:.1f}", sw, sc, f"{c.cos[0]:.5f}", f"{c.cos[1]:.5f}",
                     DESCRIPTIONS.get(c.name, "") + (f" [{c.note}]" if c.note else "")])
    return header, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", choices=[s for s in SIZES if s != "xxl"] + ["tiny"])
    p.add_argument("--checkpoint", help="real weights (a fastenc-loadable checkpoint) instead of random ones")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-cos", type=float, default=None, help="calibration cos-sim the int8 plan must keep")
    p.add_argument("--candidates", help=f"comma-separated subset of {','.join(DEFAULT + OPTIONAL)}")
    p.add_argument("--with-transformers", action="store_true", help="add transformers fp32/bf16 (slow)")
    p.add_argument("--with-compile", action="store_true", help="add torch.compile bf16 (compiles for a minute)")
    p.add_argument("--csv", default=str(common.RESULTS_DIR / "cpu_path.csv"), help="'' to write none")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from fastenc.backends import cpu as fcpu

    args.min_cos = args.min_cos if args.min_cos is not None else fcpu.DEFAULT_MIN_COS
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    names = args.candidates.split(",") if args.candidates else DEFAULT + (
        ["transformers-fp32", "transformers-bf16"] if args.with_transformers else []) + (
        ["compile-bf16"] if args.with_compile else [])
    say = lambda text: sys.stdout.write(text + "\n") or sys.stdout.flush()  # noqa: E731

    cfg = common.get_config(args.size)
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"RANDOM T5-init weights (seed {args.seed})"
    say(f"CPU path comparison: {args.size} ({common.param_count(cfg) / 1e6:.0f} M params), B={args.batch}, "
        f"L={args.seq}, {args.threads} thread(s), {weights}")
    say(f"device: {common.device_name(torch.device('cpu'))}; {common.versions()}")
    model32 = common.build_model(args.size, seed=args.seed, checkpoint=args.checkpoint)
    ids = common.sample_ids(model32.config, args.batch, args.seq, seed=args.seed + 1)
    with torch.inference_mode():
        ref = model32(ids)  # [B, L, P] fp32 reference
    cands = build_candidates(names, model32, ids, args, say)
    say(f"timing {args.rounds} interleaved rounds ...")
    run_rounds(cands, ref, args.rounds)
    header, rows = report(cands)
    say(common.format_table(header, rows))
    chosen = next((c for c in cands if c.name == CHOSEN), None)
    base = next((c for c in cands if c.name == BASELINE), None)
    if chosen and base:
        say(f"\nfastenc cpu vs plain ORT fp32: {min(base.wall) / min(chosen.wall):.2f}x wall, "
            f"{min(base.cpu) / min(chosen.cpu):.2f}x CPU time, cos-sim {chosen.cos[0]:.5f} "
            f"(goal: >= 2x, cos >= 0.999)")
    if args.csv:
        ctx = common.run_context(torch.device("cpu"), "checkpoint" if args.checkpoint else "random")
        csv_rows = []
        params = common.param_count(cfg)
        for c in cands:
            dtype = {"ort-int8": "int8", "cpu": "bf16+int8", "cpu-int8-all": "bf16+int8"}.get(
                c.name, "fp32" if "fp32" in c.name else "bf16")
            for metric, unit, stats in (("latency", "ms", common.Stats.of(c.wall)),
                                        ("cpu_time", "ms", common.Stats.of(c.cpu)),
                                        ("cos_sim", "1", common.Stats.single(c.cos[0]))):
                csv_rows.append(common.Row(args.size, params, c.name, dtype, args.batch, args.seq, metric, unit, stats))
        common.append_csv(args.csv, csv_rows, ctx)
        say(f"rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
