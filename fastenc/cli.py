"""``fastenc`` command line: encode, info, demo (+ export/verify when the exporters are present)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import FastencError

log = logging.getLogger("fastenc")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="checkpoint directory, .safetensors file or hub id")
    g.add_argument("--size", help="named size (small, base, large, xl, xxl)")
    g.add_argument("--random-init", action="store_true", help="random weights of --size (benchmarks only)")
    g.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the checkpoint's)")
    g.add_argument("--backend", default="auto")
    g.add_argument("--device")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])


def _load_from_args(args):
    from . import load

    if args.checkpoint is None and not args.random_init:
        raise FastencError("pass --checkpoint DIR|HUB_ID, or --size SIZE --random-init")
    return load(args.checkpoint, size=args.size, random_init=args.random_init, backend=args.backend,
                device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)


def cmd_encode(args) -> int:
    from safetensors.torch import save_file

    from .fileio import atomic_write

    enc = _load_from_args(args)
    out = enc.encode(args.prompts, target=args.target)
    tensors = {"text_embeddings": out.embeds.float().cpu().contiguous(), "attention_mask": out.mask.cpu().contiguous()}
    atomic_write(Path(args.output), lambda p: save_file(tensors, str(p), metadata={"target": args.target}))
    log.info("wrote %s: text_embeddings %s", args.output, list(out.embeds.shape))
    return 0


def cmd_info(args) -> int:
    from .info import collect

    for key, value in collect().items():
        sys.stdout.write(f"{key:<22} {value}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastenc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="encode prompts to a safetensors file")
    _add_model_args(p)
    p.add_argument("prompts", nargs="+")
    p.add_argument("--target", default="flux-dev")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("info", help="versions, GPU and usable backends")
    p.set_defaults(func=cmd_info)

    from .demo import add_demo_command

    add_demo_command(sub)
    try:
        from .exporters.cli import add_commands
    except ImportError:  # exporters not installed in this build
        pass
    else:
        add_commands(sub)
    try:
        from .exporters.triton_repo import add_triton_command
    except ImportError:  # exporters not installed in this build
        pass
    else:
        add_triton_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except FastencError as exc:
        sys.stderr.write(f"fastenc: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
