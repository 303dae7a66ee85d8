"""``T5Replacement``: a fastenc :class:`~fastenc.Encoder` behind the interface diffusers expects of T5.

Diffusers pipelines call their T5 slot as ``text_encoder(input_ids, attention_mask=...)`` (some add
``output_hidden_states=False``), read ``[0]`` or ``.last_hidden_state``, cast the result to
``text_encoder.dtype`` and place inputs on ``text_encoder.device``. ``DiffusionPipeline.from_pretrained``
only accepts a passed-in component for a slot declared as a transformers model if it subclasses
``transformers.PreTrainedModel``, so the adapter does; it owns no transformers layers, only the
fastenc encoder (an ``nn.Module``, so ``pipe.to`` and accelerate's offload hooks move it).
Diffusers still logs "Expected types for text_encoder_2: T5EncoderModel" when one is passed in; that
check only warns.

What the adapter reports is what the pipeline gets; what the encoder reports is what is computed:

* ``adapter.dtype`` / ``adapter.device``: the dtype and device of the embeddings handed to the pipeline
  (the last ``.to(...)`` the pipeline asked for); ``adapter.encoder.dtype`` / ``.device`` / ``.backend``:
  where and in what precision they are computed. They differ when the encoder keeps its ``cpu`` fast
  path (bf16 + int8) inside an fp32 pipeline, and when it is pinned.
* ``T5Replacement(encoder, keep_on="cpu")`` pins the encoder: ``pipe.to("cuda")`` and offload hooks
  leave it where it is (its op table stays), ids arriving on CUDA are copied over, and the embeddings
  go back on the ids' device in the pipeline's dtype, so the text encoder takes no GPU memory.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel  # PreTrainedModel must be a module-level name:
from transformers.modeling_outputs import BaseModelOutput  # diffusers looks it up here to pick the load method

from ..api import Encoder, load, parse_dtype, save
from ..errors import ConfigError, InputError
from ..inputs import check_device

log = logging.getLogger("fastenc")

__all__ = ["T5Replacement", "T5ReplacementConfig"]


class T5ReplacementConfig(PretrainedConfig):
    """Describes the adapter: ``hidden_size`` is the width of ``last_hidden_state`` (the projection dim)."""

    model_type = "fastenc"

    def __init__(self, hidden_size: int = 4096, vocab_size: int = 32128, encoder: dict | None = None, **kwargs):
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.encoder = encoder or {}  # fastenc EncoderConfig as a transformers-style T5 dict
        super().__init__(**kwargs)


class T5Replacement(PreTrainedModel):
    """Wraps a fastenc encoder so it can sit in a diffusers pipeline's T5 slot.

    ``forward(input_ids [B, L], attention_mask [B, L] | None)`` returns a ``BaseModelOutput`` whose
    ``last_hidden_state`` (also ``[0]``) holds the projected embeddings ``[B, L, P]`` in ``self.dtype``.
    The mask is used when the pipeline passes one (PixArt) and not otherwise (Flux, SD3), as with T5.
    """

    config_class = T5ReplacementConfig
    base_model_prefix = "fastenc"
    main_input_name = "input_ids"

    def __init__(self, encoder: Encoder, *, keep_on: str | torch.device | None = None):
        if not isinstance(encoder, Encoder):
            raise ConfigError(f"T5Replacement wraps a fastenc.Encoder (from fastenc.load), "
                              f"got {type(encoder).__name__}")
        cfg = encoder.config
        super().__init__(T5ReplacementConfig(hidden_size=cfg.output_dim, vocab_size=cfg.vocab_size,
                                             encoder=cfg.to_hf_dict()))
        self.encoder = encoder
        self._out_dtype: torch.dtype | None = None  # dtype the pipeline asked for (None: the encoder's)
        self._out_device: torch.device | None = None  # device the pipeline asked for, when pinned
        self.keep_on: torch.device | None = None
        if keep_on is not None:
            self.pin(keep_on)

    def pin(self, device: str | torch.device | None) -> "T5Replacement":
        """Keep the encoder on ``device`` whatever the pipeline is moved to (``None`` unpins)."""
        if device is None:
            self.keep_on = None
            self._out_device = None
            return self
        device = check_device(device, "keep_on/pin_device", "pin to 'cpu'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.keep_on = device
        self.encoder.to(device)
        log.info("fastenc encoder pinned to %s (%s backend, %s): pipeline moves leave it there", device,
                 self.encoder.backend, str(self.encoder.dtype).removeprefix("torch."))
        return self

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the fastenc checkpoint; transformers' initialisation must never touch them."""

    # ---- what pipelines read ----------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the embeddings handed to the pipeline (``encoder.dtype`` is the one computed in)."""
        return self._out_dtype or self.encoder.dtype

    @property
    def device(self) -> torch.device:
        """Device the pipeline placed this component on (pinned: where ``pipe.to`` asked, the encoder
        itself stays on ``keep_on``; ``encoder.device`` is where it computes)."""
        if self.keep_on is not None:
            return self._out_device or self.keep_on
        return self.encoder.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def projection_dim(self) -> int:
        """Width of the embeddings handed to the diffusion transformer."""
        return self.encoder.config.output_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput | tuple[torch.Tensor]:
        if inputs_embeds is not None:
            raise InputError("T5Replacement takes input_ids, not inputs_embeds")
        if output_attentions or output_hidden_states:
            flag = "output_attentions" if output_attentions else "output_hidden_states"
            raise InputError(f"T5Replacement returns only the final projected embeddings; {flag}=True is not supported")
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise InputError(f"T5Replacement.forward got unsupported arguments: {', '.join(unknown)}")
        if self.encoder.device.type == "meta":
            raise ConfigError("the fastenc encoder's weights are on the meta device (accelerate's sequential CPU "
                              "offload does that: fastenc's ops read weights directly, so its per-layer hooks "
                              "never load them); use pipe.enable_model_cpu_offload() or use_in_pipeline(..., "
                              "pin_device='cpu') instead")
        embeds = self.encoder(input_ids, attention_mask)  # [B, L, P] on the encoder's device
        embeds = embeds.to(device=input_ids.device, dtype=self.dtype)  # back where the ids came from
        if return_dict is False:
            return (embeds,)
        return BaseModelOutput(last_hidden_state=embeds)

    # ---- dtype / device moves (fp16 keeps T5's FFN output projection in fp32) --------------

    def to(self, *args: Any, **kwargs: Any) -> "T5Replacement":
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        non_blocking = bool(kwargs.pop("non_blocking", False))
        if kwargs:
            raise InputError(f"T5Replacement.to got unsupported arguments: {', '.join(sorted(kwargs))}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, torch.Tensor):
                device, dtype = arg.device, arg.dtype
            elif arg is not None:
                device = arg
        if device is not None:
            device = torch.device(device)
            if self.keep_on is not None:
                self._out_device = device  # pinned: the encoder stays; only the reported device follows
            else:
                self.encoder.to(device)  # the encoder re-selects its op table / CUDA graphs for the device
        if dtype is not None:
            dtype = parse_dtype(dtype, self.encoder.device)
            self._out_dtype = dtype
            if self.keep_on is None:  # pinned encoders keep the precision they were loaded with
                self.encoder.cast(dtype)  # fp16 keeps wo in fp32; the cpu fast path stays bf16 (and says so)
            if self.encoder.dtype != dtype:
                log.info("fastenc encoder computes in %s on %s (%s backend) and hands %s embeddings to the "
                         "pipeline", str(self.encoder.dtype).removeprefix("torch."), self.encoder.device,
                         self.encoder.backend, str(dtype).removeprefix("torch."))
        return self

    def cuda(self, device: int | torch.device | None = None) -> "T5Replacement":
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self) -> "T5Replacement":
        return self.to("cpu")

    def _apply(self, fn, recurse: bool = True):
        if self.keep_on is not None:  # a pinned encoder is moved and cast by nothing but pin()
            return self
        return super()._apply(fn, recurse)

    def half(self) -> "T5Replacement":
        return self.to(torch.float16)

    def bfloat16(self) -> "T5Replacement":
        return self.to(torch.bfloat16)

    def float(self) -> "T5Replacement":
        return self.to(torch.float32)

    # ---- save / load, so pipe.save_pretrained and DiffusionPipeline.from_pretrained round-trip ----

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the encoder in fastenc's format (config.json + model.safetensors [+ tokenizer.json]) through
        :func:`fastenc.save`: its weights as loaded, bit for bit, even after the pipeline's dtype or the ``cpu``
        backend cast them (and one error, not a stale or rounded copy, when that cannot be done)."""
        if kwargs:
            log.debug("T5Replacement.save_pretrained ignores %s", ", ".join(sorted(kwargs)))
        save(self.encoder, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        subfolder: str | None = None,
        keep_on: str | torch.device | None = None,
        **kwargs: Any,
    ) -> "T5Replacement":
        """Load any checkpoint ``fastenc.load`` reads. Diffusers' loader options (device_map,
        low_cpu_mem_usage, variant, ...) do not apply and are ignored; the encoder loads on the CPU
        unless ``device`` says otherwise, as diffusers components do before ``pipe.to(...)``."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ConfigError(f"pass dtype or torch_dtype, not both ({dtype} vs {torch_dtype})")
        ignored = sorted(k for k, v in kwargs.items() if v is not None)
        if ignored:
            log.debug("T5Replacement.from_pretrained ignores %s", ", ".join(ignored))
        # diffusers loads components in fp32 unless told otherwise; so does the adapter
        encoder = load(pretrained_model_name_or_path, dtype=dtype or torch_dtype or torch.float32, device=device or "cpu",
                       backend=backend, subfolder=subfolder)
        return cls(encoder, keep_on=keep_on)
