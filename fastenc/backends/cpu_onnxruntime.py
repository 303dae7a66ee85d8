"""ONNX Runtime as an execution engine of the ``cpu`` backend (chosen by the planner, :mod:`.cpu_plan`),
with the planned weights as per-token int8 GEMMs.

The graph is fastenc's own ONNX export of the one model definition (:func:`fastenc.exporters.onnx.export_onnx`,
fp32, batch and sequence dynamic). Each planned weight's ``MatMul`` is rewritten into the numerics of
:func:`fastenc.backends.cpu.int8_linear`, so the weight set :func:`fastenc.backends.cpu.plan_int8` chose
on the op table computes the same numbers here:

* the activations, times the weight's SmoothQuant factors where it has them, are quantised per token
  (``scale = amax / 127``, round half to even) to uint8 around a zero point of 128;
* the weights are quantised per output channel (symmetric, int8) and stored as int8 (zero point 0) or as
  uint8 around 128, whichever :func:`weight_format` found exact and faster on this CPU;
* ``com.microsoft.MatMulIntegerToFloat`` accumulates in int32 and scales the result by ``scale_w[n]`` in
  the same kernel; one ``Mul`` applies ``scale[m]``.

The weight format is measured, not assumed from the ISA: on AVX2 CPUs without VNNI, ONNX Runtime's
uint8 x int8 kernel multiplies with ``vpmaddubsw``, which saturates a pair of products at 32767 (up to
17 % wrong at full 8-bit range), while its uint8 x uint8 kernel is exact; where the CPU has VNNI or AMX
the uint8 x int8 kernel is exact and about three times faster than uint8 x uint8 (1.8 vs 5.8 ms at
512 x 768 x 2048 on an AVX512-VNNI Xeon). Both formats compute the same integers, so the plan's
fidelity does not depend on which one runs. The rest of the graph (norms, attention, GELU) runs in fp32,
as ONNX Runtime's fused kernels (:mod:`.ort_fusions`).

With ``graph_cache`` (the plan's cache name) the rewritten graph is saved beside the plan
(``<key>.ort.onnx``) and later loads read it, checked against the bound model on a short input before
it serves, so a cached plan skips the export. Weights edited in place after the build make the engine
step aside (the op-table path runs), as for the OpenVINO engine.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..errors import BackendUnavailable
from ..model import T5Encoder
from . import cpu as fcpu
from .cpu_openvino import agrees, available_memory, float_copy
from .ort_fusions import MS_DOMAIN, fuse
from .params import ParamSlots

log = logging.getLogger("fastenc")

GRAPH_SUFFIX = ".ort.onnx"
#: Peak memory of building the engine, in multiples of the fp32 weight bytes (a float copy, the exported
#: program, the loaded proto and the session's packed weights), rounded up from the base student's 3.4x.
BUILD_PEAK = 4.0
#: One ONNX file holds at most 2 GiB (protobuf); larger models are left to the other engines.
MAX_GRAPH_BYTES = 1 << 30  # fastenc.exporters.onnx.EXTERNAL_DATA_THRESHOLD: one file, no external data
ZERO_POINT = 128
#: How the int8 weights are stored for ``MatMulInteger``: int8 around 0, or uint8 around ZERO_POINT.
WEIGHT_FORMATS = ("int8", "uint8")
#: The graph's metadata key that records the weight format it was built with.
FORMAT_KEY = "fastenc.int8_weight_format"


def available() -> tuple[bool, str]:
    """Whether onnxruntime and onnx import here, and the runtime's version or the reason they do not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError as exc:
        return False, f"onnxruntime is not installed ({exc}); pip install 'fastenc[onnx]'"
    return True, ort.__version__


def _gemm_session(fmt: str, weight: np.ndarray):
    """A one-node ``MatMulInteger`` session: uint8 activations around ZERO_POINT times ``weight`` (int8
    values [K, N]) stored in ``fmt``; one thread."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if fmt == "int8":
        w, zw = weight.astype(np.int8), np.array(0, np.int8)
    else:
        w, zw = (weight.astype(np.int16) + ZERO_POINT).astype(np.uint8), np.array(ZERO_POINT, np.uint8)
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "za", "zw"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "za"),
         numpy_helper.from_array(zw, "zw")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def gemm_exact(fmt: str) -> bool:
    """Whether ONNX Runtime's ``MatMulInteger`` with weights in ``fmt`` gives the exact int32 product at
    full range here: activations 255 (the largest uint8: a pair of them times 127 overflows int16) against
    weights of +-127, the extremes fastenc's quantisation produces."""
    k, n = 256, 16
    weight = np.where(np.arange(n) % 2 == 0, 127, -127)[None, :].repeat(k, 0)  # [K, N]
    a = np.full((8, k), 255, np.uint8)  # [M, K]
    a[1::2, ::5] = 0
    want = (a.astype(np.int64) - ZERO_POINT) @ weight.astype(np.int64)
    got = _gemm_session(fmt, weight).run(None, {"a": a})[0]
    return bool(np.array_equal(got, want))


def _gemm_ms(fmt: str, m: int = 256, k: int = 768, n: int = 1024, calls: int = 5) -> float:
    rng = np.random.default_rng(0)
    session = _gemm_session(fmt, rng.integers(-127, 128, (k, n)))
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    session.run(None, {"a": a})
    t0 = time.perf_counter()
    for _ in range(calls):
        session.run(None, {"a": a})
    return (time.perf_counter() - t0) * 1e3 / calls


@functools.lru_cache(maxsize=None)
def weight_format() -> str:
    """The weight storage of the int8 GEMMs on this CPU: the faster of the formats whose ``MatMulInteger``
    is exact (:func:`gemm_exact`), timed once per process on one GEMM. uint8 is always exact."""
    exact = [fmt for fmt in WEIGHT_FORMATS if fmt == "uint8" or gemm_exact(fmt)]
    if len(exact) == 1:
        chosen = exact[0]
    else:
        times = {fmt: _gemm_ms(fmt) for fmt in exact}
        chosen = min(exact, key=times.get)
        log.info("fastenc: cpu backend: ONNX Runtime int8 GEMM %s", ", ".join(f"{f} weights {t:.2f} ms" for f, t in times.items()))
    log.info("fastenc: cpu backend: ONNX Runtime int8 GEMMs store their weights as %s (exact: %s)", chosen, ", ".join(exact))
    return chosen


def graph_file(prefix: Path) -> Path:
    return prefix.parent / f"{prefix.name}{GRAPH_SUFFIX}"


def quantize_graph(proto, weights: Mapping[str, torch.Tensor], quantized: Mapping[str, fcpu.Int8Weight],
                   fmt: str = "uint8") -> list[str]:
    """Rewrite, in place, every ``MatMul`` of ``proto`` whose right operand is the transpose of one of
    ``quantized``'s weights (``weights``: name -> float [N, K]) into the per-token int8 GEMM, its weights
    stored as ``fmt`` (one of WEIGHT_FORMATS). Returns the names rewritten; a planned weight the graph does
    not hold raises BackendUnavailable."""
    from onnx import helper, numpy_helper

    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r} is not one of {', '.join(WEIGHT_FORMATS)}")

    wanted = {fcpu.weight_fingerprint(weights[name].detach().float().t().numpy()): name for name in quantized}
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    const = []

    def c(name: str, value) -> str:
        const.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    shared = {"axis": c("q8_axis", np.array([-1], np.int64)), "flat": c("q8_flat", np.array([-1], np.int64)),
              "inv": c("q8_inv", np.array(1.0 / 127.0, np.float32)), "eps": c("q8_eps", np.array(1e-12, np.float32)),
              "zp": c("q8_zp", np.array(ZERO_POINT, np.uint8)),
              "one": c("q8_one", np.array(1.0, np.float32)),
              "zw": c("q8_zw", np.array(0, np.int8) if fmt == "int8" else np.array(ZERO_POINT, np.uint8))}
    nodes, done, drop = [], [], set()
    H = helper.make_node
    for node in graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        name = None
        if init is not None and len(init.dims) == 2:
            name = wanted.get(fcpu.weight_fingerprint(numpy_helper.to_array(init)))
        if name is None:
            nodes.append(node)
            continue
        q = quantized[name]
        t = f"q8_{len(done)}"
        k = int(q.qweight_t.shape[0])
        if fmt == "int8":
            wq = np.ascontiguousarray(q.qweight_t.numpy())  # [K, N] int8
        else:
            wq = (q.qweight_t.to(torch.int16) + ZERO_POINT).to(torch.uint8).numpy()  # [K, N]
        x, y = node.input[0], node.output[0]
        new = []
        if q.inv_smooth is not None:
            new.append(H("Mul", [x, c(f"{t}_smooth", q.inv_smooth.float().numpy())], [f"{t}_xs"]))
            x = f"{t}_xs"
        new += [
            H("Shape", [x], [f"{t}_lead"], end=-1),
            H("Reshape", [x, c(f"{t}_k", np.array([-1, k], np.int64))], [f"{t}_x"]),  # [M, K]
            H("ReduceMax", [f"{t}_x", shared["axis"]], [f"{t}_hi"], keepdims=1),  # [M, 1]
            H("ReduceMin", [f"{t}_x", shared["axis"]], [f"{t}_lo"], keepdims=1),
            H("Neg", [f"{t}_lo"], [f"{t}_nlo"]),
            H("Max", [f"{t}_hi", f"{t}_nlo"], [f"{t}_amax"]),
            H("Mul", [f"{t}_amax", shared["inv"]], [f"{t}_s0"]),
            H("Max", [f"{t}_s0", shared["eps"]], [f"{t}_s"]),  # [M, 1] the per-token scale
            H("Reshape", [f"{t}_s", shared["flat"]], [f"{t}_s1"]),  # [M]
            H("Shape", [f"{t}_s1"], [f"{t}_m"]),
            H("Expand", [shared["zp"], f"{t}_m"], [f"{t}_zpm"]),
            H("QuantizeLinear", [f"{t}_x", f"{t}_s1", f"{t}_zpm"], [f"{t}_xq"], axis=0),  # [M, K] uint8
            # int32 product times the per-channel weight scale, in one kernel: [M, N] fp32
            H("MatMulIntegerToFloat", [f"{t}_xq", c(f"{t}_wq", wq), shared["one"], c(f"{t}_sw", q.scale.float().numpy()),
                                       shared["zp"], shared["zw"]], [f"{t}_y0"], domain=MS_DOMAIN),
            H("Mul", [f"{t}_y0", f"{t}_s"], [f"{t}_y1"]),  # times the per-token activation scale
            H("Concat", [f"{t}_lead", shared["flat"]], [f"{t}_shape"], axis=0),
            H("Reshape", [f"{t}_y1", f"{t}_shape"], [y]),  # [..., N]
        ]
        nodes += new
        drop.add(node.input[1])
        done.append(name)
    missing = sorted(set(quantized) - set(done))
    if missing:
        raise BackendUnavailable(f"the exported graph has no MatMul for {', '.join(missing[:3])}")
    used = {i for n in nodes for i in n.input}
    keep = [t for t in graph.initializer if t.name not in drop or t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + const)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in proto.opset_import):
        raise BackendUnavailable("the exported graph's opset is older than 13 (per-axis QuantizeLinear)")
    if done and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


def export_graph(model: T5Encoder) -> bytes:
    """fastenc's fp32 ONNX export of ``model`` (batch and sequence dynamic), serialised."""
    from ..exporters.contract import MAX_BATCH_LIMIT, MAX_SEQ_LIMIT, make_profile
    from ..exporters.onnx import export_onnx

    m = float_copy(model)
    with tempfile.TemporaryDirectory(prefix="fastenc-ort-") as tmp:
        path = Path(tmp) / "encoder.onnx"
        export_onnx(m, path, make_profile(MAX_BATCH_LIMIT, MAX_SEQ_LIMIT))
        return path.read_bytes()


class OrtEngine:
    """``engine(ids [B, L], mask [B, L] | None) -> [B, L, P]`` fp32, or None once the weights changed."""

    kind = "onnxruntime"
    precision = "fp32"
    dtype = torch.float32

    def __init__(self, model: T5Encoder, *, int8_weights: Sequence[str] = (), threads: int | None = None,
                 graph_cache: Path | None = None, base_graph: bytes | None = None, keep_graph: bool = False):
        ok, why = available()
        if not ok:
            raise BackendUnavailable(why)
        fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
        if fp32_bytes >= MAX_GRAPH_BYTES:
            raise BackendUnavailable(f"the model's fp32 weights ({fp32_bytes >> 20} MiB) exceed one ONNX file's "
                                     f"{MAX_GRAPH_BYTES >> 20} MiB")
        self.graph_cache = Path(graph_cache) if graph_cache is not None else None
        cached = self.graph_cache is not None and graph_file(self.graph_cache).is_file()
        free = available_memory()
        if not cached and free is not None and free < BUILD_PEAK * fp32_bytes:
            from ..caches import human

            raise BackendUnavailable(f"ONNX Runtime needs about {human(BUILD_PEAK * fp32_bytes)} to export the "
                                     f"model; {human(free)} is available")
        import onnxruntime as ort

        self.version = ort.__version__
        self.int8_weights = tuple(int8_weights)
        self.threads = int(threads or torch.get_num_threads())
        self.output_dim = model.config.output_dim
        self._graph: bytes | None = None  # the rewritten graph, kept (keep_graph) until saved or dropped
        self._lock = threading.Lock()
        self.build_s = 0.0
        self.from_cache = False
        self.bind(model)
        t0 = time.perf_counter()
        self._session = self._read_cached() if cached else None
        self.from_cache = self._session is not None
        if self._session is None:
            graph = self._build_graph(base_graph)
            self._session = self._open(graph)
            if self.graph_cache is not None:
                self.save_graph(self.graph_cache, graph)
            elif keep_graph:
                self._graph = graph
            del graph
        self.build_s = time.perf_counter() - t0
        self.weight_format = self._recorded_format()
        log.info("fastenc: cpu backend: ONNX Runtime %s %s graph %s in %.1f s", self.version, self._what,
                 "read from the cache" if self.from_cache else "exported and rewritten", self.build_s)

    def _recorded_format(self) -> str | None:
        """How the session's graph stores its int8 weights (WEIGHT_FORMATS; None without int8 GEMMs), as the
        graph records it (a cached graph may come from another process's probe)."""
        if not self.int8_weights:
            return None
        fmt = self._session.get_modelmeta().custom_metadata_map.get(FORMAT_KEY)
        return fmt if fmt in WEIGHT_FORMATS else None

    @property
    def _what(self) -> str:
        if not self.int8_weights:
            return "fp32"
        fmt = self.weight_format
        return f"fp32 + int8 ({len(self.int8_weights)} GEMMs{f', {fmt} weights' if fmt else ''})"

    @property
    def label(self) -> str:
        return f"ONNX Runtime {self.version} {self._what}"

    def bind(self, model: T5Encoder) -> None:
        self._source = model
        self._params = ParamSlots(model)
        self._versions = self._params.versions()

    def stale(self) -> bool:
        return self._params.versions() != self._versions

    def __deepcopy__(self, memo):
        return None

    def _build_graph(self, base_graph: bytes | None) -> bytes:
        """The fp32 export of the bound model (or ``base_graph``, one made earlier by :func:`export_graph`),
        the planned weights' GEMMs rewritten and the norm, GELU and attention chains fused
        (:mod:`.ort_fusions`); serialised."""
        import onnx

        proto = onnx.load_from_string(base_graph if base_graph is not None else export_graph(self._source))
        fuse(proto)
        if not self.int8_weights:
            return proto.SerializeToString()
        m = float_copy(self._source)
        params = dict(m.named_parameters())
        quantized = fcpu.quantized_weights(m, self.int8_weights)
        fmt = weight_format()
        quantize_graph(proto, params, quantized, fmt)
        proto.metadata_props.add(key=FORMAT_KEY, value=fmt)
        del m, params, quantized
        return proto.SerializeToString()

    def _open(self, data):
        import onnxruntime as ort

        from .onnxruntime import session_options

        options = session_options(self.threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # the optimiser's notes on folded initializers are not the user's business
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def save_graph(self, prefix: Path, graph: bytes | None = None) -> None:
        """Write the rewritten graph (``graph``, else the one kept) as the cache file of ``prefix``."""
        from ..fileio import atomic_write

        graph = graph if graph is not None else self._graph
        self._graph = None
        if graph is None:
            return
        self.graph_cache = Path(prefix)
        path = graph_file(self.graph_cache)
        try:
            atomic_write(path, lambda p: p.write_bytes(graph))
        except OSError as exc:  # read-only or full cache: the next load exports again
            log.info("fastenc: could not cache the ONNX Runtime graph at %s (%s)", path, exc)

    def drop_graph(self) -> None:
        self._graph = None

    def _read_cached(self):
        path = graph_file(self.graph_cache)
        try:
            session = self._open(str(path))
            if self._agrees(session):
                return session
            why = "it disagrees with the model"
        except Exception as exc:  # damaged: exported again and rewritten
            why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        log.warning("fastenc: cpu backend: the cached ONNX Runtime graph %s is unusable (%s); exporting again", path, why)
        return None

    def _agrees(self, session) -> bool:
        return agrees(self._source, lambda ids, mask: self._run(session, ids, mask))

    def forget_graphs(self) -> None:
        if self.graph_cache is not None:
            try:
                graph_file(self.graph_cache).unlink(missing_ok=True)
            except OSError:
                pass

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.stale():
            return None
        with self._lock:
            return self._run(self._session, ids, mask)

    def _run(self, session, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        from ..exporters.contract import ATTENTION_MASK, INPUT_IDS

        ids32 = ids.to(torch.int32).contiguous()
        mask32 = torch.ones_like(ids32) if mask is None else mask.to(torch.int32).contiguous()
        out = session.run(None, {INPUT_IDS: ids32.numpy(), ATTENTION_MASK: mask32.numpy()})[0]
        return torch.from_numpy(out)  # [B, L, P]
