"""TensorRT backend: runs ``trt/encoder.trt*.sm*.{dtype}.plan`` on torch's current CUDA stream.

Before TensorRT is touched the engine file is checked against its sidecar (size, sha256), so a
truncated or corrupt plan gives a clear error; then the TensorRT release it was built with is
compared with this machine's in full (major.minor.patch: an engine only deserialises in the
release that built it) and its GPU architecture with this GPU's.

Execution contexts: eager runs share one context, re-bound for each call's shape under a lock,
and a call on another stream first waits for the previous call's enqueue (a context must never
run twice at once). With ``cuda_graph=True`` each input shape gets its own context, bound once and
captured once into a CUDA graph that is replayed (graphs bake the context's bindings in, so one
context re-bound for a later shape would corrupt every earlier graph); the number of such shapes is
bounded (least recently used is dropped). Work is enqueued under a device guard for the engine's
GPU, on torch's current stream for that device; when that is the legacy default stream (which
TensorRT synchronises around), on the runner's own stream, ordered against the caller's both ways.

Written against TensorRT 10's documented Python API; TensorRT cannot be installed where this was
written, so only the logic around it (version check, context bookkeeping, bindings) is tested there,
against small stand-ins for those few runtime calls.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

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


def trt_release(version: str) -> tuple[int, int, int] | None:
    """``"10.8.0.43"`` -> ``(10, 8, 0)``; None when the string has no major.minor.patch."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", str(version).strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def check_trt_release(built: str, here: str, where: object) -> None:
    """An engine deserialises only in the TensorRT release that built it: compare major.minor.patch
    and raise one :class:`CheckpointError` naming both versions (not TensorRT's generic failure later)."""
    built_release, here_release = trt_release(built), trt_release(here)
    if built_release is None:
        raise CheckpointError(f"{where}: its sidecar records TensorRT version {built!r}, not major.minor.patch; "
                              f"rebuild it with `fastenc export ... --trt --force`")
    if here_release is None:
        raise CheckpointError(f"{where}: cannot read this machine's TensorRT version {here!r}")
    if built_release != here_release:
        raise CheckpointError(
            f"{where} was built with TensorRT {built} but this machine has TensorRT {here}: an engine only loads in "
            f"the TensorRT release (major.minor.patch) that built it; rebuild it here with "
            f"`fastenc export ... --trt --force`")


def bind(context, shape: tuple[int, int], addresses: dict[str, int]) -> None:
    """Set the input shapes and every I/O tensor address of ``context``."""
    for name in INPUT_NAMES:
        if not context.set_input_shape(name, shape):
            raise FastencError(f"TensorRT rejected input shape {shape} for {name}")
    for name, ptr in addresses.items():
        if not context.set_tensor_address(name, ptr):
            raise FastencError(f"TensorRT rejected the address of {name}")


class ShapeContexts:
    """One execution context per input shape (for CUDA graphs), least recently used dropped past ``limit``."""

    def __init__(self, create: Callable[[], Any], limit: int = 8):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._create = create
        self.limit = limit
        self._entries: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self.created = 0
        self.dropped = 0

    def get(self, shape: tuple[int, int]):
        """The entry for ``shape`` or None (marks it most recently used)."""
        entry = self._entries.get(shape)
        if entry is not None:
            self._entries.move_to_end(shape)
        return entry

    def new_context(self):
        while len(self._entries) >= self.limit:
            self._entries.popitem(last=False)
            self.dropped += 1
        self.created += 1
        context = self._create()
        if context is None:
            raise FastencError("TensorRT could not create an execution context (out of GPU memory?)")
        return context

    def put(self, shape: tuple[int, int], entry) -> None:
        self._entries[shape] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> list[tuple[int, int]]:
        return list(self._entries)


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
                 *, cuda_graph: bool = False, max_graphs: int = 8):
        data = read_plan(artifact, meta)
        trt = import_tensorrt()
        require_gpu()
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        capability = torch.cuda.get_device_capability(device)
        check_trt_release(str(meta.get("tensorrt_version", "?")), trt.__version__, artifact)
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
        self.cuda_graph = cuda_graph
        self._lock = threading.Lock()
        with torch.cuda.device(device):
            self.context = engine.create_execution_context()  # eager runs: re-bound per call, under the lock
            self._own_stream = torch.cuda.Stream(device)
            self._done = torch.cuda.Event()  # recorded after each enqueue; the next one waits for it
        self._recorded = False
        self._graphs = ShapeContexts(self._new_context, limit=max_graphs)

    def _new_context(self):
        with torch.cuda.device(self.device):
            return self.engine.create_execution_context()

    def _addresses(self, ids: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> dict[str, int]:
        return {INPUT_IDS: ids.data_ptr(), ATTENTION_MASK: mask.data_ptr(), OUTPUT_NAME: out.data_ptr()}

    def _stream(self) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        """``(caller's current stream, stream to enqueue on)``: never the legacy default stream."""
        current = torch.cuda.current_stream(self.device)
        return current, (self._own_stream if current.cuda_stream == 0 else current)

    def _enqueue(self, context, stream: torch.cuda.Stream) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise FastencError(f"TensorRT execution of {self.artifact.name} failed (see TensorRT's log)")

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.cuda.device(self.device):
            current, stream = self._stream()
            if self._recorded:
                current.wait_event(self._done)  # the previous call (maybe on another stream) is done with the context
            if self.cuda_graph:
                out = self._replay(input_ids, attention_mask, current)
            else:
                B, L = input_ids.shape
                out = torch.empty(B, L, self.config.output_dim, dtype=self.compute_dtype, device=self.device)
                bind(self.context, (B, L), self._addresses(input_ids, attention_mask, out))
                if stream is not current:
                    stream.wait_stream(current)
                self._enqueue(self.context, stream)
                if stream is not current:
                    current.wait_stream(stream)
            self._done.record(current)
            self._recorded = True
            return out  # [B, L, P]

    def _replay(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, current: torch.cuda.Stream) -> torch.Tensor:
        """Replay the CUDA graph of this shape (captured on first use, with a context of its own)."""
        key = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        entry = self._graphs.get(key)
        if entry is None:
            context = self._graphs.new_context()
            ids, mask = input_ids.clone(), attention_mask.clone()
            out = torch.empty(*key, self.config.output_dim, dtype=self.compute_dtype, device=self.device)
            bind(context, key, self._addresses(ids, mask, out))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            self._enqueue(context, side)  # TensorRT must run once after a shape change before capture
            graph = torch.cuda.CUDAGraph()
            capture = torch.cuda.Stream(self.device)
            capture.wait_stream(side)
            with torch.cuda.graph(graph, stream=capture, capture_error_mode="thread_local"):
                self._enqueue(context, capture)
            current.wait_stream(capture)
            entry = (graph, context, ids, mask, out)
            self._graphs.put(key, entry)
        graph, _, ids, mask, out = entry
        ids.copy_(input_ids)
        mask.copy_(attention_mask)
        graph.replay()  # on the current stream
        return out.clone()


def open_artifact(path: Path, meta: dict[str, Any], cfg: EncoderConfig, device: torch.device) -> TrtRunner:
    return TrtRunner(cfg, path, meta, torch.device(device))


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
