"""OpenVINO as an execution engine of the ``cpu`` backend (chosen by the planner, :mod:`.cpu_plan`).

The one model definition is converted straight from the torch module (``openvino.convert_model``
traces :class:`fastenc.model.T5Encoder` with the reference op table; no file is written), with
batch and sequence dynamic, so one compiled model serves every shape (and must: OpenVINO 2026.4's
static-shape compile of this graph under the bf16 hint computes other numbers, cos 0.93-0.97 to the
dynamic one at 1x120 / 1x512, for fastenc's graph and its ONNX export alike). OpenVINO prepacks the
weights at compile time and runs them through oneDNN (AMX / AVX512 / AVX2 as the CPU has); the
inference precision is bf16 where the CPU has it natively, else fp32. One graph takes ids and mask:
a call without a mask (Flux, SD3) passes all ones, which computes the same numbers as no mask at the
same speed, and a second compiled model would hold another packed copy of the weights (about 2.6x
their bf16 size).

The engine copies the weights at conversion (``share_weights=False``) and remembers the version
counters of the parameters it was made from: a weight edited in place after that makes the engine
step aside (the op-table path runs) instead of serving stale numbers.

Converting costs seconds (tracing the module); with ``graph_cache`` (the plan's cache name, given by
:mod:`.cpu_plan` for a checkpoint it planned) each converted graph is saved once as OpenVINO IR beside
the plan (``<key>.mask.xml`` / ``.bin``; the weights in the compute precision: bf16
weights round exactly as OpenVINO's bf16 inference rounds fp32 ones, so the graph read back computes
the same numbers) and later loads read it instead, so a cached plan only compiles. A graph read back is checked
against the bound model on a short input before it serves; one that disagrees (damaged, or written by
something else) is converted again and rewritten. An ids-only graph an earlier version kept beside it
(``<key>.ids.*``) is deleted.

With ``int8_weights`` the planned weights are stored as fastenc's own per-channel int8 values and scales
(:func:`compress_weights`, smoothing included), and OpenVINO quantises their activations per token and group of
``DQ_GROUP`` channels as it runs: int8 GEMMs on VNNI/AMX, the rest in the inference precision (fp32, or bf16 where
the CPU has it: on a Zen 4 OpenVINO bf16 with its int8 set runs about 1.3x plain bf16). Where the CPU has
no VNNI OpenVINO decompresses the weights instead, which is no faster, so the planner offers it only on VNNI CPUs
(:func:`dynamic_int8`). That graph is cached as ``<key>.int8.*``; under bf16 its float weights are stored rounded
to bf16, its int8 values and per-channel scales as they are.
"""

from __future__ import annotations

import copy
import logging
import os
import secrets
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from ..errors import BackendUnavailable
from ..model import T5Encoder
from ..ops import TORCH_OPS
from .params import ParamSlots

if TYPE_CHECKING:
    from .cpu import Int8Weight

log = logging.getLogger("fastenc")

#: openvino Type name -> the label fastenc prints
PRECISIONS = {"bf16": "bf16", "f32": "fp32"}
#: the graph cache's file stem: the one graph (ids + mask); "ids": the ids-only graph earlier versions kept too
GRAPH_NAME, LEGACY_GRAPH_NAMES = "mask", ("ids",)
#: the stem of the graph with int8 weights (:func:`compress_weights`), kept beside the float one during a search
INT8_GRAPH_NAME = "int8"
#: OpenVINO's dynamic quantisation of the int8 GEMMs' activations: one int8 scale per token and group of this
#: many input channels (finer than the op table's per-token scale; 128 divides every T5 width). 0 turns it off.
DQ_GROUP = 128
#: a graph read from the cache serves only if every token of the check input keeps this cos-sim to the model
CHECK_MIN_COS = 0.999
#: The memory building the engine takes at its peak, in multiples of the model's fp32 weight bytes: converting
#: (a float copy, the traced graph, the compiled model) and reading a cached graph (the graph and the compiled
#: model). Measured for the base student (3.1x and 1.5x above the process before), rounded up.
CONVERT_PEAK, READ_PEAK = 3.5, 2.0


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def float_copy(model: T5Encoder) -> T5Encoder:
    """A float32 copy of ``model`` on the reference op table (not its int8 tables): what an engine traces."""
    m = copy.deepcopy(model, memo={id(model.ops): TORCH_OPS})
    return m.float().eval()


def agrees(model: T5Encoder, run) -> bool:
    """Whether ``run(ids, mask) -> [B, L, P]`` (an engine's graph) computes what ``model`` does on the
    reference op table, token by token (cos-sim >= CHECK_MIN_COS), on a short fixed input with padding."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (1, 12), generator=gen)  # [1, 12]
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0  # padding, as PixArt's prompts have
    training, saved = model.training, model.ops
    try:
        model.ops = TORCH_OPS
        with torch.no_grad():
            ref = model.eval()(ids, mask).float()  # [1, 12, P] (eval: no projector dropout)
    finally:
        model.ops = saved
        model.train(training)
    out = run(ids, mask).float()
    keep = mask.bool()
    cos = torch.nn.functional.cosine_similarity(out[keep], ref[keep], dim=-1)
    return bool(torch.isfinite(out[keep]).all() and cos.min() >= CHECK_MIN_COS)


def graph_files(prefix: Path, name: str = GRAPH_NAME) -> tuple[Path, Path]:
    """The (xml, bin) pair of the cached graph for the plan cache name ``prefix``."""
    stem = f"{prefix.name}.{name}"
    return prefix.parent / f"{stem}.xml", prefix.parent / f"{stem}.bin"


def available() -> tuple[bool, str]:
    """Whether openvino imports here, and its version or the reason it does not."""
    try:
        import openvino as ov
    except ImportError as exc:
        return False, f"openvino is not installed ({exc}); pip install 'fastenc[openvino]'"
    return True, ov.__version__.split("-")[0]


def dynamic_int8() -> bool:
    """Whether OpenVINO's CPU plugin runs int8-weight GEMMs with dynamically quantised fp32 activations here
    (it needs AVX-VNNI or AVX512-VNNI; AMX CPUs have the latter)."""
    from .cpu import cpu_flags

    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def compress_weights(graph, weights: Mapping[str, torch.Tensor], quantized: Mapping[str, "Int8Weight"]) -> list[str]:
    """Store, in place, each of ``quantized``'s weights (``weights``: name -> the float [N, K] the graph holds, or
    its bf16 rounding: weights are found by their bf16 values, so a graph traced before the model was cast to
    bf16 serves) as an int8 constant [N, K], a conversion to fp32 and a multiply by its per-channel scale
    [N, 1]: the pattern OpenVINO's CPU plugin runs as an int8-weight GEMM. A smoothed weight's activations are
    multiplied by ``inv_smooth [K]`` first. Returns the names rewritten; a planned weight the graph does not hold
    (as the second input of a MatMul with transpose_b) raises BackendUnavailable."""
    import numpy as np
    import openvino as ov
    from openvino import opset13

    from .cpu import weight_fingerprint

    def key(w: torch.Tensor) -> str:
        return weight_fingerprint(w.to(torch.bfloat16).float().numpy())

    wanted = {key(weights[n].detach()): n for n in quantized}
    done = []
    for node in graph.get_ordered_ops():
        if node.get_type_name() != "MatMul" or not node.get_attributes().get("transpose_b"):
            continue
        const = node.input_value(1).get_node()
        if const.get_type_name() != "Constant" or const.get_output_element_type(0) != ov.Type.f32 \
                or len(const.get_output_shape(0)) != 2:
            continue
        name = wanted.get(key(torch.from_numpy(np.array(const.get_data(), dtype=np.float32))))
        if name is None or name in done:
            continue
        q = quantized[name]
        wq = np.ascontiguousarray(q.qweight_t.t().numpy())  # [N, K] int8
        scale = q.scale.float().reshape(-1, 1).numpy()  # [N, 1]
        weight = opset13.multiply(opset13.convert(ov.op.Constant(wq), ov.Type.f32), ov.op.Constant(scale))
        node.input(1).replace_source_output(weight.output(0))
        if q.inv_smooth is not None:
            x = node.input_value(0)
            node.input(0).replace_source_output(
                opset13.multiply(x, ov.op.Constant(q.inv_smooth.float().numpy())).output(0))
        done.append(name)
    missing = sorted(set(quantized) - set(done))
    if missing:
        raise BackendUnavailable(f"the converted OpenVINO graph has no MatMul for {', '.join(missing[:3])}")
    graph.validate_nodes_and_infer_types()
    return done


def _bf16_weights(graph, min_elements: int = 4096) -> None:
    """Replace each large fp32 weight matrix of ``graph`` (a constant of at least ``min_elements`` with no
    dimension of 1: not an int8 weight's per-channel scales [N, 1]) by its bf16 rounding and a conversion back
    to fp32, in place: half the bytes on disk, the same numbers under bf16 inference."""
    import numpy as np
    import openvino as ov
    from openvino import opset13

    for node in graph.get_ordered_ops():
        if node.get_type_name() != "Constant" or node.get_output_element_type(0) != ov.Type.f32:
            continue
        shape = list(node.get_output_shape(0))
        if len(shape) < 2 or 1 in shape or int(np.prod(shape)) < min_elements:
            continue
        data = torch.from_numpy(np.array(node.get_data(), dtype=np.float32))  # a copy: the constant is read-only
        rounded = ov.Tensor(ov.Type.bf16, ov.Shape(shape))
        np.copyto(rounded.data.view(np.int16), data.to(torch.bfloat16).view(torch.int16).numpy().reshape(shape))
        widened = opset13.convert(ov.op.Constant(rounded), ov.Type.f32)
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(widened.output(0))


class _IdsMask(nn.Module):
    def __init__(self, model: T5Encoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # [B, L] x2 -> [B, L, P]
        return self.model(input_ids, attention_mask)


class OpenVinoEngine:
    """``engine(ids [B, L], mask [B, L] | None) -> [B, L, P]`` in the compute precision (bf16 or fp32), or
    None when it cannot serve (the weights changed since conversion)."""

    kind = "openvino"

    def __init__(self, model: T5Encoder, *, precision: str = "bf16", threads: int | None = None,
                 graph_cache: Path | None = None, int8_weights: Sequence[str] = (), dq_group: int = DQ_GROUP,
                 keep_converted: bool = False, base: "OpenVinoEngine | None" = None):
        """``keep_converted``: keep the traced float graph as ``converted`` (it holds the float weights: set it
        to None when done), for another engine of the same weights to start from (``base``: its int8 graph is
        then ``base.converted`` cloned and compressed, no second trace)."""
        ok, why = available()
        if not ok:
            raise BackendUnavailable(why)
        if precision not in PRECISIONS:
            raise BackendUnavailable(f"openvino engine precision must be one of {', '.join(PRECISIONS)}")
        self.int8_weights = tuple(int8_weights)
        self.dq_group = int(dq_group)
        self.graph_name = INT8_GRAPH_NAME if self.int8_weights else GRAPH_NAME
        self.graph_cache = Path(graph_cache) if graph_cache is not None else None
        cached = self.graph_cache is not None and all(p.is_file() for p in graph_files(self.graph_cache,
                                                                                       self.graph_name))
        need = (READ_PEAK if cached else CONVERT_PEAK) * 4 * sum(p.numel() for p in model.parameters())
        free = available_memory()
        if free is not None and free < need:  # checked before anything is copied or converted
            from ..caches import human

            raise BackendUnavailable(f"OpenVINO needs about {human(need)} to "
                                     f"{'compile the cached graph' if cached else 'convert and compile the model'}; "
                                     f"{human(free)} is available")
        import openvino as ov

        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.output_dim = model.config.output_dim
        self.threads = int(threads or torch.get_num_threads())
        self.version = ov.__version__.split("-")[0]
        self._core = ov.Core()
        self._lock = threading.Lock()
        self.build_s = 0.0
        self.from_cache = False  # the graph was read from the graph cache (not converted)
        self.keep_converted = keep_converted
        self.converted = None  # with keep_converted: the float graph as traced (none when read from the cache)
        self._base_graph = base.converted if base is not None and base.precision == precision else None
        self.bind(model)
        self._forget(LEGACY_GRAPH_NAMES)
        self._request = self._compile()

    def bind(self, model: T5Encoder) -> None:
        """Follow ``model``'s parameters from now on (call after casting them: in bf16 inference the
        rounded weights give the same graph, and a later edit of any of them retires the engine)."""
        self._source = model
        self._params = ParamSlots(model)
        self._versions = self._params.versions()

    def _convert(self):
        """A float copy of the bound model traced into an OpenVINO graph (or the base engine's graph cloned),
        its output in the compute precision; the planned weights compressed to int8."""
        m = float_copy(self._source)
        graph = self._base_graph.clone() if self._base_graph is not None else self._trace(m)
        self._base_graph = None
        if self.keep_converted:
            self.converted = graph.clone()  # shares the constants: saving replaces them, it does not edit them
        if self.int8_weights:
            from .cpu import quantized_weights

            compress_weights(graph, dict(m.named_parameters()), quantized_weights(m, self.int8_weights))
        return graph

    def _trace(self, m: T5Encoder):
        """``m`` (a float copy) as an OpenVINO graph: ids and mask [B, L] (both dynamic) -> [B, L, P]."""
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        ids = torch.randint(2, m.config.vocab_size, (2, 8))
        wrapper = _IdsMask(m)
        example = (ids, torch.ones_like(ids))
        shapes = [ov.PartialShape([-1, -1])] * len(example)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the converter's tracing warns about its own deprecations
            graph = ov.convert_model(wrapper, example_input=example, input=shapes, share_weights=False)
        del wrapper
        ppp = PrePostProcessor(graph)  # the output in the compute precision, converted inside the graph
        ppp.output(0).tensor().set_element_type(ov.Type.bf16 if self.precision == "bf16" else ov.Type.f32)
        return ppp.build()

    def _read_graph(self):
        """The cached graph, or None when there is none (or it cannot be read: then it is converted again)."""
        if self.graph_cache is None:
            return None
        xml, bin_ = graph_files(self.graph_cache, self.graph_name)
        if not (xml.is_file() and bin_.is_file()):
            return None
        try:
            return self._core.read_model(str(xml), str(bin_))
        except Exception as exc:  # damaged: converted again and rewritten
            log.warning("fastenc: cpu backend: the cached OpenVINO graph %s is unreadable (%s); converting again",
                        xml, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
            return None

    def _save_graph(self, graph) -> None:
        """Write ``graph`` (already compiled: it may be changed) as IR under the cache names, its weights in
        the compute precision: both files on temporary names first, then renamed (the weights before the
        xml, so an xml in place always has its complete weights)."""
        import openvino as ov

        if self.precision == "bf16":
            _bf16_weights(graph)
        xml, bin_ = graph_files(self.graph_cache, self.graph_name)
        tmp_xml = xml.parent / f".{xml.stem}.{secrets.token_hex(4)}.tmp.xml"
        tmp_bin = tmp_xml.with_suffix(".bin")
        try:
            xml.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(graph, str(tmp_xml), compress_to_fp16=False)  # fp32: the graph that was measured
            os.replace(tmp_bin, bin_)
            os.replace(tmp_xml, xml)
        except (OSError, RuntimeError) as exc:  # read-only or full cache: the next load converts again
            log.info("fastenc: could not cache the OpenVINO graph at %s (%s)", xml, exc)
        finally:
            tmp_xml.unlink(missing_ok=True)
            tmp_bin.unlink(missing_ok=True)

    def forget_graphs(self) -> None:
        """Delete this engine's cached graph (the plan did not choose it)."""
        self._forget((self.graph_name, *LEGACY_GRAPH_NAMES))

    def _forget(self, names) -> None:
        if self.graph_cache is None:
            return
        for name in names:
            for path in graph_files(self.graph_cache, name):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass

    def _compile(self):
        t0 = time.perf_counter()
        graph = self._read_graph()
        cached = graph is not None
        if graph is None:
            graph = self._converted_and_kept()
        request = self._compile_graph(graph)
        if cached and not self._agrees(request):
            log.warning("fastenc: cpu backend: the cached OpenVINO graph %s disagrees with the model; converting "
                        "again", graph_files(self.graph_cache, self.graph_name)[0])
            cached = False
            del graph, request
            graph = self._converted_and_kept()
            request = self._compile_graph(graph)
        del graph
        self.from_cache = cached
        self.build_s += time.perf_counter() - t0
        log.info("fastenc: cpu backend: OpenVINO %s %s graph %s in %.1f s", self.version, self._what,
                 "read from the cache and compiled" if cached else "converted and compiled", time.perf_counter() - t0)
        return request

    def _converted_and_kept(self):
        """A converted graph; with a graph cache, saved and read back, so this load serves the very graph later
        loads read (a graph read from IR compiles a little apart from the converted one: last-bit differences)."""
        graph = self._convert()
        if self.graph_cache is None:
            return graph
        self._save_graph(graph)
        saved = self._read_graph()
        return saved if saved is not None else graph  # not writable: the converted one (converted again next load)

    def _compile_graph(self, graph):
        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": self.precision}
        if self.int8_weights:
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = self.dq_group
        return self._core.compile_model(graph, "CPU", config).create_infer_request()

    def _agrees(self, request) -> bool:
        return agrees(self._source, lambda ids, mask: self._run(request, ids, mask))

    def __deepcopy__(self, memo):
        """A copied model has other parameters: its copy runs the op-table path (the engine is not copied)."""
        return None

    @property
    def _what(self) -> str:
        what = PRECISIONS[self.precision]
        if self.int8_weights:
            what += f" + int8 ({len(self.int8_weights)} GEMMs, activations per {self.dq_group} channels)"
        return what

    @property
    def label(self) -> str:
        return f"OpenVINO {self.version} {self._what}"

    def stale(self) -> bool:
        return self._params.versions() != self._versions

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.stale():
            return None
        with self._lock:  # one infer request: calls from several threads take turns
            return self._run(self._request, ids, mask)

    def _run(self, request, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        import openvino as ov

        ids64 = ids.to(torch.int64)
        mask64 = torch.ones_like(ids64) if mask is None else mask.to(torch.int64)  # all ones: the same as no mask
        feed = [ids64.numpy(), mask64.numpy()]
        shape = (*ids.shape, self.output_dim)
        out = torch.empty(shape, dtype=self.dtype)  # [B, L, P]: OpenVINO writes it in place (no copy)
        if self.dtype == torch.bfloat16:  # numpy has no bf16: the bytes, typed on the OpenVINO side
            target = ov.Tensor(out.view(torch.uint8).numpy(), ov.Shape(list(shape)), ov.Type.bf16)
        else:
            target = ov.Tensor(out.numpy(), shared_memory=True)
        request.set_output_tensor(0, target)
        request.infer(feed)
        return out
