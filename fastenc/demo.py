"""``fastenc demo``: the main job, end to end, offline when it has to be.

Loads a checkpoint (path or hub id) or, with none, a random-init ``base`` student (said loudly),
encodes prompts (or token ids when no T5 vocabulary is reachable), times the forward pass,
exports ONNX, verifies it against the torch model, and prints a latency table of the backends.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("fastenc")

DEMO_PROMPTS = [
    "A sculptor waving a poster stating 'fastenc'.",
    "A photo of a red fox in fresh snow, golden hour, 85mm lens",
    "A rat, a cat and a man at a small wooden table",
]

BANNER = """
##########################################################################
##  NO CHECKPOINT GIVEN: running a RANDOM-INIT '{size}' student.
##  Its embeddings are meaningless; this run exercises the code path and
##  the timings only. Pass --checkpoint DIR|HUB_ID for real weights
##  (e.g. --checkpoint LifuWang/DistillT5 when online).
##########################################################################
"""


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="run the whole path once (offline-capable)")
    p.add_argument("--checkpoint", help="checkpoint directory, .safetensors file or hub id")
    p.add_argument("--size", default="base", help="size for the random-init fallback (default base)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (Flux's tokenizer_2)")
    p.add_argument("--target", default="flux-dev")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export + verify step")
    p.add_argument("--out", help="keep exported artifacts here (default: a temporary folder)")
    p.add_argument("prompts", nargs="*", default=DEMO_PROMPTS)
    p.set_defaults(func=run_demo)


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_demo(args: argparse.Namespace) -> int:
    from . import load
    from .config import max_length_for

    out = sys.stdout
    if args.checkpoint:
        enc = load(args.checkpoint, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    else:
        out.write(BANNER.format(size=args.size))
        enc = load(size=args.size, random_init=True, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    out.write(f"encoder: {enc.extra_repr()}\n")
    n_params = sum(p.numel() for p in enc.model.parameters())
    out.write(f"parameters: {n_params / 1e6:.1f} M\n")

    L = max_length_for(args.target)
    if enc.tokenizer is not None:
        emb = enc.encode(args.prompts, target=args.target)
        ids = enc.tokenizer(args.prompts, max_length=L).input_ids
        out.write(f"encoded {len(args.prompts)} prompts for {args.target}: embeds {list(emb.embeds.shape)}, "
                  f"{emb.num_truncated} truncated\n")
    else:
        out.write("no T5 tokenizer reachable (pass --tokenizer FOLDER); encoding synthetic token ids instead\n")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, enc.config.vocab_size, (len(args.prompts), L), generator=gen)
        ids[:, -1] = 1  # </s>
        with torch.inference_mode():
            embeds = enc(ids)
        out.write(f"token ids {list(ids.shape)} -> embeddings {list(embeds.shape)}\n")
    if not torch.isfinite(enc(ids[:1]).float()).all():
        out.write("ERROR: non-finite embeddings\n")
        return 1

    encoders = {enc.backend: enc}
    if not args.no_export:
        exported = _export_and_verify(enc, args, out)
        if exported is None:
            return 1
        encoders.update(exported)

    out.write(f"\n{'backend':<13} {'dtype':<8} {'B':>2} {'L':>4} {'p50 ms':>8} {'min ms':>8}\n")
    with torch.inference_mode():
        for name, e in encoders.items():
            for shape in ((1, 77), (1, L)):
                x = ids[: shape[0], : shape[1]]
                t = _time(lambda: e(x), args.repeats)
                out.write(f"{name:<13} {str(e.dtype).removeprefix('torch.'):<8} {shape[0]:>2} {shape[1]:>4} "
                          f"{statistics.median(t):>8.1f} {min(t):>8.1f}\n")
    out.write("demo finished\n")
    return 0


def _export_and_verify(enc, args: argparse.Namespace, out) -> dict | None:
    """Export ONNX (+ the ONNX Runtime-optimised copy), verify it, and load it as a backend."""
    from . import load, save
    from .exporters.pipeline import ExportRequest, export
    from .exporters.verify import VerificationFailed

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.out) if args.out else Path(tmp)
        ckpt = save(enc, workdir / "checkpoint") if not args.checkpoint else None
        req = ExportRequest(out=workdir / "export", checkpoint=str(ckpt or args.checkpoint),
                            max_batch=len(args.prompts), target=args.target)
        out.write(f"\nexporting ONNX to {req.out} ...\n")
        try:
            result = export(req)
        except VerificationFailed as exc:
            out.write(exc.report.table() + "\nERROR: exported model missed its accuracy bound\n")
            return None
        if result.report is not None:
            out.write(result.report.table() + "\n")
        # the ONNX Runtime session holds the model in memory, so the temporary folder may go
        return {"onnxruntime": load(result.directory, backend="onnxruntime", cache=False)}
