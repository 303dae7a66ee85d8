"""AOTInductor backend: loads ``aoti/encoder.{dtype}.{device}.pt2`` with ``aoti_load_package``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import EncoderConfig
from ..errors import BackendUnavailable, CheckpointError
from ..exporters.aoti import check_package_compat
from ..exporters.artifacts import check_files, find_artifacts, first_line
from ..exporters.contract import DTYPES, dtype_name
from .graph import GraphRunner, pick


class AotiRunner(GraphRunner):
    backend = "aoti"

    def __init__(self, config: EncoderConfig, artifact: Path, meta: dict[str, Any], device: torch.device):
        check_files(artifact, meta)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"{artifact} was compiled for CUDA and no GPU is visible here")
        check_package_compat(meta, device, where=artifact)
        try:
            self._package = torch._inductor.aoti_load_package(str(artifact))
        except Exception as exc:  # zip / runtime errors from the loader
            raise CheckpointError(f"{artifact}: not a loadable AOTInductor package ({first_line(exc)}); "
                                  f"re-run `fastenc export --aoti --force`") from None
        super().__init__(config, artifact, meta, device, DTYPES[str(meta.get("dtype"))])

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._package(input_ids, attention_mask)  # [B, L, P]


def open_artifact(path: Path, meta: dict[str, Any], cfg: EncoderConfig, device: torch.device) -> AotiRunner:
    return AotiRunner(cfg, path, meta, device)


def load_artifact(directory: Path, backend: str = "aoti", device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None) -> tuple[AotiRunner, EncoderConfig]:
    """The package compiled for ``device`` (default: CUDA when a GPU is visible and a CUDA package exists)."""
    if device is None:
        want = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        want = [torch.device(device).type]
    wanted = dtype_name(dtype)
    found = find_artifacts(Path(directory), "aoti")
    for kind in want:  # the first device with a package of the dtype; a bad package is an error, not skipped
        if kind != want[-1] and not any(m.get("device") == kind and (wanted is None or m.get("dtype") == wanted)
                                        for _, m in found):
            continue
        path, meta, cfg = pick(directory, "aoti", dtype, ["fp32", "bf16", "fp16"] if kind == "cpu"
                               else ["bf16", "fp16", "fp32"], lambda m, k=kind: m.get("device") == k)
        dev = torch.device(device) if device is not None else torch.device(kind)
        return AotiRunner(cfg, path, meta, dev), cfg
    raise AssertionError("unreachable")
