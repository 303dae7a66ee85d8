"""Side by side on the CPU: fastenc's default CPU path against the runtimes a user would pick instead.

    python -m bench.cpu_path [--size base] [--shapes 1x512,1x120,4x256] [--threads 2] [--rounds 5]
                             [--candidates ...] [--contention] [--out FILE.csv|DIR] [--save]
                             [--checkpoint DIR]

Every candidate runs in its own worker process (``bench/workers.py``) with the same weights
(random T5-initialised unless ``--checkpoint``) and the same thread count, set for every runtime:
torch (``set_num_threads``, ``OMP_NUM_THREADS``), ONNX Runtime (intra-op ``threads``, inter-op 1,
spinning off), OpenVINO (``INFERENCE_NUM_THREADS``, one stream, latency hint). Per shape, each
round asks every worker for one call in turn (round-robin), so a change in machine load hits all
alike; reported are the median and minimum wall time, process CPU time, the cosine similarity of
the embeddings to the fp32 model (mean and worst token), the build time and the first call (where
plans are searched and graphs compiled). ``--contention`` repeats the rounds while another process
keeps one core busy and reports the slowdown.

Results go to ``--out`` (a ``.csv`` file, with ``.md`` table and ``.png`` plot beside it, or a
folder), else to a new run folder under the bench cache; ``bench/results/`` changes only with
``--save`` (``cpu_path-<machine>.{csv,md,png}``, the machine and its load named inside).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fastenc.backends.cpu import prompt_ids
from fastenc.config import SIZES
from fastenc.errors import BackendUnavailable

from . import common, exports, workers

log = logging.getLogger("fastenc")

#: name -> (what it is, needs native bf16). The default set is what a user would compare.
CANDIDATES = {
    "cpu": ("fastenc's default on the CPU: the cpu backend with its measured plan (fastenc tune)", False),
    "cpu-bf16": ("fastenc cpu backend's op table alone: bf16, no int8, no other engine", True),
    "torch-bf16": ("fastenc torch backend, bf16", True),
    "torch-fp32": ("fastenc torch backend, fp32", False),
    "compile-bf16": ("torch.compile of the bf16 model (inductor, freezing)", True),
    "compile-fp32": ("torch.compile of the fp32 model (inductor, freezing)", False),
    "transformers-bf16": ("transformers T5EncoderModel + projector, bf16", True),
    "transformers-fp32": ("transformers T5EncoderModel + projector, fp32", False),
    "ort-fp32": ("ONNX Runtime, plain fp32 export", False),
    "ort-opt": ("ONNX Runtime, fp32 export optimised offline for the CPU provider", False),
    "ort-int8": ("ONNX Runtime dynamic int8 (per-channel weights, per-tensor activations)", False),
    "ov": ("OpenVINO, its default precision on this CPU (bf16 where native, else fp32)", False),
    "ov-bf16": ("OpenVINO with the bf16 inference-precision hint", True),
    "ov-int8w": ("OpenVINO + NNCF int8 weight compression (compress_weights, INT8_ASYM)", False),
}
DEFAULT = ["cpu", "compile-bf16", "compile-fp32", "ort-fp32", "ort-int8", "ov", "ov-bf16", "ov-int8w"]
#: On a CPU without native bf16 the bf16 candidates are emulated (tens of times slower): fp32 stand-ins.
FP32_STANDIN = {"torch-bf16": "torch-fp32", "compile-bf16": "compile-fp32", "transformers-bf16": "transformers-fp32",
                "cpu-bf16": "torch-fp32", "ov-bf16": "ov"}
#: fastenc's own candidates; every other one is a peer.
FASTENC = ("cpu", "cpu-bf16", "torch-bf16", "torch-fp32")
#: The fidelity floor a peer must meet to count (mean cos-sim and worst token to the fp32 model).
FLOOR = (0.9995, 0.999)
ONNX_KINDS = {"ort-fp32": ("fp32", "onnx"), "ort-opt": ("fp32", "onnx-ort"), "ort-int8": ("int8", "onnx-int8")}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        b, sep, l_ = part.strip().lower().partition("x")
        if not sep or not b.isdigit() or not l_.isdigit() or int(b) < 1 or int(l_) < 1:
            raise argparse.ArgumentTypeError(f"--shapes: {part!r} is not BATCHxLENGTH (e.g. 1x512)")
        shapes.append((int(b), int(l_)))
    return shapes


# ----------------------------------------------------------------------------- building (in the worker)


def _label(backend: str, model, dtype: torch.dtype) -> str:
    from types import SimpleNamespace

    try:
        from fastenc.info import describe_backend
    except ImportError:
        return f"fastenc {backend}"
    return describe_backend(SimpleNamespace(backend=backend, dtype=dtype, model=model, device=torch.device("cpu")))


def build_candidate(name: str, o: dict, threads: int):
    """Runs in the worker process: returns ``(run(ids) -> [B, L, P] tensor, label, note)``."""
    import copy

    if name in ONNX_KINDS or name.startswith("ov"):
        return _build_graph(name, o, threads)
    model32 = common.build_model(o["size"], seed=o["seed"], checkpoint=o["checkpoint"])
    source = f"bench:{o['size']}:seed{o['seed']}"
    if o["checkpoint"]:
        from fastenc.backends.cpu import source_fingerprint

        source = source_fingerprint(o["checkpoint"])
    if name == "cpu":  # what fastenc.load gives: the Encoder with the plan for this machine (cached after a search)
        planned = common.planned_cpu(model32, source, emulated_bf16=bool(o.get("emulated")))
        enc = planned.encoder
        return (lambda ids: enc(ids)), _label("cpu", enc.model, enc.dtype), planned.note
    if name == "cpu-bf16":
        from fastenc.backends import cpu as fcpu

        m = fcpu.prepare(model32, int8="none", source=source, attention="sdpa")
        return (lambda ids: m(ids)), _label("cpu", m, torch.bfloat16), "op table only, sdpa attention"
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    m = model32 if dtype == torch.float32 else copy.deepcopy(model32).cast(dtype)
    del model32
    if name.startswith("torch-"):
        return (lambda ids: m(ids)), _label("torch", m, dtype), ""
    if name.startswith("transformers-"):
        tm = common.TransformersEncoder(m)
        return (lambda ids: tm(ids)), f"transformers {name.split('-')[1]}", ""
    if name.startswith("compile-"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(m, dynamic=False)
        return (lambda ids: compiled(ids)), f"torch.compile {name.split('-')[1]} (inductor, freezing)", \
            "compiles at the first call of each shape"
    raise BackendUnavailable(f"unknown candidate {name!r}")


def _build_graph(name: str, o: dict, threads: int):
    from fastenc.exporters.artifacts import find_artifacts

    out_dir = Path(o["export_dir"])
    if name in ONNX_KINDS:
        dtype, kind = ONNX_KINDS[name]
        path = next((p for p, meta in find_artifacts(out_dir, "onnxruntime")
                     if meta.get("dtype") == dtype and meta.get("kind") == kind), None)
        if path is None:
            raise BackendUnavailable(f"{out_dir}: no {kind} {dtype} model")
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no spinning between calls
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run_ort(ids):
            feed = {"input_ids": ids.to(torch.int32).numpy()}
            if "attention_mask" in names:
                feed["attention_mask"] = torch.ones_like(ids, dtype=torch.int32).numpy()
            return torch.from_numpy(sess.run(None, feed)[0])

        label = {"ort-fp32": "ONNX Runtime fp32", "ort-opt": "ONNX Runtime fp32 (optimised graph)",
                 "ort-int8": "ONNX Runtime int8 (dynamic)"}[name]
        return run_ort, f"{label} {ort.__version__}", "intra-op spinning off"
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed ({exc}); pip install openvino nncf") from None
    path = next((p for p, meta in find_artifacts(out_dir, "onnxruntime")
                 if meta.get("dtype") == "fp32" and meta.get("kind") == "onnx"), None)
    if path is None:
        raise BackendUnavailable(f"{out_dir}: no fp32 ONNX model to convert")
    core = ov.Core()
    model = ov.convert_model(str(path))
    note = "converted from the fastenc ONNX export"
    if name == "ov-int8w":
        try:
            import nncf
        except ImportError as exc:
            raise BackendUnavailable(f"nncf is not installed ({exc}); pip install nncf") from None
        model = nncf.compress_weights(model)  # INT8_ASYM weights, activations in the inference precision
        note += "; NNCF compress_weights (int8 asym)"
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if name == "ov-bf16":
        config["INFERENCE_PRECISION_HINT"] = "bf16"
        note += "; INFERENCE_PRECISION_HINT bf16"
    compiled = core.compile_model(model, "CPU", config)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type: f32, bf16, f16
    precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    precision = {"bf16": "bf16", "f32": "fp32", "f16": "fp16"}.get(precision, precision)
    request = compiled.create_infer_request()
    inputs = [(p.get_any_name(), p.get_element_type().to_dtype()) for p in compiled.inputs]

    def run_ov(ids):
        feed = {}
        for input_name, np_dtype in inputs:
            arr = ids if input_name == "input_ids" else torch.ones_like(ids)
            feed[input_name] = arr.numpy().astype(np_dtype)
        request.infer(feed)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    what = f"OpenVINO {ov.__version__.split('-')[0]} {precision}" + (" + int8 weights (NNCF)" if name == "ov-int8w"
                                                                      else "")
    return run_ov, what, note


# ----------------------------------------------------------------------------- the run (in the parent)


@dataclass
class Point:
    """One candidate at one shape."""

    name: str
    label: str
    batch: int
    seq: int
    first_ms: float = float("nan")
    cos_mean: float = float("nan")
    cos_worst: float = float("nan")
    prompt_mean: float = float("nan")  # the same on padded prompts, read unmasked (what Flux and SD3 send)
    prompt_worst: float = float("nan")
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # wall times with one core kept busy

    @property
    def p50(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def busy_p50(self) -> float:
        return statistics.median(self.busy) if self.busy else float("nan")


def choose_candidates(names: list[str], native_bf16: bool, say, emulated: bool = False) -> list[str]:
    out = []
    for name in names:
        if name not in CANDIDATES:
            raise SystemExit(f"--candidates: unknown {name!r} (known: {', '.join(CANDIDATES)})")
        if CANDIDATES[name][1] and not native_bf16 and not emulated:
            standin = FP32_STANDIN.get(name)
            say(f"  skip {name}: this CPU has no AVX512-BF16/AMX (bf16 would be emulated, tens of times slower)"
                + (f"; {standin} instead" if standin else ""))
            name = standin
        if name and name not in out:
            out.append(name)
    return out


def run(args, say) -> tuple[list[Point], dict]:
    from fastenc.backends.cpu import fast_path_supported

    native_bf16, why = fast_path_supported()
    names = choose_candidates(args.candidates.split(",") if args.candidates else DEFAULT, native_bf16, say,
                              args.emulated_bf16)
    load_start = common.load_average()
    cfg = common.get_config(args.size)
    model32 = common.build_model(args.size, seed=args.seed, checkpoint=args.checkpoint)
    options = {"size": args.size, "seed": args.seed, "checkpoint": args.checkpoint, "export_dir": None,
               "emulated": args.emulated_bf16}
    if any(n in ONNX_KINDS or n.startswith("ov") for n in names):
        key = exports.model_key(args.size, args.seed, args.checkpoint)
        ckpt = args.checkpoint or exports.saved_checkpoint(model32, key)
        out_dir = exports.export_dir(key)
        t0 = time.perf_counter()
        try:
            exports.ensure_export(ckpt, out_dir, int8=True, max_batch=max(4, max(b for b, _ in args.shapes)),
                                  max_seq=max(512, max(s for _, s in args.shapes)))
            options["export_dir"] = str(out_dir)
            say(f"  ONNX exports in {out_dir} ({time.perf_counter() - t0:.0f} s; reused when present)")
        except BackendUnavailable as exc:
            say(f"  skip the ONNX Runtime and OpenVINO candidates: {exc}")
            names = [n for n in names if not (n in ONNX_KINDS or n.startswith("ov"))]
    from bench import cpu_path as this  # pickled by module name, also when run as __main__

    builder = this.build_candidate
    env = {"OMP_WAIT_POLICY": args.omp_wait_policy.upper()} if args.omp_wait_policy != "default" else {}
    pool: list[workers.Worker] = []
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                here = env
                if name == "cpu" and not env:  # what a user who imports fastenc before torch gets (fastenc/__init__)
                    from fastenc import OMP_WAIT_POLICY_DEFAULT

                    here = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)}
                w = workers.start(name, builder, options, args.threads, env=here)
            except workers.WorkerError as exc:
                say(f"  skip {name}: {exc}")
                continue
            pool.append(w)
            say(f"  built {name} in {time.perf_counter() - t0:.1f} s: {w.label}" + (f" [{w.note}]" if w.note else ""))
        points: list[Point] = []
        for batch, seq in args.shapes:
            ids = common.sample_ids(cfg, batch, seq, seed=args.seed + 1)
            prompts = prompt_ids(cfg, batch, seq, seed=args.seed + 2)  # [B, L]: a prompt, EOS, padding
            with torch.inference_mode():
                ref, ref_prompts = model32(ids), model32(prompts)  # [B, L, P] fp32 references
            here = []
            for w in list(pool):
                p = Point(w.name, w.label, batch, seq)
                try:
                    got = w.request("first", ids.numpy())
                except workers.WorkerError as exc:
                    say(f"  {w.name} fails at {batch}x{seq}: {exc}")
                    continue
                cos = F.cosine_similarity(torch.from_numpy(got["out"]), ref, dim=-1)  # [B, L]
                p.first_ms, p.cos_mean, p.cos_worst = got["first_ms"], float(cos.mean()), float(cos.min())
                cos = F.cosine_similarity(torch.from_numpy(w.request("first", prompts.numpy())["out"]), ref_prompts,
                                          dim=-1)  # [B, L], every padding position included
                p.prompt_mean, p.prompt_worst = float(cos.mean()), float(cos.min())
                w.request("time", ids.numpy(), args.warmup)
                here.append((w, p))
            say(f"  {batch}x{seq}: {args.rounds} rounds x {len(here)} candidates ...")
            for busy in ([False, True] if args.contention else [False]):
                ctx = workers.BusyCore() if busy else None
                if ctx:
                    ctx.__enter__()
                try:
                    for _ in range(args.rounds):
                        for w, p in here:
                            for wall, cpu in w.request("time", ids.numpy(), 1):
                                (p.busy if busy else p.wall).append(wall)
                                if not busy:
                                    p.cpu.append(cpu)
                finally:
                    if ctx:
                        ctx.__exit__(None, None, None)
            points += [p for _, p in here]
        builds = {w.name: (w.build_s, w.note) for w in pool}
    finally:
        for w in pool:
            w.stop()
    from fastenc.backends.cpu_plan import machine

    meta = {"machine": common.machine_description(load_start), "threads": args.threads, "native_bf16": why,
            "isa": machine(),
            "omp_wait_policy": args.omp_wait_policy,
            "builds": builds, "size": args.size, "params": common.param_count(cfg),
            "weights": f"checkpoint {args.checkpoint}" if args.checkpoint else f"random T5-init (seed {args.seed})"}
    return points, meta


# ----------------------------------------------------------------------------- reporting


def meets_floor(p: Point) -> bool:
    """On random ids and on padded prompts alike (NaN, not measured, never meets it)."""
    return (p.cos_mean >= FLOOR[0] and p.cos_worst >= FLOOR[1]
            and p.prompt_mean >= FLOOR[0] and p.prompt_worst >= FLOOR[1])


def best_peers(points: list[Point]) -> dict[tuple[int, int], Point]:
    """Per shape, the fastest candidate that is not fastenc's and meets the fidelity floor."""
    best: dict[tuple[int, int], Point] = {}
    for p in points:
        if p.name in FASTENC or not meets_floor(p) or not p.wall:
            continue
        key = (p.batch, p.seq)
        if key not in best or p.p50 < best[key].p50:
            best[key] = p
    return best


def table(points: list[Point], meta: dict) -> str:
    """Markdown table: one row per candidate and shape, its speed against the fastest peer at the floor."""
    best = best_peers(points)
    contended = any(p.busy for p in points)
    head = ["B x L", "candidate", "median ms", "min ms", "x fastest peer at the floor", "cos mean / worst",
            "padded prompts: cos mean / worst", "floor", "first call ms"]
    if contended:
        head += ["1 core busy: median ms", "slowdown"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 2 + [" ---: "] * (len(head) - 2)) + "|"]
    for p in sorted(points, key=lambda p: (p.batch, p.seq, p.p50)):
        r = best.get((p.batch, p.seq))
        name = f"**{p.label} (`{p.name}`)**" if p.name == "cpu" else f"{p.label} (`{p.name}`)"
        cells = [f"{p.batch} x {p.seq}", name, f"{p.p50:.1f}", f"{min(p.wall):.1f}",
                 f"{r.p50 / p.p50:.2f}" if r else "n/a", f"{p.cos_mean:.5f} / {p.cos_worst:.5f}",
                 f"{p.prompt_mean:.5f} / {p.prompt_worst:.5f}", "meets" if meets_floor(p) else "below",
                 f"{p.first_ms:.0f}"]
        if contended:
            cells += [f"{p.busy_p50:.1f}", f"{p.busy_p50 / p.p50:.2f}x" if p.busy else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"ISA class: {meta.get('isa', 'unknown')}. {meta['size']} ({meta['params'] / 1e6:.0f} M parameters), "
             f"{meta['weights']}, {meta['threads']} threads per runtime, each candidate in its own process, "
             f"round-robin, OMP_WAIT_POLICY {meta.get('omp_wait_policy', 'default')} (fastenc's `cpu`: PASSIVE unless "
             f"given, as importing fastenc sets it); machine: {meta['machine']}; "
             f"cpu backend fast path: {meta['native_bf16']}.",
             f"Fidelity floor: mean cos-sim >= {FLOOR[0]} and worst token >= {FLOOR[1]} to the fp32 model on the timed "
             "random ids and on padded prompts of the same shape (a prompt, EOS and padding to the full length, "
             "unmasked, as Flux and SD3 send them: every padding position counts); peers below it do not count as "
             "the fastest peer."]
    for (b, l_), peer in sorted(best.items()):
        ours = next((p for p in points if p.name == "cpu" and (p.batch, p.seq) == (b, l_)), None)
        if ours is not None:
            notes.append(f"- {b} x {l_}: fastenc default {ours.p50:.1f} ms vs fastest peer at the floor "
                         f"{peer.label} {peer.p50:.1f} ms: {peer.p50 / ours.p50:.2f}x")
    notes += [f"- `{name}` built in {s:.1f} s" + (f": {note}" if note else "") for name, (s, note) in
              meta["builds"].items()]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_csv(path: Path, points: list[Point], meta: dict) -> None:
    rows = []
    dtype_of = {"cpu": "planned", "ort-int8": "int8", "ov-int8w": "int8-weights", "ov-bf16": "bf16"}
    for p in points:
        dtype = dtype_of.get(p.name, "fp32" if "fp32" in p.name or p.name in ("ort-opt", "ov") else "bf16")
        stats = [("latency", "ms", common.Stats.of(p.wall)), ("cpu_time", "ms", common.Stats.of(p.cpu)),
                 ("first_call", "ms", common.Stats.single(p.first_ms)),
                 ("cos_mean", "1", common.Stats.single(p.cos_mean)),
                 ("cos_worst", "1", common.Stats.single(p.cos_worst)),
                 ("cos_mean_padded_prompts", "1", common.Stats.single(p.prompt_mean)),
                 ("cos_worst_padded_prompts", "1", common.Stats.single(p.prompt_worst))]
        if p.busy:
            stats.append(("latency_one_core_busy", "ms", common.Stats.of(p.busy)))
        rows += [common.Row(meta["size"], meta["params"], p.name, dtype, p.batch, p.seq, m, u, s) for m, u, s in stats]
    ctx = common.run_context(torch.device("cpu"), "checkpoint" if "checkpoint" in meta["weights"] else "random")
    ctx["device"], ctx["threads"] = meta["machine"], str(meta["threads"])
    if path.exists():
        path.unlink()  # a result file holds one run
    common.append_csv(path, rows, ctx)


def plot(path: Path, points: list[Point], meta: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = sorted({(p.batch, p.seq) for p in points})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 0.45 * len(points) / len(shapes) + 2.2),
                             squeeze=False)
    for ax, (b, s) in zip(axes[0], shapes):
        pts = sorted((p for p in points if (p.batch, p.seq) == (b, s)), key=lambda p: -p.p50)
        y = range(len(pts))
        ax.barh(y, [p.p50 for p in pts], color=["tab:green" if p.name == "cpu" else "tab:gray" if meets_floor(p)
                                                else "lightgray" for p in pts],
                label="median")
        if any(p.busy for p in pts):
            ax.barh(y, [p.busy_p50 for p in pts], fill=False, hatch="//", edgecolor="tab:red",
                    label="one core busy")
        ax.set_yticks(list(y), [f"{p.label}\ncos {p.cos_mean:.4f}/{p.cos_worst:.4f}" for p in pts], fontsize=7)
        ax.set_xlabel("ms per call (median)")
        ax.set_title(f"B={b}, L={s}")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{meta['size']}, {meta['threads']} threads; {meta['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(target: Path, points: list[Point], meta: dict) -> list[Path]:
    """``target`` is a ``.csv`` path (table ``.md`` and plot ``.png`` beside it) or a folder."""
    from fastenc.fileio import atomic_write

    if target.suffix == ".csv":
        csv_path = target
    else:
        csv_path = target / "cpu_path.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(csv_path, lambda p: write_csv(p, points, meta))
    md = csv_path.with_suffix(".md")
    text = table(points, meta)
    atomic_write(md, lambda p: p.write_text(text))
    out = [csv_path, md]
    png = csv_path.with_suffix(".png")
    if plot(png, points, meta):
        out.append(png)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", choices=[s for s in SIZES if s != "xxl"] + list(common.TINY_SIZES))
    p.add_argument("--checkpoint", help="real weights (a fastenc-loadable checkpoint) instead of random ones")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("1x512,1x120,4x256"),
                   help="BATCHxLENGTH,... (default 1x512,1x120,4x256)")
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: the CPUs)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per shape (each candidate once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate and shape after the first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", help=f"comma-separated subset of {','.join(CANDIDATES)} (default "
                                        f"{','.join(DEFAULT)})")
    p.add_argument("--contention", action="store_true", help="repeat the rounds with one core kept busy")
    p.add_argument("--omp-wait-policy", choices=["default", "passive", "active"], default="default",
                   help="OMP_WAIT_POLICY for the workers (default: each runtime's own; fastenc's `cpu` gets the "
                        "PASSIVE that importing fastenc sets): passive keeps torch's idle OpenMP threads from "
                        "spinning (on a shared machine a spinning thread takes the core its peer needs)")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="run the bf16 candidates even where the CPU emulates bf16 (accuracy only: slow)")
    p.add_argument("--out", help="results: a .csv file (table .md and plot .png beside it) or a folder "
                                 "(default: a new run folder under the bench cache)")
    p.add_argument("--save", action="store_true", help="also write bench/results/cpu_path-<machine>.{csv,md,png}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.threads = args.threads or cpus
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    say = lambda text: sys.stdout.write(text + "\n") or sys.stdout.flush()  # noqa: E731
    say(f"CPU side by side: {args.size}, shapes {', '.join(f'{b}x{s}' for b, s in args.shapes)}, "
        f"{args.threads} thread(s) per runtime; {common.machine_description()}")
    points, meta = run(args, say)
    if not points:
        say("nothing ran")
        return 1
    text = table(points, meta)
    say("\n" + text)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = Path(args.out) if args.out else exports.cache_root() / "runs" / f"cpu_path-{stamp}"
    written = write_outputs(target, points, meta)
    if args.save:
        written += write_outputs(common.RESULTS_DIR / f"cpu_path-{common.machine_slug()}.csv", points, meta)
    say("written: " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
