"""TensorRT backend: runs ``trt/encoder.trt*.sm*.{dtype}.plan`` on torch's current CUDA stream.

Before TensorRT is touched the engine file is checked against its sidecar (size, sha256), so a
truncated or corrupt plan gives a clear error; then the TensorRT version and GPU architecture it
was built for are compared with this machine's. Optionally each input shape is captured once
into a CUDA graph and replayed (``cuda_graph=True``).

Written against TensorRT 10's documented Python API; not run where it was written (no TensorRT there).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..config import EncoderConfig
from ..errors import CheckpointError, FastencError
from ..exporters.artifacts import check_files
from ..exporters.contract import ATTENTION_MASK, INPUT_IDS, INPUT_NAMES, OUTPUT_NAME
from ..exporters.tensorrt import check_engine_compat, import_tensorrt, require_gpu, sm_tag
from .graph import GraphRunner, pick


def read_plan(path: Path, meta: dict[str, Any]) -> bytes:
    """The engine bytes, after checking size and sha256 against the sidecar."""
    check_files(path, meta)
    data = path.read_bytes()
    want = meta.get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{path}: contents do not match its sidecar's sha256 (corrupt); "
                              f"rebuild with `fastenc export ... --trt --force`")
    return data


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise CheckpointError(f"engine output type {dtype} is not supported")
    return table[dtype]


class TrtRunner(GraphRunner):
    backend = "tensorrt"

    def __init__(self, config: EncoderConfig, artifact: Path, meta: dict[str, Any], device: torch.device,
                 *, cuda_graph: bool = False):
        data = read_plan(artifact, meta)
        trt = import_tensorrt()
        capability = require_gpu()
        check_engine_compat(meta, trt_version=trt.__version__, capability=capability, where=artifact)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise CheckpointError(f"{artifact}: TensorRT could not deserialize the engine (corrupt, or built by "
                                  f"another TensorRT); rebuild with `fastenc export ... --trt --force`")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted([*INPUT_NAMES, OUTPUT_NAME]):
            raise CheckpointError(f"{artifact}: engine tensors {names} are not the export contract")
        out_dtype = _torch_dtype(trt, engine.get_tensor_dtype(OUTPUT_NAME))
        super().__init__(config, artifact, meta, device, out_dtype)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _bind(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, out: torch.Tensor) -> None:
        shape = tuple(input_ids.shape)
        for name, t in ((INPUT_IDS, input_ids), (ATTENTION_MASK, attention_mask)):
            if not self.context.set_input_shape(name, shape):
                raise FastencError(f"TensorRT rejected input shape {shape} for {name}")
            self.context.set_tensor_address(name, t.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise FastencError(f"TensorRT execution of {self.artifact.name} failed (see TensorRT's log)")

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cuda_graph:
            return self._run_graph(input_ids, attention_mask)
        B, L = input_ids.shape
        out = torch.empty(B, L, self.config.output_dim, dtype=self.compute_dtype, device=self.device)  # [B, L, P]
        self._bind(input_ids, attention_mask, out)
        self._enqueue(torch.cuda.current_stream(self.device))
        return out

    def _run_graph(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Replay a CUDA graph captured for this shape (captured on first use). The graphs share the
        context's scratch memory: one runner must not run on two streams at once."""
        key = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        entry = self._graphs.get(key)
        if entry is None:
            ids, mask = input_ids.clone(), attention_mask.clone()
            out = torch.empty(*key, self.config.output_dim, dtype=self.compute_dtype, device=self.device)
            self._bind(ids, mask, out)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # TensorRT must run once after a shape change before capture
                self._enqueue(side)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue(torch.cuda.current_stream(self.device))
            entry = self._graphs[key] = (graph, ids, mask, out)
        graph, ids, mask, out = entry
        ids.copy_(input_ids)
        mask.copy_(attention_mask)
        graph.replay()
        return out.clone()


def open_artifact(path: Path, meta: dict[str, Any], cfg: EncoderConfig, device: torch.device) -> TrtRunner:
    return TrtRunner(cfg, path, meta, device)


def load_artifact(directory: Path, backend: str = "tensorrt", device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, *, cuda_graph: bool = False) -> tuple[TrtRunner, EncoderConfig]:
    """The engine built for this GPU (default bf16, then fp16, fp32). Without a GPU/TensorRT here,
    the engine that exists is still checked (file, sidecar) before the availability error."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise CheckpointError(f"TensorRT engines run on CUDA devices, not {dev}")
    here = None
    if torch.cuda.is_available():
        here = sm_tag(torch.cuda.get_device_capability(dev))
    order = ["bf16", "fp16", "fp32"]
    try:  # prefer an engine for this GPU; else the first one, whose mismatch TrtRunner reports
        path, meta, cfg = pick(directory, "tensorrt", dtype, order, lambda m: m.get("compute_capability") == here)
    except CheckpointError:
        path, meta, cfg = pick(directory, "tensorrt", dtype, order, lambda m: True)
    return TrtRunner(cfg, path, meta, dev, cuda_graph=cuda_graph), cfg
