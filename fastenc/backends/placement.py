"""Encoders that follow their weights: op table, CUDA graphs and precision rules per device.

A :class:`fastenc.Encoder` built by ``fastenc.load`` remembers the backend it was asked for.
Whenever its weights move (``encoder.to``, a parent module's ``.to`` / ``.cuda()`` / ``.half()``,
``pipe.to``, accelerate's offload hooks, or anything that swaps parameter storage) the next
forward installs the op table :func:`fastenc.backends.follow_backend` names for the new device and
dtype: Triton kernels + CUDA graphs on CUDA, the ``cpu`` fast path on a CPU with native bf16, the
torch reference elsewhere. The check is two attribute reads per forward; the work (for the
``cpu`` path: re-quantising the planned int8 weights) happens only when a forward runs there, so
an offload hook that parks the encoder on the CPU between GPU runs costs nothing extra; nor does it
capture CUDA graphs again on every call (the runner keeps them for weights that come back to the same
addresses and captures only for placements that stay put, see :mod:`fastenc.kernels.graphs`).

Precision rules (an encoder's ``dtype`` is always what it computes in):

* the ``cpu`` fast path computes in bf16 with int8 GEMMs; a request to cast it to another dtype
  keeps the fast path (its weights are bf16 already, so a cast could not bring back fp32
  numerics) and says so once in the log. Load with ``dtype="fp32"`` (or ``backend="torch"``) for
  fp32 numerics on a CPU.
* fp16 keeps every FFN output projection in fp32 (T5 overflows fp16 there), however it is asked
  for (``encoder.to(torch.float16)``, ``.half()``, a parent's ``.to``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import torch
from torch import nn

from . import follow_backend, op_table
from ..errors import ConfigError
from ..inputs import check_device
from .graph import GRAPH_BACKENDS
from .params import ParamSlots

log = logging.getLogger("fastenc")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FollowsWeights:
    """Mixed into :class:`fastenc.Encoder` (an ``nn.Module`` holding ``self.model``)."""

    requested_backend: str
    cuda_graphs: bool
    model: Any

    def _setup_following(self, backend: str, requested: str, *, cuda_graphs: bool, graphs=None,
                         plan_source: str | None = None) -> None:
        d = self.__dict__  # kept out of nn.Module's registries: the graph runner is not a submodule
        d["requested_backend"] = requested
        d["cuda_graphs"] = bool(cuda_graphs)
        d["_backend"] = backend
        d["_lock"] = threading.RLock()
        d["_plan_source"] = plan_source
        d["_kept_fast_path_logged"] = False
        d["_graph_runner"] = graphs
        d["_active"] = None if self._is_graph_backend else self._placement()
        d["_params"] = ParamSlots(self.model)  # read on every cpu call: its slots, not a module walk
        d["_cpu_signature"] = self._params.signature() if backend == "cpu" else None
        if graphs is None and not self._is_graph_backend:
            self._sync_graphs(backend, self._placement()[0])

    # ---- what the encoder reports ----------------------------------------------------------

    @property
    def _is_graph_backend(self) -> bool:
        return self.requested_backend in GRAPH_BACKENDS

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        w = self.model.embed.weight
        return w.device, w.dtype

    @property
    def backend(self) -> str:
        """The backend the next forward runs (it follows the weights' device and dtype)."""
        if self._is_graph_backend:
            return self._backend
        placed = self._placement()
        return self._backend if placed == self._active else follow_backend(self.requested_backend, *placed)

    @property
    def graphs(self):
        """The :class:`~fastenc.kernels.graphs.CudaGraphRunner` replaying the model (triton on CUDA), or None
        (as of the last forward or move)."""
        return self._graph_runner

    # ---- moves ------------------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        if self._is_graph_backend:
            return super()._apply(fn, recurse)
        with self._moving():
            before_backend, before_dtype = self.backend, self._placement()[1]
            out = super()._apply(fn, recurse)
            dtype = self._placement()[1]
            if dtype != before_dtype:
                self._fix_precision(before_backend, dtype)
            # the graph runner sees the move itself (the model's weights_moves): it keeps its graphs for
            # weights that come back to the same addresses (offload hooks) and captures anew only once a
            # new placement has stayed put (fastenc.kernels.graphs)
            return out

    def _fix_precision(self, before_backend: str, dtype: torch.dtype) -> None:
        """After a generic cast (a parent's ``.to(dtype)``), restore fastenc's precision rules."""
        device = self._placement()[0]
        if before_backend == "cpu" and device.type == "cpu" and dtype == torch.float32:
            self.model.cast(torch.bfloat16)  # bf16 -> fp32 -> bf16 is exact: the fast path stays
            self._log_kept_fast_path(dtype)
        elif dtype == torch.float16:
            self.model.cast(torch.float16)  # FFN output projections back to fp32

    def to(self, *args, **kwargs):
        """``nn.Module.to`` with fastenc's precision rules (see :mod:`fastenc.backends.placement`)."""
        if self._is_graph_backend:
            return super().to(*args, **kwargs)
        try:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"Encoder.to: {str(exc).splitlines()[0][:160]}") from None
        if device is not None:
            check_device(device, "Encoder.to", "keep it on 'cpu'")
            super().to(device=device, non_blocking=non_blocking)
        if dtype is not None:
            self.cast(dtype)
        return self

    def cast(self, dtype: torch.dtype):
        """Change the compute dtype (fp16 keeps T5's FFN output projections in fp32); the ``cpu`` fast
        path stays bf16 and logs that it did."""
        from ..api import parse_dtype

        dtype = parse_dtype(dtype, self._placement()[0])
        if self._is_graph_backend or dtype == self._placement()[1]:
            return self
        if self.backend == "cpu":
            self._log_kept_fast_path(dtype)
            return self
        with self._moving():
            self.model.cast(dtype)
        return self

    @contextlib.contextmanager
    def _moving(self):
        """The encoder's lock, and the graph runner's with replays in flight ordered before the move
        (so a move frees nothing a replay still reads)."""
        runner = self._graph_runner
        with self._lock, (runner.quiesced() if runner is not None else contextlib.nullcontext()):
            yield

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def float(self):
        return self.to(torch.float32)

    def _log_kept_fast_path(self, dtype: torch.dtype) -> None:
        level = logging.INFO if self._kept_fast_path_logged else logging.WARNING
        self.__dict__["_kept_fast_path_logged"] = True
        now = self._placement()[1]
        if now == torch.bfloat16:
            log.log(level, "fastenc: kept the cpu backend (bf16 compute, int8 GEMMs) instead of casting to %s: its "
                    "weights are bf16 already, so a cast could not restore %s numerics; the encoder's dtype stays "
                    "bfloat16 (load with dtype='fp32' or backend='torch' for fp32)", _name(dtype), _name(dtype))
        else:  # the fp32 plan of a CPU without native bf16: a half cast would be emulated or overflow
            log.log(level, "fastenc: kept the cpu backend (its plan for this CPU computes in %s) instead of casting "
                    "to %s; load with backend='torch' and dtype=... for another precision", _name(now), _name(dtype))

    # ---- the forward side -------------------------------------------------------------------

    def _sync(self) -> None:
        """Install the op table (and graph runner) for where the weights are now; cheap when nothing moved."""
        if self._installed(self._placement()):
            return
        with self._lock:
            placed = self._placement()
            if self._installed(placed):  # another thread did it while this one waited
                return
            name = follow_backend(self.requested_backend, *placed)
            model = self.model
            if name == "cpu":
                from .cpu_plan import prepare_planned

                # the plan made at load (or by an earlier move) is reused; else one is searched and cached on disk
                source = self._plan_source or getattr(self, "source", None)
                prepare_planned(model, source=source, plan=getattr(model, "cpu_plan", None))
                self.__dict__["_cpu_signature"] = self._params.signature()
            else:
                model.ops = op_table(name, placed[0])
            if name != self._backend:
                log.info("fastenc: the encoder's weights are now %s on %s: %s backend (was %s)",
                         _name(placed[1]), placed[0], name, self._backend)
            self._sync_graphs(name, placed[0])
            self.__dict__["_backend"] = name
            self.__dict__["_active"] = placed

    def _installed(self, placed: tuple[torch.device, torch.dtype]) -> bool:
        """The installed op table is the one for ``placed`` (the cpu path's int8 weights: for these storages)."""
        return placed == self._active and (self._backend != "cpu"
                                           or self._params.signature() == self._cpu_signature)

    def _sync_graphs(self, name: str, device: torch.device) -> None:
        wanted = name == "triton" and device.type == "cuda" and self.cuda_graphs
        runner = self._graph_runner
        if wanted and runner is None:
            from ..kernels.graphs import CudaGraphRunner

            self.__dict__["_graph_runner"] = CudaGraphRunner(self.model)
        elif not wanted and runner is not None:
            runner.reset()
            self.__dict__["_graph_runner"] = None

    def _forward_placed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The model on ids/mask already on its device: CUDA graphs when no grad is needed."""
        if self._is_graph_backend:
            return self.model(input_ids, attention_mask)
        self._sync()
        runner = self._graph_runner
        if runner is not None and not torch.is_grad_enabled():
            return runner(input_ids, attention_mask)
        engine = getattr(self.model, "cpu_engine", None) if self._backend == "cpu" else None
        if engine is not None and not torch.is_grad_enabled():  # the plan's engine (OpenVINO): inference only
            out = engine(input_ids, attention_mask)  # None once the weights changed in place
            if out is not None:
                return out.to(self._placement()[1])
            log.warning("fastenc: the encoder's weights changed since the cpu plan's OpenVINO engine was built; "
                        "running the op-table path")
            self.model.cpu_engine = None
        return self.model(input_ids, attention_mask)
