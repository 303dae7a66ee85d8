"""``python -m train --config train.toml [flags]`` (or ``accelerate launch -m train ...``).

Distils a T5 teacher into fastenc's student through a frozen Flux / PixArt-α transformer
(step-following), or with ``--loss embedding`` the naive embedding-MSE baseline. The final student is
written to ``<output_dir>/student`` in fastenc's format (``fastenc.load`` / ``fastenc export`` read it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fastenc.cli import check_output
from fastenc.errors import ConfigError

from .boundary import Parser, guarded
from .config import TrainConfig, apply_override, origin_of, read_config_file
from .distributed import setup_logging

log = logging.getLogger("fastenc.train")

#: Shortcut flags -> config keys (typed by argparse, so "--output-dir 123" stays a string).
FLAGS = {
    "output_dir": "run.output_dir", "loss": "run.loss", "resume": "run.resume", "max_steps": "run.max_steps",
    "stop_after_steps": "run.stop_after_steps", "seed": "run.seed", "lr": "optim.lr",
    "mixed_precision": "run.mixed_precision", "teacher_cache": "teacher.cache", "batch_size": "data.batch_size",
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m train", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--config", help="config file (.toml, .json or .yaml); flags override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set dit.kind=pixart --set optim.ema_decay=0.999")
    p.add_argument("--output-dir", help="run folder: checkpoints, metrics.jsonl, images, final student")
    p.add_argument("--loss", choices=["vision", "embedding"], help="vision (step-following) or embedding (naive)")
    p.add_argument("--resume", help="checkpoint folder, or 'auto' for the newest under the output dir")
    p.add_argument("--max-steps", type=int, help="total optimizer steps")
    p.add_argument("--stop-after-steps", type=int, help="stop (with a checkpoint) after this many steps this run")
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, help="prompts per process and batch")
    p.add_argument("--mixed-precision", choices=["bf16", "no"])
    p.add_argument("--teacher-cache", help="teacher cache folder (python -m train.cache_teacher)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks of unexpected errors")
    return p


def resolve(args: argparse.Namespace) -> TrainConfig:
    """The config file, then ``--set``, then the shortcut flags; every value checked, each error naming
    the file (or the flag) and the key."""
    source = args.config
    data = read_config_file(args.config) if args.config else {}
    origins: dict[str, str] = {}
    for assignment in args.overrides:
        apply_override(data, assignment)
        origins[assignment.split("=", 1)[0].strip()] = "--set"
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            section, name = key.split(".")
            if not isinstance(data.setdefault(section, {}), dict):
                where = origin_of(section, origins, source) or "--set"
                raise ConfigError(f"{where}: {section} must be a table/object, got {type(data[section]).__name__}")
            data[section][name] = value
            origins[key] = "--" + flag.replace("_", "-")
    cfg = TrainConfig.from_dict(data, source=source or "flags", origins=origins).validate(source, origins)
    args.origin_of_output = origin_of("run.output_dir", origins, source)
    return cfg


def check_output_dir(cfg: TrainConfig, where: str | None) -> None:
    """The output folder can be made and written (not a file, not under one, not read-only), before any work.
    Missing parent folders (``runs/`` of the shipped configs in a fresh checkout) are created, and said."""
    check_output(f"{where}: run.output_dir" if where else "run.output_dir", cfg.run.output_dir, folder=True,
                 parents=True)
    out = Path(cfg.run.output_dir).expanduser().absolute()
    missing = [p for p in out.parents if not os.path.lexists(p)]
    if missing:
        log.warning("train: creating %s for run.output_dir %s (%s)", missing[-1], cfg.run.output_dir,
                    "it does not exist" if len(missing) == 1 else f"with {len(missing) - 1} folder(s) below it")


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when done (or stopped with a checkpoint), 2 for bad input (config, data, checkpoint, a busy
    output folder), 1 for a failed write or an unexpected error; every error is one line on stderr."""
    args = build_parser().parse_args(argv)
    setup_logging()
    return guarded("train", lambda: _run(args), verbose=args.verbose, interrupted="resume with --resume auto",
                   memory_hint="lower data.batch_size or dit.resolution")


def _run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    if args.print_config:
        sys.stdout.write(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return 0
    check_output_dir(cfg, args.origin_of_output)
    from .loop import train

    result = train(cfg)
    if result.student_dir is not None:
        sys.stdout.write(f"student: {result.student_dir}\n")
    else:
        sys.stdout.write(f"stopped at step {result.step}; resume with --resume auto\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
