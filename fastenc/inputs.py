"""Checks on what callers hand an encoder: prompts, token ids and masks, and the result's finiteness.

Shared by :class:`fastenc.Encoder` and the graph-backend runners, so every backend refuses the same
inputs with the same :class:`~fastenc.errors.InputError` message. The encoder checks CUDA tensors on
their device without a host sync and reports what it found at its next call (:class:`DeviceChecks`).
"""

from __future__ import annotations

import math
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .errors import BackendUnavailable, ConfigError, FastencError, InputError, NumericsError


def check_device(device: object, what: str = "device", advice: str = "use 'cpu'") -> torch.device:
    """``device`` as a :class:`torch.device` that exists here: a wrong type or name is one ConfigError, a
    CUDA device this machine lacks one BackendUnavailable naming ``what`` (torch's own refusal is an
    AssertionError deep inside ``.to()``)."""
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"{what} must be a device such as 'cpu' or 'cuda:0' (a string or torch.device), "
                          f"got {type(device).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{what} must be a device such as 'cpu' or 'cuda:0', got {device!r:.60}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"{what} {str(device)!r}: no CUDA device is visible here (torch sees no GPU); "
                                     f"{advice}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"{what} {str(device)!r}: no such CUDA device (this machine has "
                                     f"{torch.cuda.device_count()})")
    return device


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
    """ids: integer [B, L] in [0, vocab_size); mask: None or [B, L] of 0/1. One fused check per tensor
    (reading a device tensor's verdict synchronises with it; :class:`DeviceChecks` does not)."""
    check_token_meta(input_ids, attention_mask)
    check_id_values(input_ids, vocab_size)
    if attention_mask is not None:
        check_mask_values(attention_mask)


def check_token_meta(input_ids: object, attention_mask: object) -> None:
    """What can be checked without reading a value: ids an integer [B, L] tensor, not empty; the mask
    None or a tensor of the same shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError(f"input_ids must be a 2-D tensor [B, L], got {type(input_ids).__name__} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")


def _ids_message(vocab_size: int, i: int, j: int, value: int) -> str:
    return f"input_ids out of range [0, {vocab_size}): input_ids[{i}, {j}] = {value}"


def _mask_message(i: int, j: int, value: object) -> str:
    return f"attention_mask must hold only 0 and 1: attention_mask[{i}, {j}] = {value}"


def check_id_values(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Every id in [0, vocab_size), else one :class:`InputError` naming the first one outside."""
    bad = (input_ids < 0) | (input_ids >= vocab_size)  # [B, L]
    if bool(bad.any()):
        i, j = bad.nonzero()[0].tolist()
        raise InputError(_ids_message(vocab_size, i, j, int(input_ids[i, j])))


def check_mask_values(attention_mask: torch.Tensor) -> None:
    """Every mask value 0 or 1, else one :class:`InputError` naming the first other one."""
    if attention_mask.dtype == torch.bool:
        return
    bad = (attention_mask != 0) & (attention_mask != 1)  # [B, L]
    if bool(bad.any()):
        i, j = bad.nonzero()[0].tolist()
        raise InputError(_mask_message(i, j, attention_mask[i, j].item()))


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
    raise NumericsError(_nonfinite_message(len(rows), out.shape[0], rows[0], dtype))


def _nonfinite_message(count: int, batch: int, first: int, dtype: torch.dtype) -> str:
    return (f"the encoder output holds non-finite values (NaN/inf) in {count} of {batch} inputs (first: row "
            f"{first}); the weights or the compute dtype ({str(dtype).removeprefix('torch.')}) overflow - check "
            "the checkpoint, or use dtype='fp32'")


#: Device types whose tensors are checked on the host at once (reading them waits for no device); ids,
#: masks and results anywhere else (CUDA) are checked on their device without a host sync (:class:`DeviceChecks`).
HOST_DEVICE_TYPES = frozenset({"cpu"})


def on_host(t: torch.Tensor) -> bool:
    return t.device.type in HOST_DEVICE_TYPES


@dataclass
class Ticket:
    """One call's device checks: int64 status scalars on the device, and what they are."""

    vocab_size: int
    shape: tuple[int, int]  # input_ids [B, L]
    mask_float: bool
    names: list[str] = field(default_factory=list)  # "ids" (3 values), "mask" (3), "out" (2), in order
    parts: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Pending:
    call: int
    ticket: Ticket
    device: torch.device
    dtype: torch.dtype
    slot: tuple[torch.Tensor, Any]  # (host status buffer, its numpy view)
    event: Any  # a CUDA event recorded after the status copy, or None (copied synchronously)


_SIZES = {"ids": 3, "mask": 3, "out": 2}


class DeviceChecks:
    """The input and result checks of one encoder, without a host sync for tensors on a device.

    Host tensors (:data:`HOST_DEVICE_TYPES`: ids as a tokenizer builds them) are checked at once. For
    device tensors the device computes a small status (the first id outside the vocabulary, the first
    mask value other than 0/1, the rows of the result holding NaN/inf), copied into pinned host memory
    behind the forward on the same stream; ids are clamped into the vocabulary for the forward, so no
    kernel reads outside the embedding table. A status showing a failure raises the host check's
    :class:`InputError` / :class:`NumericsError` (naming the call it belongs to) at the next call into the
    encoder once the device has got there (a non-blocking event query), or at :meth:`raise_ready` with
    ``wait=True`` (``Encoder.synchronize()``).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: deque[_Pending] = deque()
        self._free: list[tuple[torch.Tensor, Any]] = []
        self._calls = 0

    def inputs(self, input_ids: object, attention_mask: object, vocab_size: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, Ticket]:
        """``(ids, mask, ticket)`` on ``device``: host tensors checked now, device ones on the device (their
        ids clamped into range). Raises first what an earlier call's delivered status showed."""
        self.raise_ready()
        check_token_meta(input_ids, attention_mask)
        ticket = Ticket(vocab_size, tuple(input_ids.shape),
                        attention_mask is not None and attention_mask.is_floating_point())
        if on_host(input_ids):
            check_id_values(input_ids, vocab_size)
        ids = input_ids.to(device, torch.long)  # [B, L]
        if not on_host(input_ids):
            flat = ids.reshape(-1)
            hit = ((flat < 0) | (flat >= vocab_size)).max(0)  # (any, first index); take(): no host read
            ticket.names.append("ids")
            ticket.parts += [hit.values.long(), hit.indices, torch.take(flat, hit.indices)]
            ids = ids.clamp(0, vocab_size - 1)
        mask = None
        if attention_mask is not None:
            if on_host(attention_mask):
                check_mask_values(attention_mask)
            mask = attention_mask.to(device)  # [B, L]
            if not on_host(attention_mask) and mask.dtype != torch.bool:
                flat = mask.reshape(-1)
                hit = ((flat != 0) & (flat != 1)).max(0)
                ticket.names.append("mask")  # the value as float64 bits
                ticket.parts += [hit.values.long(), hit.indices, torch.take(flat, hit.indices).double().view(torch.int64)]
        return ids, mask, ticket

    def result(self, out: torch.Tensor, ticket: Ticket, dtype: torch.dtype) -> None:
        """Check the result ``out [B, L, P]`` (at once on the host, else on its device) and queue the
        status of the call's device checks."""
        if on_host(out):
            check_finite(out, dtype)
        elif out.numel() and (out.is_floating_point() or out.is_complex()):
            lo, hi = torch.aminmax(out.detach().flatten(1), dim=1)  # [B] each; NaN propagates
            bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
            ticket.names.append("out")
            ticket.parts += [bad.sum(), bad.max(0).indices]
        if not ticket.names:
            return
        status = torch.stack(ticket.parts)  # int64 [<= 8]
        with self._lock:
            self._calls += 1
            call, slot = self._calls, self._slot(status.is_cuda)
        host = slot[0]
        event = None
        if status.is_cuda:
            host[: status.numel()].copy_(status, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(status.device))
        else:
            host[: status.numel()].copy_(status)
        ticket.parts = []  # the device scalars are not kept alive
        with self._lock:
            self._pending.append(_Pending(call, ticket, status.device, dtype, slot, event))

    def _slot(self, pinned: bool) -> tuple[torch.Tensor, Any]:
        for k, (host, _) in enumerate(self._free):
            if host.is_pinned() == pinned:
                return self._free.pop(k)
        host = torch.zeros(8, dtype=torch.int64, pin_memory=pinned)
        return host, host.numpy()

    def raise_ready(self, wait: bool = False) -> None:
        """Raise the first failure among the statuses the device has delivered (with ``wait``: all of them,
        waiting for each); statuses showing none are dropped."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                p = self._pending[0]
                if p.event is not None and not wait and not p.event.query():
                    return
                self._pending.popleft()
            if p.event is not None and wait:
                p.event.synchronize()
            values = [int(v) for v in p.slot[1]]  # the host copy: no device read
            with self._lock:
                self._free.append(p.slot)
            error = _failure(p, values)
            if error is not None:
                raise error


def _failure(p: _Pending, values: list[int]) -> FastencError | None:
    t = p.ticket
    B, L = t.shape
    where = f" (found on {p.device} after call {p.call} returned; input_ids [{B}, {L}])"
    for name in t.names:
        (flag, first, *rest), values = values[:_SIZES[name]], values[_SIZES[name]:]
        if not flag:
            continue
        if name == "ids":
            return InputError(_ids_message(t.vocab_size, first // L, first % L, rest[0]) + where)
        if name == "mask":
            shown = struct.unpack("<d", struct.pack("<q", rest[0]))[0]
            return InputError(_mask_message(first // L, first % L, shown if t.mask_float else int(shown)) + where)
        return NumericsError(_nonfinite_message(flag, B, first, p.dtype) + where)
    return None
