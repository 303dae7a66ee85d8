"""The text-encoding stage of a Flux pipeline: T5-XXL resident, T5-XXL offloaded, fastenc student.

    python -m bench.pipeline [--device cuda|cpu] [--student base] [--prompts 8] [--target flux-dev]
                             [--tokenizer DIR] [--student-checkpoint DIR] [--teacher-checkpoint DIR]

GPU set-ups (one prompt at a time, as a user generating images does):

* ``t5-xxl resident``: transformers ``T5EncoderModel`` (bf16) kept on the GPU;
* ``t5-xxl offload``: the same model kept in host memory and moved in for each prompt with
  accelerate's ``cpu_offload_with_hook`` (what diffusers' ``enable_model_cpu_offload`` installs),
  then moved out again, as happens when the transformer is called next;
* ``fastenc student``: the student (bf16, Triton op table when available) resident on the GPU.

On a machine without a GPU the CPU-only variant runs instead: T5-XXL (transformers, bf16) and the
student (fastenc's ``cpu`` backend) on the CPU. Reported per set-up: latency per prompt
(tokenisation included when ``--tokenizer`` is given; else random ids of the target length, the
same cost since Flux pads every prompt to it), peak memory during a prompt and memory the stage
holds between prompts (GPU memory; host RSS on the CPU variant), and the speed-up of the student.
Only the T5 encoder is measured: Flux's CLIP text encoder is the same in every set-up.
Rows go to ``bench/results/pipeline.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastenc.config import SIZES, max_length_for

from . import common

log = logging.getLogger("fastenc")

PROMPTS = [
    "A cat holding a sign that says hello world",
    "A sculptor waving a poster stating 'user'.",
    "an astronaut riding a horse on the moon, digital art, cinematic lighting",
    "a red fox sitting in the snow, highly detailed photograph",
    "a bowl of ramen on a wooden table, steam rising, soft morning light",
    "a watercolor painting of a lighthouse on a cliff during a storm",
    "two robots playing chess in a park, 35mm film photo",
    "a neon sign reading 'open late' above a rainy street at night",
]


class Skip(Exception):
    """A set-up that cannot run here; the message is the one-line reason."""


@dataclass
class Stage:
    name: str
    model: str
    backend: str
    dtype: str
    encode: Callable[[torch.Tensor], torch.Tensor]  # input_ids [1, L] -> embeddings [1, L, P]
    after_prompt: Callable[[], None] = lambda: None  # e.g. move offloaded weights out again


@dataclass
class Outcome:
    stage: Stage
    latency: common.Stats
    peak: int
    held: int


def teacher_encoder(args, device: torch.device, *, dtype=torch.bfloat16) -> common.TransformersEncoder:
    model = common.build_model(args.teacher, device=device, dtype=dtype, seed=args.seed,
                               checkpoint=args.teacher_checkpoint)
    return common.TransformersEncoder(model)


def student_model(args, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return common.build_model(args.student, device=device, dtype=dtype, seed=args.seed,
                              checkpoint=args.student_checkpoint)


def check_fits(name: str, bytes_per_param: int, device: torch.device) -> None:
    need = common.param_count(common.get_config(name)) * bytes_per_param
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if need * 1.25 > free:
        where = "GPU" if device.type == "cuda" else "host"
        raise Skip(f"needs ~{need / 1e9:.1f} GB of {where} memory for weights, {free / 1e9:.1f} GB free")


def build_stage(kind: str, args, device: torch.device) -> Stage:
    cuda = device.type == "cuda"
    if kind == "resident":
        check_fits(args.teacher, 2, device)
        enc = teacher_encoder(args, device)
        return Stage("t5-xxl resident", args.teacher, "transformers", "bf16", enc)
    if kind == "offload":
        if not cuda:
            raise Skip("offload moves weights to a GPU; this is the CPU-only variant")
        try:
            from accelerate import cpu_offload_with_hook
        except ImportError as exc:
            raise Skip(f"accelerate is not installed ({exc})") from None
        check_fits(args.teacher, 2, torch.device("cpu"))
        enc = teacher_encoder(args, torch.device("cpu"))
        enc, hook = cpu_offload_with_hook(enc, execution_device=device)
        return Stage("t5-xxl offload", args.teacher, "transformers+offload", "bf16", enc, after_prompt=hook.offload)
    if kind == "cpu-teacher":
        check_fits(args.teacher, 2, device)
        enc = teacher_encoder(args, device)
        return Stage("t5-xxl on cpu", args.teacher, "transformers", "bf16", enc)
    if kind == "student":
        check_fits(args.student, 4 if not cuda else 2, device)
        model = student_model(args, device)
        if cuda:
            backend = "torch"
            try:
                from fastenc.backends import op_table
                from fastenc.kernels.graphs import CudaGraphRunner

                model.ops = op_table("triton", device)
                backend, runner = "triton", CudaGraphRunner(model)
            except Exception as exc:  # no triton / kernels: the torch op table
                log.warning("student on the torch backend (%s)", str(exc).splitlines()[0])
                runner = model
            return Stage("fastenc student", args.student, backend, "bf16", runner)
        from fastenc.backends import cpu as fcpu

        ok, why = fcpu.fast_path_supported()
        if not ok:
            return Stage("fastenc student (cpu)", args.student, "torch", "fp32", model)
        source = fcpu.source_fingerprint(args.student_checkpoint) if args.student_checkpoint else \
            f"bench:{args.student}:seed{args.seed}"
        planned = common.planned_cpu(model, source)  # what fastenc.load gives: the plan's engine serves
        return Stage("fastenc student (cpu)", args.student, "cpu", planned.dtype, planned.encoder)
    raise Skip(f"unknown set-up {kind!r}")


def prompt_inputs(args, cfg, seq: int) -> list[Callable[[], torch.Tensor]]:
    """One callable per prompt giving its input ids [1, L] (tokenising inside, so it is timed)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    if args.tokenizer:
        from fastenc.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(args.tokenizer)
        return [lambda p=p: tok(p, max_length=seq).input_ids for p in prompts]
    return [lambda i=i: common.sample_ids(cfg, 1, seq, seed=args.seed + 10 + i) for i in range(len(prompts))]


def memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return common.rss_bytes()


def run_stage(kind: str, args, device: torch.device, seq: int) -> Outcome:
    # imports are not the stage's memory
    for module in ("transformers.models.t5.modeling_t5", "accelerate", "fastenc.backends.cpu", "fastenc.tokenizer"):
        try:
            __import__(module)
        except ImportError:
            pass
    common.release_memory()
    base = memory_now(device)
    stage = build_stage(kind, args, device)
    cfg = common.get_config(stage.model)
    inputs = prompt_inputs(args, cfg, seq)

    def one(make_ids: Callable[[], torch.Tensor]) -> None:
        ids = make_ids().to(device)  # [1, L]
        with torch.inference_mode():
            stage.encode(ids)  # [1, L, P]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stage.after_prompt()

    one(inputs[0])  # warm-up (kernel selection, graph capture, allocator growth)
    samples = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with common.HostPeak() if device.type != "cuda" else contextlib.nullcontext() as host:
        for make_ids in inputs:
            t0 = time.perf_counter()
            one(make_ids)
            samples.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else host.peak) - base
    held = memory_now(device) - base
    outcome = Outcome(stage, common.Stats.of(samples), max(0, peak), max(0, held))
    del stage
    common.release_memory()
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cuda (the three GPU set-ups) or cpu (CPU-only variant); default: cuda if any")
    p.add_argument("--student", default="base", help="student size (DistillT5 is base)")
    p.add_argument("--teacher", default="xxl", help=argparse.SUPPRESS)  # a smaller stand-in for self-tests
    p.add_argument("--student-checkpoint")
    p.add_argument("--teacher-checkpoint")
    p.add_argument("--tokenizer", help="T5 tokenizer folder (e.g. Flux's tokenizer_2); default: random ids")
    p.add_argument("--target", default="flux-dev", help="sets the sequence length (flux-dev 512)")
    p.add_argument("--seq", type=int, help="override the sequence length")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--setups", help="comma-separated subset (GPU: resident,offload,student; CPU: cpu-teacher,student)")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=str(common.RESULTS_DIR / "pipeline.csv"), help="'' to write none")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    known = set(SIZES) | set(common.TINY_SIZES)
    for name in (args.student, args.teacher):
        if name not in known:
            p.error(f"unknown size {name!r}")
    if args.prompts < 1:
        p.error("--prompts must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("bench.pipeline: error: --device cuda but no CUDA GPU is visible\n")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    seq = args.seq or max_length_for(args.target)
    kinds = args.setups.split(",") if args.setups else (
        ["resident", "offload", "student"] if device.type == "cuda" else ["cpu-teacher", "student"])
    say = lambda text: sys.stdout.write(text + "\n") or sys.stdout.flush()  # noqa: E731
    weights = "checkpoints" if args.student_checkpoint and args.teacher_checkpoint else \
        "RANDOM weights (speed/memory only)"
    variant = "GPU" if device.type == "cuda" else "CPU-only variant"
    say(f"bench.pipeline ({variant}) on {common.device_name(device)}: T5 stage of {args.target} (L={seq}), "
        f"{args.prompts} prompts, {weights}")
    outcomes: list[Outcome] = []
    for kind in kinds:
        try:
            outcomes.append(run_stage(kind, args, device, seq))
            o = outcomes[-1]
            say(f"  done {o.stage.name}: p50 {o.latency.p50:.1f} ms")
        except Skip as exc:
            say(f"  skip {kind}: {exc}")
    if not outcomes:
        say("no set-up could run")
        return 1
    mem_kind = "GPU" if device.type == "cuda" else "host"
    refs = {o.stage.name: o for o in outcomes}
    offload = refs.get("t5-xxl offload")
    teacher = offload or refs.get("t5-xxl resident") or refs.get("t5-xxl on cpu")
    header = ["set-up", "model", "backend", "dtype", "per prompt p50 ms", "p20-p80 ms", f"peak {mem_kind} MB",
              f"held {mem_kind} MB", f"speed-up vs {teacher.stage.name if teacher else 't5-xxl'}"]
    rows = []
    for o in outcomes:
        speed = f"{teacher.latency.p50 / o.latency.p50:.2f}x" if teacher else "n/a"
        rows.append([o.stage.name, o.stage.model, o.stage.backend, o.stage.dtype, f"{o.latency.p50:.1f}",
                     f"{o.latency.p20:.1f}-{o.latency.p80:.1f}", f"{o.peak / 2**20:.0f}", f"{o.held / 2**20:.0f}",
                     speed])
    say("")
    say(common.format_table(header, rows))
    student = next((o for o in outcomes if o.stage.name.startswith("fastenc")), None)
    if student and offload:
        say(f"\nstudent vs T5-XXL with CPU offload: {offload.latency.p50 / student.latency.p50:.2f}x faster per "
            f"prompt (the paper reports 2.7x on consumer GPUs)")
    if args.csv:
        ctx = common.run_context(device, "checkpoint" if args.student_checkpoint else "random")
        out = []
        for o in outcomes:
            params = common.param_count(common.get_config(o.stage.model))
            name = o.stage.name.replace(" ", "-")
            for metric, unit, stats in (
                ("latency", "ms", o.latency),
                (f"peak_{mem_kind.lower()}_memory", "MB", common.Stats.single(o.peak / 2**20)),
                (f"held_{mem_kind.lower()}_memory", "MB", common.Stats.single(o.held / 2**20)),
            ):
                out.append(common.Row(name, params, o.stage.backend, o.stage.dtype, 1, seq, metric, unit, stats))
        path = common.append_csv(Path(args.csv), out, ctx)
        say(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
