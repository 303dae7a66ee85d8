"""What every benchmark shares: models with T5-style random weights, timing, memory, CSV rows.

Timing: warm-up calls, then repeated calls; CUDA events (or ``triton.testing.do_bench``) on a GPU,
``time.perf_counter`` (monotonic) on the CPU. Results are p20/p50/p80 in milliseconds.

Memory: on a GPU the torch allocator's peak after a reset, or the drop in free device memory
(``cudaMemGetInfo``) for runtimes that allocate outside torch (ONNX Runtime, TensorRT); on the
CPU the process's peak resident set (``VmHWM`` reset through ``/proc/self/clear_refs`` where
Linux allows, else a sampling thread) minus the resident set before the model was built.
"""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import importlib
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from fastenc.config import SIZES, EncoderConfig
from fastenc.model import T5Encoder

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_COLUMNS = [
    "timestamp", "model", "params", "backend", "dtype", "batch", "seq", "metric", "unit", "p20", "p50", "p80",
    "device", "threads", "weights", "versions", "git_commit",
]
VERSIONED = ("fastenc", "torch", "transformers", "onnxruntime", "triton", "tensorrt")

# ----------------------------------------------------------------------------- models

#: Tiny configs for a fast self-test of the benchmarks (``--tiny``); not the paper's shapes.
TINY_SIZES = {
    "tiny": EncoderConfig(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=512, name="tiny",
                          projection_dim=256),
    "tiny-xxl": EncoderConfig(d_model=256, d_ff=512, num_layers=4, num_heads=8, d_kv=32, vocab_size=512,
                              projection_dim=None, name="tiny-xxl"),
}


def get_config(name: str) -> EncoderConfig:
    return TINY_SIZES[name] if name in TINY_SIZES else SIZES[name]


def param_count(cfg: EncoderConfig) -> int:
    """Parameters of the model a config builds (embedding and projector included)."""
    D, F, H, dk = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv
    per_layer = D * 3 * H * dk + H * dk * D + D * (2 if cfg.gated else 1) * F + F * D + 2 * D
    proj = 0
    if cfg.projection_dim:
        P = cfg.projection_dim
        proj = D * P + P * P + (2 * P if cfg.projector_bias else 0)
    tables = cfg.num_layers if cfg.per_layer_bias else 1  # umT5: every layer's own relative-attention-bias table
    return cfg.vocab_size * D + tables * cfg.num_buckets * cfg.num_heads + cfg.num_layers * per_layer + D + proj


@torch.no_grad()
def t5_init_(model: T5Encoder, seed: int = 0) -> T5Encoder:
    """Fill ``model`` in place with transformers' T5 initialisation (factor 1.0).

    The query projection gets the extra ``d_kv ** -0.5`` T5 uses instead of scaling its scores,
    so attention is as soft as in a trained T5; projector layers get ``nn.Linear``'s default.
    """
    cfg = model.config
    dev = model.embed.weight.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    D, F, inner = cfg.d_model, cfg.d_ff, cfg.inner_dim

    def normal_(p: torch.Tensor, std: float) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, device=dev, dtype=torch.float32).mul_(std))

    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name == "embed.weight":
            normal_(p, 1.0)
        elif name.endswith("rel_bias.weight"):  # T5's one table, or umT5's per layer
            normal_(p, D**-0.5)
        elif name.endswith("attn.qkv.weight"):
            normal_(p[:inner], (D * cfg.d_kv) ** -0.5)
            normal_(p[inner:], D**-0.5)
        elif name.endswith("attn.o.weight"):
            normal_(p, inner**-0.5)
        elif name.endswith("ffn.wi.weight"):
            normal_(p, D**-0.5)
        elif name.endswith("ffn.wo.weight"):
            normal_(p, F**-0.5)
        elif name.startswith("projector."):
            bound = (p.shape[1] if p.dim() == 2 else p.shape[0]) ** -0.5
            p.copy_(torch.rand(p.shape, generator=gen, device=dev).mul_(2 * bound).sub_(bound))
        else:
            raise KeyError(f"no initialisation rule for {name}")
    return model


def build_model(size: str | EncoderConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0, checkpoint: str | None = None) -> T5Encoder:
    """A torch-backend :class:`T5Encoder`: random T5-initialised weights, or ``checkpoint`` when given."""
    if checkpoint is not None:
        import fastenc

        return fastenc.load(checkpoint, size=size if isinstance(size, str) else None, backend="torch",
                            device=device, dtype=dtype, cache=False).model.eval()
    cfg = get_config(size) if isinstance(size, str) else size
    with torch.device("meta"):
        model = T5Encoder(cfg)
    model.cast(dtype)  # on the meta device: no memory, so the weights are allocated once, in dtype
    model.to_empty(device=torch.device(device))
    return t5_init_(model, seed).eval()


class TransformersEncoder(nn.Module):
    """transformers' ``T5EncoderModel`` (``UMT5EncoderModel`` for a per-layer-bias config) (+ the DistillT5
    projector) holding a fastenc model's weights.

    The tensors are views of the fastenc parameters (no copy): q/k/v are rows of ``qkv``,
    ``wi_0``/``wi_1`` the halves of ``wi``."""

    def __init__(self, model: T5Encoder, attn_implementation: str | None = None):
        super().__init__()
        import transformers

        cfg = model.config
        act = "gelu" if cfg.activation == "gelu_new" else cfg.activation
        family = "UMT5" if cfg.per_layer_bias else "T5"
        hf = getattr(transformers, f"{family}Config")(
            vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_kv, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
            relative_attention_max_distance=cfg.max_distance, layer_norm_epsilon=cfg.eps, dropout_rate=0.0,
            feed_forward_proj=f"gated-{act}" if cfg.gated else act, is_encoder_decoder=False,
        )
        if attn_implementation is not None:
            hf._attn_implementation = attn_implementation
        with torch.device("meta"):
            self.encoder = getattr(transformers, f"{family}EncoderModel")(hf)
        missing, unexpected = self.encoder.load_state_dict(self._hf_state(model), strict=False, assign=True)
        if missing or unexpected:
            raise RuntimeError(f"T5EncoderModel weights do not line up: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        self.encoder.eval()
        self.projector = None
        if cfg.projection_dim:
            P, fc1, fc2 = cfg.projection_dim, model.projector.fc1, model.projector.fc2
            with torch.device("meta"):
                self.projector = nn.Sequential(nn.Linear(cfg.d_model, P, bias=cfg.projector_bias), nn.ReLU(),
                                               nn.Dropout(0.1), nn.Linear(P, P, bias=cfg.projector_bias))
            state = {"0.weight": fc1.weight, "3.weight": fc2.weight}
            if cfg.projector_bias:
                state.update({"0.bias": fc1.bias, "3.bias": fc2.bias})
            self.projector.load_state_dict({k: v.detach() for k, v in state.items()}, assign=True)
            self.projector.eval()
        self.config = cfg

    @staticmethod
    def _hf_state(model: T5Encoder) -> dict[str, torch.Tensor]:
        cfg, inner = model.config, model.config.inner_dim
        p = {n: t.detach() for n, t in model.named_parameters()}
        state = {
            "shared.weight": p["embed.weight"],
            "encoder.embed_tokens.weight": p["embed.weight"],
            "encoder.final_layer_norm.weight": p["final_norm.weight"],
        }
        for i in range(cfg.num_layers):
            b = f"encoder.block.{i}.layer"
            if cfg.per_layer_bias or i == 0:
                bias = p[f"blocks.{i}.rel_bias.weight" if cfg.per_layer_bias else "rel_bias.weight"]
                state[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = bias
            qkv = p[f"blocks.{i}.attn.qkv.weight"]
            for j, n in enumerate("qkv"):
                state[f"{b}.0.SelfAttention.{n}.weight"] = qkv[j * inner:(j + 1) * inner]
            state[f"{b}.0.SelfAttention.o.weight"] = p[f"blocks.{i}.attn.o.weight"]
            state[f"{b}.0.layer_norm.weight"] = p[f"blocks.{i}.attn_norm.weight"]
            state[f"{b}.1.layer_norm.weight"] = p[f"blocks.{i}.ffn_norm.weight"]
            wi = p[f"blocks.{i}.ffn.wi.weight"]
            if cfg.gated:
                state[f"{b}.1.DenseReluDense.wi_0.weight"] = wi[:cfg.d_ff]
                state[f"{b}.1.DenseReluDense.wi_1.weight"] = wi[cfg.d_ff:]
            else:
                state[f"{b}.1.DenseReluDense.wi.weight"] = wi
            state[f"{b}.1.DenseReluDense.wo.weight"] = p[f"blocks.{i}.ffn.wo.weight"]
        return state

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
        return self.projector(h) if self.projector is not None else h  # [B, L, P]


def sample_ids(cfg: EncoderConfig, batch: int, seq: int, *, device: str | torch.device = "cpu", seed: int = 0
               ) -> torch.Tensor:
    """Token ids [B, L] (ids >= 2: no pad/EOS), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, cfg.vocab_size, (batch, seq), generator=gen).to(device)


def cos_sim(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over tokens of the cosine similarity of the embedding vectors."""
    return float(torch.nn.functional.cosine_similarity(out.float().cpu(), ref.float().cpu(), dim=-1).mean())


@dataclass
class PlannedCpu:
    """fastenc's default CPU path as ``fastenc.load`` gives it: the model with the cpu plan for this machine
    (searched once per source, then cached) inside an Encoder, so the plan's engine (OpenVINO or the op
    table) serves each call."""

    encoder: object  # fastenc.Encoder
    dtype: str  # "bf16", "bf16+int8", "fp32", ...
    weights_bytes: int  # the torch weights (an OpenVINO engine holds its own packed copy besides)
    note: str  # the plan in force and what it cost


def planned_cpu(model: T5Encoder, source: str, *, emulated_bf16: bool = False) -> PlannedCpu:
    """``model`` (float, CPU) turned into fastenc's default CPU path in place (see :class:`PlannedCpu`)."""
    import fastenc
    from fastenc.backends import cpu_fast_path
    from fastenc.backends.cpu_plan import prepare_planned

    precision = "bf16" if cpu_fast_path()[0] or emulated_bf16 else "fp32"  # as fastenc.load picks it
    t0 = time.perf_counter()
    prepare_planned(model, source=source, precision=precision)
    encoder = fastenc.Encoder(model, backend="cpu", source=source, requested_backend="auto", plan_source=source)
    plan = model.cpu_plan
    int8_bytes = model.ops.int8_bytes if plan.chosen.engine == "eager" and plan.chosen.int8 else 0
    return PlannedCpu(encoder, plan.chosen.precision + ("+int8" if plan.int8_weights else ""),
                      tensor_bytes(model) + int8_bytes,
                      f"plan ready in {time.perf_counter() - t0:.1f} s (searched in {plan.tune_s:.1f} s when not "
                      f"cached): {plan.chosen.name}")


def tensor_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Stats:
    p20: float
    p50: float
    p80: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stats":
        v = sorted(values)
        if not v:
            raise ValueError("no samples")
        if len(v) == 1:
            return cls(v[0], v[0], v[0], 1)
        q = statistics.quantiles(v, n=10, method="inclusive")  # deciles
        return cls(q[1], statistics.median(v), q[7], len(v))

    @classmethod
    def single(cls, value: float) -> "Stats":
        return cls(value, value, value, 1)


def time_cpu(fn: Callable[[], object], *, warmup: int = 2, reps: int = 10, max_seconds: float | None = None) -> Stats:
    """Wall-clock milliseconds per call (``time.perf_counter``), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and time.perf_counter() - start > max_seconds and len(samples) >= 3:
            break
    return Stats.of(samples)


def time_cuda(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20) -> Stats:
    """Milliseconds per call on the GPU: ``triton.testing.do_bench`` when triton is there, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        q = do_bench(fn, warmup=max(1, warmup) * 5, rep=max(reps, 20) * 5, quantiles=[0.2, 0.5, 0.8])
        return Stats(float(q[0]), float(q[1]), float(q[2]), reps)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return Stats.of(samples)


def measure_latency(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 10,
                    max_seconds: float | None = None) -> Stats:
    if device.type == "cuda":
        return time_cuda(fn, warmup=warmup, reps=reps)
    return time_cpu(fn, warmup=warmup, reps=reps, max_seconds=max_seconds)


# ----------------------------------------------------------------------------- memory


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    value = _proc_status("VmRSS")
    if value is not None:
        return value
    import psutil

    return psutil.Process().memory_info().rss


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS baselines are honest."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HostPeak:
    """Peak resident set while the block runs: ``with HostPeak() as p: ...; p.peak`` (bytes)."""

    def __enter__(self) -> "HostPeak":
        self.peak = 0
        self._kernel = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._kernel = _proc_status("VmHWM") is not None
        except OSError:
            self._kernel = False
        if not self._kernel:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(0.002)

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self.peak = _proc_status("VmHWM") or rss_bytes()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


class GpuPeak:
    """Device memory the block needs above ``baseline`` (bytes): torch allocator peak, or the drop
    in free memory (``cudaMemGetInfo``) when ``allocator=False`` (ONNX Runtime, TensorRT)."""

    def __init__(self, device: torch.device, *, allocator: bool = True):
        self.device, self.allocator = device, allocator

    def __enter__(self) -> "GpuPeak":
        torch.cuda.synchronize(self.device)
        if self.allocator:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.free_before = torch.cuda.mem_get_info(self.device)[0]
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        if self.allocator:
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = max(0, self.free_before - torch.cuda.mem_get_info(self.device)[0])


def gpu_used_bytes(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


# ----------------------------------------------------------------------------- environment and CSV


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus)"


def versions() -> str:
    out = []
    for mod in VERSIONED:
        try:
            v = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception:  # not installed, or broken without a GPU
            continue
        out.append(f"{mod}={v}")
    return ";".join(out)


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Row:
    model: str
    params: int
    backend: str
    dtype: str
    batch: int
    seq: int
    metric: str
    unit: str
    stats: Stats

    def as_dict(self, context: dict[str, str]) -> dict[str, object]:
        return {
            "model": self.model, "params": self.params, "backend": self.backend, "dtype": self.dtype,
            "batch": self.batch, "seq": self.seq, "metric": self.metric, "unit": self.unit,
            "p20": f"{self.stats.p20:.6g}", "p50": f"{self.stats.p50:.6g}", "p80": f"{self.stats.p80:.6g}",
            **context,
        }


def run_context(device: torch.device, weights: str) -> dict[str, str]:
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "threads": str(torch.get_num_threads()),
        "weights": weights,
        "versions": versions(),
        "git_commit": git_commit(),
    }


def append_csv(path: Path, rows: Iterable[Row], context: dict[str, str]) -> Path:
    """Append long-format rows (header written when the file is new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict(context))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ----------------------------------------------------------------------------- the machine a run ran on

#: CPU features that decide which kernels run (bf16/int8 GEMMs), reported with every CPU result.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_features() -> list[str]:
    try:
        from fastenc.backends.cpu import cpu_flags

        flags = cpu_flags()
    except ImportError:
        flags = set()
    return [f for f in CPU_FEATURES if f in flags]


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f}/{five:.2f}"


def machine_description(load_start: str | None = None) -> str:
    """CPU model, logical CPUs, the features that matter and the load average (1/5 min) when the run
    started and now, e.g. ``AMD EPYC (2 cpus; avx2; load 0.10/0.05 -> 1.02/0.40)``."""
    feats = ", ".join(cpu_features()) or "no avx2"
    load = f"load {load_start} -> {load_average()}" if load_start else f"load {load_average()}"
    return f"{device_name(torch.device('cpu')).rsplit(' (', 1)[0]} ({os.cpu_count()} cpus; {feats}; {load})"


def machine_slug() -> str:
    """File-name form of the machine: ``amd-epyc-2cpu-avx512bf16`` (CPU model, CPUs, its best bf16 or int8 feature)."""
    import re

    name = device_name(torch.device("cpu")).rsplit(" (", 1)[0].lower()
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*|\d+-core", " ", name)
    name = "-".join(re.findall(r"[a-z0-9]+", name))[:40] or "cpu"
    feats = cpu_features()
    best = next((f for f in ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2") if f in feats), "x86")
    return f"{name}-{os.cpu_count()}cpu-{best.replace('_', '')}"
