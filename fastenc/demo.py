"""``fastenc demo``: the main job, end to end, offline when it has to be.

Loads a checkpoint (path or hub id) or, with none, a random-init student (said loudly), encodes
prompts (or token ids when no T5 vocabulary is reachable) and keeps them, times the forward pass,
exports ONNX and verifies it against the torch model, then times ONNX Runtime. Everything it makes
stays in one folder (``./fastenc-demo`` by default, ``--out`` to move it), listed at the end with
the commands to try next.

Timings: every torch backend is timed before any ONNX Runtime session exists in the process (ORT's
idle worker threads spin and slow torch down); each row states its repeats, median and min-max.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("fastenc")

DEFAULT_OUT = "fastenc-demo"
#: What the demo keeps in --out (model_repository: where its closing advice points `fastenc triton-repo`).
#: The folder may hold nothing else, so that deleting it whole (as the report advises) loses nothing of
#: the user's: the rule ``fastenc export`` applies to its --out.
DEMO_NAMES = frozenset({"token_ids.safetensors", "embeddings.safetensors", "export", "model_repository"})
_DEMO_LEFTOVERS = re.compile(r"\.export\.(staging|new|old)-\d+-[0-9a-f]{8}")  # of a killed export into export/
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
    from .cli import DEVICE_METAVAR, DTYPES, device_arg, positive_int
    from .config import SIZES, TARGET_MAX_LENGTH

    p = sub.add_parser(
        "demo", help="the main job: load, encode, time, export + verify; keeps its output in ./fastenc-demo",
        description="Run the whole path once: load (a random-init student when no --checkpoint is given), encode "
                    "the prompts, time the forward pass, export ONNX, verify it against the torch model and time "
                    "ONNX Runtime. Works offline. Everything it writes stays in --out (default ./fastenc-demo); "
                    "it ends with what each file is and the commands to try next.",
    )
    p.add_argument("--checkpoint", metavar="DIR|FILE|HUB_ID",
                   help="checkpoint folder, .safetensors file or hub id (default: random weights of --size)")
    p.add_argument("--size", choices=list(SIZES), default="base",
                   help="size of the random-init student used when no --checkpoint is given (default base)")
    p.add_argument("--tokenizer", metavar="DIR|HUB_ID",
                   help="T5 tokenizer folder (e.g. Flux's tokenizer_2) or hub id; without one the demo encodes "
                        "synthetic token ids")
    p.add_argument("--target", choices=list(TARGET_MAX_LENGTH), default="flux-dev",
                   help="pipeline whose sequence length to use (default flux-dev, 512 tokens)")
    p.add_argument("--device", type=device_arg, metavar=DEVICE_METAVAR,
                   help="where the model runs (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="compute precision (default: the backend's own)")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed forward passes per row, after one warm-up (default 5)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export, verify and ONNX Runtime timing")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                   help=f"folder that keeps what the demo makes (default ./{DEFAULT_OUT}; reruns reuse the export)")
    p.add_argument("prompts", nargs="*", default=DEMO_PROMPTS, metavar="PROMPT",
                   help="prompts to encode (default: three sample prompts)")
    p.set_defaults(func=run_demo)


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when under it (shorter commands), else absolute."""
    path = path.absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_demo_out(folder: Path, *, export: bool = True) -> None:
    """--out may be new, empty, or hold only what a demo writes (the rule of ``fastenc export --out``);
    its export/ subfolder is held to export's own rule. Checked before anything is loaded or written."""
    from .exporters.transaction import check_target

    check_target(folder, DEMO_NAMES, maker="the demo", example=DEFAULT_OUT, ignore=_DEMO_LEFTOVERS,
                 why="the demo keeps what it makes in a folder of its own, to be deleted whole")
    if export and (folder / "export").is_dir():
        from .exporters.pipeline import EXPORT_NAMES

        check_target(folder / "export", EXPORT_NAMES)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from . import load
    from .cli import check_device, check_prompts
    from .config import max_length_for
    from .info import describe_backend

    out = sys.stdout
    check_prompts(args.prompts)
    check_device(args.device)
    folder = Path(args.out)
    check_demo_out(folder, export=not args.no_export)
    folder.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        enc = load(args.checkpoint, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    else:
        out.write(BANNER.format(size=args.size))
        enc = load(size=args.size, random_init=True, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    label = describe_backend(enc)
    out.write(f"encoder: {label}; {enc.extra_repr()}\n")
    n_params = sum(p.numel() for p in enc.model.parameters())
    out.write(f"parameters: {n_params / 1e6:.1f} M\n")

    made: list[tuple[Path, str]] = []
    L = max_length_for(args.target)
    if enc.tokenizer is not None:
        emb = enc.encode(args.prompts, target=args.target)
        batch = enc.tokenizer(args.prompts, max_length=L, warn=False)
        ids, mask, embeds = batch.input_ids, batch.attention_mask, emb.embeds
        out.write(f"encoded {len(args.prompts)} prompts for {args.target}: embeds {list(embeds.shape)}, "
                  f"{emb.num_truncated} truncated\n")
    else:
        out.write("no T5 tokenizer reachable (pass --tokenizer FOLDER); encoding synthetic token ids instead\n")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, enc.config.vocab_size, (len(args.prompts), L), generator=gen)  # [B, L]
        ids[:, -1] = 1  # </s>
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            embeds = enc(ids)  # [B, L, P]
        out.write(f"token ids {list(ids.shape)} -> embeddings {list(embeds.shape)}\n")
    if not torch.isfinite(embeds.float()).all():
        out.write("ERROR: non-finite embeddings\n")
        return 1
    made += _save_inputs_outputs(folder, ids, mask, embeds, args)

    # torch backends first: no ONNX Runtime session may exist in this process while they are timed
    rows = _time_rows(label, enc, ids, L, args.repeats)
    exported = None
    if not args.no_export:
        exported = _export_and_verify(args, folder, out)
        if exported is None:
            return 1
        result, ort = exported
        made += [(p, _describe_artifact(p)) for p in result.artifacts]
        rows += _time_rows(describe_backend(ort), ort, ids, L, args.repeats)
        del ort

    out.write(f"\nlatency, batch 1 (median and min-max of {args.repeats} timed runs after 1 warm-up; torch timed "
              f"before any ONNX Runtime session existed; {torch.get_num_threads()} torch threads)\n")
    out.write(f"{'backend':<34} {'L':>4} {'median ms':>10} {'min-max ms':>16}\n")
    for name, length, t in rows:
        spread = f"{min(t):.1f}-{max(t):.1f}"
        out.write(f"{name:<34} {length:>4} {statistics.median(t):>10.1f} {spread:>16}\n")
    _report(out, folder, made, args, exported is not None, enc.tokenizer is not None)
    return 0


def _time_rows(label: str, enc, ids, L: int, repeats: int) -> list[tuple[str, int, list[float]]]:
    import torch

    rows = []
    with torch.inference_mode():
        for length in sorted({min(77, L), L}):
            x = ids[:1, :length]  # [1, length]
            rows.append((label, length, _time(lambda: enc(x), repeats)))
    return rows


def _save_inputs_outputs(folder: Path, ids, mask, embeds, args) -> list[tuple[Path, str]]:
    from safetensors.torch import save_file

    from .fileio import atomic_write

    meta = {"target": args.target}
    ids_file, emb_file = folder / "token_ids.safetensors", folder / "embeddings.safetensors"
    tensors = {"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}
    atomic_write(ids_file, lambda p: save_file(tensors, str(p), metadata=meta))
    emb = {"text_embeddings": embeds.float().cpu().contiguous(), "attention_mask": mask.cpu().contiguous()}
    atomic_write(emb_file, lambda p: save_file(emb, str(p), metadata=meta))
    what = "the demo prompts' token ids" if getattr(args, "tokenizer", None) or args.checkpoint else \
        "the token ids encoded"
    return [(ids_file, f"{what}: input_ids + attention_mask {list(ids.shape)} (fastenc encode --ids takes it)"),
            (emb_file, f"their embeddings: text_embeddings {list(embeds.shape)} float32 + attention_mask")]


def _export_and_verify(args: argparse.Namespace, folder: Path, out):
    """Export ONNX (+ the ONNX Runtime-optimised copy) into ``folder/export``, verify, load it as a backend."""
    from . import load
    from .exporters.pipeline import ExportRequest, export
    from .exporters.verify import VerificationFailed

    target = folder / "export"
    if args.checkpoint:
        req = ExportRequest(out=target, checkpoint=str(args.checkpoint), tokenizer=args.tokenizer,
                            max_batch=len(args.prompts), target=args.target)
    else:  # the same seeded random weights the demo ran
        req = ExportRequest(out=target, size=args.size, random_init=True, seed=0, tokenizer=args.tokenizer,
                            max_batch=len(args.prompts), target=args.target)
    out.write(f"\nexporting ONNX to {_shown(target)} (reused when its inputs did not change) ...\n")
    try:
        result = export(req)
    except VerificationFailed as exc:
        out.write(exc.report.table() + "\nERROR: exported model missed its accuracy bound\n")
        return None
    if result.report is not None:
        out.write(result.report.table() + "\n")
    return result, load(result.directory, backend="onnxruntime", cache=False)


def _describe_artifact(path: Path) -> str:
    name, parent = path.name, path.parent.name
    if name.endswith(".onnx"):
        if "ort" in name or "opt" in name:
            return "the same graph optimised by ONNX Runtime for this machine (what --backend onnxruntime runs)"
        return "ONNX model: input_ids [B, L], attention_mask [B, L] -> text_embeddings [B, L, P]"
    if parent == "trt" or name.endswith((".plan", ".engine")):
        return "TensorRT engine"
    if name.endswith(".pt2"):
        return "AOTInductor package"
    if name == "config.json":
        return "the encoder's config"
    if name == "tokenizer.json":
        return "the T5 tokenizer (used by triton-repo)"
    if name.endswith(".json"):
        return "export record (inputs, versions, hashes)"
    return "export artifact"


def _report(out, folder: Path, made: list[tuple[Path, str]], args, exported: bool, has_tokenizer: bool) -> None:
    from .caches import human, tree_size

    here = _shown(folder)
    out.write(f"\nkept in {here}/ ({human(tree_size(folder))}; delete it with `rm -r {shlex.quote(here)}`):\n")
    seen = set()
    for path, what in made:
        if path in seen:
            continue
        seen.add(path)
        rel = os.path.relpath(path, folder) if path.is_absolute() or path.exists() else str(path)
        size = human(tree_size(path)) if path.exists() else "-"
        out.write(f"  {rel:<40} {size:>9}  {what}\n")
    model = (f"--checkpoint {shlex.quote(str(args.checkpoint))}" if args.checkpoint
             else f"--size {args.size} --random-init")
    q = shlex.quote
    ids = q(f"{here}/token_ids.safetensors")
    out.write("\nnext:\n")
    out.write(f"  fastenc encode {model} --ids {ids} -o embeddings.safetensors    # same embeddings, from the CLI\n")
    if has_tokenizer:
        tok = f" --tokenizer {q(args.tokenizer)}" if args.tokenizer else ""
        out.write(f"  fastenc encode {model}{tok} \"a prompt\" -o embeddings.safetensors\n")
    else:
        out.write(f"  fastenc encode {model} --tokenizer DIR \"a prompt\" -o embeddings.safetensors"
                  "    # DIR: a folder with tokenizer.json, e.g. Flux's tokenizer_2\n")
    if exported:
        export_dir = q(f"{here}/export")
        out.write(f"  fastenc encode --backend onnxruntime --checkpoint {export_dir} --ids {ids} -o embeddings.safetensors"
                  "    # the exported model\n")
        out.write(f"  fastenc verify {export_dir}    # every artifact against the torch model\n")
        if has_tokenizer:
            out.write(f"  fastenc triton-repo {export_dir} -o {q(f'{here}/model_repository')}    "
                      "# Triton Inference Server repository\n")
        else:
            out.write(f"  fastenc triton-repo {export_dir} -o {q(f'{here}/model_repository')} --tokenizer DIR    "
                      "# Triton Inference Server repository (needs a tokenizer)\n")
    out.write("  python -m bench.latency --quick    # from a source checkout: the benchmark table (see bench/README.md)\n")
    out.write("  fastenc cache info    # where fastenc keeps files between runs\n")
