"""GPU latency and memory of the base student against the usual baselines, one bounded run.

    python -m bench.gpu [--shapes 1x77,1x512,8x77,8x512] [--candidates ...] [--out-dir bench/results]

Random-init weights (T5-style scales, drawn on the GPU), bf16. Candidates, each timed with CUDA
events after warm-up (median of ``--reps`` calls, p20/p80 beside it):

* ``fastenc``: the base student, ``backend="triton"`` with CUDA graphs, called as users call it
  (``encoder(ids)``: input checks and the output's finite check included; a ``fastenc-graphs`` row
  beside it times the graph replay alone). Each row's note counts the host syncs one call makes; when
  the user call makes more than the baselines do, it is reported as ``fastenc-call`` and the
  ``fastenc`` row (the one the targets read) times the graph runner without those checks;
* ``torch-eager``: the same model and weights with the torch reference ops;
* ``torch-compile``: ``torch.compile(mode="max-autotune")`` of the reference, in a child process
  killed after ``--compile-budget`` seconds (shapes finished by then are kept);
* ``onnxruntime-cpu``: ONNX Runtime's CPU provider at ``--ort-shape``, for scale (child process, bounded);
* ``t5-xxl``: the T5-XXL encoder (4.76 B parameters), random init, eager bf16: the teacher ratio.

Peak memory is ``torch.cuda.max_memory_allocated`` from a reset before the candidate's first call
(weights included). fastenc's kernels are tuned before that window with the inputs the CUDA-graph
runner launches them with (its bucket, and a mask: ``HAS_MASK`` is in the attention kernel's tuning
key), so triton's benchmarking buffers (its 256 MB L2-flush buffer) stay out of the peak; a row whose
window still tuned a kernel says so in its note. Every candidate runs B = 1, L = 512 (the targets'
shape) first. Rows go to ``bench/results/gpu-<gpu>.csv`` (this run's rows; the file is
replaced) and a summary with the issue's targets is printed last. Without CUDA it prints one
``skipped:`` line and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CANDIDATES = ("fastenc", "torch-eager", "torch-compile", "onnxruntime-cpu", "t5-xxl")
COLUMNS = ["timestamp", "gpu", "candidate", "model", "params", "dtype", "batch", "seq", "metric", "unit",
           "p20", "p50", "p80", "n", "note", "versions", "git_commit"]
#: Targets from the issue for the base student at B=1, L=512, bf16 on an H200.
TARGET_MS, TARGET_VS_COMPILE, TARGET_VS_XXL, TARGET_PEAK_GB = 0.35, 1.5, 25.0, 0.4


@dataclass
class Row:
    candidate: str
    model: str
    params: int
    dtype: str
    batch: int
    seq: int
    metric: str  # latency | peak_memory | cos_vs_torch
    unit: str
    p20: float
    p50: float
    p80: float
    n: int = 1
    note: str = ""


# ----------------------------------------------------------------------------- arguments


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x77,8x512"`` -> ``[(1, 77), (8, 512)]``; batch and sequence positive, seq <= 512."""
    shapes = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        if not m or int(m[1]) < 1 or not 1 <= int(m[2]) <= 512:
            raise argparse.ArgumentTypeError(f"shape {part!r} is not BATCHxSEQ with batch >= 1 and 1 <= seq <= 512")
        shapes.append((int(m[1]), int(m[2])))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def parse_candidates(text: str) -> list[str]:
    names = [c.strip() for c in str(text).split(",") if c.strip()]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown candidate(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(CANDIDATES)}")
    return names


def _positive(kind):
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return check


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("1x512,1x77,8x77,8x512"))
    p.add_argument("--candidates", type=parse_candidates, default=list(CANDIDATES))
    p.add_argument("--size", default="base", help="student size (fastenc.config.SIZES)")
    p.add_argument("--reps", type=_positive(int), default=50, help="timed calls per candidate and shape")
    p.add_argument("--warmup", type=_positive(int), default=10)
    p.add_argument("--compile-budget", type=_positive(float), default=180.0, help="seconds for torch.compile")
    p.add_argument("--ort-shape", type=lambda t: parse_shapes(t)[0], default=(1, 77))
    p.add_argument("--ort-budget", type=_positive(float), default=120.0, help="seconds for the ONNX Runtime row")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--time-limit", type=_positive(float), default=None,
                   help="seconds for the whole run: child processes get what is left (the CSV is rewritten after "
                        "every candidate, so a run stopped from outside keeps what it measured)")
    p.add_argument("--worker", choices=["torch-compile", "onnxruntime-cpu"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models and timing


def random_model(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A :class:`fastenc.model.T5Encoder` of ``size`` with T5-scaled random weights drawn on ``device``
    (a T5-XXL in seconds instead of minutes of CPU sampling)."""
    from fastenc.config import get_size
    from fastenc.model import T5Encoder

    cfg = get_size(size)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    model.cast(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            fan_in = p.shape[1] if p.dim() == 2 and not name.startswith(("embed", "rel_bias")) else cfg.d_model
            std = 1.0 if name == "embed.weight" else (0.02 if name.endswith("bias") else fan_in**-0.5)
            p.normal_(0.0, std, generator=gen)
        for block in model.blocks:  # T5 folds d_kv**-0.5 into the query weights
            block.attn.qkv.weight[: cfg.inner_dim].mul_(cfg.d_kv**-0.5)
    return model.eval()


def sample_ids(vocab: int, batch: int, seq: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, seq), generator=gen).to(device)


def target_first(shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``shapes`` with the targets' B = 1, L = 512 first (a run stopped early keeps its rows)."""
    return sorted(dict.fromkeys(shapes), key=lambda s: s != (1, 512))


def graph_inputs(runner, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ids and mask the CUDA-graph runner launches the model with for a call on ``ids``: padded to its
    bucket, with a mask (it always passes one); beyond its buckets it runs the call eagerly, as given."""
    from fastenc.kernels.graphs import pad_inputs

    bucket = runner.buckets(*ids.shape) if runner is not None else None
    if bucket is None:
        return ids, None
    return pad_inputs(ids, None, *bucket, pad_id=runner.pad_id)


def count_host_syncs(fn: Callable[[], object]) -> int:
    """Synchronizing CUDA calls (``.item()``, ``.cpu()``, ``nonzero``, ...) one call of ``fn`` makes, counted
    with torch's sync debug mode."""
    import warnings

    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return sum("synchroniz" in str(w.message) for w in caught)


def stats(samples: list[float]) -> tuple[float, float, float]:
    v = sorted(samples)
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=10, method="inclusive")
    return q[1], statistics.median(v), q[7]


def time_events(fn: Callable[[], object], warmup: int, reps: int) -> tuple[float, float, float]:
    """Milliseconds per call from CUDA events around each call, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return stats([s.elapsed_time(e) for s, e in events])


def measure(candidate: str, fn: Callable[[], object], model_name: str, params: int, batch: int, seq: int,
            args, note: str = "", syncs: Callable[[Callable[[], object]], int] | None = None) -> list[Row]:
    """Latency (CUDA events) and peak memory from a reset before the warm-up (so a first call's CUDA-graph
    capture counts; cached blocks are released first, allocator pools of captured graphs are not). The
    note gets the host syncs of one call (``syncs``: default :func:`count_host_syncs`, after the warm-up)
    and, when a fastenc kernel tuned inside the window, says so."""
    from fastenc.kernels._common import tunings

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    tuned = tunings()
    p20, p50, p80 = time_events(fn, args.warmup, args.reps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    n = (syncs or count_host_syncs)(fn)
    return window_rows(candidate, model_name, params, batch, seq, args.reps, (p20, p50, p80), peak,
                       note, n, tunings() - tuned)


def window_rows(candidate: str, model_name: str, params: int, batch: int, seq: int, reps: int,
                latency: tuple[float, float, float], peak: float, note: str, syncs: int, tuned: int) -> list[Row]:
    """The latency and peak-memory rows of one measured window; the note names the host syncs per call
    and any kernel tuning inside the window (its benchmarking buffers are then in the peak)."""
    parts = [note] if note else []
    parts.append(f"{syncs} host sync{'' if syncs == 1 else 's'}/call")
    if tuned:
        parts.append(f"{tuned} kernel key(s) tuned inside the window: peak includes triton's benchmarking buffers")
    text = "; ".join(parts)
    return [Row(candidate, model_name, params, "bf16", batch, seq, "latency", "ms", *latency, reps, text),
            Row(candidate, model_name, params, "bf16", batch, seq, "peak_memory", "GB", peak, peak, peak, 1, text)]


def host_syncs_of(row: Row) -> int:
    """The host syncs per call a row's note records (0 when it records none)."""
    m = re.search(r"(\d+) host syncs?/call", row.note)
    return int(m[1]) if m else 0


def sync_free_target(user: list[Row], graphs: list[Row], baseline_syncs: int) -> list[Row]:
    """fastenc's rows for one shape: ``user`` (the user call, measured first: its peak includes the graph
    capture) and ``graphs`` (the replay alone). When the user call makes no more host syncs than the
    baselines it is the ``fastenc`` row; otherwise it becomes ``fastenc-call`` and the replay, without the
    checks that sync, is the ``fastenc`` row (its peak the larger of the two windows')."""
    if host_syncs_of(user[0]) <= baseline_syncs:
        return user + graphs
    call = [replace(r, candidate="fastenc-call") for r in user]
    peak = max(user[1].p50, graphs[1].p50)
    target = [replace(graphs[0], candidate="fastenc"),
              replace(graphs[1], candidate="fastenc", p20=peak, p50=peak, p80=peak,
                      note=graphs[1].note + "; peak: the larger of this and the fastenc-call window (graph capture)")]
    return target + call


# ----------------------------------------------------------------------------- candidates


def run_student(args, say) -> list[Row]:
    import fastenc
    from fastenc.backends import op_table
    from fastenc.ops import TORCH_OPS

    dev = torch.device("cuda")
    model = random_model(args.size, dev, torch.bfloat16)
    cfg, params = model.config, sum(p.numel() for p in model.parameters())
    rows: list[Row] = []
    shapes = target_first(args.shapes)
    baseline_syncs = 0
    for B, L in shapes if "torch-eager" in args.candidates else []:
        ids = sample_ids(cfg.vocab_size, B, L, dev)
        with torch.inference_mode():
            rows += measure("torch-eager", lambda: model(ids), args.size, params, B, L, args)
        baseline_syncs = max(baseline_syncs, host_syncs_of(rows[-2]))
        say(f"torch-eager {B}x{L}: {rows[-2].p50:.3f} ms")
    if "fastenc" in args.candidates:
        model.ops = op_table("triton", dev)
        enc = fastenc.Encoder(model, backend="triton", requested_backend="auto", source=f"random-init:{args.size}")
        for B, L in shapes:
            ids = sample_ids(cfg.vocab_size, B, L, dev)
            with torch.inference_mode():
                # tune this shape's kernels first, launched exactly as the graph runner will launch them
                # (bucket, mask), and as given (its eager calls while weights settle; the cos check below):
                # triton's benchmarking buffers stay out of the peak-memory window
                model(*graph_inputs(enc.graphs, ids))
                model(ids)
                user = measure("fastenc", lambda: enc(ids), args.size, params, B, L, args,
                               note="triton kernels + CUDA graphs (peak includes the graph capture)")
                graphs = measure("fastenc-graphs", lambda: enc.graphs(ids), args.size, params, B, L, args,
                                 note="CUDA-graph replay alone, no input/output checks (steady-state peak)")
                model.ops = TORCH_OPS
                ref = model(ids)
                model.ops = op_table("triton", dev)
                cos = float(torch.nn.functional.cosine_similarity(enc(ids).float(), ref.float(), dim=-1).min())
            rows += sync_free_target(user, graphs, baseline_syncs)
            rows.append(Row("fastenc", args.size, params, "bf16", B, L, "cos_vs_torch", "min", cos, cos, cos, 1))
            fast = _find(rows, "fastenc", B, L)
            say(f"fastenc {B}x{L}: {fast.p50:.3f} ms ({graphs[0].p50:.3f} ms replay alone; user call "
                f"{user[0].p50:.3f} ms, {host_syncs_of(user[0])} host syncs), peak "
                f"{_find(rows, 'fastenc', B, L, 'peak_memory').p50:.3f} GB, min cos {cos:.5f}")
        del enc
    del model
    torch.cuda.empty_cache()
    return rows


def run_xxl(args, say) -> list[Row]:
    dev = torch.device("cuda")
    model = random_model("xxl", dev, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    rows: list[Row] = []
    for B, L in target_first(args.shapes):
        ids = sample_ids(model.config.vocab_size, B, L, dev)
        with torch.inference_mode():
            rows += measure("t5-xxl", lambda: model(ids), "xxl", params, B, L, args, note="eager bf16")
        say(f"t5-xxl {B}x{L}: {rows[-2].p50:.3f} ms")
    del model
    torch.cuda.empty_cache()
    return rows


def worker_compile(args) -> None:
    """Child process: torch.compile(max-autotune) of the reference; one JSON line per finished shape."""
    dev = torch.device("cuda")
    model = random_model(args.size, dev, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    compiled = torch.compile(model, mode="max-autotune", dynamic=False)  # one static graph per shape, as timed
    for B, L in target_first(args.shapes):  # the target's shape first: it may be the only one in the budget
        ids = sample_ids(model.config.vocab_size, B, L, dev)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(ids)
            torch.cuda.synchronize()
            took = time.perf_counter() - start
            for row in measure("torch-compile", lambda: compiled(ids), args.size, params, B, L, args,
                               note=f"max-autotune, compiled in {took:.0f} s"):
                print(json.dumps(asdict(row)), flush=True)


def worker_ort(args) -> None:
    """Child process: export the student (fp32) to ONNX, time ONNX Runtime's CPU provider at one shape."""
    import tempfile

    import onnxruntime as ort

    from fastenc.exporters.contract import make_profile
    from fastenc.exporters.onnx import export_onnx

    B, L = args.ort_shape
    model = random_model(args.size, torch.device("cpu"), torch.float32)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder.fp32.onnx"
        export_onnx(model, path, make_profile(max(B, 1), L))
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ids = sample_ids(model.config.vocab_size, B, L, "cpu").to(torch.int32).numpy()
        feed = {"input_ids": ids, "attention_mask": (ids * 0 + 1)}
        for _ in range(3):
            session.run(None, feed)
        samples = []
        for _ in range(max(5, args.reps // 5)):
            t0 = time.perf_counter()
            session.run(None, feed)
            samples.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = stats(samples)
    note = f"CPU provider, {os.cpu_count()} cpus, fp32, wall clock"
    print(json.dumps(asdict(Row("onnxruntime-cpu", args.size, params, "fp32", B, L, "latency", "ms", p20, p50, p80,
                                len(samples), note))), flush=True)


def run_worker(name: str, args, budget: float, say) -> list[Row]:
    """Run a worker in a child process for at most ``budget`` seconds; keep the rows it finished."""
    argv = [sys.executable, "-m", "bench.gpu", "--worker", name, "--size", args.size, "--reps", str(args.reps),
            "--warmup", str(args.warmup), "--shapes", ",".join(f"{b}x{s}" for b, s in args.shapes),
            "--ort-shape", "{}x{}".format(*args.ort_shape)]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=budget, cwd=root, env=env)
        out, err, status = done.stdout, done.stderr, f"exit {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        status = f"stopped after its {budget:.0f} s budget"
    rows = parse_rows(out)
    say(f"{name}: {len(rows)} row(s), {status}")
    if not rows and err.strip():
        say(f"{name}: " + err.strip().splitlines()[-1][:300])
    return rows


def parse_rows(text: str) -> list[Row]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(Row(**json.loads(line)))
            except (TypeError, ValueError):
                continue
    return rows


# ----------------------------------------------------------------------------- output


def gpu_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"`` (the CSV's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def write_csv(path: Path, rows: list[Row], context: dict[str, str]) -> Path:
    """Replace ``path`` with this run's rows (atomically)."""
    from fastenc.fileio import atomic_write

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        d = asdict(r)
        for k in ("p20", "p50", "p80"):
            d[k] = f"{d[k]:.6g}"
        writer.writerow({**context, **d})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(buf.getvalue()))
    return path


def _find(rows: list[Row], candidate: str, B: int, L: int, metric: str = "latency") -> Row | None:
    return next((r for r in rows if (r.candidate, r.batch, r.seq, r.metric) == (candidate, B, L, metric)), None)


def summary(rows: list[Row]) -> list[str]:
    """The table and the issue's targets (base student, B=1, L=512)."""
    lines = [f"{'candidate':16} {'B':>3} {'L':>4} {'p50 ms':>10} {'peak GB':>8}"]
    for r in rows:
        if r.metric == "latency":
            peak = _find(rows, r.candidate, r.batch, r.seq, "peak_memory")
            lines.append(f"{r.candidate:16} {r.batch:>3} {r.seq:>4} {r.p50:>10.3f} "
                         f"{(f'{peak.p50:.3f}' if peak else '-'):>8}")
    fast = _find(rows, "fastenc", 1, 512)
    if fast is None:
        return lines + ["targets: no fastenc row at B=1, L=512"]

    def check(label: str, ok: bool | None, value: str) -> str:
        return f"{'PASS' if ok else ('MISS' if ok is not None else 'n/a ')} {label}: {value}"

    compiled, xxl = _find(rows, "torch-compile", 1, 512), _find(rows, "t5-xxl", 1, 512)
    peak = _find(rows, "fastenc", 1, 512, "peak_memory")
    lines.append(check(f"latency <= {TARGET_MS} ms", fast.p50 <= TARGET_MS, f"{fast.p50:.3f} ms"))
    lines.append(check(f">= {TARGET_VS_COMPILE}x torch.compile", None if compiled is None else
                       compiled.p50 / fast.p50 >= TARGET_VS_COMPILE,
                       f"{compiled.p50 / fast.p50:.2f}x" if compiled else "no torch.compile row"))
    lines.append(check(f">= {TARGET_VS_XXL:.0f}x T5-XXL eager", None if xxl is None else
                       xxl.p50 / fast.p50 >= TARGET_VS_XXL, f"{xxl.p50 / fast.p50:.1f}x" if xxl else "no T5-XXL row"))
    lines.append(check(f"peak memory <= {TARGET_PEAK_GB} GB", None if peak is None else peak.p50 <= TARGET_PEAK_GB,
                       f"{peak.p50:.3f} GB" if peak else "no memory row"))
    baselines = [r for r in (compiled, xxl, _find(rows, "torch-eager", 1, 512)) if r is not None]
    call = _find(rows, "fastenc-call", 1, 512)
    lines.append(f"host syncs per call: fastenc {host_syncs_of(fast)}, baselines "
                 f"{max((host_syncs_of(r) for r in baselines), default=0)}"
                 + (f" (the user call makes {host_syncs_of(call)}: its row is fastenc-call, {call.p50:.3f} ms)"
                    if call else ""))
    if "tuned inside the window" in fast.note or (peak is not None and "tuned inside the window" in peak.note):
        lines.append("note: a fastenc kernel tuned inside the measured window (see the CSV's note)")
    return lines


def context(gpu: str) -> dict[str, str]:
    versions = []
    for mod in ("torch", "triton", "transformers", "onnxruntime"):
        try:
            versions.append(f"{mod}={__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - not installed here
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
            "versions": ";".join(versions), "git_commit": commit}


def plan(args) -> list[tuple[str, list[tuple[int, int]]]]:
    """The steps of a run in order, each with its shapes: first every candidate at the targets' B = 1,
    L = 512 (so a run cut short still has the rows the targets read), then the other shapes, then ONNX
    Runtime's one shape."""
    wanted = set(args.candidates)
    on_gpu = [name for name, needs in (("student", {"fastenc", "torch-eager"} & wanted),
                                       ("t5-xxl", "t5-xxl" in wanted), ("torch-compile", "torch-compile" in wanted))
              if needs]
    shapes = target_first(args.shapes)
    passes = [shapes[:1], shapes[1:]] if shapes[0] == (1, 512) else [shapes]
    steps = [(name, part) for part in passes if part for name in on_gpu]
    if "onnxruntime-cpu" in wanted:
        steps.append(("onnxruntime-cpu", [args.ort_shape]))
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: bench.gpu needs a CUDA GPU and torch sees none here")
        return 0
    if args.worker == "torch-compile":
        worker_compile(args)
        return 0
    if args.worker == "onnxruntime-cpu":
        worker_ort(args)
        return 0

    def say(text: str) -> None:
        print(f"[bench.gpu {time.strftime('%H:%M:%S')}] {text}", flush=True)

    gpu = torch.cuda.get_device_name()
    say(f"{gpu}; shapes {args.shapes}; candidates {', '.join(args.candidates)}")
    start = time.monotonic()
    path = args.out_dir / f"gpu-{gpu_slug(gpu)}.csv"
    ctx = context(gpu)
    rows: list[Row] = []

    def budget(wanted: float) -> float:
        if args.time_limit is None:
            return wanted
        return min(wanted, args.time_limit - (time.monotonic() - start) - 10)

    runners = {"student": lambda a: run_student(a, say), "t5-xxl": lambda a: run_xxl(a, say),
               "torch-compile": lambda a: run_worker("torch-compile", a, budget(a.compile_budget), say),
               "onnxruntime-cpu": lambda a: run_worker("onnxruntime-cpu", a, budget(a.ort_budget), say)}
    for name, shapes in plan(args):
        if budget(60.0) < 15:
            say(f"{name} {shapes}: skipped, the time limit is nearly used up")
            continue
        try:
            rows += runners[name](argparse.Namespace(**{**vars(args), "shapes": shapes}))
        except Exception as exc:  # noqa: BLE001 - one candidate failing must not lose the others' rows
            say(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        write_csv(path, rows, ctx)
    say(f"wrote {len(rows)} rows to {path}")
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
