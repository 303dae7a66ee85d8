"""What the graph backends (onnxruntime, tensorrt, aoti) share: a runner module and artifact lookup.

A runner is an ``nn.Module`` that :class:`fastenc.Encoder` holds in place of the
:class:`~fastenc.model.T5Encoder`: ``runner(input_ids [B, L], attention_mask [B, L] | None)``
-> ``[B, L, P]``, with ``config``, ``compute_dtype`` and ``device`` like the model. It checks the
shape against the profile the artifact was built for and feeds the graph int32 tensors.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import EncoderConfig
from ..errors import CheckpointError, ConfigError
from ..inputs import check_token_inputs
from ..exporters.artifacts import check_export, find_artifacts, read_config, read_manifest
from ..exporters.contract import INPUT_DTYPE, Profile, dtype_name

GRAPH_BACKENDS = ("onnxruntime", "tensorrt", "aoti")


class GraphRunner(nn.Module):
    """Runs one exported artifact; subclasses implement :meth:`_run` on int32 tensors on ``device``."""

    backend = "graph"

    def __init__(self, config: EncoderConfig, artifact: Path, meta: dict[str, Any], device: torch.device,
                 out_dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.artifact = Path(artifact)
        self.meta = meta
        self.device = device
        self.compute_dtype = out_dtype  # dtype of the embeddings it returns
        self.artifact_dtype = str(meta.get("dtype"))  # fp32 | fp16 | bf16 | int8
        self.profile = Profile.from_dict(meta.get("profile"), where=artifact)

    def extra_repr(self) -> str:
        p = self.profile
        return (f"{self.artifact.name}, dtype={self.artifact_dtype}, device={self.device}, "
                f"batch<={p.max_batch}, seq<={p.max_seq}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_inputs(input_ids, attention_mask, self.config.vocab_size)  # ids in range, mask 0/1
        batch, seq = input_ids.shape
        self.profile.check(batch, seq, self.artifact.name)
        ids = input_ids.to(self.device, INPUT_DTYPE).contiguous()  # [B, L]
        mask = (torch.ones_like(ids) if attention_mask is None
                else attention_mask.to(self.device, INPUT_DTYPE).contiguous())  # [B, L]
        with torch.no_grad():
            return self._run(ids, mask)  # [B, L, P]

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def load_artifact(directory: str | os.PathLike, backend: str, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None) -> tuple[GraphRunner, EncoderConfig]:
    """Open the artifact of ``backend`` in an export directory: ``(runner, config)``."""
    if backend not in GRAPH_BACKENDS:
        raise ConfigError(f"backend {backend!r} is not a graph backend; choose one of {', '.join(GRAPH_BACKENDS)}")
    module = importlib.import_module(f"{__package__}.{backend}")
    return module.load_artifact(Path(directory), backend, device, dtype)


def exported_from_random_init(directory: Path) -> bool:
    """True when the export manifest says the weights were random (benchmark-only artifacts)."""
    try:
        return read_manifest(Path(directory)).get("source", {}).get("kind") == "random-init"
    except CheckpointError:
        return False


def pick(directory: Path, backend: str, dtype: str | torch.dtype | None, order: list[str],
         usable: Callable[[dict[str, Any]], bool], *, allow_int8: bool = False) -> tuple[Path, dict[str, Any], EncoderConfig]:
    """Choose the artifact of ``backend`` to run: the requested dtype, else the first of ``order``
    present; among equals the first ``usable`` one. Raises one :class:`CheckpointError` naming what exists.

    The chosen artifact, its sidecar and the folder's config and tokenizer files are checked against
    the export manifest (sha256; every other listed file by size) before anything reads them."""
    directory = Path(directory)
    found = find_artifacts(directory, backend)
    if not found:
        raise CheckpointError(f"{directory}: no {backend} artifact (export one with `fastenc export"
                              f"{' --trt' if backend == 'tensorrt' else ' --aoti' if backend == 'aoti' else ''}`)")
    wanted = dtype_name(dtype, allow_int8=allow_int8)
    for name in [wanted] if wanted else order:
        for path, meta in found:
            if meta.get("dtype") == name and usable(meta):
                check_export(directory, members=[path])
                return path, meta, read_config(directory)
    have = ", ".join(sorted({f"{m.get('dtype')} ({p.name})" for p, m in found}))
    want = f"dtype {wanted}" if wanted else "a dtype"
    raise CheckpointError(f"{directory}: no {backend} artifact with {want} usable here; found {have}")
