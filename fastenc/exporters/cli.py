"""``fastenc export`` and ``fastenc verify`` subcommands."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import SIZES, TARGET_MAX_LENGTH

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def _positive_int(text: str) -> int:
    from ..cli import positive_int

    return positive_int(text)


def add_commands(sub) -> None:
    """Add ``export`` and ``verify`` to the ``fastenc`` subparsers."""
    add_export_command(sub)
    add_verify_command(sub)


def add_export_command(sub) -> None:
    from ..hub import RELEASED

    released = ", ".join(f"{s} = {r}" for s, r in RELEASED.items())
    p = sub.add_parser(
        "export", help="export ONNX / TensorRT / AOTInductor artifacts and verify them",
        description="Export the encoder: ONNX always (plus an ONNX Runtime-optimised copy), a TensorRT engine "
                    "with --trt, an AOTInductor package with --aoti, an int8 ONNX Runtime model with --int8. "
                    "Artifacts whose inputs did not change are reused; --force rebuilds. Every artifact is "
                    "verified against the torch model at the end. `--size base` alone exports the released base "
                    "student (downloaded from the Hugging Face hub).",
    )
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR|FILE|HUB_ID",
                   help="checkpoint folder, .safetensors file or Hugging Face hub id")
    g.add_argument("--size", choices=list(SIZES),
                   help=f"named size: without --checkpoint, the released checkpoint of that size ({released}); "
                        "with --random-init, random weights of that size; with --checkpoint, checked against it")
    g.add_argument("--random-init", action="store_true", help="random weights of --size (benchmarks only)")
    g.add_argument("--seed", type=int, default=0, help="seed of --random-init weights (default 0)")
    g.add_argument("--tokenizer", metavar="DIR|HUB_ID",
                   help="tokenizer folder or hub id to bundle (default: the checkpoint's)")
    a = p.add_argument_group("artifacts")
    a.add_argument("--onnx", action="store_true", help="ONNX model (always produced; accepted for clarity)")
    a.add_argument("--trt", action="store_true", help="TensorRT engine (needs TensorRT and a CUDA GPU)")
    a.add_argument("--aoti", action="store_true", help="AOTInductor .pt2 package")
    a.add_argument("--int8", action="store_true", help="dynamically quantised int8 ONNX Runtime model (CPU)")
    a.add_argument("--dtype", choices=DTYPE_CHOICES, help="artifact dtype (default: bf16 with --trt, else fp32)")
    a.add_argument("--max-batch", type=_positive_int, default=4, help="largest batch the artifacts accept (default 4)")
    a.add_argument("--max-seq", type=_positive_int, help="longest sequence (default: the target's max length)")
    a.add_argument("--target", choices=list(TARGET_MAX_LENGTH), default="flux-dev",
                   help="pipeline whose sequence length sets the default --max-seq (default flux-dev)")
    a.add_argument("--device", choices=("cpu", "cuda"), help="device the AOTInductor package runs on (default cpu)")
    a.add_argument("--out", type=Path, metavar="DIR",
                   help="output directory (default ./fastenc-export-SIZE, or ./fastenc-export-checkpoint)")
    a.add_argument("--force", action="store_true", help="rebuild artifacts even when their inputs did not change")
    a.add_argument("--no-verify", action="store_true", help="skip the accuracy check at the end")
    p.set_defaults(func=cmd_export)


def add_verify_command(sub) -> None:
    v = sub.add_parser(
        "verify", help="check exported artifacts against the torch model",
        description="Run every artifact of an export directory against the torch model it came from and print "
                    "max abs error and cosine similarity per artifact. Exit status 1 when a bound is missed "
                    "(fp32 max abs <= 1e-4; fp16/bf16 mean cos-sim >= 0.9999; int8 >= 0.995).",
    )
    v.add_argument("artifact_dir", type=Path, metavar="EXPORT_DIR", help="folder written by `fastenc export`")
    v.add_argument("--checkpoint", metavar="DIR|FILE|HUB_ID", help="the checkpoint the artifacts came from, if it moved")
    v.add_argument("--device", choices=("cpu", "cuda"), help="device for the ONNX Runtime models and the reference")
    v.set_defaults(func=cmd_verify)


def cmd_export(args) -> int:
    from ..caches import human, tree_size
    from ..cli import checkpoint_from_args

    checkpoint = checkpoint_from_args(args)  # hub ids fetched first (before torch loads); offline: fails at once
    from .pipeline import ExportRequest, export
    from .verify import VerificationFailed

    name = args.size or ("checkpoint" if args.checkpoint else "base")
    out = args.out or Path(f"fastenc-export-{name}")
    if args.out is None:
        from ..cli import check_output

        check_output("--out", out, folder=True)
    req = ExportRequest(
        out=out, checkpoint=checkpoint, size=args.size,
        random_init=args.random_init, seed=args.seed, tokenizer=args.tokenizer, dtype=args.dtype, trt=args.trt,
        aoti=args.aoti, int8=args.int8, max_batch=args.max_batch, max_seq=args.max_seq, target=args.target,
        device=args.device, force=args.force, verify=not args.no_verify,
    )
    try:
        result = export(req)
    except VerificationFailed as exc:  # show the whole table, then the one-line error
        sys.stdout.write(exc.report.table() + "\n")
        raise
    for path in result.artifacts:
        state = "built" if path in result.built else "reused"
        sys.stdout.write(f"{state:<7} {path}\n")
    if result.report is not None:
        sys.stdout.write(result.report.table() + "\n")
    sys.stdout.write(f"export folder {Path(result.directory).resolve()}: {human(tree_size(Path(result.directory)))}\n")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    report = verify(args.artifact_dir, checkpoint=args.checkpoint, device=args.device)
    sys.stdout.write(report.table() + "\n")
    if not report.ok:
        sys.stderr.write(f"fastenc: verify: {len(report.failures())} artifact(s) missed their bound\n")
        return 1
    return 0
