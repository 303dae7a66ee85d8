"""CUDA-graph replay of the whole encoder forward, one graph per (batch, sequence-length) bucket.

At B=1, L=512 the base student is launch-bound (~100 kernels of a few microseconds each), so the
forward is captured once per bucket and replayed. A call is padded up to the smallest bucket
that holds it: padded positions get token ``pad_id`` and mask 0, so real tokens never attend to
them and their relative positions are unchanged; the result is sliced back to [B, L]. A call
without a mask becomes "all ones" over its real tokens, which is the same computation.

The number of live graphs is bounded (least recently used is dropped); all graphs share one
memory pool, and each replay's output is copied out before the next replay reuses the buffers.
Shapes beyond the largest bucket, and a model on the CPU, run eagerly.

A captured graph holds the weights' addresses, so graphs are replayed only while every parameter's
(data_ptr, dtype, device) is what they were captured against. Checking that is O(1) per call: the
model's ``weights_moves`` counter (bumped by every ``.to`` / ``.cuda`` / ``.half`` / ``cast`` of the
model or of a module holding it: ``encoder.to``, ``pipe.to``, accelerate's offload hooks) and a
process-wide count of parameter and submodule registrations (assigning a new ``nn.Parameter``,
``load_state_dict(assign=True)``, replacing a submodule) are compared with what the last call saw;
only when one changed is the full signature read again (~20 us for the base student). Storage
swapped behind torch's module API (assigning ``param.data`` directly, writing ``module._parameters``,
moving a single submodule with its own ``.to``) is not seen: call :meth:`CudaGraphRunner.reset` after it.
A model without ``weights_moves`` gets the full signature read on every call.

Placements that keep changing are not captured again and again (accelerate's
``enable_model_cpu_offload`` moves the encoder to the GPU before each call and back after it): a
signature gets graphs once it has been seen on :attr:`~CudaGraphRunner.stable_calls` consecutive calls
(the runner's creation counts as one sighting, so an encoder loaded on its GPU captures on its first
call); until then calls run eagerly. Graphs are kept while the weights are away, and replayed when
they come back to the same addresses (the caching allocator usually hands the same blocks back);
weights that come back elsewhere on ``stable_calls`` consecutive calls make the runner drop the old
graphs and their pool. So an offloaded encoder captures once, then either replays every call or runs
eagerly, never paying a capture (two warm-ups, ``gc.collect()``, ``empty_cache()``) per call. While
the weights are away the graphs' memory pool stays reserved on the GPU (``reset()`` frees it; a
forward on another device drops the runner).

Replays are serialised by a lock (the static input buffers and the memory pool are shared), run on
the caller's current stream of the weights' device, and a stream that replays next first waits for
the previous replay's output copy. Neither a replay nor the checks before it synchronise with the host.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..backends.params import REGISTRATIONS as _REGISTRATIONS  # one process-wide count of registrations
from ..backends.params import ParamSlots
from ..errors import ConfigError

log = logging.getLogger("fastenc")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
#: Consecutive calls a parameter signature must be seen on before graphs are captured for it.
STABLE_CALLS = 2

SEQ_BUCKETS = (32, 64, 77, 128, 256, 512)


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds every bucket."""
    fits = [b for b in buckets if b >= n]
    return min(fits) if fits else None


def pad_inputs(
    input_ids: torch.Tensor,  # [B, L]
    attention_mask: torch.Tensor | None,  # [B, L] or None
    batch: int,
    seq: int,
    pad_id: int = 0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``/``attention_mask`` padded to [batch, seq] (written into ``out`` when given).

    Padded tokens are ``pad_id`` with mask 0; a missing mask is 1 on every real token.
    """
    B, L = input_ids.shape
    if B > batch or L > seq:
        raise ValueError(f"inputs [{B}, {L}] do not fit the bucket [{batch}, {seq}]")
    if out is None:
        ids = torch.empty((batch, seq), dtype=torch.long, device=input_ids.device)
        mask = torch.empty((batch, seq), dtype=torch.long, device=input_ids.device)
    else:
        ids, mask = out
    ids.fill_(pad_id)
    ids[:B, :L].copy_(input_ids)
    mask.zero_()
    if attention_mask is None:
        mask[:B, :L].fill_(1)
    else:
        mask[:B, :L].copy_(attention_mask)
    return ids, mask


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    ids: torch.Tensor  # [Bb, Lb] static input
    mask: torch.Tensor  # [Bb, Lb] static input
    out: torch.Tensor  # [Bb, Lb, P] static output


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager: int = 0
    evictions: int = 0
    invalidations: int = 0  # times live graphs were dropped because the weights settled elsewhere
    signature_checks: int = 0  # full (data_ptr, dtype, device) reads; O(1) checks in between
    live: list = field(default_factory=list)  # (batch, seq) buckets currently captured


class CudaGraphRunner(nn.Module):
    """Runs ``model(input_ids, attention_mask)`` through per-bucket CUDA graphs.

    ``model`` is a :class:`fastenc.model.T5Encoder` (any op table; the Triton one is the point).
    In-place updates of the weights are seen by the graphs; moved, cast or replaced weights are
    captured again once they stay put for ``stable_calls`` calls, and graphs are reused when the
    weights return to the addresses they were captured at (see the module docstring). Safe to call
    from several threads.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_buckets: Sequence[int] = BATCH_BUCKETS,
        seq_buckets: Sequence[int] = SEQ_BUCKETS,
        max_graphs: int = 8,
        pad_id: int = 0,
        warmup: int = 2,
        stable_calls: int = STABLE_CALLS,
    ):
        super().__init__()
        if max_graphs < 1:
            raise ConfigError(f"max_graphs must be >= 1, got {max_graphs}")
        if stable_calls < 1:
            raise ConfigError(f"stable_calls must be >= 1, got {stable_calls}")
        self.model = model
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        self.seq_buckets = tuple(sorted(set(seq_buckets)))
        self.max_graphs = max_graphs
        self.pad_id = pad_id
        self.warmup = warmup
        self._graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self._pool = None
        self._lock = threading.RLock()  # re-entered by quiesced() -> reset()
        self._params = ParamSlots(model)  # the parameters, read without walking the modules
        self._captured_for: tuple | None = None  # parameter signature the live graphs were captured against
        self._done = None  # CUDA event recorded after the last replay's output copy
        self.stable_calls = stable_calls
        self.stats = GraphStats()
        self._seen: tuple | None = None  # the signature the last call (or the creation) saw
        self._seen_moves: tuple[int, int] | None = None  # _moves() when _seen was read
        self._streak = 0  # consecutive sightings of _seen
        self._misses = 0  # consecutive calls with live graphs for another signature
        self._look()  # the creation is the first sighting of the weights where they are now
        self._streak = 1

    @property
    def captures(self) -> int:
        """Graphs captured so far (``stats.captures``)."""
        return self.stats.captures

    def _moves(self) -> tuple[int, int] | None:
        """O(1): what changes whenever the parameters may have moved, or None when the model cannot say."""
        moves = getattr(self.model, "weights_moves", None)
        return None if moves is None else (moves, _REGISTRATIONS[0])

    def _look(self) -> None:
        """Read the full signature now; a new one starts a new streak of sightings."""
        self._seen_moves = self._moves()
        signature = self.signature()
        self.stats.signature_checks += 1
        if signature != self._seen:
            self._seen, self._streak = signature, 0

    def signature(self) -> tuple:
        """``((data_ptr, dtype, device), ...)`` of the model's parameters, read now (~20 us for the
        base student): the graphs are valid exactly while this equals what they were captured against."""
        return self._params.signature()

    def device(self) -> torch.device:
        """Where the first parameter lives (O(1) while no parameter or submodule was registered anew)."""
        first = self._params.first()
        return first.device if first is not None else torch.device("cpu")

    def buckets(self, batch: int, seq: int) -> tuple[int, int] | None:
        bb, lb = bucket_for(batch, self.batch_buckets), bucket_for(seq, self.seq_buckets)
        return None if bb is None or lb is None else (bb, lb)

    def batch_within(self, budget: int, seq_len: int, bytes_at: Callable[[int], int]) -> int:
        """Prompts per call at ``seq_len`` whose activations fit ``budget`` bytes when calls run through
        these graphs: the graph of a bucket allocates for the whole padded bucket, so the answer is the
        largest batch bucket whose activations at the bucketed length (``bytes_at(L)`` per prompt) fit.
        Lengths beyond every bucket run eagerly: the plain budget step there."""
        seq = bucket_for(seq_len, self.seq_buckets)
        fits = max(1, budget // bytes_at(seq if seq is not None else seq_len))
        under = [b for b in self.batch_buckets if b <= fits] if seq is not None else []
        return max(under) if under else fits

    def check_weights(self) -> bool:
        """Drop every graph when the weights moved, were cast or replaced since capture (a full check,
        now); True if graphs were dropped. Calls do this on their own (see :meth:`_admit`)."""
        with self._lock:
            self._look()
            if self._seen == self._captured_for:
                return False
            dropped = bool(self._graphs)
            if dropped:
                self._invalidate("the weights moved or were replaced since the CUDA graphs were captured")
            self._captured_for = self._seen
            return dropped

    def _admit(self) -> bool:
        """Whether this call runs through graphs (replayed or captured now) rather than eagerly: the weights
        are where the live graphs were captured, or have stayed at one signature for ``stable_calls``
        consecutive calls. O(1) unless a move or registration happened since the last call. The caller
        holds the lock."""
        moves = self._moves()
        if moves is None or moves != self._seen_moves:
            self._look()
        self._streak += 1
        if self._seen == self._captured_for:
            self._misses = 0
            return True
        if self._streak >= self.stable_calls:
            if self._graphs:
                self._invalidate("the weights settled at new addresses since the CUDA graphs were captured")
            self._captured_for, self._misses = self._seen, 0
            return True
        self._misses += 1
        if self._misses >= self.stable_calls and self._graphs:  # not coming back: free the pool
            self._invalidate(f"the weights have been elsewhere for {self._misses} calls")
            self._captured_for = None
        return False

    def _invalidate(self, why: str) -> None:
        self.stats.invalidations += 1
        log.info("fastenc: %s; dropping %d graph(s)", why, len(self._graphs))
        self._drop()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        device = self.device()
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        B, L = input_ids.shape
        key = self.buckets(B, L)
        if key is None or not self._graphable(device) or B == 0 or L == 0:
            self.stats.eager += 1
            return self.model(input_ids, attention_mask)
        with self._lock, self._on(device):
            if not self._admit():  # the weights have just moved: eager until they stay
                self.stats.eager += 1
                return self.model(input_ids, attention_mask)
            self._wait_previous(device)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(*key, device)
            else:
                self._graphs.move_to_end(key)
            pad_inputs(input_ids, attention_mask, *key, pad_id=self.pad_id, out=(entry.ids, entry.mask))
            entry.graph.replay()  # on the current stream
            out = entry.out[:B, :L].clone()  # [B, L, P]
            self._record_done(device)
            self.stats.replays += 1
            return out

    # the device steps (CUDA); a simulation on the CPU replaces these and nothing else

    def _graphable(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _on(self, device: torch.device):
        return torch.cuda.device(device)

    def _wait_previous(self, device: torch.device) -> None:
        if self._done is not None:  # the previous replay (maybe on another stream) is done with the buffers
            torch.cuda.current_stream(device).wait_event(self._done)

    def _record_done(self, device: torch.device) -> None:
        if self._done is None:
            self._done = torch.cuda.Event()
        self._done.record(torch.cuda.current_stream(device))

    def _capture(self, batch: int, seq: int, device: torch.device) -> _Graph:
        """Capture the bucket on ``device`` (the caller holds the lock and the device guard)."""
        while len(self._graphs) >= self.max_graphs:
            old, _ = self._graphs.popitem(last=False)
            self.stats.evictions += 1
            log.debug("fastenc: dropped CUDA graph for bucket %s", old)
        ids = torch.full((batch, seq), self.pad_id, dtype=torch.long, device=device)
        mask = torch.ones((batch, seq), dtype=torch.long, device=device)
        graph, out = self._record_graph(ids, mask, device)
        entry = _Graph(graph, ids, mask, out)
        self._graphs[(batch, seq)] = entry
        self.stats.captures += 1
        self.stats.live = list(self._graphs)
        log.info("fastenc: captured CUDA graph for batch %d, seq %d (%d live)", batch, seq, len(self._graphs))
        return entry

    def _record_graph(self, ids: torch.Tensor, mask: torch.Tensor, device: torch.device):
        """(graph, static output) of ``model(ids, mask)``: warm-ups, then the capture into the shared pool."""
        # compile / autotune every kernel for this shape outside the capture
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model(ids, mask)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # a capture stream of this device (torch's shared default one belongs to whichever device made it
        # first); thread-local capture mode leaves other threads' CUDA work alone
        capture = torch.cuda.Stream(device)
        capture.wait_stream(current)
        with torch.cuda.graph(graph, pool=self._pool, stream=capture, capture_error_mode="thread_local"):
            out = self.model(ids, mask)
        current.wait_stream(capture)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, out

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold the replay lock, with the current stream of the weights' device ordered after the last
        replay: a move of the weights inside frees nothing a replay in flight still reads."""
        with self._lock:
            done = self._done
            if done is not None:
                device = self.device()
                if device.type == "cuda":
                    torch.cuda.current_stream(device).wait_event(done)
            yield

    def reset(self) -> None:
        """Drop every captured graph and the memory pool (e.g. after swapping weight storage behind torch's
        module API); the next calls look at the weights afresh."""
        with self._lock:
            self._drop()
            self._captured_for = None
            self._params = ParamSlots(self.model)
            self._seen = None
            self._look()

    def _drop(self) -> None:
        self._graphs.clear()
        self._pool = None
        self._done = None
        self.stats.live = []
