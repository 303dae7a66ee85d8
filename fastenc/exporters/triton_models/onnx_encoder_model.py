"""Triton python-backend model: the exported fastenc ONNX encoder through ONNX Runtime.

For servers without Triton's onnxruntime backend: the same ``encoder.*.onnx`` file the
``onnxruntime_onnx`` configuration serves, with the same inputs (``input_ids``, ``attention_mask``:
TYPE_INT32 [B, L]) and output (``text_embeddings`` [B, L, P]). Requests batched together by Triton
that share a sequence length run as one ONNX Runtime call. Parameters: ``onnx_model``, the file name
in this version directory; ``threads``, ONNX Runtime intra-op threads (``0``: its default); intra-op
threads do not spin between requests. Runs on the CUDA execution provider for KIND_GPU instances when ONNX
Runtime has it, else on the CPU.
"""

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

log = logging.getLogger("fastenc")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        name = config.get("parameters", {}).get("onnx_model", {}).get("string_value")
        if not name:
            raise pb_utils.TritonModelException(f"config.pbtxt of {config.get('name')} lacks parameter 'onnx_model'")
        path = Path(args["model_repository"]) / args["model_version"] / name
        if not path.is_file():
            raise pb_utils.TritonModelException(f"fastenc encoder: model file {path} is missing")
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy threads between requests
        threads = int(config.get("parameters", {}).get("threads", {}).get("string_value", "0"))
        if threads > 0:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # a truncated or corrupt file: say which, in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise pb_utils.TritonModelException(f"fastenc encoder: cannot load {path}: {first}") from None
        log.info("fastenc encoder: %s on %s", path.name, self.session.get_providers()[0])

    def execute(self, requests):
        inputs, errors = [], {}
        for i, request in enumerate(requests):
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()  # [b, L]
            mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()  # [b, L]
            if ids.shape != mask.shape:
                errors[i] = f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in shape"
            inputs.append((ids.astype(np.int32, copy=False), mask.astype(np.int32, copy=False)))
        outputs = [None] * len(requests)
        by_length = {}
        for i, (ids, _) in enumerate(inputs):
            if i not in errors:
                by_length.setdefault(ids.shape[1], []).append(i)
        for group in by_length.values():  # one ONNX Runtime call per sequence length
            ids = np.concatenate([inputs[i][0] for i in group])
            mask = np.concatenate([inputs[i][1] for i in group])
            try:
                out = self.session.run(["text_embeddings"], {"input_ids": ids, "attention_mask": mask})[0]  # [B, L, P]
            except Exception as exc:
                for i in group:
                    errors[i] = f"ONNX Runtime failed: {str(exc).splitlines()[0]}"
                continue
            start = 0
            for i in group:
                n = inputs[i][0].shape[0]
                outputs[i] = out[start:start + n]
                start += n
        responses = []
        for i in range(len(requests)):
            if i in errors:
                error = pb_utils.TritonError(f"fastenc encoder: {errors[i]}")
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                tensor = pb_utils.Tensor("text_embeddings", outputs[i])
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
