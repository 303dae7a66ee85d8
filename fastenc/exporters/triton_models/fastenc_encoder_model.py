"""Triton python-backend model: fastenc's own encoder (``fastenc.load(..., backend="cpu")`` by default).

The fastest CPU path fastenc has (bf16 compute with planned int8 GEMMs) served with the same inputs
(``input_ids``, ``attention_mask``: TYPE_INT32 [B, L]) and output (``text_embeddings`` TYPE_FP32
[B, L, P]) as the ONNX encoder. Requests Triton batched together that share a sequence length run
as one forward. Parameters (config.pbtxt): ``checkpoint`` (folder in this version directory with
config.json and the safetensors weights), ``backend`` (a fastenc backend, default ``cpu``) and
``threads`` (torch intra-op threads per instance; ``0`` keeps torch's default).

Needs torch and fastenc in the python backend's environment (the venv whose ``python3`` is first on
the server's PATH; ``scripts/triton_env.sh`` installs both, torch as the CPU wheel).
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import fastenc

log = logging.getLogger("fastenc")


def _param(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"] / _param(config, "checkpoint", "checkpoint")
        backend = _param(config, "backend", "cpu")
        threads = int(_param(config, "threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        if not folder.is_dir():
            raise pb_utils.TritonModelException(f"fastenc encoder: no checkpoint folder {folder}")
        try:  # missing or corrupt weights: fastenc names the file; Triton marks the model UNAVAILABLE with it
            self.encoder = fastenc.load(folder, backend=backend, device="cpu", cache=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise pb_utils.TritonModelException(f"fastenc encoder: cannot load {folder}: {first}") from None
        log.info("fastenc encoder: %s, %d threads", self.encoder, torch.get_num_threads())

    def execute(self, requests):
        inputs, errors = [], {}
        for i, request in enumerate(requests):
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()  # [b, L]
            mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()  # [b, L]
            if ids.shape != mask.shape:
                errors[i] = f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in shape"
            inputs.append((ids, mask))
        outputs = [None] * len(requests)
        by_length = {}
        for i, (ids, _) in enumerate(inputs):
            if i not in errors:
                by_length.setdefault(ids.shape[1], []).append(i)
        for group in by_length.values():  # one forward per sequence length
            ids = torch.from_numpy(np.concatenate([inputs[i][0] for i in group]))  # [B, L] int32
            mask = torch.from_numpy(np.concatenate([inputs[i][1] for i in group]))  # [B, L] int32
            try:
                with torch.inference_mode():
                    out = self.encoder.forward(ids, mask).float().numpy()  # [B, L, P] fp32
            except Exception as exc:
                for i in group:
                    errors[i] = f"forward failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                continue
            start = 0
            for i in group:
                n = inputs[i][0].shape[0]
                outputs[i] = out[start:start + n]
                start += n
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"fastenc encoder: {errors[i]}")))
            else:
                tensor = pb_utils.Tensor("text_embeddings", np.ascontiguousarray(outputs[i]))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
