"""ONNX export of :class:`fastenc.model.T5Encoder`, ONNX Runtime graph optimisation, int8 quantisation.

The graph comes from ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript) with
batch and sequence as ``torch.export.Dim``s. The TorchScript exporter (``dynamo=False``) emits an
invalid graph for this model on torch 2.13 (a node consumed before it is produced), so it is not used.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import BackendUnavailable, CheckpointError, FastencError
from ..model import T5Encoder
from .artifacts import commit, first_line, staged
from .contract import INPUT_NAMES, OUTPUT_NAME, ExportModule, Profile, dynamic_shapes, sample_inputs

log = logging.getLogger("fastenc")

OPSET = 18
#: Weights at or above this many bytes go to an external ``.data`` file (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"ONNX export needs onnx and onnxscript (pip install 'fastenc[onnx]'): {exc}") from None


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_onnx(model: T5Encoder, path: Path, profile: Profile, *, opset: int = OPSET,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Export ``model`` (in its own dtype) to ``path``; returns the files written (model [+ data])."""
    _require_onnx()
    if opset < 17:
        raise FastencError(f"opset {opset} is too old; the encoder needs opset >= 17")
    module = ExportModule(model).eval()
    ids, mask = sample_inputs(model.config, profile)
    external = param_bytes(model) >= external_data_threshold
    with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx"), _quiet("onnxscript"), _quiet("onnx_ir"):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (ids, mask), dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes(profile), verbose=False, report=False,
            )
        except Exception as exc:  # exporter failures carry long traces; keep the first line
            raise FastencError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from exc
    with staged(path.parent) as tmp:
        with _quiet("onnx_ir"), _quiet("onnxscript"):
            program.save(tmp / path.name, external_data=external)
        del program
        check_onnx(tmp / path.name)  # before it takes the artifact's name
        files = commit(tmp, path.parent, path.name)
    log.info("ONNX %s: %.1f MB%s", path.name, sum(f.stat().st_size for f in files) / 1e6,
             " (external data)" if external else "")
    return files


def check_onnx(path: Path) -> None:
    """``onnx.checker`` on the file (by path, so external data and >2 GB models work)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises ValidationError / DecodeError / OSError
        raise CheckpointError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None


def uses_external_data(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _require_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"ONNX Runtime is not installed (pip install 'fastenc[onnx]'): {exc}") from None
    return onnxruntime


def optimize_for_ort(src: Path, dst: Path) -> list[Path]:
    """Apply ONNX Runtime's extended graph optimisations for the CPU provider and save the result.

    Raises :class:`BackendUnavailable` when the CPU provider cannot run the model (bf16)."""
    ort = _require_ort()
    external = uses_external_data(src)
    with staged(dst.parent) as tmp:
        from ..backends.onnxruntime import session_options

        so = session_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp / dst.name)
        if external:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            if "NOT_IMPLEMENTED" in str(exc):
                raise BackendUnavailable(f"ONNX Runtime's CPU provider cannot run {src.name}: {first_line(exc)}") from None
            raise CheckpointError(f"{src}: ONNX Runtime could not load it ({first_line(exc)})") from None
        return commit(tmp, dst.parent, dst.name)


def weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose right operand is a weight (the ones int8 quantisation touches)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name and n.input[1] in weights]


@contextmanager
def _quiet(logger_name: str | None, level: int = logging.ERROR) -> Iterator[None]:
    """Raise a logger's level for the duration (None = the root logger)."""
    lg = logging.getLogger(logger_name)
    old = lg.level
    lg.setLevel(level)
    try:
        yield
    finally:
        lg.setLevel(old)


def quantize_int8(src: Path, dst: Path) -> list[Path]:
    """Dynamic int8 quantisation (per-channel weights) of the weight MatMuls of the fp32 model ``src``.

    Attention's activation-by-activation MatMuls stay fp32: quantising them drops the cosine
    similarity to the fp32 model below 0.995 (T5 attention is unscaled and its softmax is sharp).
    Weights use 7 bits (``reduce_range``): with full 8-bit weights ONNX Runtime 1.32's u8 x s8 kernels
    saturate their 16-bit pair sums on x86, and a tiny test model's cos-sim fell from 0.9994 to 0.98."""
    _require_ort()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = uses_external_data(src)
    nodes = weight_matmuls(src)
    if not nodes:
        raise CheckpointError(f"{src}: no weight MatMul nodes to quantise")
    with staged(dst.parent) as tmp, _quiet(None):
        quantize_dynamic(
            str(src), str(tmp / dst.name), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
            op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, use_external_data_format=external,
        )
        return commit(tmp, dst.parent, dst.name)
