"""Tiny checkpoints written without transformers (fast): fastenc's random init saved in the DistillT5
layout (``encoder.``-prefixed T5 names + ``final_projection``), single-file or sharded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastenc.api import _build_random
from fastenc.config import EncoderConfig
from fastenc.weights import key_map

MICRO = EncoderConfig(d_model=16, d_ff=24, num_layers=2, num_heads=2, d_kv=8, vocab_size=320, num_buckets=8,
                      max_distance=16, projection_dim=16, name="micro")


def distillt5_state(cfg: EncoderConfig = MICRO, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random-init weights under the DistillT5 tensor names (fused QKV / wi split back into parts)."""
    model = _build_random(cfg, torch.device("cpu"), torch.float32, seed)
    params = dict(model.named_parameters())
    state = {}
    for ours, theirs in key_map(cfg, "distillt5", "encoder.").items():
        for name, part in zip(theirs, params[ours].detach().chunk(len(theirs), 0)):
            state[name] = part.contiguous().clone()
    return state


def write_checkpoint(directory: Path, cfg: EncoderConfig = MICRO, seed: int = 0, *, shards: int = 1) -> Path:
    """``directory/{config.json, model.safetensors}`` (or ``shards`` files + model.safetensors.index.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = distillt5_state(cfg, seed)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"))
        return directory
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(directory / shard))
        weight_map.update({n: shard for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory
