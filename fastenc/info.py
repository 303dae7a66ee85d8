"""Environment report for ``fastenc info``, and the one label per backend/precision everything prints.

``collect()`` imports neither torch nor the runtimes: versions come from the installed packages'
metadata, the GPU from ``nvidia-smi``, the CPU's features from ``/proc/cpuinfo``, so ``fastenc info``
answers in a fraction of a second. ``collect(probe=True)`` (``fastenc info --probe``) also imports
torch and asks it what it sees (CUDA devices, threads), and probes fastenc's Triton kernels on each
visible GPU again (:mod:`fastenc.backends.probe`: the verdict ``auto`` acts on, recorded for later
processes), which takes seconds.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

#: Package (distribution) names whose versions ``fastenc info`` reports.
PACKAGES = {"fastenc": "fastenc", "torch": "torch", "triton": "triton", "onnxruntime": "onnxruntime",
            "tensorrt": "tensorrt", "transformers": "transformers", "diffusers": "diffusers",
            "huggingface_hub": "huggingface_hub"}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_GRAPH_NAMES = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT", "aoti": "AOTInductor"}


def describe_backend(encoder) -> str:
    """One label for an encoder's backend and precision, the same in the demo, the benchmarks and info.

    e.g. ``"fastenc cpu (bf16 + int8 W8A8)"``, ``"fastenc torch fp32"``, ``"fastenc triton bf16 + CUDA graphs"``,
    ``"ONNX Runtime fp32"``, ``"ONNX Runtime int8 (dynamic)"``, ``"TensorRT bf16 (CUDA)"``.
    """
    backend = str(encoder.backend)
    device = getattr(getattr(encoder, "device", None), "type", "cpu")
    where = " (CUDA)" if device == "cuda" else ""
    model = getattr(encoder, "model", encoder)
    if backend in _GRAPH_NAMES:
        dtype = str(getattr(model, "artifact_dtype", None) or dtype_label(encoder.dtype))
        kind = " (dynamic)" if dtype == "int8" and backend == "onnxruntime" else ""
        return f"{_GRAPH_NAMES[backend]} {dtype}{kind}{where}"
    if backend == "cpu":
        engine = getattr(model, "cpu_engine", None)
        if engine is not None:
            return f"fastenc cpu ({engine.label})"
        plan = getattr(model, "int8_plan", None)
        precision = dtype_label(getattr(encoder, "dtype", "bf16"))
        return f"fastenc cpu ({precision} + int8 W8A8)" if plan is not None and plan.weights else \
            f"fastenc cpu ({precision})"
    label = f"fastenc {backend} {dtype_label(encoder.dtype)}"
    if getattr(encoder, "graphs", None) is not None:
        label += " + CUDA graphs"
    return label + (where if backend != "triton" else "")


def dtype_label(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the names the CLI flags use)."""
    text = str(dtype).removeprefix("torch.")
    return _DTYPE_NAMES.get(text, text)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def nvidia_gpus() -> list[str]:
    """``"NAME (compute capability X.Y)"`` per GPU that ``nvidia-smi`` lists; empty without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, cc = line.rpartition(",")
        if name.strip():
            gpus.append(f"{name.strip()} (compute capability {cc.strip()})")
    return gpus


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def usable_backends(*, cuda: bool | None = None) -> dict[str, str]:
    """backend name -> 'yes' or the reason it is not usable here (``cuda``: whether torch sees a GPU;
    None: judged from nvidia-smi and whether torch is a CPU-only build)."""
    torch_version = _version("torch")
    if torch_version is None:
        return {name: "no (torch not installed)" for name in ("torch", "cpu", "triton", "onnxruntime", "tensorrt",
                                                                "aoti")}
    if cuda is None:
        cuda = bool(nvidia_gpus()) and "+cpu" not in torch_version
    no_gpu = "no (needs a CUDA GPU)" if "+cpu" not in torch_version else "no (needs a CUDA GPU; torch is the CPU wheel)"
    flags = cpu_flags()
    out = {"torch": "yes"}
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        out["cpu"] = f"yes (default on this CPU: {'AMX-BF16' if 'amx_bf16' in flags else 'AVX512-BF16'})"
    else:
        out["cpu"] = "yes (default on this CPU: fp32 plan, no native bf16)"
    out["triton"] = ("yes" if cuda else no_gpu) if _version("triton") else "no (triton not installed)"
    out["onnxruntime"] = "yes" if _version("onnxruntime") or _version("onnxruntime-gpu") \
        else "no (onnxruntime not installed)"
    out["tensorrt"] = ("yes" if cuda else no_gpu) if _version("tensorrt") else "no (tensorrt not installed)"
    out["aoti"] = "yes"
    return out


def collect(*, probe: bool = False) -> dict[str, str]:
    """The ``fastenc info`` report; ``probe=True`` imports torch to report what it sees (slower)."""
    from .caches import cache_root

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for key, dist in PACKAGES.items():
        info[key] = _version(dist) or "not installed"
    gpus = nvidia_gpus()
    info["gpu"] = "; ".join(gpus) if gpus else "none (CPU only)"
    info["cpu threads"] = str(_cpu_threads())
    cuda = None
    if probe:
        import torch

        cuda = torch.cuda.is_available()
        info["torch sees"] = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                              if cuda else "no CUDA device")
        info["torch threads"] = str(torch.get_num_threads())
    backends = usable_backends(cuda=cuda)
    if probe and _version("torch"):  # what the cpu backend itself checks (oneDNN, torch._int_mm, CPU flags)
        from .backends.cpu import fast_path_supported

        ok, why = fast_path_supported()
        backends["cpu"] = f"yes (default on this CPU: {why})" if ok else f"yes (default on this CPU: fp32 plan; {why})"
    for name, status in backends.items():
        info[f"backend {name}"] = status
    if probe and _version("torch"):  # the cpu backend's plans measured on this machine (fastenc tune)
        from .backends.cpu_plan import cached_plans, machine

        here = machine()
        from .backends.cpu import plan_cache_dir
        from .backends.cpu_onnxruntime import graph_file as ort_graph_file
        from .backends.cpu_openvino import INT8_GRAPH_NAME, graph_files

        found = [(key, plan) for key, plan in cached_plans() if plan.machine == here]
        plans = [plan for _, plan in found]
        info["cpu plans"] = f"{len(plans)} cached for {here}" if plans else \
            f"none cached for {here} (`fastenc tune` or the first load searches one)"
        for i, plan in enumerate(plans):
            times = ", ".join(f"{m.ms[k]:.1f} ms at {k}" for m in plan.measured if m.candidate == plan.chosen
                              for k in m.ms)
            best = next((m for m in plan.measured if m.candidate == plan.chosen), None)
            fid = f"; cos {best.cos:.5f} / worst {best.worst:.5f}" if best is not None else ""
            prefix = plan_cache_dir() / found[i][0]
            kept = ""
            ov_files = graph_files(prefix) + graph_files(prefix, INT8_GRAPH_NAME)
            for runtime, files in (("OpenVINO", ov_files), ("ONNX Runtime", (ort_graph_file(prefix),))):
                graphs = [f for f in files if f.is_file()]
                if graphs:
                    kept += f"; {runtime} graph cached, {sum(f.stat().st_size for f in graphs) / 1e6:.0f} MB"
            info[f"cpu plan {i + 1}"] = f"{plan.chosen.name} ({times}{fid}; searched in {plan.tune_s:.0f} s{kept})"
    if probe and cuda and _version("triton"):  # the first-contact check of the triton kernels, per GPU
        info.update(gpu_probe_report())
    info["cache"] = f"{cache_root()} (fastenc cache info)"
    return info


def gpu_probe_report(dtype=None) -> dict[str, str]:
    """``"triton probe cuda:N"`` -> the verdict of probing the triton kernels again on GPU N in ``dtype``
    (default bf16, what ``auto`` loads in on CUDA), with the other dtypes' recorded verdicts; a failure
    adds ``"... cause"`` (the end of its traceback)."""
    import torch

    from .backends import on_rocm
    from .backends import probe as gpu_probe

    dtype = dtype or torch.bfloat16
    out: dict[str, str] = {}
    for i in range(torch.cuda.device_count()):
        label = f"triton probe cuda:{i}"
        if on_rocm():
            out[label] = "not probed (ROCm: auto runs the torch op table; backend='triton' runs the kernels)"
            continue
        try:
            facts, verdict = gpu_probe.check(torch.device("cuda", i), dtype, fresh=True)
        except Exception as exc:  # noqa: BLE001 - a report line, not a crash
            out[label] = f"could not probe: {type(exc).__name__}: {exc}"
            continue
        others = [v for name, v in sorted(gpu_probe.read_verdicts(facts).items()) if name != verdict.dtype]
        out[label] = "; ".join([f"{facts.label()}: {verdict.describe()}", *(v.describe() for v in others)]) + \
            f" [{gpu_probe.probe_dir() / (facts.key() + '.json')}]"
        if not verdict.ok:
            out[f"{label} cause"] = "\n    ".join(verdict.detail.strip().splitlines()[-12:])
    return out
