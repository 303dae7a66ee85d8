"""``fastenc demo``: the main job, end to end, offline when it has to be.

Loads a checkpoint (path or hub id) or, with none, a random-init ``base`` student (said loudly),
encodes prompts (or token ids when no T5 vocabulary is reachable), times the forward pass,
and — where the exporters are installed — exports ONNX and verifies it against the torch model.
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

    with torch.inference_mode():
        for shape in ((1, 77), (1, L)):
            x = ids[: shape[0], : shape[1]]
            t = _time(lambda: enc(x), args.repeats)
            out.write(f"latency B={shape[0]} L={shape[1]:<4} backend={enc.backend} dtype={str(enc.dtype)[6:]}: "
                      f"p50 {statistics.median(t):.1f} ms (min {min(t):.1f})\n")

    if not args.no_export:
        try:
            from .exporters.demo import export_and_verify
        except ImportError:
            out.write("exporters not available in this install; skipping export/verify\n")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                status = export_and_verify(enc, Path(args.out or tmp), target=args.target, stream=out)
                if status:
                    return status
    out.write("demo finished\n")
    return 0
