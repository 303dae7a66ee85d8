"""Exporters: ONNX (+ ONNX Runtime optimisation and int8), TensorRT engines, AOTInductor packages, verify.

All artifacts follow one contract (:mod:`.contract`) and carry a sidecar JSON (:mod:`.artifacts`);
``fastenc export`` (:mod:`.pipeline`) builds them and ``fastenc verify`` (:mod:`.verify`) checks them.
Heavy dependencies (onnx, onnxruntime, tensorrt) are imported only by the steps that need them.
"""

__all__ = ["INPUT_NAMES", "OUTPUT_NAME", "Profile", "make_profile", "export", "ExportRequest"]


def __getattr__(name: str):  # lazy: `fastenc export --help` and its argument checks need no torch
    if name in ("export", "ExportRequest"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("INPUT_NAMES", "OUTPUT_NAME", "Profile", "make_profile"):
        from . import contract

        return getattr(contract, name)
    raise AttributeError(name)
