"""Checks on what callers hand an encoder: prompts, token ids and masks, and the result's finiteness.

Shared by :class:`fastenc.Encoder` and the graph-backend runners, so every backend refuses the same
inputs with the same :class:`~fastenc.errors.InputError` message.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from .errors import InputError, NumericsError


def check_prompt(prompt: object, index: int) -> str:
    """One prompt: a ``str`` that is valid Unicode (no lone surrogates), else :class:`InputError`."""
    if not isinstance(prompt, str):
        raise InputError(f"prompts[{index}] is {type(prompt).__name__}, expected str")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"prompts[{index}] holds a lone surrogate U+{ord(prompt[exc.start]):04X} at character "
                         f"{exc.start}: not valid Unicode text (decode its source with errors='replace')") from None
    return prompt


def prompt_list(prompts: object) -> list[str]:
    """``str | Sequence[str]`` -> list of checked prompts; anything else is an :class:`InputError`."""
    if isinstance(prompts, str):
        return [check_prompt(prompts, 0)]
    if isinstance(prompts, (bytes, bytearray, memoryview)) or not isinstance(prompts, Sequence):
        hint = "; iterate encode_batches() for iterators" if isinstance(prompts, Iterator) else ""
        raise InputError(f"prompts must be a str or a sequence (list, tuple) of str, got "
                         f"{type(prompts).__name__}{hint}")
    if len(prompts) == 0:
        raise InputError("prompts is empty")
    return [check_prompt(p, i) for i, p in enumerate(prompts)]


def check_token_inputs(input_ids: object, attention_mask: object, vocab_size: int) -> None:
    """ids: integer [B, L] in [0, vocab_size); mask: None or [B, L] of 0/1. One fused check per tensor."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError(f"input_ids must be a 2-D tensor [B, L], got {type(input_ids).__name__} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    bad = (input_ids < 0) | (input_ids >= vocab_size)  # [B, L]
    if bool(bad.any()):
        i, j = bad.nonzero()[0].tolist()
        raise InputError(f"input_ids out of range [0, {vocab_size}): input_ids[{i}, {j}] = "
                         f"{int(input_ids[i, j])}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    bad = (attention_mask != 0) & (attention_mask != 1)  # [B, L]
    if bool(bad.any()):
        i, j = bad.nonzero()[0].tolist()
        raise InputError(f"attention_mask must hold only 0 and 1: attention_mask[{i}, {j}] = "
                         f"{attention_mask[i, j].item()}")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``: one min/max reduction (NaN propagates through it), no temporary tensor;
    ~25x faster than ``isfinite(t).all()`` on the CPU."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_finite(out: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse a result holding NaN/inf (overflowing weights or dtype): :class:`NumericsError`."""
    if all_finite(out):
        return
    rows = (~torch.isfinite(out.detach())).flatten(1).any(1).nonzero().flatten().tolist()
    raise NumericsError(f"the encoder output holds non-finite values (NaN/inf) in {len(rows)} of {out.shape[0]} "
                        f"inputs (first: row {rows[0]}); the weights or the compute dtype "
                        f"({str(dtype).removeprefix('torch.')}) overflow - check the checkpoint, or use dtype='fp32'")
