"""``fastenc`` command line: encode, info, demo, export, verify, triton-repo, cache.

Only the subcommand being run is built (and imports what it needs), so ``fastenc --help`` and
``fastenc info`` load no torch. Every error the library raises on purpose (:class:`FastencError`)
and every OSError is reported as one line on stderr with a non-zero exit status, never a traceback;
``-v`` shows the traceback of unexpected errors. A reader of stdout that goes away (``| head -1``)
ends the command quietly with status 141. Outputs are checked before any work: ``encode -o FILE``
needs FILE's folder to exist (none is created), ``encode -o -`` writes the safetensors bytes to
stdout (a pipe or a redirect; the summary line then goes to stderr).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from .errors import BackendUnavailable, CheckpointError, ConfigError, FastencError, InputError

log = logging.getLogger("fastenc")

BACKENDS = ("auto", "torch", "cpu", "triton", "onnxruntime", "tensorrt", "aoti")
DTYPES = ("fp32", "bf16", "fp16")
DEVICE_METAVAR = "{cpu,cuda,cuda:N}"
_DEVICE = re.compile(r"cpu|cuda(:\d{1,2})?")
_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")  # owner/name, as fastenc.weights.resolve_checkpoint reads it
STDOUT = "-"  # encode -o -: the safetensors bytes on standard output

#: name -> (one-line help, "module:function" that adds the full subparser)
COMMANDS: dict[str, tuple[str, str]] = {
    "encode": ("encode prompts (or token ids) to a safetensors file", "fastenc.cli:add_encode_command"),
    "info": ("versions, GPU, usable backends and the cache folder", "fastenc.cli:add_info_command"),
    "demo": ("the main job: load, encode, time, export + verify; keeps its output in ./fastenc-demo",
             "fastenc.demo:add_demo_command"),
    "export": ("export ONNX / TensorRT / AOTInductor artifacts and verify them",
               "fastenc.exporters.cli:add_export_command"),
    "verify": ("check exported artifacts against the torch model", "fastenc.exporters.cli:add_verify_command"),
    "triton-repo": ("write a Triton Inference Server model repository from an export directory",
                    "fastenc.exporters.triton_repo:add_triton_command"),
    "tune": ("measure which engine runs the cpu backend fastest here (under the fidelity floor) and cache the plan",
             "fastenc.cli:add_tune_command"),
    "cache": ("show (info) or delete (clear) the files fastenc keeps between runs",
              "fastenc.cli:add_cache_command"),
}

#: Output locations checked before any work: command -> (attribute, flag, is a folder)
OUTPUTS = {"encode": ("output", "-o/--output", False), "demo": ("out", "--out", True),
           "export": ("out", "--out", True), "triton-repo": ("out", "-o/--out", True)}


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (flag named, pointer to --help) and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, _one_line(f"{self.prog}: error: {message} (see `{self.prog} --help`)") + "\n")


# ---------------------------------------------------------------------------- flag types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def device_arg(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}; choose cpu, cuda or cuda:N")
    return text


def add_model_args(p: argparse.ArgumentParser, *, backends: bool = True) -> None:
    """--checkpoint/--size/--random-init/--tokenizer/--backend/--device/--dtype, shared by encode and demo."""
    from .config import SIZES
    from .hub import RELEASED

    released = ", ".join(f"{s} = {r}" for s, r in RELEASED.items())
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR|FILE|HUB_ID",
                   help="checkpoint folder, .safetensors file or Hugging Face hub id (with --backend onnxruntime, "
                        "tensorrt or aoti: a folder written by `fastenc export`)")
    g.add_argument("--size", choices=list(SIZES),
                   help=f"named size: without --checkpoint, the released checkpoint of that size ({released}; "
                        "downloaded from the hub), or random weights with --random-init")
    g.add_argument("--random-init", action="store_true",
                   help="random weights of --size (default base): exercises the code and the timings only")
    g.add_argument("--tokenizer", metavar="DIR|HUB_ID",
                   help="T5 tokenizer: a folder with tokenizer.json or spiece.model (e.g. Flux's tokenizer_2) or a "
                        "hub id (default: one found in the checkpoint folder)")
    if backends:
        g.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="what runs the model (default auto: triton on a GPU, cpu on CPUs with native bf16, "
                            "else torch)")
    g.add_argument("--device", type=device_arg, metavar=DEVICE_METAVAR,
                   help="where the model runs (default: cuda when a GPU is visible, else cpu)")
    g.add_argument("--dtype", choices=DTYPES + ("int8",) if backends else DTYPES,
                   help="compute precision (default: bf16 on a GPU; on the CPU the backend's own: cpu = bf16 + "
                        "int8, torch = fp32)" + ("; int8 runs the dynamic-int8 ONNX artifact `fastenc export --int8` "
                                                 "builds (--backend onnxruntime)" if backends else ""))


def check_device(device: str | None) -> None:
    """``--device cuda`` on a machine where torch sees no GPU: one line, before anything is loaded."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device}: torch {torch.__version__} sees no CUDA GPU here; "
                                 "use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise BackendUnavailable(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def check_output(flag: str, path: str | os.PathLike, *, folder: bool, parents: bool = False) -> None:
    """Fail before any work when ``path`` cannot be written: under a file, in a read-only folder, wrong kind,
    in a folder that does not exist (unless ``parents``: the caller creates them and says so)."""
    from .fileio import check_parent

    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    if not parents:
        check_parent(flag, path)  # a typo is not a request for new folders (nor is a new folder's missing parent)
    ancestor = path if folder else path.parent
    ancestor = ancestor.absolute()
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is a file, not a folder")
    try:  # a real probe: permission bits do not tell about read-only mounts (or root)
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".fastenc-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {ancestor} ({exc.strerror or exc})") from None


def check_stdout(flag: str) -> None:
    """``-o -`` writes binary safetensors to stdout: refused, before any work, when that is a terminal."""
    try:
        terminal = sys.stdout.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if terminal:
        raise ConfigError(f"{flag} -: standard output is a terminal; redirect it to a file or a pipe "
                          "(e.g. `-o - > out.safetensors`), or give a file name")
    if not hasattr(sys.stdout, "buffer"):
        raise ConfigError(f"{flag} -: standard output takes no bytes here; give a file name")


def check_prompts(prompts: list[str], what: str = "prompt") -> None:
    """Undecodable command-line bytes arrive as lone surrogates: one clear line instead of a crash later."""
    for i, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            ch = prompt[exc.start]
            byte = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"U+{ord(ch):04X}"
            raise InputError(f"{what} {i + 1} is not valid UTF-8 text ({byte} at character {exc.start}); pass "
                             "prompts as UTF-8 (check the terminal's locale, e.g. LANG=C.UTF-8)") from None


def checkpoint_from_args(args) -> str | None:
    """The checkpoint the model flags name, hub ids fetched (or refused offline) before torch is imported."""
    if args.checkpoint is not None and args.random_init:
        raise ConfigError("--checkpoint and --random-init exclude each other")
    if args.random_init:
        return None
    checkpoint = args.checkpoint
    if checkpoint is None:
        if args.size is None:
            raise ConfigError("pass --checkpoint DIR|HUB_ID, --size base for the released base student "
                              "(LifuWang/DistillT5, from the hub), or --size SIZE --random-init for random weights")
        from .hub import released_checkpoint

        checkpoint = released_checkpoint(args.size)
    if Path(os.path.expanduser(checkpoint)).exists():
        return checkpoint
    from .fileio import looks_local, missing_path_message

    if looks_local(checkpoint):  # ./x, ../x, /x, ~/x, a symbolic link: never a hub id
        raise CheckpointError(missing_path_message(checkpoint))
    if _HUB_ID.fullmatch(checkpoint):
        from .hub import download_checkpoint

        return str(download_checkpoint(checkpoint))
    return checkpoint


def load_from_args(args, checkpoint: str | None = "", **extra):
    """fastenc.load from the model flags (``checkpoint``: what :func:`checkpoint_from_args` gave, when the
    caller already asked); errors speak in flags."""
    checkpoint = checkpoint_from_args(args) if checkpoint == "" else checkpoint
    check_device(args.device)
    if args.dtype == "int8" and getattr(args, "backend", "auto") != "onnxruntime":
        raise ConfigError("--dtype int8 runs the int8 ONNX artifact of `fastenc export --int8`: pass --backend "
                          "onnxruntime and the export folder as --checkpoint (the cpu backend's int8 GEMMs need no "
                          "flag: it is the default on the CPU)")
    from . import load

    return load(checkpoint, size=args.size, random_init=args.random_init, backend=getattr(args, "backend", "auto"),
                device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, **extra)


# ---------------------------------------------------------------------------- encode


def add_encode_command(sub) -> None:
    from .config import TARGET_MAX_LENGTH

    p = sub.add_parser(
        "encode", help=COMMANDS["encode"][0],
        description="Encode prompts (tokenised like the --target pipeline does) or token ids (--ids; no tokenizer "
                    "needed, works offline) and write text_embeddings [B, L, P] and attention_mask [B, L] to a "
                    "safetensors file.",
    )
    add_model_args(p)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to encode (needs a tokenizer)")
    p.add_argument("--ids", action="append", metavar="IDS|FILE",
                   help="token ids instead of prompts: comma-separated ids (repeat the flag for more rows), or a "
                        ".npy file / .safetensors file (tensor input_ids, optional attention_mask) holding [B, L] "
                        "or [L]; rows are padded to the target's length")
    p.add_argument("--target", choices=list(TARGET_MAX_LENGTH), default="flux-dev",
                   help="pipeline whose sequence length and masking to follow (default flux-dev: "
                        + ", ".join(f"{t} {n}" for t, n in TARGET_MAX_LENGTH.items()) + " tokens)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="safetensors file to write (its folder must exist); - writes the file's bytes to standard "
                        "output (a pipe or a redirect, not a terminal) and the summary line to stderr")
    p.set_defaults(func=cmd_encode)


def read_ids(values: list[str]):
    """--ids values -> (ids int64 [B, n], mask [B, n] or None) as numpy arrays, rows right-padded with 0."""
    import numpy as np

    if len(values) == 1 and values[0].endswith((".npy", ".safetensors")):
        file = Path(values[0])
        if not file.is_file():
            raise ConfigError(f"--ids {file}: no such file")
        mask = None
        try:
            if file.suffix == ".npy":
                ids = np.load(file, allow_pickle=False)
            else:
                from safetensors.numpy import load_file

                tensors = load_file(str(file))
                if "input_ids" not in tensors and len(tensors) != 1:
                    raise ConfigError(f"--ids {file}: no tensor named input_ids (has {', '.join(sorted(tensors))})")
                ids = tensors.get("input_ids", next(iter(tensors.values())))
                mask = tensors.get("attention_mask")
        except (ValueError, OSError) as exc:
            raise ConfigError(f"--ids {file}: not a readable {file.suffix} file ({exc})") from None
        if ids.ndim == 1:
            ids = ids[None]
            mask = mask[None] if mask is not None and mask.ndim == 1 else mask
        if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"--ids {file}: expected integer token ids [B, L] or [L], got {ids.dtype} "
                              f"{list(ids.shape)}")
        if mask is not None and (mask.shape != ids.shape or not np.isin(mask, (0, 1)).all()):
            raise ConfigError(f"--ids {file}: attention_mask must be 0/1 with the shape of input_ids "
                              f"{list(ids.shape)}, got {list(mask.shape)}")
        return ids.astype(np.int64), (None if mask is None else mask.astype(np.int64))
    rows = []
    for value in values:
        if value.endswith((".npy", ".safetensors")):
            raise ConfigError(f"--ids {value}: give one file, or comma-separated ids (not both)")
        try:
            rows.append([int(x) for x in value.replace(" ", "").split(",") if x != ""])
        except ValueError:
            raise ConfigError(f"--ids {value!r}: expected comma-separated integers like 3,27,1, or one .npy or "
                              ".safetensors file") from None
        if not rows[-1]:
            raise ConfigError("--ids: an empty row")
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def cmd_encode(args) -> int:
    if bool(args.prompts) == bool(args.ids):
        raise ConfigError("give prompts or --ids (token ids), not both" if args.prompts else
                          "nothing to encode: give prompts, or token ids with --ids")
    check_prompts(args.prompts)
    ids = read_ids(args.ids) if args.ids else None  # checked before the model is loaded
    checkpoint = checkpoint_from_args(args)
    where = "none beside the checkpoint" if checkpoint is not None else "random weights come without one"
    no_tokenizer = ConfigError(f"no tokenizer for these prompts ({where}): pass --tokenizer DIR (a folder with "
                               "tokenizer.json, e.g. Flux's tokenizer_2), or token ids with --ids")
    if ids is None and args.tokenizer is None:  # said before the model (and its cpu plan) is built
        from .api import tokenizer_beside

        local = Path(os.path.expanduser(checkpoint)) if checkpoint is not None else None
        if local is None or (local.exists() and tokenizer_beside(local if local.is_dir() else local.parent) is None):
            raise no_tokenizer
    enc = load_from_args(args, checkpoint)
    if ids is None:
        if enc.tokenizer is None:
            raise no_tokenizer
        out = enc.encode(args.prompts, target=args.target)
        embeds, mask = out.embeds, out.mask
    else:
        embeds, mask = _encode_ids(enc, *ids, target=args.target)
    return _write_embeddings(Path(args.output), embeds, mask, args.target)


def _encode_ids(enc, ids, mask, *, target: str):
    import numpy as np
    import torch

    from .targets import get_target

    row = get_target(target)
    length = row.max_length
    if ids.shape[1] > length:
        raise ConfigError(f"--ids: rows of {ids.shape[1]} ids; --target {target} takes at most {length}")
    vocab = enc.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ConfigError(f"--ids: token id {bad} is out of range for this model's vocabulary [0, {vocab})")
    if mask is None:
        mask = np.ones_like(ids)
    pad = length - ids.shape[1]
    ids_t = torch.from_numpy(np.pad(ids, ((0, 0), (0, pad))))  # [B, L]; 0 = <pad>
    mask_t = torch.from_numpy(np.pad(mask, ((0, 0), (0, pad))))  # [B, L]
    with torch.inference_mode():
        embeds = row.finish(enc(ids_t, mask_t if row.masked else None), mask_t)  # [B, L, P], as the pipeline has it
    return embeds, mask_t


def _write_embeddings(path: Path, embeds, mask, target: str) -> int:
    from safetensors.torch import save, save_file

    from .caches import human
    from .fileio import atomic_write

    tensors = {"text_embeddings": embeds.float().cpu().contiguous(), "attention_mask": mask.cpu().contiguous()}
    shapes = f"text_embeddings {list(embeds.shape)} float32, attention_mask {list(mask.shape)}"
    if str(path) == STDOUT:  # the safetensors bytes on stdout; what is said goes to stderr
        data = save(tensors, metadata={"target": target})
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        sys.stderr.write(f"wrote {human(len(data))} of safetensors to standard output: {shapes}\n")
        return 0
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"target": target}))
    sys.stdout.write(f"wrote {path} ({human(path.stat().st_size)}): {shapes}\n")
    return 0


# ---------------------------------------------------------------------------- info, cache


def add_info_command(sub) -> None:
    p = sub.add_parser("info", help=COMMANDS["info"][0],
                       description="Report versions, GPUs, which backends are usable here and where fastenc keeps "
                                   "its caches. Reads package metadata, nvidia-smi and /proc/cpuinfo only.")
    p.add_argument("--probe", action="store_true",
                   help="also import torch and report what it sees (CUDA devices, threads); takes seconds")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .info import collect

    for key, value in collect(probe=args.probe).items():
        sys.stdout.write(f"{key:<22} {value}\n")
    return 0


def add_tune_command(sub) -> None:
    from .backends.cpu_plan import DEFAULT_BUDGET_S, MIN_COS, MIN_WORST, TUNE_SHAPES

    shapes = ", ".join(f"{b}x{s}" for b, s in TUNE_SHAPES)
    p = sub.add_parser(
        "tune", help=COMMANDS["tune"][0],
        description="Search the cpu backend's plan for a checkpoint on this machine ahead of time (fastenc.load "
                    "otherwise does it at the first load): every installed engine and op-table variant is checked "
                    f"against the fp32 model on held-out inputs (mean cos-sim >= {MIN_COS}, worst token >= "
                    f"{MIN_WORST}) and timed at {shapes}; the fastest that meets the floor is cached per CPU, "
                    "thread count, library versions and checkpoint. Prints the measured table.")
    add_model_args(p, backends=False)
    p.add_argument("--budget", type=positive_float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                   help=f"time the search may spend (default {DEFAULT_BUDGET_S:.0f}); candidates not started by then "
                        "are skipped and listed")
    p.add_argument("--force", action="store_true", help="search again even where a plan is cached")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    import time

    from .backends import cpu_fast_path
    from .backends.cpu import source_fingerprint
    from .backends.cpu_plan import plan_key, prepare_planned, read_plan, MIN_COS, MIN_WORST, TUNE_SHAPES

    if args.dtype not in (None, "bf16"):
        raise ConfigError(f"--dtype {args.dtype}: tune plans the cpu backend's own precision (bf16 where the CPU "
                          "has it natively, else fp32); leave --dtype out")
    if args.device not in (None, "cpu"):
        raise ConfigError(f"--device {args.device}: tune plans the cpu backend; use --device cpu or leave it out")
    precision = "bf16" if cpu_fast_path()[0] else "fp32"  # never emulated bf16
    if args.dtype == "bf16" and precision == "fp32":
        raise ConfigError(f"--dtype bf16: this CPU has no native bf16 ({cpu_fast_path()[1]}); its plan is fp32")
    args.device, args.dtype = "cpu", "fp32"
    args.backend = "torch"  # loaded as is: the plan is searched against these fp32 weights
    enc = load_from_args(args, cache=False)
    source = enc.source if enc.random_init else source_fingerprint(enc.source)
    key = plan_key(source, enc.model.config, TUNE_SHAPES, MIN_COS, MIN_WORST, precision)
    cached = None if args.force else read_plan(key)
    out = sys.stdout
    t0 = time.perf_counter()
    prepare_planned(enc.model, source=source, budget_s=args.budget, retune=args.force, precision=precision,
                    say=lambda text: out.write(f"  {text}\n") or out.flush())
    plan = enc.model.cpu_plan
    if cached is not None:
        out.write(f"cached plan (searched earlier in {plan.tune_s:.1f} s; --force to search again), loaded in "
                  f"{time.perf_counter() - t0:.1f} s:\n")
    out.write(plan.table() + "\n")
    from .backends.cpu import plan_cache_dir

    out.write(f"plan: {plan_cache_dir() / (key + '.json')}\n")
    return 0


def add_cache_command(sub) -> None:
    p = sub.add_parser(
        "cache", help=COMMANDS["cache"][0],
        description="fastenc keeps files between runs under $FASTENC_CACHE_DIR (default $XDG_CACHE_HOME/fastenc, "
                    "i.e. ~/.cache/fastenc): cpu-plans/ (cpu backend plans), gpu-probes/ (triton first-contact "
                    "verdicts), gpu-tuning/ (triton autotuning choices per GPU kind), "
                    "embeddings/ (embedding cache disk store), fid-stats/ (FID reference statistics) and bench/ (benchmark models and exports; $FASTENC_BENCH_CACHE overrides). "
                    "`clear` deletes only files fastenc named itself there.",
    )
    p.add_argument("action", choices=("info", "clear"), help="info: where and how much; clear: delete")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="which caches to clear: {cpu-plans,gpu-probes,gpu-tuning,embeddings,fid-stats,bench} (default: all)")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args) -> int:
    from . import caches

    out = sys.stdout
    known = [cache.name for cache in caches.cache_dirs()]
    for name in args.names:
        if name not in known:
            raise ConfigError(f"unknown cache {name!r}; choose from {', '.join(known)}")
    if args.action == "info":
        if args.names:
            raise ConfigError("cache info takes no names (they select what `fastenc cache clear` deletes)")
        out.write(f"fastenc caches under {caches.cache_root()}  ($FASTENC_CACHE_DIR to move them)\n")
        for cache in caches.cache_dirs():
            files, size = cache.usage()
            out.write(f"  {cache.name:<11} {caches.human(size):>9} {files:>6} files  {cache.path}\n"
                      f"  {'':<11} {cache.what}\n")
        out.write(f"not fastenc's: the Hugging Face hub cache {caches.hub_cache()} holds checkpoints and tokenizers "
                  "downloaded by hub id (see `hf cache ls`, `hf cache rm`)\n")
        out.write(f"delete with `fastenc cache clear [{'|'.join(known)}]`\n")
        return 0
    freed = 0
    for cache, files, size in caches.clear(args.names or None):
        freed += size
        out.write(f"cleared {cache.name:<11} {caches.human(size):>9} in {files} files  ({cache.path})\n")
    out.write(f"freed {caches.human(freed)}\n")
    return 0


# ---------------------------------------------------------------------------- parser, main


def _adder(command: str):
    module, _, func = COMMANDS[command][1].partition(":")
    return getattr(importlib.import_module(module), func)


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The ``fastenc`` parser. ``command``: the subcommand to build in full ("*": all of them; None: only
    their names and one-line help, which imports nothing heavy)."""
    parser = Parser(prog="fastenc", description="Small, fast distilled T5 text encoders for Flux, SD3 and "
                                                "PixArt-alpha: encode, export, verify and serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks of unexpected errors")
    parser.add_argument("--version", action="version", version=f"fastenc {_version()}", help="print the version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser, title="commands")
    for name, (text, _) in COMMANDS.items():
        if command == "*" or command == name:
            _adder(name)(sub)
        else:
            sub.add_parser(name, help=text, add_help=False)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _command_of(argv: list[str]) -> str | None:
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


_KWARG = re.compile(r"\b(backend|device|dtype|tokenizer|size|random_init)="
                    r"(?:'([^']*)'|\"([^\"]*)\"|([\w.:/-]+))")


def cli_words(message: str) -> str:
    """Python-API wording in a library message, in flags: ``device='cpu'`` -> ``--device cpu``."""
    def flag(m: re.Match) -> str:
        name, value = m[1], next(v for v in m.groups()[1:] if v is not None)
        return "--random-init" if name == "random_init" else f"--{name} {value}"

    return _KWARG.sub(flag, message.replace(" to fastenc.load", ""))


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates cannot crash the report


def _os_error(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        other = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{other}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


#: Exit status when the reader of stdout went away (`fastenc cache info | head -1`): 128 + SIGPIPE, as
#: the shell reports a program the signal ended; nothing is printed.
BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            _flush_stdout()  # a reader that went away is seen here, not at interpreter exit
    except BrokenPipeError:
        _drop_stdout()
        return BROKEN_PIPE


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (ValueError, AttributeError, OSError):  # closed or replaced by the caller: nothing to flush
        pass


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that nothing more (the flush at exit included) fails on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (captured in tests): nothing to protect
        pass


def _main(argv: list[str] | None) -> int:
    if argv is None:  # undecodable argv bytes (lone surrogates) echoed in a path must not crash the output
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from . import hub

    hub.speak_cli(True)
    prog = "fastenc"
    try:
        if args.command in OUTPUTS and getattr(args, OUTPUTS[args.command][0], None) is not None:
            attr, flag, folder = OUTPUTS[args.command]
            value = getattr(args, attr)
            if not folder and str(value) == STDOUT:
                check_stdout(flag)
            else:
                check_output(flag, value, folder=folder)
        return int(args.func(args) or 0)
    except FastencError as exc:
        sys.stderr.write(_one_line(f"{prog}: error: {cli_words(str(exc))}") + "\n")
        return 2
    except BrokenPipeError:  # the reader of stdout went away: main() ends quietly
        raise
    except OSError as exc:
        sys.stderr.write(_one_line(f"{prog}: error: {_os_error(exc)}") + "\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except MemoryError:
        sys.stderr.write(f"{prog}: error: out of memory (try a smaller batch, --max-seq or --dtype bf16)\n")
        return 1
    except Exception as exc:  # a bug: still one line, the traceback with -v
        if args.verbose:
            raise
        sys.stderr.write(_one_line(f"{prog}: internal error: {type(exc).__name__}: {exc} "
                                   "(run with -v for the traceback)") + "\n")
        return 1
    finally:
        hub.speak_cli(False)


if __name__ == "__main__":
    sys.exit(main())
