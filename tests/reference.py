"""transformers' T5 as the numerical reference, and writers for every checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fastenc.config import EncoderConfig

TINY = EncoderConfig(d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, vocab_size=512,
                     num_buckets=8, max_distance=20, projection_dim=64, name="tiny")


def hf_config(cfg: EncoderConfig):
    from transformers import T5Config

    act = "gelu" if cfg.activation == "gelu_new" else cfg.activation
    return T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_kv, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, layer_norm_epsilon=cfg.eps, dropout_rate=0.0,
        feed_forward_proj=f"gated-{act}" if cfg.gated else act, is_encoder_decoder=False,
        attn_implementation="eager",
    )


class Reference(nn.Module):
    """transformers T5EncoderModel + the DistillT5 projector (final_projection.{0,3})."""

    def __init__(self, cfg: EncoderConfig, seed: int = 0):
        super().__init__()
        from transformers import T5EncoderModel

        torch.manual_seed(seed)
        self.encoder = T5EncoderModel(hf_config(cfg)).eval()
        with torch.no_grad():  # transformers' T5 init, plus norm weights that are not all ones
            for name, p in self.encoder.named_parameters():
                if "layer_norm" in name:
                    p.uniform_(0.5, 1.5)
        self.final_projection = None
        if cfg.projection_dim:
            P = cfg.projection_dim
            self.final_projection = nn.Sequential(
                nn.Linear(cfg.d_model, P, bias=cfg.projector_bias), nn.ReLU(), nn.Dropout(0.1),
                nn.Linear(P, P, bias=cfg.projector_bias),
            ).eval()

    @torch.no_grad()
    def forward(self, ids, mask=None):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.final_projection(h) if self.final_projection is not None else h


def write_distillt5(ref: Reference, cfg: EncoderConfig, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"encoder.{k}": v.contiguous() for k, v in ref.encoder.state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    state.update({f"final_projection.{k}": v.contiguous() for k, v in ref.final_projection.state_dict().items()})
    save_file(state, str(directory / "model.safetensors"))
    hf = ref.encoder.config.to_dict()
    hf.update(architectures=["T5EncoderWithProjection"], project_in_dim=cfg.d_model,
              project_out_dim=cfg.projection_dim, torch_dtype="float32")
    (directory / "config.json").write_text(json.dumps(hf))
    return directory


def write_repacked(ref: Reference, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in ref.encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state.update({f"final_projection.{k}": v.contiguous() for k, v in ref.final_projection.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (elementwise relative error is meaningless near zero)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def cos_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
