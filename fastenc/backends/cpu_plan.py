"""The ``cpu`` backend's plan: what runs this model fastest on this CPU, chosen by measurement under a
fidelity floor.

A plan covers everything that decides speed on the CPU: the engine (the op-table path of
:mod:`.cpu`, or OpenVINO on the same model, :mod:`.cpu_openvino`), and for the op-table path the
attention kernel, the int8 weight set (:func:`.cpu.plan_int8`) and the GELU form. :func:`tune`

1. computes the fp32 model's output on held-out inputs (ids and lengths the int8 calibration never
   saw: a full-length row without mask and a padded two-row batch with one),
2. builds every candidate that is installed and fits the time budget, checks its output against
   that reference (mean cos-sim >= ``min_cos`` and worst token >= ``min_worst``; padding excluded),
3. times the candidates round-robin at the plan's shapes (median of ``rounds`` calls each; one that
   cannot win, below the floor or over ``SLACK`` times the fastest, stops being timed at that shape), and
4. keeps the fastest candidate that meets the floor (sum of the medians over the shapes), so the plan
   is never slower than the best single candidate it measured.

The plan is cached as JSON per (CPU model and ISA flags, thread count, torch / OpenVINO versions,
checkpoint fingerprint, floor, shapes) under ``<cache>/cpu-plans/``; a cached plan costs no timing,
only building the chosen engine. ``fastenc tune`` runs the search ahead of time and prints the table;
``fastenc info --probe`` lists the plans in force on this machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Sequence

import torch
import torch.nn.functional as F

from ..errors import BackendUnavailable, ConfigError
from ..info import cpu_flags
from ..model import T5Encoder
from ..ops import TORCH_OPS
from . import cpu as fcpu

log = logging.getLogger("fastenc")

#: Bump when the search, the candidates or the plan format change (cached plans are then ignored).
PLAN_VERSION = 6
#: The fidelity floor: mean cos-sim over tokens and the worst token, to the fp32 model, on held-out inputs.
MIN_COS = 0.9995
MIN_WORST = 0.999
#: (batch, length) the plan is timed at: Flux/SD3's 512 tokens and PixArt's 120.
TUNE_SHAPES: tuple[tuple[int, int], ...] = ((1, 512), (1, 120))
#: Seconds the search may spend building and timing candidates (a candidate not started by then is skipped).
DEFAULT_BUDGET_S = 120.0
ROUNDS = 3
#: A candidate stops being timed at a shape once its fastest call is this many times the leader's median.
SLACK = 1.5
#: CPU flags that change which kernels the libraries pick (part of the cache key).
ISA_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2", "fma")
ENGINES = ("eager", "openvino", "onnxruntime")
ENGINE_NAMES = {"eager": "the op table", "openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}
#: A comma-separated subset of ENGINES the search may use (unset: all that are installed).
ENGINES_ENV = "FASTENC_CPU_ENGINES"
PRECISIONS = ("bf16", "fp32")
HELD_OUT_SEED = 20261202  # never the calibration seed of cpu.calibration_ids
HELD_OUT_TOKENS = 512


@dataclass(frozen=True)
class Candidate:
    """One way to run the model: ``eager`` (the op table of :mod:`.cpu`), ``openvino`` (:mod:`.cpu_openvino`) or
    ``onnxruntime`` (:mod:`.cpu_onnxruntime`: fp32), with the planned int8 weights when ``int8``."""

    engine: str = "eager"
    attention: str = "sdpa"  # eager only
    int8: bool = False  # the planned int8 weights (openvino: activations quantised as it runs)
    gelu: str = "exact"  # eager only
    precision: str = "bf16"  # "bf16" (CPUs with native bf16) or "fp32" (the others)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def name(self) -> str:
        if self.engine == "openvino":
            return f"openvino {self.precision}" + (" + int8 (dynamic)" if self.int8 else "")
        if self.engine == "onnxruntime":
            return "onnxruntime fp32" + (" + int8 (per-token)" if self.int8 else "")
        parts = [f"eager {self.precision}" + (" + int8" if self.int8 else ""), f"{self.attention} attention"]
        if self.gelu != "exact":
            parts.append(f"{self.gelu} GELU")
        return ", ".join(parts)


@dataclass(frozen=True)
class Measured:
    candidate: Candidate
    ms: dict[str, float] = field(default_factory=dict)  # "BxL" -> median ms
    cos: float = float("nan")
    worst: float = float("nan")
    passes: bool = False
    note: str = ""  # why it was skipped or failed

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values()) if self.ms else float("inf")


@dataclass(frozen=True)
class CpuPlan:
    chosen: Candidate
    int8_weights: tuple[str, ...] = ()
    measured: tuple[Measured, ...] = ()
    shapes: tuple[tuple[int, int], ...] = TUNE_SHAPES
    min_cos: float = MIN_COS
    min_worst: float = MIN_WORST
    tune_s: float = 0.0
    machine: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = PLAN_VERSION
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CpuPlan":
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("version", None) != PLAN_VERSION:
            raise ValueError("stale or foreign plan")
        chosen = _candidate(data["chosen"])
        measured = tuple(Measured(_candidate(m["candidate"]), {str(k): float(v) for k, v in m["ms"].items()},
                                  float(m["cos"]), float(m["worst"]), bool(m["passes"]), str(m["note"]))
                         for m in data["measured"])
        weights = tuple(str(w) for w in data["int8_weights"])
        shapes = tuple((int(b), int(s)) for b, s in data["shapes"])
        return cls(chosen, weights, measured, shapes, float(data["min_cos"]), float(data["min_worst"]),
                   float(data["tune_s"]), str(data["machine"]))

    def table(self) -> str:
        """The measured candidates, fastest first, the chosen one marked and the floor named."""
        heads = [f"{b}x{s} ms" for b, s in self.shapes]
        lines = [f"{'candidate':44} " + " ".join(f"{h:>11}" for h in heads) + "   cos mean / worst",
                 "-" * (64 + 12 * len(heads))]
        for m in sorted(self.measured, key=lambda m: (not m.passes, m.total_ms)):
            mark = "*" if m.candidate == self.chosen else " "
            cells = " ".join(f"{m.ms.get(_shape_key(sh), float('nan')):>11.1f}" for sh in self.shapes)
            verdict = "  below the floor" if m.ms and not m.passes else ""
            extra = f"  ({m.note})" if m.note else ""
            lines.append(f"{mark} {m.candidate.name:42} {cells}   {m.cos:.5f} / {m.worst:.5f}{verdict}{extra}")
        lines.append(f"floor: mean cos >= {self.min_cos} and worst token >= {self.min_worst} to fp32 on held-out "
                     f"inputs; * = in force ({self.chosen.name}); searched in {self.tune_s:.1f} s on {self.machine}")
        return "\n".join(lines)


def _candidate(data: dict) -> Candidate:
    c = Candidate(str(data["engine"]), str(data["attention"]), bool(data["int8"]), str(data["gelu"]),
                  str(data.get("precision", "bf16")))
    if c.engine not in ENGINES or c.attention not in fcpu.ATTENTION_KINDS or c.gelu not in fcpu.GELU_KINDS \
            or c.precision not in PRECISIONS:
        raise ValueError(f"unknown candidate {data!r}")
    return c


def _shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# ----------------------------------------------------------------------------- cache


def machine() -> str:
    """CPU model, its ISA class and the thread count: what a plan was measured on."""
    flags = cpu_flags()
    isa = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else \
        "AVX512-VNNI" if "avx512_vnni" in flags else "AVX512" if "avx512f" in flags else \
        "AVX-VNNI" if "avx_vnni" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fcpu.cpu_model()} ({isa}, {torch.get_num_threads()} threads)"


def library_versions() -> str:
    from . import cpu_onnxruntime, cpu_openvino

    ok, version = cpu_openvino.available()
    ort_ok, ort_version = cpu_onnxruntime.available()
    return (f"torch {torch.__version__}; openvino {version if ok else 'absent'}; "
            f"onnxruntime {ort_version if ort_ok else 'absent'}")


def allowed_engines() -> tuple[str, ...]:
    """The engines the search may use: ENGINES, or the subset $FASTENC_CPU_ENGINES names (e.g. a deployment
    that keeps one runtime out); a name that is not an engine is refused."""
    raw = os.environ.get(ENGINES_ENV, "").strip()
    if not raw:
        return ENGINES
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise ConfigError(f"${ENGINES_ENV}={raw!r}: {', '.join(map(repr, bad)) or 'no engine'} is not one of "
                          f"{', '.join(ENGINES)} (a comma-separated subset)")
    return names


def default_precision() -> str:
    """bf16 where the CPU has it natively (AMX, AVX512-BF16), else fp32: never emulated bf16."""
    from . import cpu_fast_path

    return "bf16" if cpu_fast_path()[0] else "fp32"


def plan_key(source: str, cfg, shapes: Sequence[tuple[int, int]], min_cos: float, min_worst: float,
             precision: str = "bf16") -> str:
    flags = cpu_flags()
    isa = ",".join(f for f in ISA_FLAGS if f in flags)
    text = "|".join(map(str, (PLAN_VERSION, source, cfg, tuple(shapes), min_cos, min_worst, fcpu.cpu_model(), isa,
                              torch.get_num_threads(), library_versions(), precision, allowed_engines())))
    return "engine-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def read_plan(key: str) -> CpuPlan | None:
    try:
        return CpuPlan.from_json((fcpu.plan_cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or stale: search again
        return None


def write_plan(key: str, plan: CpuPlan) -> None:
    from ..fileio import atomic_write

    path = fcpu.plan_cache_dir() / f"{key}.json"
    try:
        atomic_write(path, lambda p: p.write_text(plan.to_json()))
    except OSError as exc:  # read-only home: the plan is simply not reused
        log.info("fastenc: could not cache the CPU plan at %s (%s)", path, exc)


def cached_plans() -> list[tuple[str, CpuPlan]]:
    """Every readable plan in the cache (for ``fastenc info --probe``)."""
    out = []
    directory = fcpu.plan_cache_dir()
    for path in sorted(directory.glob("engine-*.json")) if directory.is_dir() else []:
        plan = read_plan(path.stem)
        if plan is not None:
            out.append((path.stem, plan))
    return out


# ----------------------------------------------------------------------------- fidelity and timing


def held_out_inputs(cfg, shapes: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Inputs no plan sees while it is made: full-length rows of the longest shape, no mask, at least
    HELD_OUT_TOKENS tokens in all (the worst token is a tail estimate: too few tokens flatter it); and two
    shorter rows with a mask, the first half padded (``[B, L]`` ids, ``[B, L]`` mask or None)."""
    gen = torch.Generator().manual_seed(HELD_OUT_SEED)
    longest = max(s for _, s in shapes)
    short = max(4, min(longest, 96) - 7)  # a length no tune shape uses
    ids_long = torch.randint(2, cfg.vocab_size, (-(-HELD_OUT_TOKENS // longest), longest), generator=gen)
    ids_short = torch.randint(2, cfg.vocab_size, (2, short), generator=gen)
    mask = torch.ones(2, short, dtype=torch.long)
    mask[0, short // 2:] = 0
    return [(ids_long, None), (ids_short, mask)]


def fidelity(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
             inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[float, float]:
    """(mean, worst) cos-sim over every real token (padding excluded) of ``outs`` against ``refs``."""
    sims = []
    for out, ref, (_, mask) in zip(outs, refs, inputs):
        cos = F.cosine_similarity(out.float(), ref.float(), dim=-1)  # [B, L]
        sims.append(cos[mask.bool()] if mask is not None else cos.flatten())
    allc = torch.cat(sims)
    if not torch.isfinite(allc).all():
        return float("nan"), float("nan")
    return float(allc.mean()), float(allc.min())


def time_round_robin(runners: dict[Candidate, Callable[[torch.Tensor], object]],
                     shapes: Sequence[tuple[int, int]], cfg, rounds: int = ROUNDS,
                     clock: Callable[[], float] = time.perf_counter,
                     contenders: Collection[Candidate] | None = None, slack: float = SLACK,
                     counts: dict[Candidate, dict[str, int]] | None = None) -> dict[Candidate, dict[str, float]]:
    """Median ms per candidate and shape over ``rounds`` passes. Each pass calls every candidate once, the
    candidates of one engine in a block (one runtime's idle worker threads, OpenMP's for torch, TBB's for
    OpenVINO, keep spinning for a while after a call and would slow another's next call, so each block
    starts with an untimed call); passes, not blocks of rounds, so a change in machine load hits every
    candidate alike. The first pass is preceded by an untimed call of every candidate (first-call costs).

    ``contenders``: the candidates that may be chosen (those that meet the floor; None: all). After each pass
    at a shape, a candidate leaves that shape's later passes when it is not a contender, or when even its
    fastest call so far took more than ``slack`` times the median of the fastest contender: it cannot win,
    and its median is over the passes it ran (one at least), which ``counts`` (candidate -> shape -> passes)
    receives when given."""
    may_win = set(runners) if contenders is None else set(contenders) & set(runners)
    out: dict[Candidate, dict[str, float]] = {c: {} for c in runners}
    for shape in shapes:
        ids = torch.randint(2, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(7))
        samples: dict[Candidate, list[float]] = {c: [] for c in runners}
        active = list(runners)
        with torch.inference_mode():
            for rep in range(rounds):
                groups: dict[str, list[Candidate]] = {}
                for c in active:
                    groups.setdefault(c.engine, []).append(c)
                for group in groups.values():
                    for c in (group if rep == 0 else group[:1]):  # warm-up: all at first, then the block's first
                        runners[c](ids)
                    for c in group:
                        t0 = clock()
                        runners[c](ids)
                        samples[c].append((clock() - t0) * 1e3)
                leaders = [statistics.median(samples[c]) for c in active if c in may_win]
                if leaders:
                    bar = slack * min(leaders)
                    active = [c for c in active if c in may_win and min(samples[c]) <= bar]
        for c, s in samples.items():
            out[c][_shape_key(shape)] = statistics.median(s)
            if counts is not None:
                counts.setdefault(c, {})[_shape_key(shape)] = len(s)
    return out


def choose(measured: Sequence[Measured]) -> Measured | None:
    """The fastest candidate (sum of its medians over the shapes) that meets the floor, else None."""
    ok = [m for m in measured if m.passes and m.ms]
    return min(ok, key=lambda m: m.total_ms) if ok else None


# ----------------------------------------------------------------------------- the search


def eager_candidates(has_int8: bool, precision: str = "bf16") -> list[Candidate]:
    out = []
    for attention in ("sdpa", "matmul"):
        for int8 in ((False, True) if has_int8 else (False,)):
            for gelu in fcpu.GELU_KINDS:
                out.append(Candidate("eager", attention, int8, gelu, precision))
    return out


def _eager_ops(c: Candidate, shared_int8: fcpu.CpuOps) -> fcpu.CpuOps:
    """The candidate's op table; int8 candidates share one set of quantised weights."""
    ops = fcpu.CpuOps(c.attention, c.gelu)
    if c.int8:
        ops._int8 = shared_int8._int8
    return ops


def tune(model: T5Encoder, *, source: str | None = None, shapes: Sequence[tuple[int, int]] = TUNE_SHAPES,
         budget_s: float = DEFAULT_BUDGET_S, min_cos: float = MIN_COS, min_worst: float = MIN_WORST,
         rounds: int = ROUNDS, engines: Sequence[str] | None = None, say: Callable[[str], None] | None = None,
         precision: str = "bf16", graph_cache: Path | None = None) -> tuple[CpuPlan, object | None]:
    """Search the plan for ``model`` (float weights on the CPU; cast to ``precision`` in place on return,
    with the chosen op table installed). Returns ``(plan, engine)``: the OpenVINO or ONNX Runtime engine when
    one won, else None. ``precision``: bf16 on CPUs with native bf16; fp32 elsewhere (fp32 and int8 candidates only).
    ``graph_cache``: where the OpenVINO engine keeps its converted graphs (kept only when it wins)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    from . import cpu_openvino

    say = say or (lambda text: log.info("fastenc: %s", text))
    engines = allowed_engines() if engines is None else tuple(engines)
    t_start = time.perf_counter()
    cfg = model.config
    model.eval()
    model.ops = TORCH_OPS
    inputs = held_out_inputs(cfg, shapes)
    with torch.inference_mode():  # the fp32 reference, before anything is cast
        if model.compute_dtype == torch.float32:
            refs = [model(i, m) for i, m in inputs]
        else:
            import copy

            ref_model = copy.deepcopy(model).float()
            refs = [ref_model(i, m) for i, m in inputs]
            del ref_model
    measured: list[Measured] = []
    runners: dict[Candidate, Callable] = {}
    fid: dict[Candidate, tuple[float, float]] = {}
    built: dict[Candidate, object] = {}  # candidate -> its OpenVINO or ONNX Runtime engine
    ov_ok, ov_why = cpu_openvino.available()
    ov_c = Candidate("openvino", precision=precision)
    offer_int8 = "openvino" in engines and ov_ok and cpu_openvino.dynamic_int8()
    if "openvino" in engines:  # the float graph it traces is kept for the int8 candidate to start from
        _ov_candidate(ov_c, dict(model=model, precision=_ov_precision(precision), graph_cache=graph_cache,
                                 keep_converted=offer_int8), ov_ok, ov_why, inputs, refs, runners, fid, measured,
                      built, say)
    # the op-table path: the int8 search (its own calibration batch against fp32) and the cast to bf16
    # (and OpenVINO's set, planned for its activations quantised per token and DQ_GROUP channels)
    fcpu.prepare(model, int8="auto" if "eager" in engines or offer_int8 else "none", source=source,
                 attention="sdpa", dtype=ov_c.dtype, act_group=cpu_openvino.DQ_GROUP if offer_int8 else 0)
    int8_weights = model.int8_plan.weights
    ov_weights = model.int8_plan.grouped or ()
    shared_int8 = model.ops  # prepare quantised the planned weights into this table
    if ov_c in built:
        built[ov_c].bind(model)
    if offer_int8 and ov_weights:
        # its set with activations quantised by OpenVINO as it runs (VNNI/AMX int8 GEMMs, the rest in the plan's
        # precision)
        _ov_candidate(Candidate("openvino", int8=True, precision=precision),
                      dict(model=model, precision=_ov_precision(precision), graph_cache=graph_cache,
                           int8_weights=ov_weights, base=built.get(ov_c)),
                      ov_ok, ov_why, inputs, refs, runners, fid, measured, built, say)
    if ov_c in built:
        built[ov_c].converted = None
    if "eager" in engines:
        # int8 op-table candidates only where torch's int8 GEMM is native (else it is a slow reference loop)
        for i, c in enumerate(eager_candidates(bool(int8_weights) and fcpu.native_int8_mm(), precision)):
            if i and time.perf_counter() - t_start > budget_s:  # the first (plain bf16) is always measured
                measured.append(Measured(c, note=f"skipped: past the {budget_s:.0f} s tuning budget"))
                continue
            ops = _eager_ops(c, shared_int8)

            def run(ids, mask=None, ops=ops):
                model.ops = ops
                return model(ids, mask)

            runners[c] = run
            with torch.inference_mode():
                fid[c] = fidelity([run(i, m) for i, m in inputs], refs, inputs)
    if "onnxruntime" in engines:
        built.update(_ort_candidates(model, precision, int8_weights, inputs, refs, runners, fid, measured, say))
    meets = {c for c, (cos, worst) in fid.items() if cos >= min_cos and worst >= min_worst}
    counts: dict[Candidate, dict[str, int]] = {}
    times = time_round_robin(runners, shapes, cfg, rounds, contenders=meets, counts=counts) if runners else {}
    for c in runners:
        cos, worst = fid[c]
        short = [f"{k} {n} of {rounds}" for k, n in counts.get(c, {}).items() if n < rounds]
        note = (f"passes timed: {', '.join(short)} (over {SLACK:g}x the fastest)" if short and c in meets else "")
        measured.append(Measured(c, times[c], round(cos, 6), round(worst, 6), c in meets, note))
    best = choose(measured)
    if best is None:  # nothing meets the floor: the most faithful candidate, said loudly
        scored = [m for m in measured if m.ms and m.cos == m.cos]
        if not scored:
            raise BackendUnavailable("the cpu backend could not run any candidate: "
                                     + "; ".join(f"{m.candidate.name}: {m.note}" for m in measured))
        best = max(scored, key=lambda m: (m.worst, m.cos))
        log.warning("fastenc: no cpu candidate keeps cos-sim %.4f / worst token %.4f to fp32 on held-out inputs; "
                    "running the most faithful one (%s: %.5f / %.5f); backend='torch' computes in fp32",
                    min_cos, min_worst, best.candidate.name, best.cos, best.worst)
    chosen = best.candidate
    weights = (ov_weights if chosen.engine == "openvino" else int8_weights) if chosen.int8 else ()
    plan = CpuPlan(chosen, tuple(weights), tuple(measured), tuple(shapes), min_cos, min_worst,
                   round(time.perf_counter() - t_start, 2), machine())
    _install(model, plan)
    engine = built.get(chosen)
    for c, other in built.items():
        if other is engine:
            continue
        if c.engine == "openvino":
            other.forget_graphs()  # its cached graph: the plan does not run it
        else:
            other.drop_graph()
    if engine is not None:
        engine.bind(model)
        if chosen.engine == "onnxruntime" and graph_cache is not None:
            engine.save_graph(graph_cache)
    return plan, engine


def _ov_candidate(c: Candidate, kwargs: dict, ok: bool, why: str, inputs, refs, runners, fid, measured, built,
                  say) -> None:
    """Build OpenVINO's engine for ``c`` (``kwargs`` for it), check it on the held-out inputs and add it to
    ``runners`` and ``built``; one note in ``measured`` when it cannot be built."""
    from . import cpu_openvino

    if not ok:
        measured.append(Measured(c, note=why))
        return
    try:
        engine = cpu_openvino.OpenVinoEngine(**kwargs)
    except BackendUnavailable as exc:  # e.g. not enough memory to convert: skipped, said in the table
        measured.append(Measured(c, note=f"skipped: {exc}"))
        return
    except Exception as exc:  # a runtime that fails to convert or compile is one note, not the load
        measured.append(Measured(c, note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
        return
    built[c] = engine
    runners[c] = lambda ids: engine(ids)
    with torch.inference_mode():
        fid[c] = fidelity([engine(i, m) for i, m in inputs], refs, inputs)
    say(f"built {c.name} in {engine.build_s:.1f} s")


def _ort_candidates(model: T5Encoder, precision: str, int8_weights, inputs, refs, runners, fid, measured,
                    say) -> dict:
    """ONNX Runtime fp32, and fp32 + the planned int8 weights (the op table's set, same numerics): built from
    one export, checked on the held-out inputs, added to ``runners``. Offered where the plan computes in
    fp32 (a CPU without native bf16); returns candidate -> engine."""
    from . import cpu_onnxruntime

    out: dict[Candidate, object] = {}
    base = Candidate("onnxruntime", precision="fp32")
    if precision != "fp32":
        return out
    ok, why = cpu_onnxruntime.available()
    if not ok:
        measured.append(Measured(base, note=why))
        return out
    wanted = [base] + ([Candidate("onnxruntime", int8=True, precision="fp32")] if int8_weights else [])
    graph = None
    for c in wanted:
        try:
            if graph is None:
                graph = cpu_onnxruntime.export_graph(model)
            e = cpu_onnxruntime.OrtEngine(model, int8_weights=int8_weights if c.int8 else (), base_graph=graph,
                                          keep_graph=True)
        except BackendUnavailable as exc:
            measured.append(Measured(c, note=f"skipped: {exc}"))
            break
        except Exception as exc:  # a runtime that fails to export or load is one note, not the load
            measured.append(Measured(c, note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
            break
        out[c] = e
        runners[c] = lambda ids, e=e: e(ids)
        with torch.inference_mode():
            fid[c] = fidelity([e(i, m) for i, m in inputs], refs, inputs)
        say(f"built {c.name} in {e.build_s:.1f} s")
    return out


def _install(model: T5Encoder, plan: CpuPlan) -> None:
    """The plan's op table on the (bf16) model; the int8 set re-quantised (smoothing from calibration)."""
    c = plan.chosen
    attention = c.attention if c.engine == "eager" else "sdpa"
    gelu = c.gelu if c.engine == "eager" else "exact"
    weights = plan.int8_weights if c.engine == "eager" else ()  # another engine's fallback: the float op table
    fcpu.prepare(model, int8=fcpu.Int8Plan(weights, attention=attention), attention=attention, gelu=gelu,
                 dtype=c.dtype, standby_for=None if c.engine == "eager" else c.name)
    model.cpu_plan = plan


def _plan_engine(model: T5Encoder, plan: CpuPlan, graph_cache: Path | None):
    """The engine a cached plan runs (its graph read from ``graph_cache`` where it was kept)."""
    if plan.chosen.engine == "openvino":
        from . import cpu_openvino

        return cpu_openvino.OpenVinoEngine(model, precision=_ov_precision(plan.chosen.precision),
                                           graph_cache=graph_cache,
                                           int8_weights=plan.int8_weights if plan.chosen.int8 else ())
    from . import cpu_onnxruntime

    return cpu_onnxruntime.OrtEngine(model, int8_weights=plan.int8_weights, graph_cache=graph_cache)


def _ov_precision(precision: str) -> str:
    return "bf16" if precision == "bf16" else "f32"


def prepare_planned(model: T5Encoder, *, source: str | None = None, plan: CpuPlan | None = None,
                    shapes: Sequence[tuple[int, int]] = TUNE_SHAPES, budget_s: float = DEFAULT_BUDGET_S,
                    retune: bool = False, say: Callable[[str], None] | None = None,
                    precision: str | None = None) -> T5Encoder:
    """The cpu backend for ``model``, in place: the cached plan for (this machine, ``source``), else one
    searched by :func:`tune` (and cached when ``source`` is given). Sets ``model.cpu_plan`` and
    ``model.cpu_engine`` (the OpenVINO engine when the plan runs it, else None). ``precision``: the
    plan's, else :func:`default_precision` (bf16 only where the CPU has it natively)."""
    if model.embed.weight.device.type != "cpu":
        raise ConfigError(f"the cpu backend runs on the CPU; the model is on {model.embed.weight.device}")
    if precision is None:
        precision = plan.chosen.precision if plan is not None else default_precision()
    key = plan_key(source, model.config, shapes, MIN_COS, MIN_WORST, precision) if source else None
    graph_cache = fcpu.plan_cache_dir() / key if key is not None else None
    if plan is None and key is not None and not retune:
        plan = read_plan(key)
        if plan is not None and not set(plan.int8_weights) <= set(fcpu.linear_weight_names(model)):
            plan = None  # a plan for another layout: search again
    engine = None
    if plan is None:
        t0 = time.perf_counter()
        # said at warning level: the first load of a checkpoint on a machine waits for it (tens of seconds)
        log.warning("fastenc: measuring which engine runs this model fastest on this CPU (once per checkpoint and "
                    "machine%s, at most %.0f s; `fastenc tune` does it ahead of time)",
                    "" if key else "; not cached: the model has no source", budget_s)
        plan, engine = tune(model, source=source, shapes=shapes, budget_s=budget_s, say=say, precision=precision,
                            graph_cache=graph_cache)
        log.info("fastenc: cpu plan in %.1f s: %s", time.perf_counter() - t0, plan.chosen.name)
        if key is not None:
            write_plan(key, plan)
    else:
        if plan.chosen.engine in ("openvino", "onnxruntime"):
            try:
                engine = _plan_engine(model, plan, graph_cache)
            except Exception as exc:  # the plan's engine is gone (uninstalled, broken): the op-table path runs
                log.warning("fastenc: the cpu plan runs %s, which failed here (%s: %s); using the op table",
                            ENGINE_NAMES[plan.chosen.engine], type(exc).__name__, str(exc).splitlines()[0][:160])
        _install(model, plan)
        if engine is not None:
            engine.bind(model)
    model.cpu_engine = engine
    return model
