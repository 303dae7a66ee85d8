"""Triton python-backend model: prompts (TYPE_STRING [B, 1]) -> T5 token ids padded to the target length.

Outputs (TYPE_INT32 [B, L]): ``input_ids``, ``attention_mask`` (1 = token incl. </s>, 0 = padding) and
``encoder_attention_mask`` — the mask the encoder gets: the attention mask for targets whose pipeline
passes it to T5 (PixArt), all ones otherwise (Flux, SD3), as ``fastenc.Encoder.encode`` does.
Prompts are first cleaned as the target's pipeline cleans them (Wan's ``prompt_clean``; the others keep
them as they are). Parameters (config.pbtxt): ``max_length``, ``pass_mask`` ("true"/"false"), ``tokenizer_file``,
``target``,
``max_prompt_bytes`` (longer prompts are refused before tokenisation; default 65536, far above the 512
tokens T5 keeps). A request that is not a [B, 1] batch of UTF-8 strings within that size gets an error
response naming the problem; the other requests of the batch are served.
Needs fastenc installed in the python backend's environment.
"""

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from fastenc.targets import get_target
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
        self.max_prompt_bytes = int(_param(config, "max_prompt_bytes", "65536"))
        self.target = get_target(_param(config, "target"))
        log.info("fastenc tokenizer: %s, %d tokens, encoder mask %s", self.target.name,
                 self.max_length, "passed" if self.pass_mask else "all ones")

    def _prompt(self, i, value):
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        if len(raw) > self.max_prompt_bytes:
            raise ValueError(f"text[{i}] is {len(raw)} bytes; prompts are limited to {self.max_prompt_bytes} bytes "
                             "(parameter max_prompt_bytes)")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"text[{i}] is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()  # [B, 1] of bytes
                if text.ndim != 2 or text.shape[0] < 1 or text.shape[1] != 1:
                    raise ValueError(f"text must be a [batch >= 1, 1] tensor of strings, got {list(text.shape)}")
                prompts = self.target.prepare([self._prompt(i, t) for i, t in enumerate(text.reshape(-1))])
                batch = self.tokenizer(prompts, max_length=self.max_length, warn=False)  # truncates like the pipelines
                ids = batch.input_ids.numpy().astype(np.int32)  # [B, L]
                mask = batch.attention_mask.numpy().astype(np.int32)  # [B, L]
                encoder_mask = mask if self.pass_mask else np.ones_like(mask)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("input_ids", ids),
                    pb_utils.Tensor("attention_mask", mask),
                    pb_utils.Tensor("encoder_attention_mask", encoder_mask),
                ]))
            except ValueError as exc:  # the request's fault (HTTP 400); it must not fail the others in the batch
                message = f"fastenc tokenizer: {exc}"
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)  # error codes: Triton 23.xx and later
                error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
                responses.append(pb_utils.InferenceResponse(error=error))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"fastenc tokenizer: {exc}")))
        return responses
