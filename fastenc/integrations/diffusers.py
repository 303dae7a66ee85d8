"""Put a fastenc encoder into a diffusers pipeline's T5 (or umT5) slot: every pipeline family that has a
row in :data:`fastenc.targets.TARGETS` (Flux, SD3 / SD3.5, PixArt-α / Σ, Chroma, Wan, LTX-Video,
CogVideoX, Mochi), found along the pipeline class's MRO.

The pipeline itself is left as it is: its own T5 tokenizer still produces the ids, and it calls the
encoder exactly as it called T5 (with the attention mask or without, as its row says).

    pipe = FluxPipeline.from_pretrained(repo, text_encoder_2=T5Replacement(encoder), torch_dtype=torch.bfloat16)
    # or, on a loaded pipeline:
    use_in_pipeline(pipe, encoder)
    # the text encoder off the GPU, on purpose (its CPU fast path; no GPU memory for text encoding):
    use_in_pipeline(pipe, encoder, pin_device="cpu"); pipe.to("cuda")
"""

from __future__ import annotations

import logging

from torch import nn

from ..api import Encoder
from ..errors import ConfigError
from ..targets import TARGETS, Target
from .text_encoder import T5Replacement

log = logging.getLogger("fastenc")

__all__ = ["T5_SLOTS", "find_t5_slot", "pipeline_target", "expected_embedding_dims", "use_in_pipeline"]

#: (pipeline class-name prefix, T5 encoder slot, its tokenizer slot), from the target table.
T5_SLOTS: tuple[tuple[str, str, str], ...] = tuple(dict.fromkeys(
    (prefix, t.encoder_slot, t.tokenizer_slot) for t in TARGETS.values() for prefix in t.pipelines))
#: Config fields giving the text width a denoiser expects (checked all, for a pipeline without a row).
DIM_FIELDS = tuple(dict.fromkeys(t.width_field for t in TARGETS.values()))
DENOISER_SLOTS = ("transformer", "transformer_2", "controlnet")  # transformer_2: Wan 2.2's low-noise expert
T5_MODEL_TYPES = frozenset({"t5", "mt5", "umt5", "fastenc"})


def _tokenizer_slot(encoder_slot: str) -> str:
    return "tokenizer" + encoder_slot.removeprefix("text_encoder")


def _may_hold_t5(module) -> bool:
    """False only for a slot that holds another kind of text model (LTX-2's Gemma in an ``LTX*`` pipeline)."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return not isinstance(model_type, str) or model_type in T5_MODEL_TYPES


def pipeline_target(pipe) -> Target | None:
    """The :class:`~fastenc.targets.Target` row serving ``pipe`` (its class or a base class matches a row's
    prefix, and the row's slot is there holding T5, umT5, fastenc or nothing yet), None for none."""
    components = pipe.components
    for cls in type(pipe).__mro__:
        for row in TARGETS.values():
            if (any(cls.__name__.startswith(prefix) for prefix in row.pipelines) and row.encoder_slot in components
                    and _may_hold_t5(components[row.encoder_slot])):
                return row
    return None


def find_t5_slot(pipe) -> tuple[str, str]:
    """``(encoder slot, tokenizer slot)`` holding T5 in ``pipe``; ConfigError when there is none."""
    row = pipeline_target(pipe)
    if row is not None:
        return row.encoder_slot, row.tokenizer_slot
    components = pipe.components
    holding_t5 = [name for name, module in components.items() if name.startswith("text_encoder")
                  and getattr(getattr(module, "config", None), "model_type", None) in T5_MODEL_TYPES]
    if len(holding_t5) == 1:
        return holding_t5[0], _tokenizer_slot(holding_t5[0])
    known = ", ".join(f"{prefix}*: {enc}" for prefix, enc, _ in T5_SLOTS)
    raise ConfigError(f"cannot tell which component of {type(pipe).__name__} is its T5 text encoder "
                      f"(known: {known}); pass slot='text_encoder_N'")


def expected_embedding_dims(pipe) -> list[tuple[str, int]]:
    """``[(where, width)]``: the embedding widths the pipeline's transformers and controlnets expect (the
    config attribute its target row names; all of :data:`DIM_FIELDS` for a pipeline without a row)."""
    row = pipeline_target(pipe)
    fields = (row.width_field,) if row is not None else DIM_FIELDS
    dims = []
    for name in DENOISER_SLOTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        nets = getattr(module, "nets", None)  # multi-controlnet wrappers hold a ModuleList of nets
        members = [(f"{name}.nets[{i}]", net) for i, net in enumerate(nets)] if nets is not None else [(name, module)]
        for where, net in members:
            cfg = getattr(net, "config", None)
            for field in fields:
                value = getattr(cfg, field, None)
                if isinstance(value, int):
                    dims.append((f"{where}.config.{field}", value))
    return dims


def use_in_pipeline(pipe, encoder: Encoder | T5Replacement, *, slot: str | None = None, match_dtype: bool = True,
                    pin_device: str | None = None):
    """Replace the T5 text encoder of ``pipe`` with ``encoder``; returns ``pipe``.

    Checks before changing anything: the encoder's projection dim equals every width the transformer
    (and controlnets) expect, the pipeline still has its T5 tokenizer, and that tokenizer's ids fit the
    encoder's vocabulary. With ``match_dtype`` the embeddings are handed over in the transformer's dtype
    (the pipelines feed the transformer embeddings in the text encoder's dtype); the encoder itself is
    cast too, except that the ``cpu`` fast path stays bf16 + int8 (``adapter.encoder.dtype`` says so).

    ``pin_device="cpu"`` keeps the encoder on the CPU (its fast path) whatever the pipeline is moved to:
    ``pipe.to("cuda")`` and offload hooks leave it there, ids come in on CUDA and embeddings go back there.
    """
    if not isinstance(encoder, (Encoder, T5Replacement)):
        raise ConfigError(f"use_in_pipeline takes a fastenc.Encoder or T5Replacement, got {type(encoder).__name__}")
    enc = encoder.encoder if isinstance(encoder, T5Replacement) else encoder
    name = type(pipe).__name__
    if slot is None:
        slot, tok_slot = find_t5_slot(pipe)
    elif slot not in pipe.components:
        raise ConfigError(f"{name} has no component {slot!r}; its components: {', '.join(pipe.components)}")
    else:
        tok_slot = _tokenizer_slot(slot)

    dim = enc.config.output_dim
    for where, want in expected_embedding_dims(pipe):
        if want != dim:
            raise ConfigError(f"the fastenc encoder projects to {dim} dims but {name}.{where} is {want}; "
                              f"use a checkpoint whose projection dim is {want}")
    tokenizer = getattr(pipe, tok_slot, None)
    if tokenizer is None:
        raise ConfigError(f"{name}.{tok_slot} is None: the pipeline's T5 tokenizer produces the ids the encoder "
                          f"reads; load the pipeline with its {tok_slot}")
    vocab = enc.config.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"{name}.{tok_slot} has {len(tokenizer)} tokens but the fastenc encoder's vocab_size "
                          f"is {vocab}; it needs the T5 vocabulary the encoder was trained with")

    adapter = encoder if isinstance(encoder, T5Replacement) else T5Replacement(encoder)
    if pin_device is not None:
        adapter.pin(pin_device)
    old = getattr(pipe, slot, None)
    if old is not None and any(hasattr(m, "_hf_hook") for m in old.modules()):
        log.warning("%s.%s had offload hooks; call enable_model_cpu_offload() again so the fastenc encoder "
                    "gets them too", name, slot)
    transformer = getattr(pipe, "transformer", None)
    if pin_device is not None and isinstance(transformer, nn.Module):
        adapter._out_device = transformer.device  # embeddings go where the pipeline runs
    if match_dtype and isinstance(transformer, nn.Module) and transformer.dtype != adapter.dtype:
        log.info("handing %s.transformer %s embeddings (the fastenc encoder computes in %s, %s backend)", name,
                 transformer.dtype, adapter.encoder.dtype, adapter.encoder.backend)
        adapter.to(transformer.dtype)
    pipe.register_modules(**{slot: adapter})
    log.info("%s.%s is now fastenc %s (%d-dim embeddings)", name, slot, adapter.encoder.config.name, dim)
    return pipe
