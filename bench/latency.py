"""Latency and memory of every backend, students against the T5-XXL teacher.

    python -m bench.latency [--models small,base,large,xl,xxl] [--backends ...] [--batch 1,8]
                            [--seq 77,256,512] [--device cpu|cuda] [--quick] [--checkpoint SIZE=DIR]

Each (model, backend) is built from nothing (so its memory is its own), warmed up, then timed at
every batch x sequence point: p20/p50/p80 latency, peak memory the backend holds during a call
(GPU: torch allocator peak, or the drop in free device memory for ONNX Runtime / TensorRT; CPU:
peak resident set above the process's before the backend was built) and the weights' size.
Weights are random with transformers' T5 initialisation unless ``--checkpoint`` names real ones:
speed and memory do not depend on the values. Unavailable backends are skipped with a one-line
reason. Prints one table (speed-up and memory against T5-XXL in the same backend family), appends
long-format rows to ``bench/results/latency.csv`` and draws ``bench/results/latency.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastenc.config import SIZES, EncoderConfig
from fastenc.errors import BackendUnavailable, FastencError

from . import common, exports

log = logging.getLogger("fastenc")

BACKENDS = ["transformers", "compile", "torch", "cpu", "triton", "onnxruntime", "onnxruntime-int8", "tensorrt", "aoti"]
#: Backends compared with each other (speed-up and memory against the teacher in the same family).
FAMILY = {"transformers": "pytorch", "compile": "pytorch", "torch": "pytorch", "cpu": "pytorch", "triton": "pytorch",
          "aoti": "pytorch", "onnxruntime": "onnxruntime", "onnxruntime-int8": "onnxruntime", "tensorrt": "tensorrt"}
#: Teacher rows a family's students are compared with, in order of preference (after the same backend).
FAMILY_REFERENCE = {"pytorch": ["transformers", "torch", "compile"], "onnxruntime": ["onnxruntime"],
                    "tensorrt": ["tensorrt"]}
DEFAULT_MODELS = ["small", "base", "large", "xl", "xxl"]
COMPILING = ("compile", "aoti", "tensorrt")

class Skip(Exception):
    """A backend that cannot run here; the message is the one-line reason."""


@dataclass
class Runner:
    fn: Callable[[torch.Tensor], torch.Tensor]
    dtype: str
    weights_bytes: int | None
    allocator: bool = True  # GPU memory comes from torch's allocator (else: cudaMemGetInfo)
    max_batch: int | None = None
    max_seq: int | None = None
    note: str = ""


@dataclass
class Result:
    model: str
    params: int
    backend: str
    dtype: str
    batch: int
    seq: int
    latency: common.Stats
    memory: int | None
    weights: int | None


# ----------------------------------------------------------------------------- runners


class Builder:
    """Builds a runner for (model, backend) on ``device`` with the settings from the command line."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        self.float_dtype = torch.bfloat16 if self.cuda else torch.float32

    def config(self, name: str) -> EncoderConfig:
        """``name``'s config: one the caller registered (``args.configs``, e.g. bench.umt5's), else a size."""
        extra = getattr(self.args, "configs", None) or {}
        return extra[name] if name in extra else common.get_config(name)

    def model(self, name: str, dtype: torch.dtype, device: torch.device | None = None):
        ckpt = self.args.checkpoints.get(name)
        return common.build_model(self.config(name) if ckpt is None else name, device=device or self.device,
                                  dtype=dtype, seed=self.args.seed, checkpoint=ckpt)

    def check_fits(self, name: str, bytes_per_param: int) -> None:
        need = common.param_count(self.config(name)) * bytes_per_param
        if self.cuda:
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        if need * 1.3 > free:
            raise Skip(f"needs ~{need / 1e9:.1f} GB of weights, {free / 1e9:.1f} GB free")

    def preload(self, backend: str) -> None:
        """Import what ``backend`` needs before the memory baseline (imports are not the backend's memory)."""
        ort = ["onnxruntime", "fastenc.backends.onnxruntime"]
        modules = {"transformers": ["transformers.models.t5.modeling_t5", "transformers.models.umt5.modeling_umt5"], "onnxruntime": ort, "onnxruntime-int8": ort,
                   "cpu": ["fastenc.backends.cpu"], "aoti": ["fastenc.backends.aoti"], "tensorrt": ["tensorrt"],
                   "triton": ["fastenc.kernels"], "compile": ["torch._inductor"]}.get(backend, [])
        for mod in modules:
            try:
                __import__(mod)
            except Exception:  # reported by build() with its reason
                pass

    def build(self, name: str, backend: str) -> Runner:
        if backend not in BACKENDS:
            raise Skip(f"unknown backend {backend!r}")
        if self.args.quick and backend in COMPILING:
            raise Skip("--quick skips backends that compile for minutes")
        return getattr(self, "_" + backend.replace("-", "_"))(name)

    def _dtype_name(self, dt: torch.dtype) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]

    def _transformers(self, name: str) -> Runner:
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            raise Skip(f"transformers is not installed ({exc})") from None
        self.check_fits(name, 4 if not self.cuda else 2)
        model = self.model(name, self.float_dtype)
        hf = common.TransformersEncoder(model)
        del model
        return Runner(hf, self._dtype_name(self.float_dtype), common.tensor_bytes(hf))

    def _torch(self, name: str) -> Runner:
        self.check_fits(name, 4 if not self.cuda else 2)
        model = self.model(name, self.float_dtype)
        return Runner(model, self._dtype_name(self.float_dtype), common.tensor_bytes(model))

    def _compile(self, name: str) -> Runner:
        self.check_fits(name, 4 if not self.cuda else 2)
        model = self.model(name, self.float_dtype)
        if not self.cuda:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # oneDNN weight prepacking on the CPU
        try:
            compiled = torch.compile(model, mode=self.args.compile_mode, dynamic=False)
        except Exception as exc:  # no compiler, unsupported platform
            raise Skip(f"torch.compile unavailable: {str(exc).splitlines()[0]}") from None
        return Runner(compiled, self._dtype_name(self.float_dtype), common.tensor_bytes(model),
                      note="compiled per shape on first call (not timed)")

    def _cpu(self, name: str) -> Runner:
        if self.cuda:
            raise Skip("the cpu backend runs on the CPU (use --device cpu)")
        from fastenc.backends import cpu as fcpu

        ok, why = fcpu.fast_path_supported()
        if not ok:
            raise Skip(why)
        self.check_fits(name, 4)
        model = self.model(name, torch.float32)
        ckpt = self.args.checkpoints.get(name)
        source = fcpu.source_fingerprint(ckpt) if ckpt else f"bench:{name}:seed{self.args.seed}"
        planned = common.planned_cpu(model, source)  # what fastenc.load gives: the plan's engine serves
        gc.collect()
        return Runner(planned.encoder, planned.dtype, planned.weights_bytes, note=planned.note)

    def _triton(self, name: str) -> Runner:
        if not self.cuda:
            raise Skip("needs a CUDA GPU (triton's CPU interpreter is for tests only)")
        try:
            from fastenc.backends import op_table
            from fastenc.kernels.graphs import CudaGraphRunner
        except ImportError as exc:
            raise Skip(f"fastenc.kernels is not available ({exc})") from None
        self.check_fits(name, 2)
        model = self.model(name, self.float_dtype)
        try:
            model.ops = op_table("triton", self.device)
        except (BackendUnavailable, FastencError) as exc:
            raise Skip(str(exc).splitlines()[0]) from None
        return Runner(CudaGraphRunner(model), self._dtype_name(self.float_dtype), common.tensor_bytes(model),
                      note="CUDA graphs per (batch, seq) bucket")

    # -- exported artifacts -------------------------------------------------------------

    def _export(self, name: str, **kw) -> Path:
        """The export directory of ``name`` with the requested artifacts (built once, then reused)."""
        if name == "xxl" and not self.args.export_teacher:
            raise Skip("the teacher is exported only with --export-teacher (tens of GB of artifacts)")
        key = exports.model_key(name, self.args.seed, self.args.checkpoints.get(name))
        ckpt = self.args.checkpoints.get(name)
        if ckpt is None:
            target = exports.cache_root() / key / "checkpoint"
            if not (target / "config.json").is_file():
                self.check_fits(name, 4)
                model = self.model(name, torch.float32, torch.device("cpu"))
                exports.saved_checkpoint(model, key)
                del model
                common.release_memory()
            ckpt = target
        out = exports.export_dir(key)
        try:
            exports.ensure_export(Path(ckpt), out, max_batch=max(self.args.batch), max_seq=max(self.args.seq), **kw)
        except BackendUnavailable as exc:
            raise Skip(str(exc).splitlines()[0]) from None
        return out

    def _graph_runner(self, out: Path, backend: str, dtype: str | None, device: torch.device):
        try:
            from fastenc.backends.graph import load_artifact
        except ImportError as exc:
            raise Skip(f"fastenc graph backends are not available ({exc})") from None
        try:
            runner, _ = load_artifact(out, backend, device, dtype)
        except (BackendUnavailable, FastencError) as exc:
            raise Skip(str(exc).splitlines()[0]) from None
        files = runner.meta.get("files") or [runner.artifact.name]
        size = sum((runner.artifact.parent / Path(f).name).stat().st_size for f in files
                   if (runner.artifact.parent / Path(f).name).exists())
        return runner, size

    def _onnxruntime(self, name: str, int8: bool = False) -> Runner:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise Skip(f"onnxruntime is not installed ({exc})") from None
        if self.cuda and int8:
            raise Skip("dynamic int8 runs on ONNX Runtime's CPU provider only")
        dtype = "int8" if int8 else ("bf16" if self.cuda else "fp32")
        out = self._export(name, int8=int8, dtype=None if not self.cuda else "bf16")
        runner, size = self._graph_runner(out, "onnxruntime", dtype, self.device)
        fn: Callable = runner
        if not self.cuda and self.args.threads:
            sess = exports.OrtSession(runner.artifact, threads=self.args.threads)
            fn = lambda ids: sess(ids)  # noqa: E731
        return Runner(fn, dtype, size, allocator=False, max_batch=runner.profile.max_batch,
                      max_seq=runner.profile.max_seq, note=runner.artifact.name)

    def _onnxruntime_int8(self, name: str) -> Runner:
        return self._onnxruntime(name, int8=True)

    def _tensorrt(self, name: str) -> Runner:
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise Skip(f"TensorRT is not installed ({type(exc).__name__})") from None
        if not self.cuda:
            raise Skip("TensorRT needs a CUDA GPU")
        out = self._export(name, trt=True, dtype="bf16")
        runner, size = self._graph_runner(out, "tensorrt", "bf16", self.device)
        return Runner(runner, "bf16", size, allocator=False, max_batch=runner.profile.max_batch,
                      max_seq=runner.profile.max_seq, note=runner.artifact.name)

    def _aoti(self, name: str) -> Runner:
        dtype = "bf16" if self.cuda else "fp32"
        out = self._export(name, aoti=True, dtype=dtype, device=self.device.type)
        runner, size = self._graph_runner(out, "aoti", dtype, self.device)
        return Runner(runner, dtype, size, max_batch=runner.profile.max_batch, max_seq=runner.profile.max_seq,
                      note=runner.artifact.name)


# ----------------------------------------------------------------------------- measuring


def measure(runner: Runner, name: str, backend: str, cfg: EncoderConfig, args, device: torch.device,
            base_bytes: int) -> list[Result]:
    results = []
    params = common.param_count(cfg)
    for batch in args.batch:
        for seq in args.seq:
            if (runner.max_batch and batch > runner.max_batch) or (runner.max_seq and seq > runner.max_seq):
                continue
            ids = common.sample_ids(cfg, batch, seq, device=device, seed=args.seed + 1)
            with torch.inference_mode():
                runner.fn(ids)  # first call: compilation / graph capture / arena growth, untimed
                if device.type == "cuda":
                    if runner.allocator:
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        runner.fn(ids)
                        torch.cuda.synchronize(device)
                        memory = torch.cuda.max_memory_allocated(device) - base_bytes
                    else:
                        runner.fn(ids)
                        torch.cuda.synchronize(device)
                        memory = common.gpu_used_bytes(device) - base_bytes
                else:
                    with common.HostPeak() as peak:
                        runner.fn(ids)
                    memory = peak.peak - base_bytes
                stats = common.measure_latency(lambda: runner.fn(ids), device, warmup=args.warmup, reps=args.reps,
                                               max_seconds=args.max_seconds)
            results.append(Result(name, params, backend, runner.dtype, batch, seq, stats, max(0, memory),
                                  runner.weights_bytes))
    return results


def baseline_bytes(device: torch.device, allocator: bool = True) -> int:
    common.release_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) if allocator else common.gpu_used_bytes(device)
    return common.rss_bytes()


def _run_unit(builder: "Builder", args, device: torch.device, name: str, backend: str,
              say: Callable[[str], None]) -> list[Result]:
    """Build one (model, backend), time it at every point, free it."""
    cfg = builder.config(name)
    t0 = time.perf_counter()
    builder.preload(backend)
    base_alloc = baseline_bytes(device, allocator=True)
    base_used = common.gpu_used_bytes(device) if device.type == "cuda" else base_alloc
    try:
        runner = builder.build(name, backend)
    except Skip as exc:
        say(f"  skip {name:>8} {backend:<16} {exc}")
        return []
    base = base_alloc if (device.type != "cuda" or runner.allocator) else base_used
    try:
        rows = measure(runner, name, backend, cfg, args, device, base)
    except (RuntimeError, FastencError) as exc:  # e.g. out of memory at the largest shape
        say(f"  skip {name:>8} {backend:<16} failed: {str(exc).splitlines()[0][:160]}")
        rows = []
    note = f" ({runner.note})" if runner.note else ""
    say(f"  done {name:>8} {backend:<16} {len(rows)} points in {time.perf_counter() - t0:.1f} s{note}")
    del runner
    common.release_memory()
    return rows


def _unit_in_worker(args, name: str, backend: str) -> tuple[list[Result], list[str]]:
    """A CPU (model, backend) in a fresh process: no other runtime's threads or memory in it."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    lines: list[str] = []
    rows = _run_unit(Builder(args, torch.device("cpu")), args, torch.device("cpu"), name, backend, lines.append)
    return rows, lines


def run_grid(args, device: torch.device, say: Callable[[str], None]) -> list[Result]:
    """Every (model, backend): on the CPU each in its own fresh worker process (another runtime's
    spinning threads or heap would change its numbers), on a GPU in this process."""
    results: list[Result] = []
    if device.type == "cpu":
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        if args.threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(args.threads)  # read by each worker's OpenMP runtime at start
        from bench import latency as this  # pickled by module name, also when run as __main__

        for name in args.models:
            for backend in args.backends:
                with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                    try:
                        rows, lines = pool.submit(this._unit_in_worker, args, name, backend).result()
                    except BrokenProcessPool:
                        rows, lines = [], [f"  skip {name:>8} {backend:<16} the worker process died (out of memory?)"]
                for line in lines:
                    say(line)
                results.extend(rows)
        return results
    builder = Builder(args, device)
    for name in args.models:
        for backend in args.backends:
            results.extend(_run_unit(builder, args, device, name, backend, say))
    return results


# ----------------------------------------------------------------------------- reporting


def teacher_row(results: list[Result], r: Result, teacher: str) -> Result | None:
    """The teacher's result ``r`` is compared with: same batch and sequence, same backend if
    measured, else the family's reference backend."""
    same = [t for t in results if t.model == teacher and t.batch == r.batch and t.seq == r.seq]
    for t in same:
        if t.backend == r.backend:
            return t
    for backend in FAMILY_REFERENCE.get(FAMILY.get(r.backend, ""), []):
        for t in same:
            if t.backend == backend:
                return t
    return None


def table(results: list[Result], teacher: str) -> tuple[list[str], list[list[str]]]:
    header = ["model", "params", "backend", "dtype", "B", "L", "p50 ms", "p20-p80 ms", "memory MB", "weights MB",
              "vs xxl: speed-up", "memory", "xxl ref"]
    rows = []
    order = {b: i for i, b in enumerate(BACKENDS)}
    for r in sorted(results, key=lambda r: (r.batch, r.seq, order.get(r.backend, 99), r.params)):
        t = teacher_row(results, r, teacher)
        speed = f"{t.latency.p50 / r.latency.p50:.2f}x" if t else "n/a"
        mem = f"{r.memory / t.memory:.3f}x" if t and t.memory and r.memory is not None else "n/a"
        rows.append([
            r.model, f"{r.params / 1e6:.0f}M", r.backend, r.dtype, str(r.batch), str(r.seq), f"{r.latency.p50:.2f}",
            f"{r.latency.p20:.2f}-{r.latency.p80:.2f}", f"{r.memory / 2**20:.0f}" if r.memory is not None else "n/a",
            f"{r.weights / 2**20:.0f}" if r.weights else "n/a", speed, mem, t.backend if t else "-",
        ])
    return header, rows


def csv_rows(results: list[Result]) -> list[common.Row]:
    out = []
    for r in results:
        out.append(common.Row(r.model, r.params, r.backend, r.dtype, r.batch, r.seq, "latency", "ms", r.latency))
        if r.memory is not None:
            out.append(common.Row(r.model, r.params, r.backend, r.dtype, r.batch, r.seq, "memory", "MB",
                                  common.Stats.single(r.memory / 2**20)))
        if r.weights is not None:
            out.append(common.Row(r.model, r.params, r.backend, r.dtype, r.batch, r.seq, "weights", "MB",
                                  common.Stats.single(r.weights / 2**20)))
    return out


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help=f"comma-separated, default {','.join(DEFAULT_MODELS)}")
    p.add_argument("--backends", help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)")
    p.add_argument("--batch", type=_ints, default=None, help="default 1,8")
    p.add_argument("--seq", type=_ints, default=None, help="default 77,256,512")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="a couple of minutes on a CPU: small+base, B=1, L=77,512, no compiling backends")
    p.add_argument("--tiny", action="store_true", help="tiny configs (self-test of the benchmark itself)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="SIZE=DIR",
                   help="real weights for a size (repeatable), e.g. base=/path/to/DistillT5")
    p.add_argument("--export-teacher", action="store_true", help="also export T5-XXL for the graph backends")
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=20.0, help="cap on timing one point (>= 3 calls)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="where the rows go (default: a new run folder under the bench cache; "
                                               "'' for none)")
    p.add_argument("--plot", default=None, help="where the plot goes (default: beside the CSV; '' for none)")
    p.add_argument("--save", action="store_true",
                   help="also append the rows to bench/results/latency.csv and redraw bench/results/latency.png")
    args = p.parse_args(argv)
    if args.tiny:
        args.models = args.models or "tiny,tiny-xxl"
    if args.quick:
        args.models = args.models or "small,base"
        args.batch = args.batch or [1]
        args.seq = args.seq or [77, 512]
        args.reps = min(args.reps, 5)
        args.warmup = min(args.warmup, 1)
        args.max_seconds = min(args.max_seconds, 5.0)
    args.models = (args.models or ",".join(DEFAULT_MODELS)).split(",")
    known = set(SIZES) | set(common.TINY_SIZES)
    for m in args.models:
        if m not in known:
            p.error(f"unknown model {m!r}; choose from {', '.join(sorted(known))}")
    args.backends = args.backends.split(",") if args.backends else list(BACKENDS)
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    args.batch = args.batch or [1, 8]
    args.seq = args.seq or [77, 256, 512]
    args.checkpoints = {}
    for item in args.checkpoint:
        size, sep, path = item.partition("=")
        if not sep or size not in known:
            p.error(f"--checkpoint wants SIZE=DIR with SIZE one of {', '.join(SIZES)}, got {item!r}")
        args.checkpoints[size] = path
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("bench.latency: error: --device cuda but no CUDA GPU is visible\n")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda text: sys.stdout.write(text + "\n") or sys.stdout.flush()  # noqa: E731
    teacher = "tiny-xxl" if "tiny-xxl" in args.models else "xxl"
    random_models = [m for m in args.models if m not in args.checkpoints]
    weights = "RANDOM weights (T5 initialisation): speed and memory only" if random_models else "checkpoints"
    if random_models and args.checkpoints:
        weights = f"checkpoints for {','.join(args.checkpoints)}, RANDOM weights for {','.join(random_models)}"
    load_start = common.load_average()
    say(f"bench.latency on {common.device_name(device)}, {torch.get_num_threads()} CPU threads; {weights}")
    say(f"models {','.join(args.models)}; backends {','.join(args.backends)}; batch {args.batch}; seq {args.seq}")
    results = run_grid(args, device, say)
    if not results:
        say("no backend produced a result")
        return 1
    header, rows = table(results, teacher)
    say("")
    say(common.format_table(header, rows))
    if not any(r.model == teacher for r in results):
        say(f"(no {teacher} rows: the vs-xxl columns need the teacher in --models and runnable here)")
    ctx = common.run_context(device, "random" if random_models else "checkpoint")
    if device.type == "cpu":
        ctx["device"] = common.machine_description(load_start)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_csv = exports.cache_root() / "runs" / f"latency-{stamp}" / "latency.csv"
    targets = []
    if args.csv != "":
        csv_path = Path(args.csv) if args.csv else run_csv
        targets.append((csv_path, Path(args.plot) if args.plot else csv_path.with_suffix(".png")))
    if args.save:
        targets.append((common.RESULTS_DIR / "latency.csv", common.RESULTS_DIR / "latency.png"))
    for csv_path, png in targets:
        path = common.append_csv(csv_path, csv_rows(results), ctx)
        say(f"\nrows appended to {path}")
        if args.plot == "":
            continue
        from .plot import plot_rows

        try:
            rows = [r for r in common.read_csv(path) if r["timestamp"] == ctx["timestamp"]] if path == \
                common.RESULTS_DIR / "latency.csv" else [r.as_dict(ctx) for r in csv_rows(results)]
            say(f"plot written to {plot_rows(rows, png)}")
        except ImportError as exc:
            say(f"no plot: matplotlib is not installed ({exc})")
    say(cache_note())
    return 0


def cache_note() -> str:
    """Where the exported artifacts of the benchmarks are kept and how much they take."""
    root = exports.cache_root()
    if not root.is_dir():
        return f"bench cache: {root} (empty)"
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return (f"bench cache: {root} holds {total / 1e9:.2f} GB of exported models and run folders "
            f"(FASTENC_BENCH_CACHE moves it; delete it to reclaim the space)")


if __name__ == "__main__":
    sys.exit(main())
