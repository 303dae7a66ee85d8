"""ONNX Runtime backend: runs ``onnx/encoder.*.onnx`` on the CPU or CUDA execution provider.

Inputs and output are bound to torch tensors with I/O binding (no copies through numpy, and the
same path on CPU and GPU); on CUDA the output stays on the GPU. Sessions use torch's thread count
and do not spin idle threads (:func:`session_options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import EncoderConfig
from ..errors import BackendUnavailable, CheckpointError, ConfigError
from ..exporters.artifacts import check_files, find_artifacts, first_line
from ..exporters.contract import ATTENTION_MASK, INPUT_IDS, INPUT_NAMES, OUTPUT_NAME, dtype_name
from .graph import GraphRunner, pick

_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16 (numpy has no bfloat16)
_ELEMENT = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: _BFLOAT16}
_OUTPUT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(bfloat16)": torch.bfloat16}


def require_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'onnxruntime' needs ONNX Runtime (pip install 'fastenc[onnx]'): {exc}") from None
    return onnxruntime


def has_cuda_provider() -> bool:
    try:
        return "CUDAExecutionProvider" in require_ort().get_available_providers() and torch.cuda.is_available()
    except BackendUnavailable:
        return False


def session_options(intra_op_threads: int | None = None, *, spinning: bool = False):
    """ONNX Runtime session options for sessions fastenc makes: ``intra_op_threads`` threads (default:
    torch's thread count, so ORT and torch share the cores alike), one inter-op thread, and idle
    threads that sleep instead of spinning. Spinning threads keep cores busy after each run: a torch
    forward timed right after an ORT run in the same process went from 39 to 72 ms."""
    ort = require_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    flag = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return options


class OrtRunner(GraphRunner):
    backend = "onnxruntime"

    def __init__(self, config: EncoderConfig, artifact: Path, meta: dict[str, Any], device: torch.device,
                 *, intra_op_threads: int | None = None):
        ort = require_ort()
        check_files(artifact, meta)
        if device.type == "cuda":
            if not has_cuda_provider():
                raise BackendUnavailable("ONNX Runtime has no CUDAExecutionProvider here (pip install onnxruntime-gpu, "
                                         "and a CUDA GPU); use device='cpu'")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = session_options(intra_op_threads)
        try:
            self.session = ort.InferenceSession(str(artifact), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own (Fail, InvalidProtobuf, NotImplemented, ...)
            text = first_line(exc)
            if "NOT_IMPLEMENTED" in text:
                raise BackendUnavailable(f"{artifact}: ONNX Runtime's {device.type.upper()} provider cannot run this "
                                         f"{meta.get('dtype')} model ({text})") from None
            raise CheckpointError(f"{artifact}: ONNX Runtime cannot load it ({text}); "
                                  f"re-run `fastenc export --force`") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        if sorted(inputs) != sorted(INPUT_NAMES) or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise CheckpointError(f"{artifact}: graph I/O {inputs} -> {[o.name for o in outputs]} is not the export "
                                  f"contract {list(INPUT_NAMES)} -> [{OUTPUT_NAME!r}]")
        out_dtype = _OUTPUT_TYPES.get(outputs[0].type)
        if out_dtype is None:
            raise CheckpointError(f"{artifact}: unsupported output type {outputs[0].type}")
        super().__init__(config, artifact, meta, device, out_dtype)
        self._where = ("cuda" if device.type == "cuda" else "cpu", device.index or 0)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        out = torch.empty(B, L, self.config.output_dim, dtype=self.compute_dtype, device=self.device)  # [B, L, P]
        binding = self.session.io_binding()
        kind, index = self._where
        for name, t in ((INPUT_IDS, input_ids), (ATTENTION_MASK, attention_mask)):
            binding.bind_input(name, kind, index, np.int32, list(t.shape), t.data_ptr())
        binding.bind_output(OUTPUT_NAME, kind, index, _ELEMENT[out.dtype], list(out.shape), out.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        if kind == "cuda":
            binding.synchronize_outputs()
        return out


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if has_cuda_provider() else "cpu")
    return torch.device(device)


def open_artifact(path: Path, meta: dict[str, Any], cfg: EncoderConfig, device: torch.device) -> OrtRunner:
    return OrtRunner(cfg, path, meta, device)


def load_artifact(directory: Path, backend: str = "onnxruntime", device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None) -> tuple[OrtRunner, EncoderConfig]:
    """CPU: the CPU-optimised model of the dtype if saved, else the plain one (default fp32, then fp16,
    int8). CUDA: the plain model (default bf16, fp16, fp32); the int8 model is CPU-only."""
    dev = _device(device)
    if dev.type == "cuda" and str(dtype).lower() == "int8":
        raise ConfigError("the int8 ONNX model runs on the CPU only (dynamic quantisation); pass device='cpu'")
    if dev.type == "cuda":
        order = ["bf16", "fp16", "fp32"]
        usable = lambda m: m.get("kind") == "onnx"  # noqa: E731
    else:  # the CPU-optimised (or int8) model of the first dtype that has one, else the plain model
        order = ["fp32", "fp16", "int8", "bf16"]
        wanted = dtype_name(dtype, allow_int8=True)
        cpu_kinds = ("onnx-ort", "onnx-int8")
        has_cpu_model = any(m.get("kind") in cpu_kinds and m.get("dtype") in ([wanted] if wanted else order)
                            for _, m in find_artifacts(Path(directory), "onnxruntime"))
        kinds = cpu_kinds if has_cpu_model else ("onnx",)
        usable = lambda m: m.get("kind") in kinds  # noqa: E731
    path, meta, cfg = pick(directory, "onnxruntime", dtype, order, usable, allow_int8=dev.type == "cpu")
    return OrtRunner(cfg, path, meta, dev), cfg
