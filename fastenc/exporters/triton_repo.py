"""Triton Inference Server model repository from a ``fastenc export`` directory.

Three models (``NAME`` defaults to ``fastenc``), four for a target whose pipeline zeroes the embeddings
past each prompt (Wan)::

    REPO/NAME_tokenizer/config.pbtxt   python backend: text (TYPE_STRING [1]) -> input_ids, attention_mask,
                       1/model.py                      encoder_attention_mask (TYPE_INT32 [-1])
                       1/tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
    REPO/NAME_encoder/config.pbtxt     onnxruntime_onnx | tensorrt_plan | python (ONNX Runtime, or fastenc's
                       1/encoder.*.onnx[.data] | 1/encoder.*.plan  [+ 1/model.py]   cpu backend: fastenc-cpu)
                       | 1/checkpoint/{config.json,*.safetensors} + 1/model.py
    REPO/NAME_finish/config.pbtxt      python backend (zero_padding targets only): encoder_embeddings,
                       1/model.py                      attention_mask -> text_embeddings, padding zeroed
    REPO/NAME/config.pbtxt             ensemble: text -> text_embeddings [-1, P], attention_mask [-1]
                       1/

Every model batches (``max_batch_size`` = the artifact profile's max batch unless lowered); the
encoder declares dynamic batching and a dynamic sequence dimension. A repository is written into a staging folder and renamed into place: a failed
run leaves no partial model (and no empty output folder). The tokenizer pads every prompt
to the target's length, like :meth:`fastenc.Encoder.encode`; ``encoder_attention_mask`` is the
mask for PixArt-style targets and all ones for Flux/SD3 (which give T5 no mask), so the ensemble's
embeddings equal ``fastenc.load(...).encode(prompts, target=...)``: the tokenizer cleans the prompts as the
target's pipeline does (Wan's ``prompt_clean``) and ``NAME_finish`` zeroes what the pipeline zeroes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import TARGET_MAX_LENGTH, max_length_for
from ..targets import get_target
from ..errors import CheckpointError, ConfigError
from ..fileio import check_parent, umask_mode
from .artifacts import (artifact_files, changed_source, check_export, checkpoint_fingerprint, find_artifacts,
                        read_config, read_manifest, source_changed, staged)
from .contract import ATTENTION_MASK, INPUT_IDS, OUTPUT_NAME, Profile

log = logging.getLogger("fastenc")

ENCODER_BACKENDS = ("auto", "onnxruntime", "tensorrt", "python", "fastenc-cpu")
#: Python-backend encoders and the model.py each runs.
PYTHON_ENCODERS = {"python": "onnx_encoder_model.py", "fastenc-cpu": "fastenc_encoder_model.py"}
CHECKPOINT_DIR = "checkpoint"  # fastenc-cpu: the weights' folder inside the encoder's version directory
INSTANCE_KINDS = ("auto", "cpu", "gpu")
TEXT = "text"
ENCODER_MASK = "encoder_attention_mask"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ENCODER_EMBEDDINGS = "encoder_embeddings"  # the encoder's output inside an ensemble with a finish step
#: Triton data type of each artifact dtype's output (dynamic int8 keeps float32 activations).
OUTPUT_TYPES = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16", "bf16": "TYPE_BF16", "int8": "TYPE_FP32"}
_ONNX_ELEM_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16"}  # onnx.TensorProto enum values
DEFAULT_QUEUE_DELAY_US = 100
MAX_INSTANCES = 64
MAX_PROMPT_BYTES = 65536  # the tokenizer model refuses longer prompts (T5 keeps at most 512 tokens anyway)


@dataclass(frozen=True)
class TritonRepoRequest:
    """What ``fastenc triton-repo`` writes; mirrors its flags."""

    export_dir: Path
    out: Path
    encoder_backend: str = "auto"  # auto: tensorrt when the export has an engine, else onnxruntime
    dtype: str | None = None  # which artifact (default: the only one, else fp32)
    target: str | None = None  # default: the export's target
    tokenizer: str | None = None  # default: the export's tokenizer.json
    name: str = "fastenc"
    max_batch_size: int | None = None  # default: the artifact profile's max batch
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instance_kind: str = "auto"
    instance_count: int = 1  # encoder instances (per GPU for KIND_GPU)
    preferred_batch_sizes: tuple[int, ...] = ()  # dynamic batching: sizes the batcher aims for
    threads: int = 0  # python-backend encoders: intra-op threads per instance (0: the runtime's default)
    checkpoint: str | None = None  # fastenc-cpu: weights (default: the checkpoint the export was made from)
    force: bool = False


@dataclass(frozen=True)
class TritonRepo:
    """What was written: the model directories and how the encoder is served."""

    root: Path
    ensemble: Path
    tokenizer: Path
    encoder: Path
    finish: Path | None  # the zero-padding step (targets whose pipeline zeroes the padding), else None
    encoder_platform: str  # onnxruntime_onnx | tensorrt_plan | python
    artifact: Path  # the exported file (or, for fastenc-cpu, the checkpoint) the encoder serves
    target: str
    max_length: int
    max_batch_size: int


# ---------------------------------------------------------------------------- config.pbtxt text


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor(name: str, data_type: str, dims: list[int]) -> str:
    return f"  {{\n    name: {_q(name)}\n    data_type: {data_type}\n    dims: [ {', '.join(map(str, dims))} ]\n  }}"


def _tensors(kind: str, items: list[tuple[str, str, list[int]]]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(*t) for t in items) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f"parameters {{\n  key: {_q(k)}\n  value: {{ string_value: {_q(v)} }}\n}}\n"
                   for k, v in params.items())


def _instance_group(kind: str, count: int = 1) -> str:
    if kind == "auto" and count == 1:  # Triton's default: one instance per GPU, or on the CPU without one
        return ""
    kind_line = "" if kind == "auto" else f"    kind: KIND_{kind.upper()}\n"
    return f"instance_group [\n  {{\n{kind_line}    count: {count}\n  }}\n]\n"


def _dynamic_batching(delay_us: int, preferred: tuple[int, ...] = ()) -> str:
    sizes = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else ""
    return f"dynamic_batching {{\n{sizes}  max_queue_delay_microseconds: {delay_us}\n}}\n"


def tokenizer_config(name: str, *, max_batch_size: int, target: str, max_length: int, pass_mask: bool,
                     delay_us: int) -> str:
    ids = [(INPUT_IDS, "TYPE_INT32", [-1]), (ATTENTION_MASK, "TYPE_INT32", [-1]), (ENCODER_MASK, "TYPE_INT32", [-1])]
    return (
        f"name: {_q(name)}\nbackend: \"python\"\nmax_batch_size: {max_batch_size}\n"
        + _tensors("input", [(TEXT, "TYPE_STRING", [1])])
        + _tensors("output", ids)
        + _dynamic_batching(delay_us)
        + _instance_group("cpu")
        + _parameters({"target": target, "max_length": str(max_length), "pass_mask": "true" if pass_mask else "false",
                       "tokenizer_file": "tokenizer.json", "max_prompt_bytes": str(MAX_PROMPT_BYTES)})
    )


def encoder_config(name: str, *, platform: str, max_batch_size: int, output_type: str, output_dim: int,
                   model_file: str, instance_kind: str, delay_us: int, instance_count: int = 1,
                   preferred_batch_sizes: tuple[int, ...] = (), parameters: dict[str, str] | None = None) -> str:
    head = f"name: {_q(name)}\n"
    if platform == "python":
        head += "backend: \"python\"\n"
    else:
        head += f"platform: {_q(platform)}\ndefault_model_filename: {_q(model_file)}\n"
    text = (
        head + f"max_batch_size: {max_batch_size}\n"
        + _tensors("input", [(INPUT_IDS, "TYPE_INT32", [-1]), (ATTENTION_MASK, "TYPE_INT32", [-1])])
        + _tensors("output", [(OUTPUT_NAME, output_type, [-1, output_dim])])
        + _dynamic_batching(delay_us, preferred_batch_sizes)
        + _instance_group(instance_kind, instance_count)
    )
    if parameters is None and platform == "python":
        parameters = {"onnx_model": model_file}
    return text + _parameters(parameters or {})


def finish_config(name: str, *, max_batch_size: int, target: str, output_type: str, output_dim: int,
                  delay_us: int) -> str:
    """The python-backend step that zeroes the embeddings past each prompt (on the CPU, like the tokenizer)."""
    return (
        f"name: {_q(name)}\nbackend: \"python\"\nmax_batch_size: {max_batch_size}\n"
        + _tensors("input", [(ENCODER_EMBEDDINGS, output_type, [-1, output_dim]), (ATTENTION_MASK, "TYPE_INT32", [-1])])
        + _tensors("output", [(OUTPUT_NAME, output_type, [-1, output_dim])])
        + _dynamic_batching(delay_us)
        + _instance_group("cpu")
        + _parameters({"target": target})
    )


def ensemble_config(name: str, *, tokenizer: str, encoder: str, max_batch_size: int, output_type: str,
                    output_dim: int, finish: str | None = None) -> str:
    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = [f"      input_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in inputs.items()]
        maps += [f"      output_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in outputs.items()]
        return f"    {{\n      model_name: {_q(model)}\n      model_version: -1\n" + "\n".join(maps) + "\n    }"

    steps = [
        step(tokenizer, {TEXT: TEXT},
             {INPUT_IDS: INPUT_IDS, ATTENTION_MASK: ATTENTION_MASK, ENCODER_MASK: ENCODER_MASK}),
        step(encoder, {INPUT_IDS: INPUT_IDS, ATTENTION_MASK: ENCODER_MASK},
             {OUTPUT_NAME: ENCODER_EMBEDDINGS if finish else OUTPUT_NAME}),
    ]
    if finish:
        steps.append(step(finish, {ENCODER_EMBEDDINGS: ENCODER_EMBEDDINGS, ATTENTION_MASK: ATTENTION_MASK},
                          {OUTPUT_NAME: OUTPUT_NAME}))
    return (
        f"name: {_q(name)}\nplatform: \"ensemble\"\nmax_batch_size: {max_batch_size}\n"
        + _tensors("input", [(TEXT, "TYPE_STRING", [1])])
        + _tensors("output", [(OUTPUT_NAME, output_type, [-1, output_dim]), (ATTENTION_MASK, "TYPE_INT32", [-1])])
        + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    )


# ---------------------------------------------------------------------------- artifact choice


def _pick(export_dir: Path, backend: str, dtype: str | None) -> tuple[Path, dict[str, Any]]:
    """The artifact the encoder serves: an engine for tensorrt, else a plain (not CPU-optimised) ONNX model."""
    if backend == "tensorrt":
        found = find_artifacts(export_dir, "tensorrt")
        hint = "run `fastenc export --trt` on the GPU that will serve it"
    else:
        found = [(p, m) for p, m in find_artifacts(export_dir, "onnxruntime") if m.get("kind") in ("onnx", "onnx-int8")]
        hint = "run `fastenc export` (it always writes ONNX)"
    if dtype is not None:
        found = [(p, m) for p, m in found if m.get("dtype") == dtype]
    if not found:
        what = "TensorRT engine" if backend == "tensorrt" else "ONNX model"
        raise CheckpointError(f"{export_dir}: no {what}{f' in {dtype}' if dtype else ''}; {hint}")
    if len(found) > 1:
        fp32 = [(p, m) for p, m in found if m.get("dtype") == "fp32"]
        if dtype is None and len(fp32) == 1:
            return fp32[0]
        names = ", ".join(sorted(p.name for p, _ in found))
        raise ConfigError(f"{export_dir}: several candidates ({names}); choose one with --dtype")
    return found[0]


def _onnx_output_type(path: Path) -> str | None:
    """Triton type of the ONNX graph's ``text_embeddings`` (None when onnx is not installed)."""
    try:
        import onnx
    except ImportError:
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    for out in graph.output:
        if out.name == OUTPUT_NAME:
            elem = out.type.tensor_type.elem_type
            if elem not in _ONNX_ELEM_TYPES:
                raise CheckpointError(f"{path}: {OUTPUT_NAME} has ONNX element type {elem}; "
                                      "expected float, float16 or bfloat16")
            return _ONNX_ELEM_TYPES[elem]
    raise CheckpointError(f"{path}: no output named {OUTPUT_NAME!r} (not a fastenc export?)")


def _model_source(name: str) -> str:
    """Source of a python-backend model shipped in ``fastenc/exporters/triton_models``."""
    return resources.files("fastenc.exporters.triton_models").joinpath(name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- writer


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "_-" for c in name) or name[0] in "-_":
        raise ConfigError(f"--name {name!r}: use letters, digits, '_' and '-' (a Triton model name)")


def _copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: no copy of a multi-GB model
    except OSError:
        shutil.copyfile(src, dst)


def _tokenizer_files(req: TritonRepoRequest, dst: Path) -> None:
    if req.tokenizer is not None:
        from ..tokenizer import Tokenizer

        Tokenizer.from_pretrained(req.tokenizer).save(dst)  # tokenizer.json; special tokens are <pad>/</s>
        return
    if not (req.export_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{req.export_dir}: no tokenizer.json; pass --tokenizer FOLDER_OR_HUB_ID "
                          "(e.g. a Flux pipeline's tokenizer_2 folder) or export with --tokenizer")
    for fname in TOKENIZER_FILES:
        if (req.export_dir / fname).is_file():
            shutil.copyfile(req.export_dir / fname, dst / fname)


def _checkpoint_files(req: TritonRepoRequest, manifest: dict[str, Any]) -> list[Path]:
    """The files ``fastenc-cpu`` serves: config.json and the safetensors weights (+ index) of the checkpoint."""
    source = manifest.get("source") or {}
    spec = req.checkpoint
    if spec is None:
        if source.get("kind") != "checkpoint" or not source.get("path"):
            raise ConfigError(f"{req.export_dir} was exported from {source.get('kind', 'an unknown source')}, not a "
                              "checkpoint folder; pass --checkpoint DIR (config.json + model.safetensors) for "
                              "--encoder-backend fastenc-cpu")
        spec = source["path"]
        changed = changed_source(manifest)  # new weights beside the export's tokenizer and config: refused
        if changed is not None:
            raise CheckpointError(f"{source_changed(changed)}: fastenc-cpu would serve its new weights beside the "
                                  f"export's tokenizer and config; re-export with `fastenc export --checkpoint "
                                  f"{changed} ...`, or pass the exported weights with --checkpoint PATH")
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path}: no such file or directory (fastenc-cpu serves the checkpoint's "
                              "weights; pass --checkpoint DIR)")
    if req.checkpoint is not None and source.get("kind") == "checkpoint" \
            and checkpoint_fingerprint(path) != manifest.get("fingerprint"):
        raise CheckpointError(f"--checkpoint {path}: not the checkpoint {req.export_dir} was exported from (its "
                              f"fingerprint is not the one export.json recorded); fastenc-cpu would serve its "
                              f"weights beside the export's tokenizer and config; export it first (`fastenc export "
                              f"--checkpoint {path} ...`)")
    folder = path if path.is_dir() else path.parent
    weights = sorted(folder.glob("*.safetensors")) if path.is_dir() else [path]
    if not weights or any(w.suffix != ".safetensors" for w in weights):
        raise CheckpointError(f"--checkpoint {path}: no .safetensors weights")
    extra = [folder / n for n in ("config.json",) if (folder / n).is_file()]
    extra += sorted(folder.glob("*.safetensors.index.json")) if path.is_dir() else []
    return weights + extra


def write_triton_repo(req: TritonRepoRequest) -> TritonRepo:
    """Write the three model directories into ``req.out`` (other models there are left alone).

    Everything is written into a staging folder first: a new repository appears by one rename, models
    of an existing one are swapped in one by one after all of them were written."""
    _check_name(req.name)
    if req.encoder_backend not in ENCODER_BACKENDS:
        raise ConfigError(f"--encoder-backend must be one of {', '.join(ENCODER_BACKENDS)}, "
                          f"got {req.encoder_backend!r}")
    if req.instance_kind not in INSTANCE_KINDS:
        raise ConfigError(f"--instance-kind must be one of {', '.join(INSTANCE_KINDS)}, got {req.instance_kind!r}")
    if req.max_queue_delay_us < 0:
        raise ConfigError(f"--max-queue-delay-us must be >= 0, got {req.max_queue_delay_us}")
    if not isinstance(req.instance_count, int) or not 1 <= req.instance_count <= MAX_INSTANCES:
        raise ConfigError(f"--instance-count must be in 1..{MAX_INSTANCES}, got {req.instance_count!r}")
    if not isinstance(req.threads, int) or req.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: the runtime's default), got {req.threads!r}")
    check_parent("--out", req.out)  # before anything is read: no missing folder is ever created
    export_dir = Path(req.export_dir)
    manifest = read_manifest(export_dir)
    cfg = read_config(export_dir)
    target = req.target or manifest.get("target", "flux-dev")
    max_length = max_length_for(target)
    zero_padding = get_target(target).zero_padding  # then a finish step zeroes the padding, as the pipeline does

    backend = req.encoder_backend
    if backend == "auto":
        backend = "tensorrt" if find_artifacts(export_dir, "tensorrt") else "onnxruntime"
    if backend == "fastenc-cpu":
        if req.dtype not in (None, "bf16"):
            raise ConfigError(f"--encoder-backend fastenc-cpu computes in bf16 with int8 GEMMs; drop --dtype {req.dtype}")
        if req.instance_kind == "gpu":
            raise ConfigError("--encoder-backend fastenc-cpu runs on the CPU: use --instance-kind cpu or auto")
        files = _checkpoint_files(req, manifest)
        artifact, limit = files[0], 1024  # no graph profile bounds the batch
        profile_batch = Profile.from_dict(manifest.get("profile"), where=export_dir / "export.json").max_batch
        output_type = "TYPE_FP32"
    else:
        artifact, meta = _pick(export_dir, backend, req.dtype)
        check_export(export_dir, members=[artifact])  # sha256 of what is copied; a tampered folder is refused
        profile = Profile.from_dict(meta["profile"], where=artifact)
        if not profile.min_seq <= max_length <= profile.max_seq:
            raise ConfigError(f"target {target} pads to {max_length} tokens but {artifact.name} accepts seq "
                              f"{profile.min_seq}..{profile.max_seq}; export with --max-seq {max_length} or pick "
                              f"another --target")
        limit = profile_batch = profile.max_batch
        files = artifact_files(artifact, meta)  # names from the sidecar, checked to stay in the folder
        dtype = str(meta.get("dtype"))
        output_type = (_onnx_output_type(artifact) if backend != "tensorrt" else None) or OUTPUT_TYPES.get(dtype)
        if output_type is None:
            raise CheckpointError(f"{artifact}: unknown artifact dtype {dtype!r}")
    max_batch = req.max_batch_size if req.max_batch_size is not None else profile_batch
    if not isinstance(max_batch, int) or not 1 <= max_batch <= limit:
        where = f"the batch range of {artifact.name}" if backend != "fastenc-cpu" else "fastenc-cpu"
        raise ConfigError(f"--max-batch-size must be in 1..{limit} ({where}), got {max_batch!r}")
    preferred = tuple(req.preferred_batch_sizes)
    if any(not isinstance(b, int) or not 1 <= b <= max_batch for b in preferred):
        raise ConfigError(f"--preferred-batch-sizes must lie in 1..{max_batch} (max_batch_size), got {list(preferred)}")
    if backend == "python" and output_type == "TYPE_BF16":
        raise ConfigError(f"{artifact.name} outputs bfloat16, which the python backend cannot return (numpy has no "
                          "bfloat16); serve an fp32 or fp16 export with --encoder-backend python")
    if backend == "tensorrt" and req.instance_kind == "cpu":
        raise ConfigError("a TensorRT engine runs on a GPU: use --instance-kind gpu or auto")
    platform = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}.get(backend, "python")
    instance_kind = "gpu" if backend == "tensorrt" and req.instance_kind == "auto" else req.instance_kind
    if platform == "python" and instance_kind == "auto":
        instance_kind = "cpu"  # python models run on the CPU unless asked otherwise
    parameters = None
    if backend == "python":
        parameters = {"onnx_model": artifact.name, "threads": str(req.threads)}
    elif backend == "fastenc-cpu":
        parameters = {"checkpoint": CHECKPOINT_DIR, "backend": "cpu", "threads": str(req.threads)}

    names = {"ensemble": req.name, "tokenizer": f"{req.name}_tokenizer", "encoder": f"{req.name}_encoder",
             "finish": f"{req.name}_finish"}
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    existing = [n for n in names.values() if (out / n).exists()]
    if existing and not req.force:
        raise ConfigError(f"{out}: models {', '.join(existing)} already exist; pass --force to replace them")

    def write_models(tmp: Path) -> None:
        tok_dir = tmp / names["tokenizer"]
        (tok_dir / "1").mkdir(parents=True)
        _tokenizer_files(req, tok_dir / "1")
        (tok_dir / "1" / "model.py").write_text(_model_source("tokenizer_model.py"), encoding="utf-8")
        (tok_dir / "config.pbtxt").write_text(tokenizer_config(
            names["tokenizer"], max_batch_size=max_batch, target=target, max_length=max_length,
            pass_mask=target in _masked_targets(), delay_us=req.max_queue_delay_us))

        enc_dir = tmp / names["encoder"]
        version = enc_dir / "1"
        weights_dir = version / CHECKPOINT_DIR if backend == "fastenc-cpu" else version
        weights_dir.mkdir(parents=True)
        for src in files:
            _copy(src, weights_dir / src.name)
        if backend in PYTHON_ENCODERS:
            (version / "model.py").write_text(_model_source(PYTHON_ENCODERS[backend]), encoding="utf-8")
        (enc_dir / "config.pbtxt").write_text(encoder_config(
            names["encoder"], platform=platform, max_batch_size=max_batch, output_type=output_type,
            output_dim=cfg.output_dim, model_file=artifact.name, instance_kind=instance_kind,
            delay_us=req.max_queue_delay_us, instance_count=req.instance_count, preferred_batch_sizes=preferred,
            parameters=parameters))

        if zero_padding:
            fin_dir = tmp / names["finish"]
            (fin_dir / "1").mkdir(parents=True)
            (fin_dir / "1" / "model.py").write_text(_model_source("finish_model.py"), encoding="utf-8")
            (fin_dir / "config.pbtxt").write_text(finish_config(
                names["finish"], max_batch_size=max_batch, target=target, output_type=output_type,
                output_dim=cfg.output_dim, delay_us=req.max_queue_delay_us))

        ens_dir = tmp / names["ensemble"]
        (ens_dir / "1").mkdir(parents=True)
        (ens_dir / "config.pbtxt").write_text(ensemble_config(
            names["ensemble"], tokenizer=names["tokenizer"], encoder=names["encoder"], max_batch_size=max_batch,
            output_type=output_type, output_dim=cfg.output_dim, finish=names["finish"] if zero_padding else None))

    if not out.exists():  # a new repository: staged beside it, then one rename
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        try:
            write_models(work)
            work.chmod(umask_mode(0o777))  # mkdtemp makes 0700; a repository is read by the server's account too
            os.rename(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    else:
        with staged(out) as tmp:
            write_models(tmp)
            for name in names.values():  # swap each model directory in; an old one is removed only after
                old = tmp / f"{name}.old"
                if (out / name).exists():
                    os.replace(out / name, old)  # also this name's finish step when the new target has none
                if (tmp / name).exists():
                    os.replace(tmp / name, out / name)
    log.info("Triton repository %s: %s (ensemble), %s, %s (%s serving %s)%s", out, names["ensemble"],
             names["tokenizer"], names["encoder"], platform, artifact.name,
             f", {names['finish']}" if zero_padding else "")
    return TritonRepo(root=out, ensemble=out / names["ensemble"], tokenizer=out / names["tokenizer"],
                      encoder=out / names["encoder"], finish=out / names["finish"] if zero_padding else None,
                      encoder_platform=platform, artifact=artifact, target=target,
                      max_length=max_length, max_batch_size=max_batch)


def _masked_targets() -> frozenset[str]:
    from ..api import MASKED_TARGETS

    return MASKED_TARGETS


# ---------------------------------------------------------------------------- CLI


def add_triton_command(subparsers) -> None:
    """Add ``fastenc triton-repo`` to the ``fastenc`` subparsers."""
    p = subparsers.add_parser(
        "triton-repo", help="write a Triton Inference Server model repository from an export directory",
        description="Write three Triton models from a `fastenc export` directory: NAME_tokenizer (python backend), "
                    "NAME_encoder (onnxruntime_onnx, tensorrt_plan, or a python-backend model running ONNX Runtime or "
                    "fastenc's cpu backend) "
                    "and the NAME ensemble (text in, text_embeddings and attention_mask out); for a target whose "
                    "pipeline zeroes the embeddings past each prompt (wan) also NAME_finish (python backend), which "
                    "does that. Other models already in the repository are left alone.",
    )
    p.add_argument("export_dir", type=Path, help="directory written by `fastenc export`")
    p.add_argument("-o", "--out", type=Path, required=True,
                   help="model repository directory (created if missing, in a folder that exists)")
    p.add_argument("--encoder-backend", choices=ENCODER_BACKENDS, default="auto",
                   help="auto (tensorrt when the export has an engine, else onnxruntime), onnxruntime, tensorrt, "
                        "python (ONNX Runtime inside the python backend, for servers without the onnxruntime "
                        "backend), or fastenc-cpu (fastenc's cpu backend, bf16 + int8, inside the python backend)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16", "int8"), help="which exported artifact to serve")
    p.add_argument("--target", choices=list(TARGET_MAX_LENGTH), help="pipeline to tokenise for (default: the export's)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the export's tokenizer.json)")
    p.add_argument("--name", default="fastenc",
                   help="ensemble name; the others get _tokenizer and _encoder (default fastenc)")
    p.add_argument("--max-batch-size", type=int, help="Triton max_batch_size (default: the artifact's max batch)")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help=f"dynamic batching queue delay in microseconds (default {DEFAULT_QUEUE_DELAY_US})")
    p.add_argument("--instance-kind", choices=INSTANCE_KINDS, default="auto",
                   help="where the encoder runs (auto: Triton's default, GPU for TensorRT)")
    p.add_argument("--instance-count", type=int, default=1,
                   help="encoder instances (per GPU for KIND_GPU; default 1, see export/triton/README.md)")
    p.add_argument("--preferred-batch-sizes", type=_batch_sizes, default=(), metavar="B1,B2,...",
                   help="dynamic batching preferred_batch_size list (default none: the largest batch available)")
    p.add_argument("--threads", type=int, default=0,
                   help="python-backend encoders: intra-op threads per instance (default 0: the runtime's default)")
    p.add_argument("--checkpoint",
                   help="fastenc-cpu: checkpoint folder or .safetensors file to serve (default: the one the export "
                        "was made from)")
    p.add_argument("--force", action="store_true", help="replace models of the same names")
    p.set_defaults(func=cmd_triton_repo)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_triton_repo(args: argparse.Namespace) -> int:
    repo = write_triton_repo(TritonRepoRequest(
        export_dir=args.export_dir, out=args.out, encoder_backend=args.encoder_backend, dtype=args.dtype,
        target=args.target, tokenizer=args.tokenizer, name=args.name, max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us, instance_kind=args.instance_kind,
        instance_count=args.instance_count, preferred_batch_sizes=args.preferred_batch_sizes, threads=args.threads,
        checkpoint=args.checkpoint, force=args.force,
    ))
    sys.stdout.write(
        f"wrote {repo.root}\n"
        f"  {repo.ensemble.name:<24} ensemble: text -> {OUTPUT_NAME}, {ATTENTION_MASK}\n"
        f"  {repo.tokenizer.name:<24} python: {repo.target}, {repo.max_length} tokens\n"
        f"  {repo.encoder.name:<24} {repo.encoder_platform}: {repo.artifact.name}, "
        f"max_batch_size {repo.max_batch_size}\n"
        + (f"  {repo.finish.name:<24} python: the padding zeroed, as the {repo.target} pipeline does\n"
           if repo.finish is not None else "")
    )
    return 0
