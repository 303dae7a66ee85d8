"""Checkpoint layouts, streaming safetensors loading, and fastenc's own save format.

Layouts read (detected from the tensor names, never from the path):

* ``distillt5`` — the released DistillT5 layout: transformers ``T5EncoderModel`` keys under
  ``encoder.`` plus ``final_projection.{0,3}.{weight,bias}``;
* ``repacked``  — the same without the outer ``encoder.`` prefix (often a single file);
* ``transformers`` — a plain T5 checkpoint (``T5EncoderModel`` or ``T5ForConditionalGeneration``,
  single-file or sharded with ``model.safetensors.index.json``); decoder weights are ignored. A umT5
  checkpoint (``UMT5EncoderModel``, ``model_type: umt5``; e.g. a diffusers pipeline's ``text_encoder/``)
  has the same names plus a relative-attention-bias table in every block, read into
  ``EncoderConfig.per_layer_bias``;
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
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MAX_PROJECTION_DIM, MODEL_TYPES, EncoderConfig, read_json_object
from .errors import CheckpointError, ConfigError, is_out_of_memory, out_of_memory
from .fileio import (atomic_write, check_utf8_path, content_identity, looks_local, missing_path_message,
                     plain_file_name)
from .inputs import all_finite

log = logging.getLogger("fastenc")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensors a T5 checkpoint may carry that the encoder does not use.
#: safetensors dtypes accepted for weights (converted to the compute dtype on load).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
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


def open_safetensors(file: Path):
    """``safe_open`` with every failure turned into one :class:`CheckpointError` naming the file."""
    try:
        return safe_open(file, framework="pt")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{file}: is a directory, not a safetensors file") from None
    except Exception as exc:  # SafetensorError, OSError, ValueError, ... from the header parser
        if is_out_of_memory(exc):  # the mmap of a valid file did not fit (a memory cap): not a damaged file
            raise out_of_memory(f"mapping {file}", os.path.getsize(file), exc) from None
        raise CheckpointError(f"{file}: not a readable safetensors file ({str(exc)[:200]})") from None


def _keys_of(file: Path) -> list[str]:
    with open_safetensors(file) as f:
        try:
            return list(f.keys())
        except Exception as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({str(exc)[:200]})") from None


def _shard_name(index: Path, tensor: object, shard: object) -> str:
    """A shard name from an index file: a plain file name in the checkpoint folder, nothing else."""
    if not isinstance(tensor, str):
        raise CheckpointError(f"{index}: weight_map keys must be tensor names (strings), got {tensor!r:.60}")
    if not isinstance(shard, str):
        raise CheckpointError(f"{index}: weight_map[{tensor!r:.80}] must be a file name, got {shard!r:.60}")
    if not plain_file_name(shard, ".safetensors"):
        raise CheckpointError(
            f"{index}: weight_map[{tensor!r:.80}] = {shard!r:.80} is not a .safetensors file name in the "
            "checkpoint folder (paths and '..' are refused)")
    return shard


def open_source(path: Path) -> TensorSource:
    """Index the safetensors file(s) at ``path`` (a file or a checkpoint directory)."""
    if path.is_file():
        _check_not_pickle(path)
        return TensorSource({k: path for k in _keys_of(path)}, None)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: key 'weight_map' must be a non-empty object of tensor name -> "
                                  f"shard file name, got {type(weight_map).__name__}")
        files = {name: path / _shard_name(index, name, shard) for name, shard in weight_map.items()}
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
    if (path / "export.json").is_file():  # a folder `fastenc export` wrote: it runs on a graph backend
        raise CheckpointError(export_folder_message(path))
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
    table = "0.SelfAttention.relative_attention_bias.weight"
    m: dict[str, list[str]] = {"embed.weight": [f"{p}shared.weight"]}
    if not cfg.per_layer_bias:  # T5: block 0's table serves every layer
        m["rel_bias.weight"] = [f"{p}encoder.block.0.layer.{table}"]
    m["final_norm.weight"] = [f"{p}encoder.final_layer_norm.weight"]
    for i in range(cfg.num_layers):
        b = f"{p}encoder.block.{i}.layer"
        if cfg.per_layer_bias:  # umT5: every block's own table
            m[f"blocks.{i}.rel_bias.weight"] = [f"{b}.{table}"]
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
    if layout == "fastenc":
        raise CheckpointError(f"{_where(source)}: fastenc checkpoints carry a config.json; it is missing")
    headers = Headers(source)
    p = prefix

    def shape(key: str, rank: int = 2) -> list[int]:
        if key not in source.files:
            raise CheckpointError(f"{_where(source)}: missing key {key!r} (needed to infer the config; "
                                  f"or put a {CONFIG_NAME} beside the weights)")
        dims = headers.shape(key)
        if len(dims) != rank or not all(dims):
            raise CheckpointError(f"{source.files[key]}: {key!r} has shape {dims}, expected {rank} non-zero dims")
        return dims

    try:
        vocab, d_model = shape(f"{p}shared.weight")
        num_layers = len(_block_ids(source, layout, prefix))
        num_buckets, heads = shape(f"{p}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner = shape(f"{p}encoder.block.0.layer.0.SelfAttention.q.weight")[0]
        gated = f"{p}encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in source.keys
        d_ff = shape(f"{p}encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
        proj = shape("final_projection.3.weight")[0] if "final_projection.3.weight" in source.keys else None
        # umT5: a table in block 1 too (with one block, T5 and umT5 are the same model)
        per_layer = f"{p}encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in source.keys
    finally:
        headers.close()
    if inner % heads:
        raise CheckpointError(f"{_where(source)}: q.weight has {inner} rows, not a multiple of the {heads} heads "
                              "of relative_attention_bias.weight")
    try:
        return EncoderConfig(
            d_model=d_model, d_ff=d_ff, num_layers=num_layers, num_heads=heads, d_kv=inner // heads,
            vocab_size=vocab, num_buckets=num_buckets, gated=gated, activation="gelu_new" if gated else "relu",
            projection_dim=proj, projector_bias="final_projection.0.bias" in source.keys, per_layer_bias=per_layer,
        )
    except ConfigError as exc:
        raise CheckpointError(f"{_where(source)}: tensor shapes give an unusable config ({exc})") from None


class Headers:
    """Shapes and dtypes from safetensors headers (no tensor data is read)."""

    def __init__(self, source: TensorSource):
        self.source = source
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(open_safetensors(file))
        return self._handles[file]

    def _slice(self, key: str):
        file = self.source.files[key]
        try:
            return self.handle(file).get_slice(key)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read the header of {key!r} ({str(exc)[:200]})") from None

    def shape(self, key: str) -> list[int]:
        return list(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._slice(key).get_dtype())

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Headers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _where(source: TensorSource) -> Path | str:
    return source.directory or next(iter(source.files.values()), "checkpoint")


def _block_ids(source: TensorSource, layout: str, prefix: str) -> set[str]:
    """Block indices present in the checkpoint (as written; at most 6 digits)."""
    pattern = re.compile(r"blocks\.(\d{1,6})\." if layout == "fastenc" else rf"{re.escape(prefix)}encoder\.block\.(\d{{1,6}})\.")
    return {m.group(1) for k in source.keys if (m := pattern.match(k))}


def check_config(cfg: EncoderConfig, source: TensorSource, layout: str, prefix: str, where: str | Path) -> None:
    """Compare a config (read from ``where``) with the tensors' header shapes, before anything is built.

    Checks the layer count against the blocks present and each dimension against one tensor that carries
    it; the full per-tensor shape check follows in :func:`load_state_dict`. Nothing is allocated here.
    """
    blocks = _block_ids(source, layout, prefix)
    if cfg.num_layers > len(blocks):  # more blocks than configured: reported as unexpected keys on load
        raise CheckpointError(f"{where}: num_layers={cfg.num_layers} but {_where(source)} holds only "
                              f"{len(blocks)} encoder blocks")
    p, inner, ffn_rows = prefix, cfg.inner_dim, (2 if cfg.gated else 1) * cfg.d_ff
    if layout == "fastenc":
        wanted = [
            ("embed.weight", [cfg.vocab_size, cfg.d_model], "vocab_size, d_model"),
            ("blocks.0.rel_bias.weight" if cfg.per_layer_bias else "rel_bias.weight", [cfg.num_buckets, cfg.num_heads],
             "relative_attention_num_buckets, num_heads"),
            ("blocks.0.attn.qkv.weight", [3 * inner, cfg.d_model], "3*num_heads*d_kv, d_model"),
            ("blocks.0.ffn.wi.weight", [ffn_rows, cfg.d_model], "d_ff (x2 when gated), d_model"),
        ]
        if cfg.projection_dim:
            wanted.append(("projector.fc1.weight", [cfg.projection_dim, cfg.d_model], "projection_dim, d_model"))
    else:
        embed = f"{p}shared.weight" if f"{p}shared.weight" in source.keys else f"{p}encoder.embed_tokens.weight"
        attn, ffn = f"{p}encoder.block.0.layer.0.SelfAttention", f"{p}encoder.block.0.layer.1.DenseReluDense"
        wi = f"{ffn}.wi_0.weight" if cfg.gated else f"{ffn}.wi.weight"
        if wi not in source.keys and (f"{ffn}.wi.weight" if cfg.gated else f"{ffn}.wi_0.weight") in source.keys:
            raise CheckpointError(f"{where}: feed_forward_proj is {'gated' if cfg.gated else 'not gated'} but "
                                  f"{_where(source)} has {'wi' if cfg.gated else 'wi_0/wi_1'} FFN weights")
        wanted = [
            (embed, [cfg.vocab_size, cfg.d_model], "vocab_size, d_model"),
            (f"{attn}.relative_attention_bias.weight", [cfg.num_buckets, cfg.num_heads],
             "relative_attention_num_buckets, num_heads"),
            (f"{attn}.q.weight", [inner, cfg.d_model], "num_heads*d_kv, d_model"),
            (wi, [cfg.d_ff, cfg.d_model], "d_ff, d_model"),
        ]
        if cfg.projection_dim:
            wanted.append(("final_projection.0.weight", [cfg.projection_dim, cfg.d_model], "project_out_dim, d_model"))
    with Headers(source) as headers:
        for key, shape, keys in wanted:
            if key not in source.keys:
                continue  # reported as a missing key by load_state_dict
            have = headers.shape(key)
            if have != shape:
                raise CheckpointError(f"{where}: {keys} = {shape} do not match {source.files[key]}: "
                                      f"{key!r} has shape {have}")


# ---------------------------------------------------------------------------- loading


def resolve_checkpoint(checkpoint: str | os.PathLike, *, subfolder: str | None = None) -> Path:
    """A local file/directory, or a hub id downloaded (safetensors and json only) when online. A path that
    looks local (a Path, or ``./``, ``../``, ``/``, ``~``, a symbolic link: :func:`fastenc.fileio.looks_local`) is
    never looked up on the hub: when it is not there, the error says so."""
    text = os.fspath(checkpoint)
    path = Path(os.path.expanduser(text))
    if path.exists():
        path = path / subfolder if subfolder else path
        check_utf8_path(path, CheckpointError)
        return path
    if not isinstance(checkpoint, str) or looks_local(text) or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", text):
        raise CheckpointError(missing_path_message(text))
    from .hub import download_checkpoint  # offline: fails at once, naming the `hf download` command

    return download_checkpoint(text, subfolder=subfolder)


def read_config(path: Path, source: TensorSource, layout: str, prefix: str) -> EncoderConfig:
    """The checkpoint's config (config.json beside it, else inferred from shapes), checked against the
    tensors in the file (:func:`check_config`) before the caller builds anything from it."""
    directory = path if path.is_dir() else path.parent
    cfg_file = directory / CONFIG_NAME
    if cfg_file.is_file():
        cfg = EncoderConfig.from_json_file(cfg_file)
        if layout in ("distillt5", "repacked") and cfg.projection_dim is None and "final_projection.3.weight" in source.keys:
            with Headers(source) as headers:
                dims = headers.shape("final_projection.3.weight")
            if len(dims) != 2 or not 0 < dims[0] <= MAX_PROJECTION_DIM:
                raise CheckpointError(f"{source.files['final_projection.3.weight']}: 'final_projection.3.weight' "
                                      f"has shape {dims}")
            cfg = cfg.replace(projection_dim=dims[0])
        if layout == "transformers":
            cfg = cfg.replace(projection_dim=None)
        check_config(cfg, source, layout, prefix, cfg_file)
        return cfg
    cfg = infer_config(source, layout, prefix)
    check_config(cfg, source, layout, prefix, _where(source))
    return cfg


def check_model_type(path: Path) -> None:
    """Raise one :class:`CheckpointError` when the config.json beside ``path`` names a ``model_type`` fastenc
    does not read (with the supported ones); nothing when it has none, a supported one, or no config.json."""
    directory = path if path.is_dir() else path.parent
    cfg_file = directory / CONFIG_NAME
    if not cfg_file.is_file():
        return
    model_type = read_json_object(cfg_file, CheckpointError).get("model_type")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise CheckpointError(f"{cfg_file}: model_type {model_type!r:.60} is not a model fastenc reads; "
                              f"supported model types: {', '.join(MODEL_TYPES)}")


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
        tables = [k for k in unexpected if k.endswith(".SelfAttention.relative_attention_bias.weight")]
        hint = ("; the checkpoint has a relative-attention-bias table in every block (umT5): its config.json "
                "should say model_type 'umt5'") if tables and not cfg.per_layer_bias else ""
        raise CheckpointError(
            f"{source.files[unexpected[0]]}: unexpected key {unexpected[0]!r}"
            + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f" for a {cfg.num_layers}-layer {'umT5' if cfg.per_layer_bias else 'T5'} config" + hint
        )
    # Headers first: every tensor's presence, dtype and shape, before any data is read.
    with Headers(source) as headers:
        for name, keys in mapping.items():
            for key in keys:
                if key not in source.files:
                    raise CheckpointError(f"{_where(source)}: missing key {key!r}")
                kind = headers.dtype(key)
                if kind not in FLOAT_DTYPES:
                    raise CheckpointError(f"{source.files[key]}: {key!r} has dtype {kind}, expected a floating-point "
                                          f"tensor ({', '.join(FLOAT_DTYPES)})")
            shapes = [headers.shape(k) for k in keys]
            if len({len(sh) for sh in shapes}) != 1 or len({tuple(sh[1:]) for sh in shapes}) != 1:
                have = list(shapes)
            else:
                have = [sum(sh[0] for sh in shapes), *shapes[0][1:]] if shapes[0] else []
            if have != list(expected[name]):
                raise CheckpointError(
                    f"{source.files[keys[0]]}: {'+'.join(keys)} has shape {have}, "
                    f"the config expects {list(expected[name])}"
                )
        state: dict[str, torch.Tensor] = {}

        def get(key: str) -> torch.Tensor:
            f = source.files[key]
            try:
                tensor = headers.handle(f).get_tensor(key)
            except Exception as exc:
                raise CheckpointError(f"{f}: cannot read {key!r} ({str(exc)[:200]})") from None
            if not all_finite(tensor):
                bad = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(f"{f}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of "
                                      f"{tensor.numel()}; the checkpoint is corrupt")
            return tensor

        for name, keys in mapping.items():
            parts = [get(k) for k in keys]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            target = param_dtype(name, dtype)
            state[name] = tensor.to(device=device, dtype=target)
            if target == torch.float16 and not all_finite(state[name]):
                raise CheckpointError(f"{source.files[keys[0]]}: {'+'.join(keys)} overflows float16 "
                                      "(values beyond 65504); load it in bf16 or fp32")
            del parts, tensor
    return state


def checkpoint_files(path: Path, source: TensorSource) -> list[Path]:
    """The files a checkpoint's content is read from: every weight file, then config.json and the index."""
    directory = path if path.is_dir() else path.parent
    files = sorted(set(source.files.values()))
    return files + [directory / n for n in (CONFIG_NAME, INDEX_NAME) if (directory / n).is_file()]


def checkpoint_identity(path: Path, source: TensorSource) -> str:
    """A cheap identity of a checkpoint's content: config/index files and every weight file's size, mtime
    and first/last MiB (the safetensors header included). New weights at the same path give a new value."""
    return content_identity(checkpoint_files(path, source))


def file_stats(files: Iterable[Path]) -> tuple[tuple[Path, int, int], ...]:
    """``((file, size, mtime_ns), ...)``: enough to name the file that changed when an identity differs."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append((Path(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def reread_state(path: Path, cfg: EncoderConfig, expected: dict[str, torch.Size], *, dtype: torch.dtype,
                 identity: str, stats: tuple[tuple[Path, int, int], ...], why: str) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint gave at load, read again (on the CPU, in ``dtype``, same layout mapping).

    ``identity`` is :func:`checkpoint_identity` as recorded at load (``stats``: :func:`file_stats` of the
    same files); a checkpoint whose content changed since (checked before and after reading) raises one
    :class:`CheckpointError` naming the file, with ``why`` (the reason the tensors are read again)."""

    def check(source: TensorSource | None) -> None:
        now = checkpoint_identity(path, source) if source is not None else None
        if now == identity:
            return
        culprit, how = Path(path), "changed"
        for file, size, mtime in stats:
            try:
                st = file.stat()
            except OSError:
                culprit, how = file, "was removed"
                break
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                culprit = file
                break
        else:
            listed = {f for f, _, _ in stats}
            extra = [f for f in (checkpoint_files(path, source) if source is not None else []) if f not in listed]
            if extra:
                culprit = extra[0]
        raise CheckpointError(
            f"fastenc.save: {culprit} {how} since the encoder was loaded from {path}; {why}, so saving them "
            "losslessly reads the checkpoint's tensors again and they are not the ones loaded any more. Load "
            "the checkpoint again and save that encoder, or write the weights as they are now with "
            "fastenc.save(encoder.model, directory)")

    try:
        source = open_source(Path(path))
    except CheckpointError:
        check(None)  # names the file that is gone or changed
        raise
    check(source)
    layout, prefix = detect_layout(source.keys)
    state = load_state_dict(source, cfg, layout, prefix, expected, dtype=dtype, device="cpu")
    check(source)  # nothing changed while it was read
    return state


def save_checkpoint(model, directory: str | os.PathLike, *, extra_files: dict[str, Callable[[Path], None]] | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write fastenc's format: config.json + model.safetensors, each to a temporary name, then renamed.

    ``state`` (parameter name -> tensor): the tensors to write instead of ``model``'s own (fastenc.save
    passes the checkpoint's tensors read again when a backend cast the model's); its dtype is recorded."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = model.state_dict()
    state = {n: p.detach().to("cpu").contiguous() for n, p in state.items()}
    config = model.config.to_hf_dict()
    config["fastenc"]["layout"] = "fastenc"
    config["torch_dtype"] = str(state["embed.weight"].dtype if "embed.weight" in state
                                else model.compute_dtype).removeprefix("torch.")

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


def export_folder_message(path: Path) -> str:
    """An export folder passed where a checkpoint is read: the one line that says how to run it."""
    from .hub import _way

    kinds = [b for b, d in (("onnxruntime", "onnx"), ("tensorrt", "trt"), ("aoti", "aoti")) if (path / d).is_dir()]
    kinds = kinds or ["onnxruntime", "tensorrt", "aoti"]
    flag = _way("--backend " + "|".join(kinds), "backend=" + "|".join(repr(k) for k in kinds))
    return (f"{path}: an export folder written by `fastenc export` (export.json), not a checkpoint: pass {flag} "
            "to run its artifacts, or the checkpoint it was exported from")
