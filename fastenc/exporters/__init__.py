"""Exporters: ONNX (+ ONNX Runtime optimisation and int8), TensorRT engines, AOTInductor packages, verify.

All artifacts follow one contract (:mod:`.contract`) and carry a sidecar JSON (:mod:`.artifacts`);
``fastenc export`` (:mod:`.pipeline`) builds them and ``fastenc verify`` (:mod:`.verify`) checks them.
Heavy dependencies (onnx, onnxruntime, tensorrt) are imported only by the steps that need them.
"""

from .contract import INPUT_NAMES, OUTPUT_NAME, Profile, make_profile

__all__ = ["INPUT_NAMES", "OUTPUT_NAME", "Profile", "make_profile", "export", "ExportRequest"]


def __getattr__(name: str):
    if name in ("export", "ExportRequest"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
