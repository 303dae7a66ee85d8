"""OpenVINO as an execution engine of the ``cpu`` backend (chosen by the planner, :mod:`.cpu_plan`).

The one model definition is converted straight from the torch module (``openvino.convert_model``
traces :class:`fastenc.model.T5Encoder` with the reference op table; no file is written), with
batch and sequence dynamic, so one compiled model serves every shape. OpenVINO prepacks the
weights at compile time and runs them through oneDNN (AMX / AVX512 / AVX2 as the CPU has); the
inference precision is bf16 where the CPU has it natively, else fp32. Two graphs exist at most:
ids only (Flux, SD3: no mask) and ids + mask (PixArt), the second converted on first use.

The engine copies the weights at conversion (``share_weights=False``) and remembers the version
counters of the parameters it was made from: a weight edited in place after that makes the engine
step aside (the op-table path runs) instead of serving stale numbers.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import warnings

import torch
from torch import nn

from ..errors import BackendUnavailable
from ..model import T5Encoder
from ..ops import TORCH_OPS

log = logging.getLogger("fastenc")

#: openvino Type name -> the label fastenc prints
PRECISIONS = {"bf16": "bf16", "f32": "fp32"}


def available() -> tuple[bool, str]:
    """Whether openvino imports here, and its version or the reason it does not."""
    try:
        import openvino as ov
    except ImportError as exc:
        return False, f"openvino is not installed ({exc}); pip install 'fastenc[openvino]'"
    return True, ov.__version__.split("-")[0]


class _Ids(nn.Module):
    def __init__(self, model: T5Encoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, P]
        return self.model(input_ids)


class _IdsMask(_Ids):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


class OpenVinoEngine:
    """``engine(ids [B, L], mask [B, L] | None) -> [B, L, P]`` in the compute precision (bf16 or fp32), or
    None when it cannot serve (the weights changed since conversion)."""

    kind = "openvino"

    def __init__(self, model: T5Encoder, *, precision: str = "bf16", threads: int | None = None):
        ok, why = available()
        if not ok:
            raise BackendUnavailable(why)
        if precision not in PRECISIONS:
            raise BackendUnavailable(f"openvino engine precision must be one of {', '.join(PRECISIONS)}")
        import openvino as ov

        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.output_dim = model.config.output_dim
        self.threads = int(threads or torch.get_num_threads())
        self.version = ov.__version__.split("-")[0]
        self._core = ov.Core()
        self._lock = threading.Lock()
        self._requests: dict[bool, object] = {}
        self.build_s = 0.0
        self.bind(model)
        self._compile(masked=False)

    def bind(self, model: T5Encoder) -> None:
        """Follow ``model``'s parameters from now on (call after casting them: in bf16 inference the
        rounded weights give the same graph, and a later edit of any of them retires the engine)."""
        self._source = model
        self._versions = self._param_versions(model)

    @staticmethod
    def _param_versions(model: nn.Module) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in model.parameters())

    def _float_copy(self) -> T5Encoder:
        """A float32 copy of the bound model on the reference op table: what is traced, then dropped."""
        m = copy.deepcopy(self._source, memo={id(self._source.ops): TORCH_OPS})  # not the int8 tables
        return m.float().eval()

    def _compile(self, masked: bool):
        import openvino as ov

        t0 = time.perf_counter()
        m = self._float_copy()
        ids = torch.randint(2, m.config.vocab_size, (2, 8))
        wrapper = _IdsMask(m) if masked else _Ids(m)
        example = (ids, torch.ones_like(ids)) if masked else (ids,)
        shapes = [ov.PartialShape([-1, -1])] * len(example)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the converter's tracing warns about its own deprecations
            graph = ov.convert_model(wrapper, example_input=example, input=shapes, share_weights=False)
        del m, wrapper
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(graph)  # the output in the compute precision, converted inside the graph
        ppp.output(0).tensor().set_element_type(ov.Type.bf16 if self.precision == "bf16" else ov.Type.f32)
        graph = ppp.build()
        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": self.precision}
        compiled = self._core.compile_model(graph, "CPU", config)
        del graph
        self._requests[masked] = compiled.create_infer_request()
        self.build_s += time.perf_counter() - t0
        log.info("fastenc: cpu backend: OpenVINO %s %s graph%s compiled in %.1f s", self.version,
                 PRECISIONS[self.precision], " (with mask)" if masked else "", time.perf_counter() - t0)
        return self._requests[masked]

    def __deepcopy__(self, memo):
        """A copied model has other parameters: its copy runs the op-table path (the engine is not copied)."""
        return None

    @property
    def label(self) -> str:
        return f"OpenVINO {self.version} {PRECISIONS[self.precision]}"

    def stale(self) -> bool:
        return self._param_versions(self._source) != self._versions

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.stale():
            return None
        masked = mask is not None
        with self._lock:  # one infer request per graph: calls from several threads take turns
            import openvino as ov

            request = self._requests.get(masked) or self._compile(masked)
            feed = [ids.to(torch.int64).numpy()]
            if masked:
                feed.append(mask.to(torch.int64).numpy())
            shape = (*ids.shape, self.output_dim)
            out = torch.empty(shape, dtype=self.dtype)  # [B, L, P]: OpenVINO writes it in place (no copy)
            if self.dtype == torch.bfloat16:  # numpy has no bf16: the bytes, typed on the OpenVINO side
                target = ov.Tensor(out.view(torch.uint8).numpy(), ov.Shape(list(shape)), ov.Type.bf16)
            else:
                target = ov.Tensor(out.numpy(), shared_memory=True)
            request.set_output_tensor(0, target)
            request.infer(feed)
            return out
