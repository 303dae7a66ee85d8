"""Triton python-backend model: prompts (TYPE_STRING [B, 1]) -> T5 token ids padded to the target length.

Outputs (TYPE_INT32 [B, L]): ``input_ids``, ``attention_mask`` (1 = token incl. </s>, 0 = padding) and
``encoder_attention_mask`` — the mask the encoder gets: the attention mask for targets whose pipeline
passes it to T5 (PixArt), all ones otherwise (Flux, SD3), as ``fastenc.Encoder.encode`` does.
Parameters (config.pbtxt): ``max_length``, ``pass_mask`` ("true"/"false"), ``tokenizer_file``, ``target``.
Needs fastenc installed in the python backend's environment.
"""

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from fastenc.tokenizer import Tokenizer

log = logging.getLogger("fastenc")


def _param(config, key, default=None):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None:
        if default is None:
            raise pb_utils.TritonModelException(f"config.pbtxt of {config.get('name')} lacks parameter {key!r}")
        return default
    return value


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = Tokenizer.from_file(folder / _param(config, "tokenizer_file", "tokenizer.json"))
        self.max_length = int(_param(config, "max_length"))
        self.pass_mask = _param(config, "pass_mask", "false").lower() == "true"
        log.info("fastenc tokenizer: %s, %d tokens, encoder mask %s", _param(config, "target", "?"),
                 self.max_length, "passed" if self.pass_mask else "all ones")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()  # [B, 1] of bytes
                prompts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text.reshape(-1)]
                if len(prompts) != text.shape[0]:
                    raise ValueError(f"text must be [batch, 1], got {list(text.shape)}")
                batch = self.tokenizer(prompts, max_length=self.max_length)
                ids = batch.input_ids.numpy().astype(np.int32)  # [B, L]
                mask = batch.attention_mask.numpy().astype(np.int32)  # [B, L]
                encoder_mask = mask if self.pass_mask else np.ones_like(mask)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("input_ids", ids),
                    pb_utils.Tensor("attention_mask", mask),
                    pb_utils.Tensor("encoder_attention_mask", encoder_mask),
                ]))
            except Exception as exc:  # one bad request must not fail the others in the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"fastenc tokenizer: {exc}")))
        return responses
