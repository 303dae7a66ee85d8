"""Public API: ``load``, ``save``, :class:`Encoder` and :class:`Embeddings`."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from . import weights
from .backends import op_table, resolve_backend
from .backends.graph import GRAPH_BACKENDS, GraphRunner
from .backends.placement import FollowsWeights
from .cache import CacheKey, EmbeddingCache, key as cache_key
from .config import EncoderConfig, get_size
from .errors import (CheckpointError, ConfigError, FastencError, InputError, NumericsError, is_out_of_memory,
                     out_of_memory)
from .fileio import content_identity
from .inputs import DeviceChecks, check_device, check_prompt, prompt_list
from .model import T5Encoder
from .targets import TARGETS, Target, get_target

log = logging.getLogger("fastenc")

#: Targets whose pipelines pass the attention mask to T5 (the others encode padding too).
MASKED_TARGETS = frozenset(name for name, t in TARGETS.items() if t.masked)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


#: Memory one forward pass may use for intermediate activations before batches are split.
ACTIVATION_BUDGET = 1 << 30
#: Head dims :mod:`fastenc.kernels.attention` tiles (larger ones fall back to matmul attention).
FUSED_ATTENTION_MAX_HEAD_DIM = 256
#: Largest result :meth:`Encoder.encode` returns in one tensor (beyond it: :meth:`Encoder.encode_batches`).
MAX_OUTPUT_BYTES = 4 << 30


@dataclass(frozen=True)
class WeightsOrigin:
    """Where a loaded encoder's weights came from, so :func:`save` can write them as they were loaded
    after a backend cast them (the ``cpu`` backend computes in bf16 on weights loaded in fp32).

    ``dtypes``: each parameter's dtype as loaded (before any backend cast); for a checkpoint, ``path``,
    ``identity`` (:func:`fastenc.weights.checkpoint_identity` at load) and ``stats`` (its files' size and
    mtime); for a random init, the ``seed`` it was drawn with."""

    kind: str  # "checkpoint" | "random-init"
    dtypes: dict[str, torch.dtype]
    path: Path | None = None
    identity: str | None = None
    stats: tuple[tuple[Path, int, int], ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Embeddings:
    embeds: torch.Tensor  # [B, L, P]
    mask: torch.Tensor  # [B, L] (1 = token incl. EOS, 0 = padding)
    num_truncated: int = 0


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:  # bf16 on CUDA from sm_80 on, fp16 below, fp32 elsewhere
        from .backends import default_dtype

        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16") from None


def default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoder(FollowsWeights, nn.Module):
    """A loaded text encoder: ``encoder(input_ids, attention_mask)`` -> [B, L, P] embeddings.

    ``backend`` is the one running now; ``requested_backend`` the one asked for (``auto`` follows the
    weights: moving the encoder re-selects op table and CUDA graphs, see :mod:`fastenc.backends.placement`).
    """

    activation_budget: int = ACTIVATION_BUDGET  # bytes of activations per forward pass (micro-batching)
    max_output_bytes: int = MAX_OUTPUT_BYTES  # largest tensor encode() returns

    def __init__(self, model: T5Encoder, *, backend: str = "torch", tokenizer=None, source: str = "random-init",
                 random_init: bool = False, cache: EmbeddingCache | None = None, graphs: nn.Module | None = None,
                 requested_backend: str | None = None, cuda_graphs: bool = True, plan_source: str | None = None,
                 origin: WeightsOrigin | None = None):
        super().__init__()
        self.model = model
        self._setup_following(backend, requested_backend or backend, cuda_graphs=cuda_graphs, graphs=graphs,
                              plan_source=plan_source)
        self.tokenizer = tokenizer
        self.source = source
        self.random_init = random_init
        self.cache = cache
        self.origin = origin  # set by fastenc.load: lets save() write the weights as loaded

    @property
    def seed(self) -> int | None:
        """The seed of a random-init encoder from :func:`load` (None otherwise)."""
        return self.origin.seed if self.origin is not None else None

    @property
    def config(self) -> EncoderConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)  # graph-backend runners carry their device
        return device if isinstance(device, torch.device) else self.model.embed.weight.device

    @property
    def fingerprint(self) -> str:
        """Identity of everything an embedding depends on: the weights' content (not their path), the
        tokenizer, config, dtype, backend, device type and the CPU backend's int8 plan. The embedding
        cache keys on it, so new weights at the same path or another tokenizer never get old entries."""
        plan = getattr(getattr(self.model, "int8_plan", None), "weights", None)
        cpu_plan = getattr(self.model, "cpu_plan", None)
        if cpu_plan is not None:
            plan = (plan, cpu_plan.chosen)
        text = "|".join(map(str, (self._weights_identity(), tokenizer_identity(self.tokenizer), self.config,
                                  self.dtype, self.backend, self.device.type, plan)))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def _weights_identity(self) -> str:
        ident = getattr(self.model, "weights_identity", None)  # set by _load_weights
        if ident is None and isinstance(getattr(self.model, "artifact", None), Path):  # graph backends
            ident = self.__dict__.get("_artifact_identity")
            if ident is None:
                ident = self.__dict__["_artifact_identity"] = content_identity([self.model.artifact])
        return ident or self.source

    def micro_batch(self, seq_len: int) -> int:
        """Prompts per forward pass at ``seq_len`` so what the running backend allocates fits
        :attr:`activation_budget` (:func:`activation_bytes` of :attr:`backend`); with CUDA graphs the
        padded bucket is what runs, so the step is a batch bucket at the bucketed length (for graph
        backends: within the artifact's batch profile)."""
        runner = self.graphs
        if runner is not None:
            return runner.batch_within(self.activation_budget, seq_len,
                                       lambda L: activation_bytes(self.config, L, self.dtype, self.backend))
        step = max(1, self.activation_budget // activation_bytes(self.config, seq_len, self.dtype, self.backend))
        profile = getattr(self.model, "profile", None)
        return min(step, profile.max_batch) if profile is not None else step

    def extra_repr(self) -> str:
        kind = "RANDOM-INIT weights (not a trained encoder)" if self.random_init else f"weights from {self.source}"
        return f"size={self.config.name}, backend={self.backend}, dtype={self.dtype}, device={self.device}, {kind}"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` [B, L] (+ ``attention_mask`` [B, L] of 0/1) -> embeddings [B, L, P].

        Ids are range-checked and masks checked for 0/1 on every device; without autograd, large batches
        run in micro-batches (:meth:`micro_batch`); a non-finite output raises :class:`NumericsError`.
        CPU tensors (ids as a tokenizer builds them) are checked at once; CUDA tensors on the device,
        without a host sync: a failure raises at the next call once the device got there, or at
        :meth:`synchronize` (see :class:`fastenc.inputs.DeviceChecks`)."""
        checks = self._checks
        ids, mask, ticket = checks.inputs(input_ids, attention_mask, self.config.vocab_size, self.device)  # [B, L]
        batch, seq = ids.shape
        step = batch if torch.is_grad_enabled() or isinstance(self.model, GraphRunner) else self.micro_batch(seq)
        if batch <= step:
            out = self._run(ids, mask)  # [B, L, P]
        else:
            out = None
            for s in range(0, batch, step):
                part = self._run(ids[s:s + step], mask[s:s + step] if mask is not None else None)  # [b, L, P]
                if out is None:
                    out = part.new_empty((batch, *part.shape[1:]))
                out[s:s + step] = part
        checks.result(out, ticket, self.dtype)
        return out

    @property
    def _checks(self) -> DeviceChecks:
        checks = self.__dict__.get("_device_checks")
        if checks is None:
            checks = self.__dict__.setdefault("_device_checks", DeviceChecks())
        return checks

    def synchronize(self) -> None:
        """Wait for the device-side checks of earlier calls and raise the first failure they found (the
        :class:`InputError` or :class:`NumericsError` a host check raises, naming the call)."""
        self._checks.raise_ready(wait=True)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self._forward_placed(ids, mask)  # op table + CUDA graphs follow the weights (backends/placement.py)

    @torch.inference_mode()
    def encode(self, prompts: str | Sequence[str], target: str | Target = "flux-dev", *,
               max_length: int | None = None, max_output_bytes: int | None = None) -> Embeddings:
        """Tokenise, encode and post-process like the target pipeline does, so ``embeds`` is the tensor it
        hands its transformer; repeated prompts come from the cache.

        ``prompts``: a ``str`` or a sequence (list, tuple) of ``str``; ``target``: a name in
        :data:`fastenc.targets.TARGETS` or a :class:`~fastenc.targets.Target`; ``max_length``: the
        pipeline's ``max_sequence_length`` (default: the target's). The forward passes run in
        micro-batches; the returned tensor must fit ``max_output_bytes`` (default
        :attr:`max_output_bytes`, 4 GiB): for more prompts iterate :meth:`encode_batches`."""
        texts = prompt_list(prompts)
        target, max_length = _target_and_length(target, max_length)
        self._need_tokenizer()
        limit = self.max_output_bytes if max_output_bytes is None else max_output_bytes
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ConfigError(f"max_output_bytes must be a positive integer, got {limit!r}")
        P, itemsize = self.config.output_dim, torch.empty((), dtype=self.dtype).element_size()
        need = len(texts) * max_length * P * itemsize
        if need > limit:
            raise InputError(
                f"encode() of {len(texts)} prompts at target {target.name!r} would return {_human(need)} "
                f"([{len(texts)}, {max_length}, {P}] {str(self.dtype).removeprefix('torch.')}), over "
                f"max_output_bytes={_human(limit)}; iterate encode_batches(prompts, target={target.name!r}, "
                "batch_size=...) to stream them, or pass a larger max_output_bytes")
        step = self.micro_batch(max_length)
        embeds = mask = None
        truncated = 0
        for s in range(0, len(texts), step):
            part = self._encode_list(texts[s:s + step], target, max_length, s)
            if embeds is None:
                embeds = part.embeds.new_empty((len(texts), *part.embeds.shape[1:]))  # [B, L, P]
                mask = part.mask.new_empty((len(texts), *part.mask.shape[1:]))  # [B, L]
            embeds[s:s + step], mask[s:s + step] = part.embeds, part.mask
            truncated += part.num_truncated
        self._warn_truncated(truncated, len(texts), max_length)
        return Embeddings(embeds, mask, truncated)

    def encode_batches(self, prompts: str | Iterable[str], target: str | Target = "flux-dev", *,
                       batch_size: int = 64, max_length: int | None = None) -> Iterator[Embeddings]:
        """Stream embeddings for any number of prompts: yields one :class:`Embeddings` per ``batch_size``
        prompts (the last may be smaller). ``prompts`` may be any iterable of ``str`` (a generator too);
        memory stays bounded by one batch's output plus the micro-batched activations."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        target, max_length = _target_and_length(target, max_length)
        self._need_tokenizer()
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (bytes, bytearray, memoryview)) or not isinstance(prompts, Iterable):
            raise InputError(f"prompts must be a str or an iterable of str, got {type(prompts).__name__}")
        return self._stream(iter(prompts), target, max_length, batch_size)

    def _stream(self, it: Iterator[object], target: Target, max_length: int, batch_size: int) -> Iterator[Embeddings]:
        start, total, truncated = 0, 0, 0
        while True:
            chunk = [check_prompt(p, start + i) for i, p in enumerate(itertools.islice(it, batch_size))]
            if not chunk:
                break
            with torch.inference_mode():  # not held across the yield: the caller's code runs as it chose
                step = self.micro_batch(max_length)
                parts = [self._encode_list(chunk[s:s + step], target, max_length, start + s)
                         for s in range(0, len(chunk), step)]
                out = parts[0] if len(parts) == 1 else Embeddings(
                    torch.cat([p.embeds for p in parts]), torch.cat([p.mask for p in parts]),
                    sum(p.num_truncated for p in parts))
            truncated, total, start = truncated + out.num_truncated, total + len(chunk), start + len(chunk)
            yield out
        if not total:
            raise InputError("prompts is empty")
        self._warn_truncated(truncated, total, max_length)

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ConfigError("this encoder has no tokenizer: pass tokenizer=FOLDER_OR_HUB_ID to fastenc.load "
                              "(e.g. a folder with tokenizer.json, or Flux's tokenizer_2 folder)")
        size = getattr(self.tokenizer, "vocab_size", None)
        if isinstance(size, int) and size > self.config.vocab_size:
            raise ConfigError(f"the tokenizer has {size} token ids but the model's embedding table has "
                              f"{self.config.vocab_size} rows: it is not this model's tokenizer")

    def _warn_truncated(self, truncated: int, total: int, max_length: int) -> None:
        if truncated and _is_fastenc_tokenizer(self.tokenizer):
            log.warning("%d of %d prompts were longer than %d tokens and were truncated", truncated, total, max_length)

    def _encode_list(self, texts: list[str], target: Target, max_length: int, offset: int) -> Embeddings:
        """One micro-batch of checked prompts (``offset``: index of ``texts[0]`` in the caller's list)."""
        if _is_fastenc_tokenizer(self.tokenizer):
            batch = self.tokenizer(target.prepare(texts), max_length=max_length, warn=False)
        else:
            batch = self.tokenizer(target.prepare(texts), max_length=max_length)
        ids, mask = batch.input_ids, batch.attention_mask  # [b, L]
        if ids.shape[0] != len(texts):
            raise InputError(f"the tokenizer returned {ids.shape[0]} rows for {len(texts)} prompts")
        keys: list[CacheKey | None] = [None] * len(texts)
        if self.cache is not None:
            fp, dt = self.fingerprint, str(self.dtype)
            tkey = target.name if TARGETS.get(target.name) == target else repr(target)  # a custom row: all of it
            if max_length != target.max_length:
                tkey = f"{tkey}@{max_length}"
            keys = [cache_key(fp, tkey, dt, p) for p in texts]
        embeds: list[torch.Tensor | None] = [None] * len(texts)
        todo: list[int] = []  # rows to compute: the first of each distinct prompt not in the cache
        same: dict[str, int] = {}  # prompt -> its row in todo
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if key is not None and texts[i] not in same else None
            if hit is not None and hit[0].shape[0] == ids.shape[1]:
                embeds[i] = hit[0].to(self.device)
            elif texts[i] not in same:
                same[texts[i]] = len(todo)
                todo.append(i)
        if todo:
            sel = torch.tensor(todo)
            try:
                out = self(ids[sel], mask[sel] if target.masked else None)  # [b, L, P]
                self.synchronize()  # checked before anything is cached
                out = target.finish(out, mask[sel])  # what the pipeline does to the encoder's output
            except NumericsError as exc:
                raise NumericsError(f"{exc} (prompts from index {offset})") from None
            for j, i in enumerate(todo):
                if keys[i] is not None:
                    self.cache.put(keys[i], out[j], mask[i])
            for i, text in enumerate(texts):
                if embeds[i] is None:
                    embeds[i] = out[same[text]]
        return Embeddings(torch.stack(embeds), mask.to(self.device), batch.num_truncated)


def _target_and_length(target: str | Target, max_length: int | None) -> tuple[Target, int]:
    row = get_target(target)
    if max_length is None:
        return row, row.max_length
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r:.60}")
    return row, max_length


def activation_bytes(cfg: EncoderConfig, seq_len: int, dtype: torch.dtype, backend: str = "torch") -> int:
    """Upper estimate of the intermediate activation bytes one prompt of ``seq_len`` tokens needs on
    ``backend``: matmul attention (``torch``, ``cpu``, graph artifacts) builds H x L x L score tensors,
    the ``triton`` flash kernel never does (scores stay in registers, the bias is a [buckets, H] table)."""
    L, item = seq_len, max(4, torch.empty((), dtype=dtype).element_size())
    fused = backend == "triton" and cfg.d_kv <= FUSED_ATTENTION_MAX_HEAD_DIM
    scores = 0 if fused else cfg.num_heads * L * L * (3 * 4 + item)  # scores, fp32 softmax in/out, position bias
    widths = 3 * cfg.inner_dim + 3 * (2 if cfg.gated else 1) * cfg.d_ff + 2 * cfg.output_dim + 6 * cfg.d_model
    return scores + L * widths * item


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _is_fastenc_tokenizer(tokenizer: object) -> bool:
    from .tokenizer import Tokenizer

    return isinstance(tokenizer, Tokenizer)


def _is_tokenizer(tokenizer: object) -> bool:
    """What load(tokenizer=...) takes as an object: a fastenc Tokenizer, or a tokenizers.Tokenizer (wrapped)."""
    from tokenizers import Tokenizer as HFTokenizer

    return _is_fastenc_tokenizer(tokenizer) or isinstance(tokenizer, HFTokenizer)


def tokenizer_identity(tokenizer: object) -> str:
    """Content identity of a tokenizer (its serialised JSON), or its type and id for foreign objects."""
    if tokenizer is None:
        return "none"
    ident = getattr(tokenizer, "fingerprint", None)
    return ident if isinstance(ident, str) else f"{type(tokenizer).__qualname__}@{id(tokenizer)}"


def _build_random(cfg: EncoderConfig, device: torch.device, dtype: torch.dtype, seed: int) -> T5Encoder:
    with torch.device("meta"):
        model = T5Encoder(cfg)
    count = sum(p.numel() for p in model.parameters())
    with _memory_guard(f"the {cfg.name} encoder (random init, {count / 1e6:,.0f}M parameters in float32 on "
                       f"{device})", count * 4):
        model.to_empty(device=device)
        _init_random(model, cfg, seed)
        return model.cast(dtype)


@contextlib.contextmanager
def _memory_guard(what: str, nbytes: int):
    """Memory exhaustion inside (MemoryError, torch's "not enough memory", CUDA's out of memory) becomes
    one :class:`~fastenc.errors.OutOfMemory` naming ``what`` and the ``nbytes`` it needed."""
    try:
        yield
    except FastencError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory(what, nbytes, exc) from None
        raise


def _init_random(model: T5Encoder, cfg: EncoderConfig, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            table = name.startswith("embed") or name.endswith("rel_bias.weight")  # embeddings, not GEMM weights
            fan_in = p.shape[1] if p.dim() == 2 and not table else cfg.d_model
            std = 1.0 if name == "embed.weight" else fan_in**-0.5
            if name.endswith("bias"):
                std = 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for block in model.blocks:  # T5 scales queries by d_kv**-0.5 at init (no 1/sqrt(d) in attention)
            block.attn.qkv.weight[: cfg.inner_dim].mul_(cfg.d_kv**-0.5)


def _param_dtypes(model: T5Encoder) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters()}


def _load_weights(path: Path, size: str | None, device: torch.device,
                  dtype: torch.dtype) -> tuple[T5Encoder, WeightsOrigin]:
    source = weights.open_source(path)
    try:
        layout, prefix = weights.detect_layout(source.keys)
    except CheckpointError:
        weights.check_model_type(path)  # another model's weights: its config.json says which, and that is said
        raise
    cfg = weights.read_config(path, source, layout, prefix)
    if size is not None:
        weights.check_config_matches(cfg, get_size(size), path)
        cfg = cfg.replace(name=size)
    identity = weights.checkpoint_identity(path, source)  # before any tensor is read
    stats = weights.file_stats(weights.checkpoint_files(path, source))
    with torch.device("meta"):  # cfg was checked against the tensors' shapes: nothing large is built here
        model = T5Encoder(cfg)
    expected = {n: p.shape for n, p in model.named_parameters()}
    count = sum(p.numel() for p in model.parameters())
    with _memory_guard(f"{path}: the {cfg.name} encoder's weights ({count / 1e6:,.0f}M parameters in "
                       f"{str(dtype).removeprefix('torch.')} on {device})", count * dtype.itemsize):
        state = weights.load_state_dict(source, cfg, layout, prefix, expected, dtype=dtype, device=device)
        model.load_state_dict(state, strict=True, assign=True)
    model.weights_identity = identity  # content identity for the embedding cache key
    log.info("loaded %s checkpoint (%s layout) from %s", cfg.name, layout, path)
    return model, WeightsOrigin("checkpoint", _param_dtypes(model), path=path.resolve(), identity=identity, stats=stats)


def tokenizer_beside(checkpoint_dir: Path) -> Path | None:
    """The folder whose tokenizer.json :func:`load` takes when no tokenizer is passed: the checkpoint's own,
    else its ``tokenizer_2/`` or ``tokenizer/`` (a pipeline folder); None when there is none."""
    from .tokenizer import _check_regular

    for sub in ("", "tokenizer_2", "tokenizer"):
        candidate = checkpoint_dir / sub / "tokenizer.json"
        _check_regular(candidate)  # there but a FIFO, a folder, a link to /dev/zero: said, not ignored
        if candidate.is_file():
            return checkpoint_dir / sub
    return None


def _find_tokenizer(tokenizer, checkpoint_dir: Path | None):
    from tokenizers import Tokenizer as _HFTokenizer

    from .tokenizer import Tokenizer

    if tokenizer is None:
        folder = tokenizer_beside(checkpoint_dir) if checkpoint_dir is not None else None
        return Tokenizer.from_pretrained(folder) if folder is not None else None
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_pretrained(tokenizer)
    if isinstance(tokenizer, _HFTokenizer):  # a tokenizers.Tokenizer: wrapped (a copy: its padding is not changed)
        return Tokenizer(_HFTokenizer.from_str(tokenizer.to_str()))
    return tokenizer


def _check_load_args(checkpoint, *, size, random_init, backend, device, tokenizer, subfolder, cache, seed,
                     cuda_graphs) -> None:
    """Type checks of :func:`load`'s arguments, so a wrong one is one :class:`ConfigError` naming it."""
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ConfigError(f"checkpoint must be a path or hub id (str), got {type(checkpoint).__name__}")
    if isinstance(checkpoint, str) and (not checkpoint.strip() or "\0" in checkpoint):
        raise ConfigError(f"checkpoint {checkpoint!r:.80} is not a path or hub id")
    for arg, value in (("size", size), ("subfolder", subfolder)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{arg} must be a string, got {type(value).__name__}")
    if subfolder is not None and (os.path.isabs(subfolder) or ".." in Path(subfolder).parts or "\0" in subfolder):
        raise ConfigError(f"subfolder {subfolder!r:.80} must be a relative folder inside the checkpoint")
    if not isinstance(backend, str):
        raise ConfigError(f"backend must be a string, got {type(backend).__name__}")
    for arg, value in (("random_init", random_init), ("cuda_graphs", cuda_graphs)):
        if not isinstance(value, bool):
            raise ConfigError(f"{arg} must be True or False, got {value!r:.60}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r:.60}")
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) and not _is_tokenizer(tokenizer):
        hint = ("; for a transformers tokenizer pass its folder (save_pretrained) or its backend_tokenizer"
                if hasattr(tokenizer, "backend_tokenizer") else "")
        raise ConfigError(f"tokenizer must be a folder, file or hub id, a fastenc.Tokenizer or a tokenizers.Tokenizer, "
                          f"got {type(tokenizer).__name__}{hint}")
    if not isinstance(cache, (bool, EmbeddingCache)):
        raise ConfigError(f"cache must be True, False or an EmbeddingCache, got {type(cache).__name__}")
    if device is not None:
        check_device(device, "device", "pass device='cpu' or leave it out")


def load(
    checkpoint: str | os.PathLike | None = None,
    *,
    size: str | None = None,
    random_init: bool = False,
    backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer=None,
    subfolder: str | None = None,
    cache: bool | EmbeddingCache = True,
    seed: int = 0,
    cuda_graphs: bool = True,
) -> Encoder:
    """Load a checkpoint (directory, .safetensors file or hub id) or build a random-init size.

    Graph backends (``onnxruntime``, ``tensorrt``, ``aoti``) load an export directory instead
    (see ``fastenc export``); ``dtype`` then picks the artifact (``"int8"`` included for ONNX Runtime).
    """
    _check_load_args(checkpoint, size=size, random_init=random_init, backend=backend, device=device,
                     tokenizer=tokenizer, subfolder=subfolder, cache=cache, seed=seed, cuda_graphs=cuda_graphs)
    if backend in GRAPH_BACKENDS:
        return _load_artifact(checkpoint, backend, device, dtype, tokenizer, random_init, cache)
    dev = default_device(device)
    requested = None if dtype is None else parse_dtype(dtype, dev)
    name = resolve_backend(backend, dev, requested)
    dt = parse_dtype(dtype, dev)
    if name == "cpu":
        if dev.type != "cpu":
            raise ConfigError(f"backend 'cpu' runs on the CPU, not {dev}; pass device='cpu'")
        if requested not in (None, torch.bfloat16, torch.float32):
            raise ConfigError(f"backend 'cpu' computes in bf16 or fp32 (with int8 GEMMs), not {requested}; "
                              "pass dtype='bf16' or 'fp32' or leave it out, or use backend='torch'")
        dt = torch.float32  # loaded in fp32: the int8 plan is checked against it, then cast to bf16
    if checkpoint is None and not random_init and size is not None:  # size="base": the released base student
        from .hub import released_checkpoint

        checkpoint = released_checkpoint(get_size(size).name)
    if random_init == (checkpoint is not None):
        raise ConfigError("pass either a checkpoint (path or hub id) or random_init=True with size=...")
    if random_init:
        cfg = get_size(size or "base")
        model = _build_random(cfg, dev, dt, seed)
        origin = WeightsOrigin("random-init", _param_dtypes(model), seed=seed)
        source, ckpt_dir = f"random-init:{cfg.name}:seed{seed}", None
        log.warning("fastenc: %s encoder with RANDOM weights (benchmarking only, not a trained model)", cfg.name)
    else:
        path = weights.resolve_checkpoint(checkpoint, subfolder=subfolder)
        model, origin = _load_weights(path, size, dev, dt)
        source, ckpt_dir = str(path.resolve()), (path if path.is_dir() else path.parent)
    plan_source = None
    if name == "cpu":
        from .backends import cpu_fast_path
        from .backends.cpu import source_fingerprint
        from .backends.cpu_plan import prepare_planned

        plan_source = source if random_init else source_fingerprint(path)
        # the CPU's own precision (bf16 where native, else fp32: never emulated bf16 unless dtype='bf16' asks)
        precision = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(requested) or \
            ("bf16" if cpu_fast_path()[0] else "fp32")
        prepare_planned(model, source=plan_source, precision=precision)
    else:
        model.ops = op_table(name, dev)
    model.eval()
    emb_cache = cache if isinstance(cache, EmbeddingCache) else (EmbeddingCache() if cache else None)
    # the encoder owns the CUDA-graph runner and re-selects op table and graphs when its weights move
    return Encoder(model, backend=name, tokenizer=_find_tokenizer(tokenizer, ckpt_dir), source=source,
                   random_init=random_init, cache=emb_cache, requested_backend=backend, cuda_graphs=cuda_graphs,
                   plan_source=plan_source, origin=origin)


def _load_artifact(directory, backend: str, device, dtype, tokenizer, random_init: bool, cache) -> Encoder:
    from .backends.graph import exported_from_random_init, load_artifact

    if random_init or directory is None:
        raise ConfigError(f"backend {backend!r} runs an exported artifact: pass the directory `fastenc export` wrote")
    path = Path(directory)
    runner, _ = load_artifact(path, backend, device, dtype)
    _say_if_source_changed(path)
    emb_cache = cache if isinstance(cache, EmbeddingCache) else (EmbeddingCache() if cache else None)
    return Encoder(runner.eval(), backend=backend, tokenizer=_find_tokenizer(tokenizer, path),
                   source=str(runner.artifact.resolve()), random_init=exported_from_random_init(path), cache=emb_cache)


def _say_if_source_changed(directory: Path) -> None:
    """An export runs its own artifacts, never the checkpoint's weights: when that checkpoint changed since
    the export (a cheap identity first, the fingerprint only when it differs), say so, once per load."""
    from .exporters.artifacts import changed_source, read_manifest, source_changed

    changed = changed_source(read_manifest(directory), quick=True)
    if changed is not None:
        log.warning("fastenc: %s: %s; this encoder runs the exported artifacts, not its new weights (re-export "
                    "with `fastenc export --checkpoint %s ...` to serve them)", directory, source_changed(changed),
                    changed)


def save(encoder: Encoder | T5Encoder, directory: str | os.PathLike) -> Path:
    """Save in fastenc's format (config.json + model.safetensors [+ tokenizer.json]); atomic per file.

    The weights written are the encoder's own, as loaded: when a backend changed their dtype (the ``cpu``
    backend computes in bf16 on weights loaded in fp32; a pipeline cast them), the checkpoint's tensors are
    read again (a random init is drawn again from its seed) and written in the dtype they were loaded in,
    so nothing is rounded. That refuses with one error when the checkpoint changed on disk since, or when
    the weights were edited after load (they are not a cast of the loaded ones): ``save(encoder.model, ...)``
    writes the weights exactly as they are now. Encoders running an exported graph (``onnxruntime``,
    ``tensorrt``, ``aoti``) hold no weights and are refused."""
    model = encoder.model if isinstance(encoder, Encoder) else encoder
    if isinstance(model, GraphRunner):
        backend = getattr(encoder, "backend", model.backend)
        raise ConfigError(
            f"fastenc.save: this encoder runs the exported {backend} artifact {model.artifact}, which holds no "
            "weights fastenc can save; save the encoder it was exported from (fastenc.load(CHECKPOINT, "
            "backend='torch')), or copy the export folder itself")
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "config", None), EncoderConfig):
        raise ConfigError(f"fastenc.save takes a fastenc.Encoder or T5Encoder, got {type(encoder).__name__}")
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory).strip():
        raise ConfigError(f"fastenc.save: directory must be a folder path (str or os.PathLike), got {directory!r:.60}")
    on_meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if on_meta is not None:
        raise ConfigError(f"fastenc.save: the encoder's weights are on the meta device ({on_meta}; accelerate's "
                          "sequential offload leaves them there), so there is nothing to save; move it to a device first")
    state = _loaded_state(encoder) if isinstance(encoder, Encoder) else None
    extra = {}
    tok = getattr(encoder, "tokenizer", None)
    if tok is not None:
        extra["tokenizer.json"] = lambda p: tok.backend.save(str(p))
    return weights.save_checkpoint(model, directory, extra_files=extra, state=state)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _loaded_state(encoder: Encoder) -> dict[str, torch.Tensor] | None:
    """The tensors to save for ``encoder``: None for its live parameters (their dtypes are still the ones
    loaded, or nothing is known of the load), else its weights as loaded, read again from the checkpoint
    (drawn again from the seed) after checking the live weights are exactly their cast."""
    origin, model = encoder.origin, encoder.model
    if origin is None:
        return None
    live = dict(model.named_parameters())
    if set(live) != set(origin.dtypes):
        raise ConfigError("fastenc.save: the encoder's parameters are not the ones it was loaded with (modules "
                          "were replaced); save the module as it is with fastenc.save(encoder.model, directory)")
    if all(p.dtype == origin.dtypes[n] for n, p in live.items()):
        return None  # today's behaviour: the live weights are in the dtype they were loaded in
    was, now = _dtype_name(origin.dtypes["embed.weight"]), _dtype_name(live["embed.weight"].dtype)
    why = (f"the encoder's weights were loaded as {was} and are {now} now"
           + (" (the cpu backend computes in bf16)" if encoder.backend == "cpu" else ""))
    load_dtype = origin.dtypes["embed.weight"]
    if origin.kind == "random-init":
        with torch.no_grad():
            rebuilt = _build_random(model.config, torch.device("cpu"), load_dtype, origin.seed)
        original = {n: p.detach() for n, p in rebuilt.named_parameters()}
        what = f"the random init's (seed {origin.seed})"
    else:
        expected = {n: p.shape for n, p in live.items()}
        original = weights.reread_state(origin.path, model.config, expected, dtype=load_dtype,
                                        identity=origin.identity, stats=origin.stats, why=why)
        what = f"the checkpoint's ({origin.path})"
    for name, p in live.items():
        kept = original.get(name)
        if kept is None or kept.dtype != origin.dtypes[name] or kept.shape != p.shape:
            raise CheckpointError(f"fastenc.save: {name} read again is not the tensor loaded ({what})")
        if not torch.equal(kept.to(p.dtype), p.detach().to("cpu")):
            raise ConfigError(
                f"fastenc.save: the encoder's weights changed after load ({name} is not {what} cast to "
                f"{_dtype_name(p.dtype)}: edited, or rounded through another dtype); {why}, so saving them "
                "losslessly would write the weights as loaded, not these. Write the weights as they are with "
                "fastenc.save(encoder.model, directory), or load with backend='torch' (weights kept as loaded) to "
                "edit and save them")
    return original
