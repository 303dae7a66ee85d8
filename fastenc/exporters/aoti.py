"""AOTInductor package (``.pt2``) of :class:`fastenc.model.T5Encoder`.

``torch.export.export`` with batch and sequence as ``torch.export.Dim``s, then
``torch._inductor.aoti_compile_and_package``. The package is compiled for the device the model sits
on and, on CPU, for the host's vector instruction set (recorded, and checked before loading);
the C++ client loads the same file with ``torch::inductor::AOTIModelPackageLoader``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, FastencError
from ..model import T5Encoder
from ..fileio import atomic_write
from .artifacts import first_line
from .contract import ExportModule, Profile, dynamic_shapes, sample_inputs

log = logging.getLogger("fastenc")

#: x86/ARM vector ISAs in increasing order; a package needs at least the one it was compiled for.
_ISA_RANK = {"DEFAULT": 0, "NEON": 1, "SVE256": 2, "AVX2": 1, "AVX512": 2}


def package_name(dtype: str, device: torch.device) -> str:
    return f"encoder.{dtype}.{device.type}.pt2"


def compile_package(model: T5Encoder, path: Path, profile: Profile, *, metadata: dict[str, str] | None = None) -> Path:
    """Export and AOT-compile ``model`` (on its own device and dtype) into the package ``path``."""
    device = model.embed.weight.device
    module = ExportModule(model).eval()
    ids, mask = (t.to(device) for t in sample_inputs(model.config, profile))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, (ids, mask), dynamic_shapes=dynamic_shapes(profile))
        except Exception as exc:
            raise FastencError(f"torch.export failed: {type(exc).__name__}: {first_line(exc)}") from exc

        def write(tmp: Path) -> None:
            # aoti_compile_and_package wants a name ending in .pt2: compile in a scratch folder, move in
            with tempfile.TemporaryDirectory(prefix=".aoti-", dir=path.parent) as scratch:
                out = torch._inductor.aoti_compile_and_package(
                    program, package_path=str(Path(scratch) / path.name),
                    inductor_configs={"aot_inductor.metadata": dict(metadata or {})},
                )
                os.replace(out, tmp)

        atomic_write(path, write)
    return path


def package_metadata(path: Path) -> dict[str, str]:
    """The metadata AOTInductor stored in the package (platform, CPU ISA, device, ours)."""
    try:
        loaded = torch._inductor.aoti_load_package(str(path))
        return dict(loaded.get_metadata())
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable AOTInductor package ({first_line(exc)})") from None


def host_isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


def check_package_compat(meta: dict[str, Any], device: torch.device, *, where: object,
                         isa: str | None = None, capability: tuple[int, int] | None = None) -> None:
    """Raise one :class:`CheckpointError` when the package cannot run on ``device`` of this machine."""
    built = meta.get("device", "cpu")
    if built != device.type:
        raise CheckpointError(f"{where} was compiled for {built}, not {device.type}: load it with device={built!r} "
                              f"or export again with --aoti --device {device.type}")
    if built == "cpu":
        need = str(meta.get("cpu_isa", "")).split()
        have = isa if isa is not None else host_isa()
        if need and need[0].upper() in _ISA_RANK and have.upper() in _ISA_RANK:
            if _ISA_RANK[need[0].upper()] > _ISA_RANK[have.upper()]:
                raise CheckpointError(f"{where} was compiled for {need[0]} CPUs and this CPU only has {have}: "
                                      f"export it again on this machine (fastenc export ... --aoti --force)")
    else:
        cap = capability if capability is not None else torch.cuda.get_device_capability(device)
        want = meta.get("compute_capability")
        if want and want != f"sm{cap[0]}{cap[1]}":
            raise CheckpointError(f"{where} was compiled for {want} and this GPU is sm{cap[0]}{cap[1]}: "
                                  f"export it again on this machine (fastenc export ... --aoti --force)")


def describe_build(path: Path, device: torch.device) -> dict[str, Any]:
    """Sidecar fields for a compiled package: device, CPU ISA or GPU capability, torch version."""
    meta = package_metadata(path)
    out: dict[str, Any] = {"device": device.type, "torch_version": torch.__version__,
                           "aoti_metadata": meta}
    if device.type == "cpu":
        out["cpu_isa"] = meta.get("AOTI_CPU_ISA", host_isa())
    else:
        major, minor = torch.cuda.get_device_capability(device)
        out["compute_capability"] = f"sm{major}{minor}"
        out["gpu_name"] = torch.cuda.get_device_name(device)
    return out


def profile_metadata(profile: Profile) -> dict[str, str]:
    """What the package itself carries about the contract (read by the C++ client)."""
    return {"fastenc.profile": json.dumps(profile.to_dict(), sort_keys=True)}
