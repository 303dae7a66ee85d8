"""The CPU fast path: bf16 compute, with int8 GEMMs on the weights where accuracy allows.

On x86 CPUs with AVX512-BF16 and AVX512-VNNI a bf16 GEMM (oneDNN) runs about 2x an fp32 one
and an int8 GEMM (``torch._int_mm``) about 4x. :class:`CpuOps` subclasses the reference op
table (the model code is unchanged):

* every op computes in bf16 (softmax, norms and GELU accumulate in fp32 inside torch's kernels);
* attention is either two batched GEMMs around torch's native bf16 softmax (matches the reference
  bit for bit) or torch's fused CPU flash-attention kernel (``scaled_dot_product_attention`` with
  the relative-position bias as its additive mask, ``scale=1``): which one is faster depends on the
  CPU and the sequence length, so :func:`choose_attention` times both once per model shape and the
  choice is cached with the int8 plan;
* selected weights run as W8A8 GEMMs: weights quantised symmetrically per output channel, the
  activations per token at run time, int32 accumulation, one fp32 rescale
  ``y[m, n] = acc[m, n] * s_x[m] * s_w[n]``. Where a GEMM's inputs have outlier channels (trained
  T5 v1.1 has a few residual channels tens of times larger) the outliers are first moved into the
  weights per input channel (SmoothQuant, :func:`smoothing`), measured on the calibration batch.

Which weights go int8 is decided per model by :func:`plan_int8` on a calibration batch against
the fp32 model: quantisation error grows with the number of layers it passes through, so the
order is attention and projector weights first (least sensitive), then the FFN input and output
projections of the *last* layers, extended towards the first while the calibration cosine
similarity stays at or above ``min_cos`` on average and ``DEFAULT_MIN_WORST`` on its worst token
(activation outliers hurt a few tokens far more than the mean). Plans are cached on disk (see :func:`plan_cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..info import cpu_flags
from ..model import T5Encoder
from ..ops import TORCH_OPS, TorchOps, activation

log = logging.getLogger("fastenc")

#: Bump when the plan search or the int8 scheme changes (invalidates cached plans).
PLAN_VERSION = 7
#: Calibration cosine similarity (mean over tokens, to fp32) a plan must keep.
DEFAULT_MIN_COS = 0.9995
#: ... and its worst token (a margin above 0.999, since unseen inputs have more tokens to be worst).
DEFAULT_MIN_WORST = 0.9994
CALIB_LEN = 128
#: SmoothQuant: an int8 GEMM's activations are smoothed when their largest channel maximum exceeds
#: SMOOTH_RATIO x the median one (trained T5 v1.1 has a few residual channels tens of times larger).
SMOOTH_RATIO = 3.0
SMOOTH_ALPHA = 0.5
#: The seed of the second calibration batch that confirms the int8 set (plan_int8's ``confirm``).
CONFIRM_SEED = 1
CALIB_ROWS = 4  # four different rows: the worst token of 512 tokens estimates the tail (unseen inputs) better
#: T5's and umT5's padding and end-of-sequence ids (2 is <unk>)
PAD_ID, EOS_ID = 0, 1
#: The lengths of a prompt-shaped row's prompt, in tokens (a diffusion prompt's T5 tokens; :func:`prompt_ids`).
PROMPT_TOKENS = (12, 96)
INT8_MODES = ("auto", "none", "all")
ATTENTION_KINDS = ("matmul", "sdpa")
#: "exact": the config's activation; "erf": tanh-approximated GELU (T5 v1.1's gelu_new) computed as the
#: erf GELU it approximates (|difference| < 1e-3, below bf16's rounding; several times faster on the CPU).
#: The planner uses "erf" only where the fidelity floor holds.
GELU_KINDS = ("exact", "erf")


# ----------------------------------------------------------------------------- int8 GEMM


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None,
                  group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation per row: ``x [M, K] * col_scale [K] ~= q [M, K] * scale [M, 1]``; with
    ``group`` (dividing K), one scale per row and group of that many columns: ``scale [M, K // group]``."""
    xf = x.to(torch.float32, copy=True)  # [M, K], a private copy scaled in place
    if col_scale is not None:
        xf.mul_(col_scale)
    if group:
        m, k = xf.shape
        xg = xf.view(m, k // group, group)  # [M, G, group]
        scale = xg.abs().amax(dim=-1).div_(127.0).clamp_(min=1e-12)  # [M, G]
        return xg.div_(scale.unsqueeze(-1)).round_().to(torch.int8).view(m, k), scale
    scale = xf.abs().amax(dim=-1, keepdim=True).div_(127.0).clamp_(min=1e-12)  # [M, 1]
    q = xf.div_(scale).round_().to(torch.int8)  # [M, K]; |q| <= 127
    return q, scale


class Int8Weight(NamedTuple):
    qweight_t: torch.Tensor  # [K, N] int8 (transposed view of a contiguous [N, K])
    scale: torch.Tensor  # [N] fp32
    data_ptr: int  # the float weight this was made from, to detect a replaced/changed tensor
    version: int
    shape: tuple[int, ...]
    inv_smooth: torch.Tensor | None = None  # [K] fp32: activations are multiplied by it before quantising


def smoothing(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor | None:
    """Per-input-channel factors ``s [K]`` that move activation outliers into the weights (SmoothQuant):
    ``x W^T = (x / s)(W s)^T`` with ``s = amax(x)^alpha / amax(W)^(1 - alpha)``, or None when the
    activations have no outlier channels (channel maximum below ``SMOOTH_RATIO`` x the median)."""
    a = act_amax.float().clamp(min=1e-5)  # [K]
    if float(a.max()) < SMOOTH_RATIO * float(a.median()):
        return None
    w = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)  # [K]
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s / s.median()  # scale-free: typical channels keep their size


def quantize_weight(weight: torch.Tensor, act_amax: torch.Tensor | None = None) -> Int8Weight:
    """Per-output-channel int8 weights; with the activations' per-channel maxima ``act_amax [K]``,
    smoothed first when those show outlier channels (see :func:`smoothing`)."""
    s = smoothing(act_amax, weight) if act_amax is not None else None
    w = weight.detach() if s is None else weight.detach().float() * s  # [N, K]
    q, scale = quantize_rows(w)  # [N, K], [N, 1]
    inv = None if s is None else (1.0 / s).contiguous()
    return Int8Weight(q.t(), scale.view(-1), weight.data_ptr(), weight._version, tuple(weight.shape), inv)


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, group: int = 0) -> torch.Tensor:
    """``x [..., K] @ W.T`` with per-token int8 activations and per-channel int8 weights; the result
    in ``out_dtype`` (default: ``x``'s). ``group`` (dividing K): a scale per token and group of that many
    channels instead, as OpenVINO quantises activations (:mod:`.cpu_openvino`); computed in fp32 on the
    dequantised values (the same products: to plan that engine's set, not to run it)."""
    lead, k = x.shape[:-1], x.shape[-1]
    group = group if group and k % group == 0 else 0
    xq, xs = quantize_rows(x.reshape(-1, k), w.inv_smooth, group)  # [M, K] int8, [M, 1] or [M, K / group]
    if group:  # each group's scale inside the sum: the dequantised activations in an fp32 GEMM
        acc = torch.mm(xq.float().view(xq.shape[0], -1, group).mul_(xs.unsqueeze(-1)).view(-1, k),
                       w.qweight_t.float())  # [M, N]
    elif native_int8_mm():
        acc = torch._int_mm(xq, w.qweight_t)  # [M, N] int32
    else:  # the same products in an fp32 GEMM: exact up to K * 127^2 < 2^24, within 1e-7 beyond
        acc = torch.mm(xq.float(), w.qweight_t.float())  # [M, N]
    y = acc.float() if group else acc.float().mul_(xs)  # int32 -> fp32: the fast cast
    y = y.mul_(w.scale).to(out_dtype or x.dtype)  # [M, N]
    if bias is not None:
        y = y + bias
    return y.view(*lead, -1)


def native_int8_mm() -> bool:
    """Whether ``torch._int_mm`` has a fast CPU kernel here (oneDNN on VNNI or AMX); elsewhere it runs a
    reference loop ~50x slower than an fp32 GEMM (341 ms for 512x768x2048 on an AVX2 EPYC), so int8 GEMMs
    are only simulated in fp32 (to plan which weights another engine runs in int8) and never timed."""
    global _NATIVE_INT8
    if _NATIVE_INT8 is None:
        flags = cpu_flags()
        _NATIVE_INT8 = hasattr(torch, "_int_mm") and any(f in flags for f in ("amx_int8", "avx512_vnni", "avx_vnni"))
    return _NATIVE_INT8


_NATIVE_INT8: bool | None = None


# ----------------------------------------------------------------------------- op table


class CpuOps(TorchOps):
    """bf16 CPU ops; weights registered with :meth:`quantize` run as int8 GEMMs.

    The registry is keyed by the weight's storage and checked against its version counter, so
    a weight that is moved, replaced or edited in place falls back to the float GEMM (never
    stale int8 numbers)."""

    name = "cpu"

    def __init__(self, attention: str = "matmul", gelu: str = "exact", act_group: int = 0) -> None:
        """``act_group``: int8 GEMMs quantise their activations per token and group of that many channels, as
        OpenVINO does (an fp32 emulation: for planning that engine's int8 set); 0: per token."""
        if attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
        if gelu not in GELU_KINDS:
            raise ConfigError(f"gelu must be one of {', '.join(GELU_KINDS)}, got {gelu!r}")
        self.attention_kind = attention
        self.gelu_kind = gelu
        self.act_group = int(act_group)
        self._int8: dict[int, Int8Weight] = {}
        self._record: dict[int, torch.Tensor] | None = None

    def quantize(self, weight: torch.Tensor, act_amax: torch.Tensor | None = None) -> None:
        """Run ``weight`` as an int8 GEMM from now on (smoothed when ``act_amax [K]``, its inputs'
        per-channel maxima, shows outlier channels)."""
        if weight.dim() != 2 or weight.device.type != "cpu":
            raise ConfigError(f"int8 weights must be 2-D CPU tensors, got {tuple(weight.shape)} on {weight.device}")
        self._int8[weight.data_ptr()] = quantize_weight(weight, act_amax)

    def record_inputs(self, on: bool = True) -> dict[int, torch.Tensor]:
        """Start (or stop) recording each float GEMM's input maxima per channel, keyed by weight storage."""
        self._record = {} if on else None
        return self._record

    def _note(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # [K]
        prev = self._record.get(weight.data_ptr())
        self._record[weight.data_ptr()] = amax if prev is None else torch.maximum(prev, amax)

    def clear(self) -> None:
        self._int8.clear()

    @property
    def num_int8(self) -> int:
        return len(self._int8)

    @property
    def int8_bytes(self) -> int:
        """Memory held by the int8 weights and their scales."""
        return sum(w.qweight_t.numel() + 4 * w.scale.numel() for w in self._int8.values())

    def _lookup(self, weight: torch.Tensor) -> Int8Weight | None:
        entry = self._int8.get(weight.data_ptr())
        if entry is None:
            return None
        if entry.version != weight._version or entry.shape != tuple(weight.shape):
            log.warning("fastenc: an int8 weight changed after quantisation; using its float GEMM")
            self._int8.pop(weight.data_ptr(), None)
            return None
        return entry

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._record is not None:
            self._note(x, weight)
        entry = self._lookup(weight) if self._int8 else None
        if entry is None:
            return F.linear(x, weight, bias)
        return int8_linear(x, entry, bias, group=self.act_group)

    def _act(self, name: str) -> str:
        return "gelu" if self.gelu_kind == "erf" and name == "gelu_new" else name

    def gated_act_linear(self, x: torch.Tensor, wi: torch.Tensor, act: str, out_dtype: torch.dtype) -> torch.Tensor:
        act = self._act(act)
        entry = self._lookup(wi) if self._int8 else None
        if entry is not None:  # gate in fp32 straight from the int32 accumulator (one rounding less)
            h0, h1 = int8_linear(x, entry, out_dtype=torch.float32, group=self.act_group).chunk(2, dim=-1)
            return activation(h0, act).mul_(h1).to(out_dtype)  # [B, L, F]
        h = self.linear(x, wi)  # [B, L, 2F]
        h0, h1 = h.chunk(2, dim=-1)
        if out_dtype != h.dtype:
            h0, h1 = h0.to(out_dtype), h1.to(out_dtype)
        return activation(h0, act) * h1  # [B, L, F]

    def act_linear(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str, out_dtype: torch.dtype
    ) -> torch.Tensor:
        return activation(self.linear(x, w, b).to(out_dtype), self._act(act))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """One fused kernel (fp32 statistics) when input and weight share a half dtype."""
        if x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return super().rms_norm(x, weight, eps)

    def position_bias(self, table, seq_len, mask, num_buckets, max_distance, dtype) -> torch.Tensor:
        """The reference bias, made contiguous: it comes out of a permute, and every layer adds it."""
        return super().position_bias(table, seq_len, mask, num_buckets, max_distance, dtype).contiguous()

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, L, dk]; bias [B|1, H, L, L]. torch's bf16 softmax accumulates in fp32."""
        if self.attention_kind == "sdpa":  # fused: QK^T, + bias, softmax, PV in one pass over key blocks
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # [B, H, L, dk]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # GEMMs on strided views are slower
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # [B, H, L, L]
        return torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, L, dk]


#: glibc ``mallopt`` parameters and the values the cpu backend sets: allocations up to 32 MiB
#: (glibc's largest mmap threshold) from the heap, which keeps up to 64 MiB free at its top.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
_heap_tuned = False


def keep_temporaries_on_heap() -> bool:
    """Serve allocations up to 32 MiB from glibc's heap instead of fresh ``mmap`` pages.

    A forward allocates many 2-8 MB temporaries; with glibc's default (dynamic) threshold many of
    them are mapped and unmapped on every call, and the page faults and kernel zeroing cost
    ~10-15 % of the base student's CPU time. This is process-wide (the heap keeps up to the peak
    working set instead of returning it at once), done once, and only under glibc; ONNX Runtime
    gets the same effect from its own arena. Returns whether the setting is in effect."""
    global _heap_tuned
    if _heap_tuned:
        return True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _heap_tuned = bool(mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(HEAP_THRESHOLD))) and \
        bool(mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(TRIM_THRESHOLD)))
    if _heap_tuned:
        log.info("fastenc: cpu backend: allocations up to %d MiB now come from the heap (mallopt)",
                 HEAP_THRESHOLD >> 20)
    return _heap_tuned


def release_freed_memory() -> None:
    """Collect garbage and return free heap pages to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def fast_path_supported() -> tuple[bool, str]:
    """Whether this CPU runs bf16 and int8 GEMMs natively (else the fp32 torch backend is faster)."""
    flags = cpu_flags()
    if not hasattr(torch, "_int_mm"):
        return False, f"torch {torch.__version__} has no torch._int_mm"
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN"
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return True, "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16"
    return False, "the CPU has neither AVX512-BF16 nor AMX (bf16 GEMMs would be emulated)"


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Int8Plan:
    """Parameter names computed as int8 GEMMs, and the calibration cos-sim that plan reached."""

    weights: tuple[str, ...]
    cos: float | None = None
    min_cos: float | None = None
    calib_len: int | None = None
    attention: str | None = None  # "matmul" | "sdpa": the faster attention kernel on the machine that planned
    worst: float | None = None  # the calibration batch's worst-token cos-sim
    group: int = 0  # with ``grouped``: the activation group it was planned for
    grouped: tuple[str, ...] | None = None  # the set planned for activations quantised per token and group

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "version": PLAN_VERSION}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Int8Plan":
        data = json.loads(text)
        if data.pop("version", None) != PLAN_VERSION:
            raise ValueError("stale plan version")
        attention = data.get("attention")
        if attention is not None and attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {attention!r}")
        grouped = data.get("grouped")
        return cls(tuple(data["weights"]), data.get("cos"), data.get("min_cos"), data.get("calib_len"), attention,
                   data.get("worst"), int(data.get("group", 0)), tuple(grouped) if grouped is not None else None)

    def summary(self, cfg) -> str:
        n = cfg.num_layers
        wi = sum(f"blocks.{i}.ffn.wi.weight" in self.weights for i in range(n))
        wo = sum(f"blocks.{i}.ffn.wo.weight" in self.weights for i in range(n))
        attn = sum(f"blocks.{i}.attn.qkv.weight" in self.weights for i in range(n))
        proj = sum(name.startswith("projector.") for name in self.weights)
        cos = f", calibration cos {self.cos:.5f}" if self.cos is not None else ""
        cos += f" (worst token {self.worst:.5f})" if self.worst is not None else ""
        return f"attention {self.attention or 'matmul'}; int8: attention {attn}/{n} layers, FFN in {wi}/{n} out {wo}/{n}, projector {proj}/2{cos}"


def linear_weight_names(model: T5Encoder) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed.") and "rel_bias" not in n]


def input_maxima(model: T5Encoder, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel maxima of every linear weight's input on ``ids`` (float GEMMs; ``model`` has CpuOps)."""
    ops = model.ops
    saved, ops._int8 = ops._int8, {}
    record = ops.record_inputs()
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        ops.record_inputs(False)
        ops._int8 = saved
    return {name: record[p.data_ptr()] for name, p in model.named_parameters() if p.data_ptr() in record}


def calibration_maxima(model: T5Encoder, calib_len: int = CALIB_LEN) -> dict[str, torch.Tensor]:
    """:func:`input_maxima` on the calibration batch :func:`prepare` uses, whatever op table ``model`` has."""
    saved = model.ops
    model.ops = CpuOps("matmul")
    try:
        return input_maxima(model, calibration_ids(model.config, calib_len))
    finally:
        model.ops = saved


def quantized_weights(model: T5Encoder, names: Sequence[str]) -> dict[str, Int8Weight]:
    """``names``' weights of ``model`` (a float copy another engine is built from) as :func:`prepare` quantises
    them: per-channel int8, smoothed where the calibration batch shows activation outliers."""
    params = dict(model.named_parameters())
    amax = calibration_maxima(model)  # SmoothQuant's statistics
    return {n: quantize_weight(params[n], amax.get(n)) for n in names}


def weight_fingerprint(array) -> str:
    """A digest of a float weight's values (a numpy array), to find it again in an exported graph."""
    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def calibration_ids(cfg, length: int = CALIB_LEN, seed: int = 0, rows: int = CALIB_ROWS) -> torch.Tensor:
    """A fixed pseudo-random batch of token ids [rows, length] (ids 0-1 are pad/EOS, so skipped)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, cfg.vocab_size, (rows, length), generator=gen)


def prompt_ids(cfg, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Prompt-shaped token ids [rows, length] as the unmasked pipelines (Flux, SD3, LTX-Video, CogVideoX) send
    them: a prompt of PROMPT_TOKENS tokens, EOS, then padding to ``length``; their transformer reads every
    position, the padding's embeddings included. The prompts' ids follow a Zipf law over the vocabulary's order
    (SentencePiece vocabularies, T5's and umT5's, list pieces from the most frequent), so common pieces recur
    as in text; each row has its own length."""
    gen = torch.Generator().manual_seed(seed)
    first = EOS_ID + 2  # the first id after pad, EOS and <unk>
    weights = 1.0 / torch.arange(1, max(cfg.vocab_size - first, 1) + 1, dtype=torch.float64)  # Zipf by rank
    hi = min(PROMPT_TOKENS[1], length - 1)
    lo = min(PROMPT_TOKENS[0], hi)
    out = torch.full((rows, length), PAD_ID, dtype=torch.long)  # [rows, L]
    for row in out:
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        if n:
            row[:n] = torch.multinomial(weights, n, replacement=True, generator=gen) + first
        row[n] = EOS_ID
    return out


def _cos(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Cosine similarity of the embeddings to the reference: (mean, worst) over tokens."""
    cos = F.cosine_similarity(out.float(), ref.float(), dim=-1)  # [B, L]
    return float(cos.mean()), float(cos.min())


def plan_int8(
    model: T5Encoder,
    ref: torch.Tensor,
    ids: torch.Tensor,
    *,
    min_cos: float = DEFAULT_MIN_COS,
    min_worst: float = DEFAULT_MIN_WORST,
    smooth: bool = True,
    confirm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Int8Plan:
    """Search the int8 weight set for ``model`` (already bf16 with a :class:`CpuOps` table).

    ``ref`` is the fp32 model's output on ``ids``; a weight set passes when the mean cosine
    similarity over tokens keeps ``min_cos`` and the worst token keeps ``min_worst`` (activation
    outliers, as in trained T5 v1.1, hurt a few tokens far more than the mean). Steps: attention +
    projector weights (else the projector alone, else nothing); then the FFN input projection
    ``wi`` of layers ``k..n-1`` for the smallest ``k`` that passes (binary search: error grows as
    ``k`` falls); then ``wo`` the same way. About ten forward passes at the calibration length.
    ``smooth``: GEMMs whose inputs have outlier channels are smoothed (see :func:`smoothing`).
    ``confirm``: ``(ref, ids)`` of a second batch the search never scored. The set found sits at the floor
    on the search batch, so on other tokens its worst token falls below about half the time; it must
    also pass on this batch, else it steps back (one ``wo`` layer at a time from the lowest, then ``wi``,
    then the projector alone, then nothing) until a set passes on both. The cos-sim kept is the lower of the
    two batches.
    """
    ops = model.ops
    if not isinstance(ops, CpuOps):
        raise ConfigError("plan_int8 needs a model with the CpuOps table installed")
    params = dict(model.named_parameters())
    n = model.config.num_layers
    amax = input_maxima(model, ids) if smooth else {}

    @torch.inference_mode()
    def score(names: Sequence[str], batch: tuple[torch.Tensor, torch.Tensor] = (ref, ids)) -> tuple[float, float]:
        ops.clear()
        for name in names:
            ops.quantize(params[name], amax.get(name))
        return _cos(model(batch[1]), batch[0])

    def passes(c: tuple[float, float]) -> bool:
        return c[0] >= min_cos and c[1] >= min_worst

    attn = [f"blocks.{i}.attn.{w}.weight" for i in range(n) for w in ("qkv", "o")]
    proj = [name for name in linear_weight_names(model) if name.startswith("projector.")]
    base: list[str] = []
    best = score(base)
    if not passes(best):
        log.warning("fastenc: bf16 alone reaches cos-sim %.5f (worst token %.5f) to fp32 on the calibration "
                    "batch (< %.4f / %.4f); no weight goes int8 (backend='torch' computes in fp32)",
                    best[0], best[1], min_cos, min_worst)
    for cand in (attn + proj, proj):
        if cand and passes(c := score(cand)):
            base, best = cand, c
            break
    first = {"wi": n, "wo": n}  # the lowest layer whose FFN weight of that kind is int8 (n: none)
    core = list(base)
    if base == attn + proj:
        for kind in ("wi", "wo"):
            lo, hi = 0, n  # invariant: layers hi..n-1 quantised is known to pass
            while lo < hi:
                mid = (lo + hi) // 2
                cand = base + [f"blocks.{i}.ffn.{kind}.weight" for i in range(mid, n)]
                c = score(cand)
                if passes(c):
                    hi, best_mid = mid, c
                else:
                    lo = mid + 1
            if hi == n:
                break  # not even the last layer's wi: wo (more sensitive) will not pass either
            first[kind] = hi
            base = base + [f"blocks.{i}.ffn.{kind}.weight" for i in range(hi, n)]
            best = best_mid
    if confirm is not None and base:

        def ffn(wi: int, wo: int) -> list[str]:
            return (core + [f"blocks.{i}.ffn.wi.weight" for i in range(wi, n)]
                    + [f"blocks.{i}.ffn.wo.weight" for i in range(wo, n)])

        steps = [ffn(first["wi"], wo) for wo in range(first["wo"] + 1, n + 1)]
        steps += [ffn(wi, n) for wi in range(first["wi"] + 1, n + 1)]
        steps += [proj] if core == attn + proj and proj else []
        steps.append([])
        # a step must pass on both batches: a smaller set is not always better on the search batch (errors of
        # different GEMMs can cancel), and the search scored only the sets on its path
        cand, c1, c2 = base, best, score(base, confirm)
        for step in steps:
            if passes(c2) and passes(c1):  # c1 is None only where c2 fails
                break
            cand, c2 = step, score(step, confirm)
            c1 = score(step) if passes(c2) else None  # the search batch only where the confirming one passes
        if cand != base:
            log.info("fastenc: the int8 set of %d weights missed the floor on the confirming batch; %d kept",
                     len(base), len(cand))
            base = cand
        best = c1 if c1 is not None else score(cand)
        best = (min(best[0], c2[0]), min(best[1], c2[1]))
    ops.clear()
    return Int8Plan(tuple(base), round(best[0], 6), min_cos, int(ids.shape[1]), worst=round(best[1], 6))


def choose_attention(cfg, seq_len: int = 512, *, reps: int = 3) -> str:
    """Time the two attention kernels of :class:`CpuOps` in bf16 on ``[1, H, seq_len, d_kv]`` and return
    the faster (``"matmul"`` or ``"sdpa"``); ``reps`` timed calls each after one warm-up, minimum kept."""
    import time

    gen = torch.Generator().manual_seed(0)
    shape = (1, cfg.num_heads, seq_len, cfg.d_kv)
    q, k, v = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(3))  # [1, H, L, dk]
    table = torch.randn(cfg.num_buckets, cfg.num_heads, generator=gen)
    bias = TORCH_OPS.position_bias(table, seq_len, None, cfg.num_buckets, cfg.max_distance, torch.bfloat16)
    best = {kind: float("inf") for kind in ATTENTION_KINDS}
    with torch.inference_mode():
        for rep in range(reps + 1):  # the kernels alternate, so a change in load hits both
            for kind in ATTENTION_KINDS:
                ops = CpuOps(kind)
                t0 = time.perf_counter()
                ops.attention(q, k, v, bias)
                if rep:  # the first call of each is the warm-up
                    best[kind] = min(best[kind], time.perf_counter() - t0)
    choice = min(best, key=best.get)
    log.info("fastenc: cpu backend attention at L=%d: %s (%s)", seq_len, choice,
             ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in best.items()))
    return choice


def plan_cache_dir() -> Path:
    """``$FASTENC_CACHE_DIR/cpu-plans``, else ``$XDG_CACHE_HOME/fastenc/cpu-plans`` (``~/.cache``)."""
    root = os.environ.get("FASTENC_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastenc"
    return Path(root) / "cpu-plans"


def _plan_key(source: str, cfg, min_cos: float, calib_len: int, dtype: torch.dtype = torch.bfloat16) -> str:
    text = f"{PLAN_VERSION}|{source}|{cfg}|{min_cos}|{DEFAULT_MIN_WORST}|{calib_len}|{torch.__version__}|{cpu_model()}"
    if dtype != torch.bfloat16:  # an int8 plan around fp32 compute is another plan
        text += f"|{dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_plan(key: str | None) -> Int8Plan | None:
    if key is None:
        return None
    try:
        return Int8Plan.from_json((plan_cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or stale: search again
        return None


def _write_plan(key: str | None, plan: Int8Plan) -> None:
    if key is None:
        return
    path = plan_cache_dir() / f"{key}.json"
    try:
        from ..fileio import atomic_write

        atomic_write(path, lambda p: p.write_text(plan.to_json()))
    except OSError as exc:  # read-only home: the plan is simply not reused
        log.info("fastenc: could not cache the CPU int8 plan at %s (%s)", path, exc)


def source_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a checkpoint for the plan cache: resolved path plus size and mtime of its files."""
    p = Path(path).resolve()
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return f"{p}|{stats}"


def prepare(
    model: T5Encoder,
    *,
    int8: str | Sequence[str] | Int8Plan = "auto",
    min_cos: float = DEFAULT_MIN_COS,
    calib_len: int = CALIB_LEN,
    source: str | None = None,
    tune_malloc: bool = True,
    attention: str = "auto",
    gelu: str = "exact",
    dtype: torch.dtype = torch.bfloat16,
    act_group: int = 0,
    standby_for: str | None = None,
) -> T5Encoder:
    """Turn ``model`` (any float dtype, on the CPU) into the CPU fast path, in place.

    ``int8``: ``"auto"`` (search a plan with :func:`plan_int8`, cached under ``source`` when
    given), ``"none"`` (bf16 only), ``"all"`` (every linear weight), or explicit parameter names
    / an :class:`Int8Plan`. The plan is kept as ``model.int8_plan``. ``tune_malloc`` calls
    :func:`keep_temporaries_on_heap` (process-wide; pass False to leave glibc's malloc alone).
    ``attention``: ``"auto"`` (the plan's choice, else timed once by :func:`choose_attention` and
    kept in the plan), ``"matmul"`` or ``"sdpa"``; ``gelu``: one of :data:`GELU_KINDS`; ``dtype``: what the op table computes
    in, bf16 (CPUs with native bf16) or fp32 (the others: int8 GEMMs around fp32). The first call with a new ``source`` pays the
    planning (about ten calibration forwards) and the attention timing; later ones read the plan.
    ``act_group`` (with ``int8="auto"``): also plan the set for int8 GEMMs whose activations are quantised per
    token and group of that many channels (OpenVINO's dynamic quantisation), against the same references:
    ``model.int8_plan.grouped`` (the op table itself runs ``weights``). ``standby_for``: the engine the plan runs
    instead (this op table then serves only when that engine steps aside), named in the log line.
    """
    if model.embed.weight.device.type != "cpu":
        raise ConfigError(f"the cpu backend runs on the CPU; the model is on {model.embed.weight.device}")
    if isinstance(int8, str) and int8 not in INT8_MODES:
        raise ConfigError(f"int8 must be one of {', '.join(INT8_MODES)} or a list of weight names, got {int8!r}")
    if attention != "auto" and attention not in ATTENTION_KINDS:
        raise ConfigError(f"attention must be auto, {' or '.join(ATTENTION_KINDS)}, got {attention!r}")
    if gelu not in GELU_KINDS:
        raise ConfigError(f"gelu must be one of {', '.join(GELU_KINDS)}, got {gelu!r}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ConfigError(f"the cpu backend computes in bf16 or fp32, not {dtype}")
    model.eval()
    if tune_malloc:
        keep_temporaries_on_heap()
    key = _plan_key(source, model.config, min_cos, calib_len, dtype) if source and int8 == "auto" else None
    plan = int8 if isinstance(int8, Int8Plan) else _read_plan(key)
    if plan is not None and key is not None and not set(plan.weights) <= set(linear_weight_names(model)):
        plan = None  # a cached plan for another layout: search again
    if plan is not None and key is not None and act_group and (plan.group != act_group or plan.grouped is None):
        plan = None  # cached without the grouped set asked for: search again (it needs the fp32 references)
    ids = ref = confirm = None
    if plan is None and int8 == "auto":  # the fp32 reference, before the cast
        ids = calibration_ids(model.config, calib_len)
        ids2 = calibration_ids(model.config, calib_len, seed=CONFIRM_SEED)
        model.ops = TORCH_OPS
        with torch.inference_mode():
            if model.compute_dtype == torch.float32:
                ref, ref2 = model(ids), model(ids2)  # [rows, L, P]
            else:  # a half-precision model: reference in fp32 on upcast copies of its weights
                import copy

                ref_model = copy.deepcopy(model).float()
                ref, ref2 = ref_model(ids), ref_model(ids2)
                del ref_model
        confirm = (ref2, ids2)
    model.cast(dtype)
    cached = plan
    kind = attention if attention != "auto" else (plan.attention if plan is not None else None)
    if kind is None:
        kind = choose_attention(model.config)
    ops = CpuOps(kind, gelu)
    model.ops = ops
    if plan is None:
        if int8 == "none":
            plan = Int8Plan(())
        elif int8 == "all":
            plan = Int8Plan(tuple(linear_weight_names(model)))
        elif int8 == "auto":
            log.info("fastenc: planning int8 weights for the cpu backend (%d calibration tokens%s)", calib_len,
                     "; cached after" if key else "")
            plan = plan_int8(model, ref, ids, min_cos=min_cos, confirm=confirm)
            if act_group:
                model.ops = CpuOps(kind, gelu, act_group)
                grouped = plan_int8(model, ref, ids, min_cos=min_cos, confirm=confirm)
                model.ops = ops
                plan = replace(plan, group=act_group, grouped=grouped.weights)
                log.info("fastenc: int8 set for activations per %d channels: %d weights (per token: %d)",
                         act_group, len(grouped.weights), len(plan.weights))
        else:
            plan = Int8Plan(tuple(int8))
    params = dict(model.named_parameters())
    unknown = [name for name in plan.weights if name not in params]
    if unknown:
        raise ConfigError(f"int8 plan names unknown weights: {', '.join(unknown[:3])}")
    if plan.attention != kind:
        plan = replace(plan, attention=kind)
    if key is not None and (cached is None or (attention == "auto" and cached.attention is None)):
        _write_plan(key, plan)
    ops.clear()
    amax = input_maxima(model, calibration_ids(model.config, calib_len)) if plan.weights else {}
    for name in plan.weights:
        ops.quantize(params[name], amax.get(name))
    model.int8_plan = plan
    del ref, confirm
    release_freed_memory()  # the fp32 weights the cast replaced
    if standby_for:
        log.info("fastenc: cpu backend (%s, %s) runs %s; the op table (attention %s, float GEMMs) stands by for when "
                 "it steps aside", model.config.name, str(dtype).removeprefix("torch."), standby_for, kind)
    else:
        log.info("fastenc: cpu backend (%s, %s) %s", model.config.name, str(dtype).removeprefix("torch."),
                 plan.summary(model.config))
    return model
