"""Triton python-backend model: the encoder's output as the target's pipeline hands it on.

For targets whose pipeline zeroes the embeddings past each prompt (Wan: every prompt's embeddings are
cut to its length and padded with zeros): ``encoder_embeddings`` [B, L, P] (the encoder's output type,
bf16 included) and ``attention_mask`` (TYPE_INT32 [B, L], 1 = token) in, ``text_embeddings`` [B, L, P]
of the same type out, every padded position zero, as ``fastenc.Encoder.encode(..., target=...)`` returns.
Tensors cross as DLPack (no copy in; numpy has no bfloat16). Parameter (config.pbtxt): ``target``.
Needs fastenc (and so torch) installed in the python backend's environment.
"""

import json
import logging

import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from fastenc.targets import get_target

log = logging.getLogger("fastenc")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        name = config.get("parameters", {}).get("target", {}).get("string_value")
        if not name:
            raise pb_utils.TritonModelException(f"config.pbtxt of {config.get('name')} lacks parameter 'target'")
        self.target = get_target(name)
        log.info("fastenc finish: %s (zero padding: %s)", name, self.target.zero_padding)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                embeds = dlpack.from_dlpack(
                    pb_utils.get_input_tensor_by_name(request, "encoder_embeddings").to_dlpack())  # [B, L, P]
                mask = dlpack.from_dlpack(pb_utils.get_input_tensor_by_name(request, "attention_mask").to_dlpack())
                if embeds.dim() != 3 or tuple(mask.shape) != tuple(embeds.shape[:2]):
                    raise ValueError(f"encoder_embeddings {list(embeds.shape)} and attention_mask {list(mask.shape)} "
                                     "do not match")
                out = self.target.finish(embeds, mask).contiguous()  # [B, L, P]
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor.from_dlpack("text_embeddings", dlpack.to_dlpack(out))]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"fastenc finish: {exc}")))
        return responses
