"""The text stage of Wan: its umT5-XXL encoder against a base-size umT5 student, time and memory.

    python -m bench.umt5 [--teacher-layers N] [--backends transformers,torch,cpu,triton] [--batch 1] [--seq 512]
                         [--device cpu|cuda] [--threads N] [--quick] [--save]

The teacher is Wan's text encoder with random weights (umT5-XXL: d_model 4096, 24 layers, 64 heads, every
layer its own relative-attention-bias table, vocabulary 256,384: 5.7 B parameters, 22.7 GB in fp32); the
student is umt5-base (768 wide, 12 layers, the same vocabulary) under a projector to Wan's text width 4096.
Both encode ``--seq`` tokens (Wan's 512 by default) through each backend: ``transformers`` is
``UMT5EncoderModel`` (what ``WanPipeline`` runs), ``torch``, ``cpu`` (the CPU) and ``triton`` (a CUDA GPU:
fastenc's kernels under CUDA graphs) are fastenc's; the default is those the device runs. Speed and memory do
not depend on the weights' values.

Free memory is checked before anything is built: when the machine cannot hold the teacher the run stops
and says so, naming the ``--teacher-layers`` that fits (a teacher of fewer layers: the time per layer is
the same, and the table adds the full depth scaled from it). Each (model, backend) runs in its own fresh
process on the CPU (as in :mod:`bench.latency`, whose measuring it uses): p20/p50/p80 latency, the peak
memory a call holds above the process before the model was built, and the weights' size. Rows go to a run
folder under the bench cache (``--save``: also ``bench/results/umt5.csv``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
from pathlib import Path

import torch

from fastenc.config import EncoderConfig

from . import common, exports, latency

#: Wan's umT5-XXL and the base-size student (per-layer bias tables, umT5's vocabulary, Wan's text width).
UMT5_XXL = EncoderConfig(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384, projection_dim=None,
                         per_layer_bias=True, name="umt5-xxl")
UMT5_BASE = EncoderConfig(d_model=768, d_ff=2048, num_layers=12, num_heads=12, vocab_size=256384, projection_dim=4096,
                          per_layer_bias=True, name="umt5-base")
#: ``--tiny``: the same shapes' kinds, small (a self-test of the benchmark, seconds).
TINY = (EncoderConfig(d_model=128, d_ff=256, num_layers=4, num_heads=4, d_kv=32, vocab_size=512, projection_dim=None,
                      per_layer_bias=True, name="tiny-umt5-xxl"),
        EncoderConfig(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=512, projection_dim=128,
                      per_layer_bias=True, name="tiny-umt5"))
BACKENDS = ("transformers", "torch", "cpu", "triton")
#: The backends run when --backends is not given, per device type.
DEFAULT_BACKENDS = {"cpu": ("transformers", "torch", "cpu"), "cuda": ("transformers", "torch", "triton")}
WAN_LENGTH = 512  # the wan target's max_sequence_length
HEADROOM = 1.3  # weights x this must fit in the available memory (activations, allocator slack)


def teacher_config(full: EncoderConfig, layers: int) -> EncoderConfig:
    """``full`` cut to its first ``layers`` layers (the same config when all of them)."""
    if layers == full.num_layers:
        return full
    return full.replace(num_layers=layers, name=f"{full.name}-{layers}of{full.num_layers}L")


def bytes_per_param(device: torch.device) -> int:
    return 2 if device.type == "cuda" else 4  # bench.latency's dtypes: bf16 on a GPU, fp32 on the CPU


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def layers_that_fit(full: EncoderConfig, free: int, per_param: int) -> int:
    """The most layers of ``full`` whose weights (x HEADROOM) fit in ``free`` bytes (0: not even the embedding)."""
    fits = [n for n in range(1, full.num_layers + 1)
            if common.param_count(teacher_config(full, n)) * per_param * HEADROOM <= free]
    return max(fits, default=0)


def memory_verdict(full: EncoderConfig, layers: int, student: EncoderConfig, free: int, per_param: int) -> str | None:
    """None when the teacher (of ``layers`` layers) and the student fit one at a time, else what to do, plainly."""
    need = common.param_count(teacher_config(full, layers)) * per_param
    if need * HEADROOM <= free:
        return None
    gb = 1e9
    what = f"umT5-XXL with {layers} of its {full.num_layers} layers" if layers < full.num_layers else "umT5-XXL"
    head = (f"{what} needs ~{need / gb:.1f} GB for its {'bf16' if per_param == 2 else 'fp32'} weights "
            f"({common.param_count(teacher_config(full, layers)) / 1e9:.2f} B parameters) plus {HEADROOM - 1:.0%} headroom; "
            f"this machine has {free / gb:.1f} GB available, so it cannot hold it")
    fit = layers_that_fit(full, free, per_param)
    if fit:
        fit_need = common.param_count(teacher_config(full, fit)) * per_param / gb
        return (f"{head}. Run with --teacher-layers {fit} (~{fit_need:.1f} GB) to time {fit} of its layers "
                f"(the table scales the time to all {full.num_layers}), or on a machine with more memory")
    student_gb = common.param_count(student) * per_param / gb
    return (f"{head}; not even its embedding table and one layer fit, so no --teacher-layers helps here "
            f"(the student alone needs ~{student_gb:.1f} GB)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from fastenc.cli import Parser, positive_float, positive_int

    p = Parser(prog="python -m bench.umt5", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-layers", type=positive_int, default=None,
                   help="time this many of umT5-XXL's 24 layers (default: all; --quick: 2)")
    p.add_argument("--backends", help=f"comma-separated subset of {','.join(BACKENDS)} (default: "
                                      "transformers,torch,cpu on the CPU, transformers,torch,triton on a GPU; "
                                      "--quick: transformers,torch)")
    p.add_argument("--batch", type=latency._ints, default=None, help="default 1")
    p.add_argument("--seq", type=latency._ints, default=None, help=f"default {WAN_LENGTH} (the wan target's length)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on a CPU: 2 teacher layers, B=1, L=512, transformers and torch, few repeats")
    p.add_argument("--tiny", action="store_true", help="tiny umT5 configs (self-test of the benchmark itself)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=1, choices=range(101), metavar="0..100")
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--max-seconds", type=positive_float, default=60.0, help="cap on timing one point (>= 3 calls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="where the rows go (default: a new run folder under the bench cache; "
                                               "'' for none)")
    p.add_argument("--save", action="store_true", help="also append the rows to bench/results/umt5.csv")
    args = p.parse_args(argv)
    full, student = TINY if args.tiny else (UMT5_XXL, UMT5_BASE)
    if args.quick:
        args.teacher_layers = args.teacher_layers or min(2, full.num_layers)
        args.backends = args.backends or "transformers,torch"
        args.reps, args.warmup, args.max_seconds = min(args.reps, 3), min(args.warmup, 1), min(args.max_seconds, 20.0)
    layers = full.num_layers if args.teacher_layers is None else args.teacher_layers
    if layers > full.num_layers:
        p.error(f"--teacher-layers must be in 1..{full.num_layers}, got {layers}")
    if args.device not in (None, "cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    backends = args.backends.split(",") if args.backends else list(DEFAULT_BACKENDS[args.device or "cpu"])
    for b in backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    teacher = teacher_config(full, layers)
    # what bench.latency's grid reads
    args.full, args.teacher_cfg, args.student_cfg = full, teacher, student
    args.configs = {teacher.name: teacher, student.name: student}
    args.models = [teacher.name, student.name]
    args.backends = backends
    args.batch = args.batch or [1]
    args.seq = args.seq or [WAN_LENGTH]
    args.checkpoints, args.compile_mode, args.export_teacher = {}, None, False
    return args


def full_depth_rows(results: list[latency.Result], args) -> list[list[str]]:
    """The teacher's measured time scaled to all its layers (the layers dominate: the embedding is a lookup)."""
    teacher, full = args.teacher_cfg, args.full
    if teacher.num_layers == full.num_layers:
        return []
    scale = full.num_layers / teacher.num_layers
    rows = []
    for r in results:
        if r.model != teacher.name:
            continue
        student = [s for s in results if s.model == args.student_cfg.name and s.backend == r.backend
                   and s.batch == r.batch and s.seq == r.seq]
        speed = f"{r.latency.p50 * scale / student[0].latency.p50:.1f}x" if student else "n/a"
        rows.append([full.name, r.backend, str(r.batch), str(r.seq), f"{r.latency.p50 * scale:.1f}",
                     f"{common.param_count(full) * bytes_per_param(torch.device(args.device or 'cpu')) / 2**20:.0f}",
                     speed])
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device or "cpu")
    say = lambda text: sys.stdout.write(text + "\n") or sys.stdout.flush()  # noqa: E731
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("bench.umt5: error: --device cuda but no CUDA GPU is visible\n")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    free = available_bytes(device)
    verdict = memory_verdict(args.full, args.teacher_cfg.num_layers, args.student_cfg, free, bytes_per_param(device))
    if verdict:
        sys.stderr.write(f"bench.umt5: {verdict}\n")
        return 1
    teacher, student = args.teacher_cfg, args.student_cfg
    load_start = common.load_average()
    say(f"bench.umt5 on {common.device_name(device)}, {torch.get_num_threads()} CPU threads; RANDOM weights "
        f"(speed and memory only); {free / 1e9:.1f} GB available")
    say(f"teacher {teacher.name} ({common.param_count(teacher) / 1e9:.2f} B parameters), student {student.name} "
        f"({common.param_count(student) / 1e6:.0f} M); backends {','.join(args.backends)}; batch {args.batch}; "
        f"seq {args.seq}")
    results = latency.run_grid(args, device, say)
    if not results:
        say("no backend produced a result")
        return 1
    header, rows = latency.table(results, teacher.name)
    say("")
    say(common.format_table(header, rows))
    scaled = full_depth_rows(results, args)
    if scaled:
        say(f"\n{args.full.name} at all {args.full.num_layers} layers, scaled from {teacher.num_layers} measured:")
        say(common.format_table(["model", "backend", "B", "L", "p50 ms (scaled)", "weights MB", "student speed-up"], scaled))
    ctx = common.run_context(device, "random")
    if device.type == "cpu":
        ctx["device"] = common.machine_description(load_start)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    targets = []
    if args.csv != "":
        targets.append(Path(args.csv) if args.csv else exports.cache_root() / "runs" / f"umt5-{stamp}" / "umt5.csv")
    if args.save:
        targets.append(common.RESULTS_DIR / "umt5.csv")
    for path in targets:
        say(f"\nrows appended to {common.append_csv(path, latency.csv_rows(results), ctx)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
