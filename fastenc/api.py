"""Public API: ``load``, ``save``, :class:`Encoder` and :class:`Embeddings`."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import weights
from .backends import op_table, resolve_backend
from .backends.graph import GRAPH_BACKENDS
from .backends.placement import FollowsWeights
from .cache import EmbeddingCache, key as cache_key
from .config import TARGET_MAX_LENGTH, EncoderConfig, get_size, max_length_for
from .errors import ConfigError, InputError
from .model import T5Encoder

log = logging.getLogger("fastenc")

#: Targets whose pipelines pass the attention mask to T5 (Flux and SD3 encode padding too).
MASKED_TARGETS = frozenset({"pixart-alpha"})
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class Embeddings:
    embeds: torch.Tensor  # [B, L, P]
    mask: torch.Tensor  # [B, L] (1 = token incl. EOS, 0 = padding)
    num_truncated: int = 0


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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

    def __init__(self, model: T5Encoder, *, backend: str = "torch", tokenizer=None, source: str = "random-init",
                 random_init: bool = False, cache: EmbeddingCache | None = None, graphs: nn.Module | None = None,
                 requested_backend: str | None = None, cuda_graphs: bool = True, plan_source: str | None = None):
        super().__init__()
        self.model = model
        self._setup_following(backend, requested_backend or backend, cuda_graphs=cuda_graphs, graphs=graphs,
                              plan_source=plan_source)
        self.tokenizer = tokenizer
        self.source = source
        self.random_init = random_init
        self.cache = cache

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
        text = f"{self.source}|{self.config}|{self.dtype}|{self.backend}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def extra_repr(self) -> str:
        kind = "RANDOM-INIT weights (not a trained encoder)" if self.random_init else f"weights from {self.source}"
        return f"size={self.config.name}, backend={self.backend}, dtype={self.dtype}, device={self.device}, {kind}"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise InputError(f"input_ids must be a 2-D tensor [B, L], got {type(input_ids).__name__} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        if input_ids.dtype.is_floating_point:
            raise InputError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.device.type == "cpu" and input_ids.numel() and (  # no device sync on GPU inputs
                int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise InputError(f"input_ids out of range [0, {self.config.vocab_size}): "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        ids = input_ids.to(self.device, torch.long)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return self._forward_placed(ids, mask)  # op table + CUDA graphs follow the weights (backends/placement.py)

    @torch.inference_mode()
    def encode(self, prompts: str | Sequence[str], target: str = "flux-dev") -> Embeddings:
        """Tokenise like the target pipeline does and encode; repeated prompts come from the cache."""
        max_length = max_length_for(target)
        if self.tokenizer is None:
            raise ConfigError("this encoder has no tokenizer: pass tokenizer=FOLDER_OR_HUB_ID to fastenc.load "
                              "(e.g. a folder with tokenizer.json, or Flux's tokenizer_2 folder)")
        batch = self.tokenizer(prompts, max_length=max_length)
        ids, mask = batch.input_ids, batch.attention_mask  # [B, L]
        B, L = ids.shape
        embeds: list[torch.Tensor | None] = [None] * B
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        keys = [cache_key(self.fingerprint, target, str(self.dtype), p) for p in texts] \
            if self.cache is not None else [None] * B
        todo = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if key is not None else None
            if hit is not None:
                embeds[i] = hit[0].to(self.device)
            else:
                todo.append(i)
        if todo:
            sel = torch.tensor(todo)
            out = self(ids[sel], mask[sel] if target in MASKED_TARGETS else None)  # [b, L, P]
            for j, i in enumerate(todo):
                embeds[i] = out[j]
                if keys[i] is not None:
                    self.cache.put(keys[i], out[j], mask[i])
        return Embeddings(torch.stack(embeds), mask.to(self.device), batch.num_truncated)


def _build_random(cfg: EncoderConfig, device: torch.device, dtype: torch.dtype, seed: int) -> T5Encoder:
    with torch.device("meta"):
        model = T5Encoder(cfg)
    model.to_empty(device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            fan_in = p.shape[1] if p.dim() == 2 and not name.startswith(("embed", "rel_bias")) else cfg.d_model
            std = 1.0 if name == "embed.weight" else fan_in**-0.5
            if name.endswith("bias"):
                std = 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for block in model.blocks:  # T5 scales queries by d_kv**-0.5 at init (no 1/sqrt(d) in attention)
            block.attn.qkv.weight[: cfg.inner_dim].mul_(cfg.d_kv**-0.5)
    return model.cast(dtype)


def _load_weights(path: Path, size: str | None, device: torch.device, dtype: torch.dtype) -> T5Encoder:
    source = weights.open_source(path)
    layout, prefix = weights.detect_layout(source.keys)
    cfg = weights.read_config(path, source, layout, prefix)
    if size is not None:
        weights.check_config_matches(cfg, get_size(size), path)
        cfg = cfg.replace(name=size)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    expected = {n: p.shape for n, p in model.named_parameters()}
    state = weights.load_state_dict(source, cfg, layout, prefix, expected, dtype=dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    log.info("loaded %s checkpoint (%s layout) from %s", cfg.name, layout, path)
    return model


def _find_tokenizer(tokenizer, checkpoint_dir: Path | None):
    if tokenizer is None:
        if checkpoint_dir is None:
            return None
        for sub in ("", "tokenizer_2", "tokenizer"):
            if (checkpoint_dir / sub / "tokenizer.json").is_file():
                from .tokenizer import Tokenizer

                return Tokenizer.from_pretrained(checkpoint_dir / sub)
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        from .tokenizer import Tokenizer

        return Tokenizer.from_pretrained(tokenizer)
    return tokenizer


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
    if backend in GRAPH_BACKENDS:
        return _load_artifact(checkpoint, backend, device, dtype, tokenizer, random_init, cache)
    dev = default_device(device)
    requested = None if dtype is None else parse_dtype(dtype, dev)
    name = resolve_backend(backend, dev, requested)
    dt = parse_dtype(dtype, dev)
    if name == "cpu":
        if dev.type != "cpu":
            raise ConfigError(f"backend 'cpu' runs on the CPU, not {dev}; pass device='cpu'")
        if requested not in (None, torch.bfloat16):
            raise ConfigError(f"backend 'cpu' computes in bf16 (with int8 GEMMs), not {requested}; "
                              "pass dtype='bf16' or leave it out, or use backend='torch'")
        dt = torch.float32  # loaded in fp32: the int8 plan is checked against it, then cast to bf16
    if checkpoint is None and not random_init and size is not None:  # size="base": the released base student
        from .hub import released_checkpoint

        checkpoint = released_checkpoint(get_size(size).name)
    if random_init == (checkpoint is not None):
        raise ConfigError("pass either a checkpoint (path or hub id) or random_init=True with size=...")
    if random_init:
        cfg = get_size(size or "base")
        model = _build_random(cfg, dev, dt, seed)
        source, ckpt_dir = f"random-init:{cfg.name}:seed{seed}", None
        log.warning("fastenc: %s encoder with RANDOM weights (benchmarking only, not a trained model)", cfg.name)
    else:
        path = weights.resolve_checkpoint(checkpoint, subfolder=subfolder)
        model = _load_weights(path, size, dev, dt)
        source, ckpt_dir = str(path.resolve()), (path if path.is_dir() else path.parent)
    plan_source = None
    if name == "cpu":
        from .backends.cpu import prepare, source_fingerprint

        plan_source = source if random_init else source_fingerprint(path)
        prepare(model, source=plan_source)
    else:
        model.ops = op_table(name, dev)
    model.eval()
    emb_cache = cache if isinstance(cache, EmbeddingCache) else (EmbeddingCache() if cache else None)
    # the encoder owns the CUDA-graph runner and re-selects op table and graphs when its weights move
    return Encoder(model, backend=name, tokenizer=_find_tokenizer(tokenizer, ckpt_dir), source=source,
                   random_init=random_init, cache=emb_cache, requested_backend=backend, cuda_graphs=cuda_graphs,
                   plan_source=plan_source)


def _load_artifact(directory, backend: str, device, dtype, tokenizer, random_init: bool, cache) -> Encoder:
    from .backends.graph import exported_from_random_init, load_artifact

    if random_init or directory is None:
        raise ConfigError(f"backend {backend!r} runs an exported artifact: pass the directory `fastenc export` wrote")
    path = Path(directory)
    runner, _ = load_artifact(path, backend, device, dtype)
    emb_cache = cache if isinstance(cache, EmbeddingCache) else (EmbeddingCache() if cache else None)
    return Encoder(runner.eval(), backend=backend, tokenizer=_find_tokenizer(tokenizer, path),
                   source=str(runner.artifact.resolve()), random_init=exported_from_random_init(path), cache=emb_cache)


def save(encoder: Encoder | T5Encoder, directory: str | os.PathLike) -> Path:
    """Save in fastenc's format (config.json + model.safetensors [+ tokenizer.json]); atomic per file."""
    model = encoder.model if isinstance(encoder, Encoder) else encoder
    extra = {}
    tok = getattr(encoder, "tokenizer", None)
    if tok is not None:
        extra["tokenizer.json"] = lambda p: tok.backend.save(str(p))
    return weights.save_checkpoint(model, directory, extra_files=extra)
