"""Checkpoint layouts, streaming safetensors loading, and fastenc's own save format.

Layouts read (detected from the tensor names, never from the path):

* ``distillt5`` — the released DistillT5 layout: transformers ``T5EncoderModel`` keys under
  ``encoder.`` plus ``final_projection.{0,3}.{weight,bias}``;
* ``repacked``  — the same without the outer ``encoder.`` prefix (often a single file);
* ``transformers`` — a plain T5 checkpoint (``T5EncoderModel`` or ``T5ForConditionalGeneration``,
  single-file or sharded with ``model.safetensors.index.json``); decoder weights are ignored;
* ``fastenc`` — :func:`save_checkpoint`'s own names (fused QKV and wi_0|wi_1).

Weights are never unpickled: ``.bin``/``.pt`` checkpoints are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import EncoderConfig
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write

log = logging.getLogger("fastenc")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensors a T5 checkpoint may carry that the encoder does not use.
IGNORED = re.compile(r"^(decoder\.|lm_head\.|encoder\.embed_tokens\.weight$)")


# ---------------------------------------------------------------------------- sources


@dataclass
class TensorSource:
    """Lazily opened safetensors file(s): tensor name -> file."""

    files: dict[str, Path]  # tensor name -> file holding it
    directory: Path | None

    @property
    def keys(self) -> set[str]:
        return set(self.files)


def _check_not_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints are refused (they can run arbitrary code); "
            "convert it to safetensors (e.g. save_pretrained(..., safe_serialization=True))"
        )


def _keys_of(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def open_source(path: Path) -> TensorSource:
    """Index the safetensors file(s) at ``path`` (a file or a checkpoint directory)."""
    if path.is_file():
        _check_not_pickle(path)
        return TensorSource({k: path for k in _keys_of(path)}, None)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc!r})") from None
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {shard.name} is missing")
            listed = {k for k, v in files.items() if v == shard}
            missing = listed - set(_keys_of(shard))
            if missing:
                raise CheckpointError(f"{shard}: lacks {sorted(missing)[0]!r} listed in {INDEX_NAME}")
        return TensorSource(files, path)
    single = path / WEIGHTS_NAME
    candidates = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return TensorSource({k: candidates[0] for k in _keys_of(candidates[0])}, path)
    if len(candidates) > 1:
        raise CheckpointError(f"{path}: several .safetensors files and no {INDEX_NAME}; pass the file itself")
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        _check_not_pickle(path / pickles[0])
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} (or sharded {INDEX_NAME}) found")


# ---------------------------------------------------------------------------- layouts


def detect_layout(keys: Iterable[str]) -> tuple[str, str]:
    """Returns (layout name, prefix of the T5 tensors)."""
    keys = set(keys)
    if "embed.weight" in keys:
        return "fastenc", ""
    if any(k.startswith("encoder.encoder.block.") for k in keys):
        return "distillt5", "encoder."
    if any(k.startswith("encoder.block.") for k in keys):
        has_proj = any(k.startswith("final_projection.") for k in keys)
        return ("repacked" if has_proj else "transformers"), ""
    raise CheckpointError("no T5 encoder tensors found (expected 'encoder.block.0...' or 'embed.weight')")


def key_map(cfg: EncoderConfig, layout: str, prefix: str) -> dict[str, list[str]]:
    """fastenc parameter name -> checkpoint tensor names (concatenated along dim 0 when several)."""
    if layout == "fastenc":
        names = _fastenc_param_names(cfg)
        return {n: [n] for n in names}
    p = prefix
    m: dict[str, list[str]] = {
        "embed.weight": [f"{p}shared.weight"],
        "rel_bias.weight": [f"{p}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
        "final_norm.weight": [f"{p}encoder.final_layer_norm.weight"],
    }
    for i in range(cfg.num_layers):
        b = f"{p}encoder.block.{i}.layer"
        m[f"blocks.{i}.attn_norm.weight"] = [f"{b}.0.layer_norm.weight"]
        m[f"blocks.{i}.attn.qkv.weight"] = [f"{b}.0.SelfAttention.{n}.weight" for n in "qkv"]
        m[f"blocks.{i}.attn.o.weight"] = [f"{b}.0.SelfAttention.o.weight"]
        m[f"blocks.{i}.ffn_norm.weight"] = [f"{b}.1.layer_norm.weight"]
        wi = ["wi_0", "wi_1"] if cfg.gated else ["wi"]
        m[f"blocks.{i}.ffn.wi.weight"] = [f"{b}.1.DenseReluDense.{n}.weight" for n in wi]
        m[f"blocks.{i}.ffn.wo.weight"] = [f"{b}.1.DenseReluDense.wo.weight"]
    if cfg.projection_dim:
        for ours, theirs in (("fc1", "0"), ("fc2", "3")):
            m[f"projector.{ours}.weight"] = [f"final_projection.{theirs}.weight"]
            if cfg.projector_bias:
                m[f"projector.{ours}.bias"] = [f"final_projection.{theirs}.bias"]
    return m


def _fastenc_param_names(cfg: EncoderConfig) -> list[str]:
    from .model import T5Encoder

    with torch.device("meta"):
        return [n for n, _ in T5Encoder(cfg).named_parameters()]


def infer_config(source: TensorSource, layout: str, prefix: str) -> EncoderConfig:
    """Derive a config from tensor shapes (for single-file checkpoints shipped without config.json)."""
    keys = source.keys
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def shape(key: str) -> list[int]:
            f = source.files[key]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, framework="pt"))
            return list(handles[f].get_slice(key).get_shape())

        if layout == "fastenc":
            raise CheckpointError("fastenc checkpoints carry a config.json; it is missing")
        p = prefix
        vocab, d_model = shape(f"{p}shared.weight")
        num_layers = len({int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(p)}encoder\.block\.(\d+)\.", k))})
        num_buckets, heads = shape(f"{p}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner = shape(f"{p}encoder.block.0.layer.0.SelfAttention.q.weight")[0]
        gated = f"{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
        d_ff = shape(f"{p}encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
        proj = shape("final_projection.3.weight")[0] if "final_projection.3.weight" in keys else None
    return EncoderConfig(
        d_model=d_model, d_ff=d_ff, num_layers=num_layers, num_heads=heads, d_kv=inner // heads,
        vocab_size=vocab, num_buckets=num_buckets, gated=gated, activation="gelu_new" if gated else "relu",
        projection_dim=proj, projector_bias="final_projection.0.bias" in keys,
    )


# ---------------------------------------------------------------------------- loading


def resolve_checkpoint(checkpoint: str | os.PathLike, *, subfolder: str | None = None) -> Path:
    """A local file/directory, or a hub id downloaded (safetensors and json only) when online."""
    path = Path(checkpoint)
    if path.exists():
        return path / subfolder if subfolder else path
    text = str(checkpoint)
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", text):
        raise CheckpointError(f"{text}: no such file or directory")
    from .hub import download_checkpoint  # offline: fails at once, naming the `hf download` command

    return download_checkpoint(text, subfolder=subfolder)


def read_config(path: Path, source: TensorSource, layout: str, prefix: str) -> EncoderConfig:
    directory = path if path.is_dir() else path.parent
    cfg_file = directory / CONFIG_NAME
    if cfg_file.is_file():
        cfg = EncoderConfig.from_json_file(cfg_file)
        if layout in ("distillt5", "repacked") and cfg.projection_dim is None and "final_projection.3.weight" in source.keys:
            cfg = cfg.replace(projection_dim=infer_config(source, layout, prefix).projection_dim)
        if layout == "transformers":
            cfg = cfg.replace(projection_dim=None)
        return cfg
    return infer_config(source, layout, prefix)


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """fp16 models keep the FFN output projections in fp32 (T5 overflows fp16 there)."""
    if dtype == torch.float16 and name.endswith("ffn.wo.weight"):
        return torch.float32
    return dtype


def load_state_dict(
    source: TensorSource,
    cfg: EncoderConfig,
    layout: str,
    prefix: str,
    expected: dict[str, torch.Size],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Stream tensors one parameter at a time, converted to ``dtype`` on ``device``."""
    mapping = key_map(cfg, layout, prefix)
    if "embed.weight" in mapping and mapping["embed.weight"][0] not in source.files:
        alt = f"{prefix}encoder.embed_tokens.weight"
        if alt in source.files:
            mapping["embed.weight"] = [alt]
    used = {k for names in mapping.values() for k in names}
    unexpected = sorted(k for k in source.keys - used if not IGNORED.match(k[len(prefix):] if k.startswith(prefix) else k))
    if unexpected:
        raise CheckpointError(
            f"{source.files[unexpected[0]]}: unexpected key {unexpected[0]!r}"
            + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f" for a {cfg.num_layers}-layer config"
        )
    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def get(key: str) -> torch.Tensor:
            if key not in source.files:
                where = source.directory or next(iter(source.files.values()), "checkpoint")
                raise CheckpointError(f"{where}: missing key {key!r}")
            f = source.files[key]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, framework="pt"))
            try:
                return handles[f].get_tensor(key)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{f}: cannot read {key!r} ({exc})") from None

        for name, keys in mapping.items():
            parts = [get(k) for k in keys]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            if tensor.shape != expected[name]:
                raise CheckpointError(
                    f"{source.files[keys[0]]}: {'+'.join(keys)} has shape {list(tensor.shape)}, "
                    f"the config expects {list(expected[name])}"
                )
            state[name] = tensor.to(device=device, dtype=param_dtype(name, dtype))
            del parts, tensor
    return state


def save_checkpoint(model, directory: str | os.PathLike, *, extra_files: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """Write fastenc's format: config.json + model.safetensors, each to a temporary name, then renamed."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().to("cpu").contiguous() for n, p in model.state_dict().items()}
    config = model.config.to_hf_dict()
    config["fastenc"]["layout"] = "fastenc"
    config["torch_dtype"] = str(model.compute_dtype).removeprefix("torch.")

    def write(name: str, writer: Callable[[Path], None]) -> None:
        atomic_write(directory / name, writer)

    write(WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt", "layout": "fastenc"}))
    write(CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    for name, writer in (extra_files or {}).items():
        write(name, writer)
    return directory


def check_config_matches(cfg: EncoderConfig, size_cfg: EncoderConfig, where: Path) -> None:
    for field in ("d_model", "d_ff", "num_layers", "num_heads"):
        if getattr(cfg, field) != getattr(size_cfg, field):
            raise ConfigError(
                f"{where}: {field}={getattr(cfg, field)} but size {size_cfg.name!r} has {getattr(size_cfg, field)}"
            )
