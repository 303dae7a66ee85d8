"""The GPU path on first contact, checked on the CPU: the triton probe and its fallback (each failure kind,
the verdict file, the explicit-triton error), ROCm, the tuning lock, and FASTENC_AUTOTUNE=0's config.

The device facts and the probe are swapped for ones the tests choose (``probe.gpu_facts``,
``probe.run_probe``); the decision code (``follow_backend``, ``resolve_backend``, ``probe.check``) is
the real one. One test runs the real probe on the CPU through triton's interpreter."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import fastenc.backends as backends
from fastenc import caches, info
from fastenc.backends import follow_backend, probe, resolve_backend
from fastenc.errors import BackendUnavailable
from fastenc.kernels import _common, attention, gated_ffn, linear_relu
from fastenc.kernels._common import SMEM_LIMIT, Kernel, dot_precision, single_config

CUDA = torch.device("cuda")
FACTS = probe.GpuFacts("NVIDIA A10", "8.6", "535.104.05", torch.__version__, triton.__version__)


def _compilation_error():
    import ast

    return CompilationError("x = tl.dot(a, b)", ast.parse("x").body[0], "unsupported dot shape on this target")


FAILURES = {
    "CompilationError": _compilation_error,
    "OutOfResources": lambda: OutOfResources(180_000, 101_376, "shared memory"),
    "RuntimeError": lambda: RuntimeError("CUDA driver error: the provided PTX was compiled with an unsupported "
                                         "toolchain"),
    "no C compiler": lambda: RuntimeError("Failed to find C compiler. Please specify via CC environment variable "
                                          "or set triton.knobs.build.impl."),
}


@pytest.fixture(autouse=True)
def gpu(tmp_path, monkeypatch):
    """A CUDA device as the decision code sees it: facts chosen here, triton importable, not ROCm, a fresh
    cache folder and no verdicts in this process. ``gpu.calls`` counts probes; ``gpu.fail`` makes them raise."""
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(backends, "_triton_importable", lambda: True)
    monkeypatch.setattr(probe, "gpu_facts", lambda device: FACTS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    class Gpu:
        calls: list = []
        fail: dict = {}  # dtype -> exception factory

    def fake_probe(device, dtype):
        Gpu.calls.append((str(device), dtype))
        if dtype in Gpu.fail:
            raise Gpu.fail[dtype]()

    Gpu.calls, Gpu.fail = [], {}
    monkeypatch.setattr(probe, "run_probe", fake_probe)
    probe.forget()
    yield Gpu
    probe.forget()


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "fastenc"]


def _verdict_file(tmp_path):
    return tmp_path / "cache" / "gpu-probes" / f"{FACTS.key()}.json"


# ---- the probe and the fallback ----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FAILURES))
def test_auto_falls_back_to_torch_once_warned_and_recorded(gpu, kind, caplog, tmp_path):
    gpu.fail = {torch.bfloat16: FAILURES[kind]}
    with caplog.at_level(logging.INFO, logger="fastenc"):
        assert follow_backend("auto", CUDA, torch.bfloat16) == "torch"
        assert resolve_backend("auto", CUDA) == "torch"  # no dtype: bf16, CUDA's default
        assert resolve_backend("auto", CUDA, torch.bfloat16) == "torch"
    assert gpu.calls == [("cuda", torch.bfloat16)]  # probed once in this process
    (warning,) = _warnings(caplog)  # exactly one warning
    text = warning.getMessage()
    assert kind in text and "fastenc info --probe" in text and "NVIDIA A10 (sm_86" in text
    if kind == "OutOfResources":
        assert "shared memory" in text
    if kind == "CompilationError":
        assert "unsupported dot shape" in text  # the error's own message, not its source location

    data = json.loads(_verdict_file(tmp_path).read_text())
    assert data["facts"]["name"] == "NVIDIA A10" and data["facts"]["driver"] == "535.104.05"
    verdict = data["verdicts"]["bfloat16"]
    assert verdict["ok"] is False and verdict["kind"] == kind and verdict["detail"]
    assert [p.name for p in caches.CacheDir("gpu-probes", _verdict_file(tmp_path).parent, "").owned()] == \
        [_verdict_file(tmp_path).name]  # `fastenc cache clear gpu-probes` deletes it

    probe._VERDICTS.clear()  # as a later process: the verdict comes from the file
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastenc"):
        assert follow_backend("auto", CUDA, torch.bfloat16) == "torch"
    assert len(gpu.calls) == 1  # the probe was not called again
    assert not _warnings(caplog)  # this process warned already


def test_explicit_triton_raises_with_the_cause_chained(gpu):
    gpu.fail = {torch.bfloat16: FAILURES["OutOfResources"]}
    with pytest.raises(BackendUnavailable, match="OutOfResources") as err:
        resolve_backend("triton", CUDA, torch.bfloat16)
    assert isinstance(err.value.__cause__, OutOfResources)
    with pytest.raises(BackendUnavailable) as err:
        follow_backend("triton", CUDA, torch.bfloat16)  # moved onto the GPU: the same
    assert isinstance(err.value.__cause__, OutOfResources)
    assert len(gpu.calls) == 1

    probe.forget()  # a later process finds the failure on disk: it probes again for the real cause
    with pytest.raises(BackendUnavailable) as err:
        resolve_backend("triton", CUDA)
    assert isinstance(err.value.__cause__, OutOfResources) and len(gpu.calls) == 2

    probe.forget()
    gpu.fail = {}  # fixed since (a driver update under the same facts): the re-probe passes, the file says so
    assert resolve_backend("triton", CUDA) == "triton"
    assert probe.read_verdicts(FACTS)["bfloat16"].ok


def test_a_passing_probe_keeps_triton_and_is_reused(gpu, tmp_path):
    assert resolve_backend("auto", CUDA, torch.float16) == "triton"
    assert follow_backend("auto", CUDA, torch.float16) == "triton"
    assert follow_backend("triton", CUDA, torch.float16) == "triton"
    assert gpu.calls == [("cuda", torch.float16)]
    probe.forget()
    assert follow_backend("auto", CUDA, torch.float16) == "triton" and len(gpu.calls) == 1  # from the file
    assert json.loads(_verdict_file(tmp_path).read_text())["verdicts"]["float16"]["ok"] is True


def test_verdicts_are_per_dtype_and_per_gpu_kind(gpu, monkeypatch):
    gpu.fail = {torch.bfloat16: FAILURES["CompilationError"]}  # e.g. no bf16 dots on this architecture
    assert follow_backend("auto", CUDA, torch.bfloat16) == "torch"
    assert follow_backend("auto", CUDA, torch.float16) == "triton"
    assert set(probe.read_verdicts(FACTS)) == {"bfloat16", "float16"}  # one file, a verdict per dtype
    other = probe.GpuFacts("NVIDIA H100 80GB HBM3", "9.0", "550.54.15", torch.__version__, triton.__version__)
    monkeypatch.setattr(probe, "gpu_facts", lambda device: other)
    gpu.fail = {}
    assert follow_backend("auto", CUDA, torch.bfloat16) == "triton"  # another GPU kind is probed afresh
    assert len(gpu.calls) == 3 and other.key() != FACTS.key()
    assert FACTS.key() != probe.GpuFacts("NVIDIA A10", "8.6", "550.54.15", FACTS.torch, FACTS.triton).key()


def test_unreadable_device_facts_fall_back_without_a_file(gpu, monkeypatch, caplog, tmp_path):
    def no_gpu(device):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(probe, "gpu_facts", no_gpu)
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        assert follow_backend("auto", CUDA, torch.bfloat16) == "torch"
    assert "no NVIDIA driver" in _warnings(caplog)[0].getMessage() and not gpu.calls
    assert not (tmp_path / "cache" / "gpu-probes").exists()
    with pytest.raises(BackendUnavailable) as err:
        resolve_backend("triton", CUDA)
    assert "no NVIDIA driver" in str(err.value.__cause__)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is visible to torch"):
        resolve_backend("triton", CUDA)  # said plainly, before any probe


def test_a_refusal_of_this_process_is_not_recorded_for_the_gpu(gpu, tmp_path):
    """TRITON_INTERPRET=1 when the kernels were imported: this process cannot run them on a GPU, later ones can."""
    gpu.fail = {torch.bfloat16: lambda: BackendUnavailable("backend 'triton' on cuda: TRITON_INTERPRET=1 was set "
                                                           "when fastenc's kernels were imported")}
    assert follow_backend("auto", CUDA, torch.bfloat16) == "torch"
    assert follow_backend("auto", CUDA, torch.bfloat16) == "torch" and len(gpu.calls) == 1  # once per process
    assert not _verdict_file(tmp_path).exists()


def test_concurrent_first_contact_probes_once(gpu, monkeypatch):
    def slow_probe(device, dtype):
        gpu.calls.append(dtype)
        time.sleep(0.1)

    monkeypatch.setattr(probe, "run_probe", slow_probe)
    results = []
    threads = [threading.Thread(target=lambda: results.append(follow_backend("auto", CUDA, torch.bfloat16)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["triton"] * 4 and len(gpu.calls) == 1


def test_info_probe_reports_each_gpu(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu.fail = {torch.bfloat16: FAILURES["no C compiler"]}
    report = info.gpu_probe_report()
    assert set(report) == {"triton probe cuda:0", "triton probe cuda:0 cause", "triton probe cuda:1",
                           "triton probe cuda:1 cause"}
    assert "FAILED (bfloat16): no C compiler" in report["triton probe cuda:0"]
    assert "NVIDIA A10" in report["triton probe cuda:1"] and "gpu-probes" in report["triton probe cuda:1"]
    assert "Failed to find C compiler" in report["triton probe cuda:0 cause"]
    assert len(gpu.calls) == 2  # probed again, per GPU (whatever was recorded)
    gpu.fail = {}
    assert "ok (bfloat16" in info.gpu_probe_report()["triton probe cuda:0"]


def test_the_real_probe_runs_on_the_cpu_interpreter(monkeypatch):
    """run_probe itself (model, reference comparison, tolerances) through triton's interpreter."""
    monkeypatch.undo()  # the genuine run_probe (the fixture's fake undone)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = torch.get_rng_state()
    probe.run_probe(torch.device("cpu"), torch.float32)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is left alone


def test_the_real_probe_reports_wrong_numbers(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fastenc.kernels import rms_norm

    real = rms_norm.rms_norm
    monkeypatch.setattr(rms_norm, "rms_norm", lambda x, w, eps: real(x, w, eps) * 1.5)
    with pytest.raises(probe.ProbeMismatch, match="relative error"):
        probe.run_probe(torch.device("cpu"), torch.float32)
    assert probe.failure_kind(probe.ProbeMismatch("x")) == "wrong results"


# ---- ROCm --------------------------------------------------------------------------------------


def test_rocm_auto_runs_torch_and_logs_once(gpu, monkeypatch, caplog):
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(backends, "_ROCM_LOGGED", [])
    with caplog.at_level(logging.INFO, logger="fastenc"):
        assert follow_backend("auto", CUDA, torch.bfloat16) == "torch"
        assert resolve_backend("auto", CUDA) == "torch"
        assert follow_backend("auto", torch.device("cuda:1"), torch.float16) == "torch"
    assert len([r for r in caplog.records if "ROCm" in r.getMessage()]) == 1
    assert not gpu.calls  # auto never probes (nor runs) triton there
    assert follow_backend("triton", CUDA, torch.bfloat16) == "triton"  # asked for explicitly: it runs (probed)
    assert gpu.calls == [("cuda", torch.bfloat16)]


def test_dot_precision_on_hip(monkeypatch):
    assert dot_precision(torch.bfloat16, hip=False) == "tf32" and dot_precision(torch.float32, hip=False) == "ieee"
    assert dot_precision(torch.bfloat16, hip=True) == dot_precision(torch.float16, hip=True) == "ieee"
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert dot_precision(torch.bfloat16) == "ieee"  # what the launchers pass on a ROCm build
    monkeypatch.setattr(torch.version, "hip", None)
    assert dot_precision(torch.bfloat16) == "tf32"


# ---- the tuning lock ---------------------------------------------------------------------------


def _stub_kernel(X, N, BLOCK: tl.constexpr):
    pass


class _StubAutotuner:
    """Stands in for ``triton.autotune(...)(jitted)``: records how many launches run at once."""

    def __init__(self, hold: float = 0.05, barrier: threading.Barrier | None = None):
        self.lock = threading.Lock()
        self.reset(hold, barrier)

    def reset(self, hold: float = 0.05, barrier: threading.Barrier | None = None):
        self.hold, self.barrier = hold, barrier
        self.active = self.peak = self.launches = 0

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kwargs):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.launches += 1
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=5)  # passes only when both launches are inside at once
            time.sleep(self.hold)
        finally:
            with self.lock:
                self.active -= 1


def _launch_in_threads(kernel, n, **kwargs):
    x = torch.zeros(4)
    errors = []

    def run():
        try:
            kernel(CUDA, lambda meta: (1,), x, 7, **kwargs)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.fixture
def current_gpu(monkeypatch):
    from fastenc.kernels import tuning

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # launch keys name the GPU a launch runs on
    monkeypatch.setattr(tuning, "device_kind", lambda index: tuning.DeviceKind("NVIDIA A10", "8.6", 101376))
    tuning.forget()
    yield
    tuning.forget()


def test_first_launch_of_a_key_is_serialised_later_ones_are_not(current_gpu):
    kernel = Kernel(_stub_kernel)
    kernel._gpu_compiled = kernel.autotuned = True  # as on a GPU
    tuner = _StubAutotuner()
    kernel._new_tuner = lambda: tuner  # the device kind's autotuner
    _launch_in_threads(kernel, 6, BLOCK=16)
    assert tuner.launches == 6 and tuner.peak == 1  # a new key: one thread at a time (tuning is not thread-safe)

    tuner.reset(barrier=threading.Barrier(2))
    _launch_in_threads(kernel, 2, BLOCK=16)  # the key is tuned: launches run concurrently, no lock
    assert tuner.peak == 2

    tuner.reset()
    _launch_in_threads(kernel, 4, BLOCK=32)  # another constexpr value: a new key, serialised again
    assert tuner.peak == 1


def test_launch_keys_follow_what_makes_triton_compile_or_tune(current_gpu):
    kernel = gated_ffn._KERNEL
    x = torch.zeros(64, 32)
    base = (x, x, x, 100, 64, 32, 32, 32, 32, 128)
    key = kernel.launch_key(CUDA, base, {"ACT": 2, "UPCAST": False, "DOT_PREC": "tf32"})
    assert key == kernel.launch_key(CUDA, (x, x, x, 120, *base[4:]), {"ACT": 2, "UPCAST": False, "DOT_PREC": "tf32"})
    assert key != kernel.launch_key(CUDA, (x, x, x, 100, 96, *base[5:]), {"ACT": 2, "UPCAST": False,
                                                                          "DOT_PREC": "tf32"})  # F: autotune key
    assert key != kernel.launch_key(CUDA, (x.half(), *base[1:]), {"ACT": 2, "UPCAST": False, "DOT_PREC": "tf32"})
    assert key != kernel.launch_key(CUDA, base, {"ACT": 1, "UPCAST": False, "DOT_PREC": "tf32"})
    assert key != kernel.launch_key(torch.device("cuda:1"), base, {"ACT": 2, "UPCAST": False, "DOT_PREC": "tf32"})
    assert key == kernel.launch_key(torch.device("cuda:0"), base, {"ACT": 2, "UPCAST": False, "DOT_PREC": "tf32"})
    with _common.single_config_launches():  # the probe's untuned launches are keys of their own
        assert key != kernel.launch_key(CUDA, base, {"ACT": 2, "UPCAST": False, "DOT_PREC": "tf32"})
    assert _common.TUNING_LOCK.acquire(blocking=False)  # one process-wide lock, free when nothing tunes
    _common.TUNING_LOCK.release()


# ---- FASTENC_AUTOTUNE=0 ------------------------------------------------------------------------


@pytest.mark.parametrize("module,kernel_name", [(gated_ffn, "_KERNEL"), (linear_relu, "_KERNEL"),
                                                (attention, "_KERNEL"), (attention, "_KERNEL_FP32")])
def test_autotune_off_hands_triton_one_config_that_fits_every_gpu(module, kernel_name, monkeypatch):
    tuned = getattr(module, kernel_name)
    monkeypatch.setenv("FASTENC_AUTOTUNE", "0")
    kernel = Kernel(tuned.fn, configs=tuned.configs, key=["M_BUCKET"], smem=tuned._smem, elsize=tuned.elsize)
    assert kernel.configs == [kernel.single] and len(kernel.compiled.configs) == 1  # what triton.autotune got
    assert kernel.smem_bytes(kernel.single) <= SMEM_LIMIT == 99 * 1024
    fitting = [c for c in tuned.configs if kernel.smem_bytes(c) <= SMEM_LIMIT]
    assert kernel.single is fitting[0]  # the first (best-listed) config that fits
    monkeypatch.setenv("FASTENC_AUTOTUNE", "1")
    assert len(Kernel(tuned.fn, configs=tuned.configs, key=["M_BUCKET"], smem=tuned._smem).compiled.configs) == \
        len(tuned.configs) > 1


def test_shared_memory_estimates():
    cfg = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_stages=3)
    assert _common.gemm_smem(cfg.kwargs, 3, 2) == 3 * (128 * 32 + 32 * 128) * 2
    assert _common.gemm_smem(cfg.kwargs, 3, 4, b_tiles=2) == 3 * (128 * 32 + 2 * 32 * 128) * 4
    assert _common.attention_smem({"BLOCK_M": 128, "BLOCK_N": 64}, 3, 2) == (128 * 64 + 3 * 2 * 64 * 64) * 2
    # fp32 doubles the need: linear_relu's first config fits no 99 KB GPU in fp32, the chosen one does
    assert linear_relu._KERNEL.smem_bytes(linear_relu._GPU_CONFIGS[0]) > SMEM_LIMIT
    assert linear_relu._KERNEL.single.kwargs == {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}
    big = [triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 64}, num_stages=4)]
    assert single_config(big, lambda c: 10**6) is big[0]  # nothing fits: the smallest need
    assert single_config([], None) is None


def _ptxas_available() -> bool:
    from pathlib import Path

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _recorded(kernel, call):
    with kernel.recording() as calls:
        call()
    (launch,) = calls
    return launch


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas (NVIDIA backend) is not here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_single_configs_compile_within_sm86_shared_memory(dtype):
    """What ptxas says, not the estimate: each kernel's single config, compiled for sm_86 at the base
    student's widths, asks for at most 99 KB of shared memory."""
    from fastenc.kernels.ops import TritonOps

    q = torch.randn(2, 12, 512, 64).to(dtype)
    bias = TritonOps("cpu").position_bias(torch.randn(32, 12), 512, torch.ones(2, 512), 32, 128, dtype)
    x, w = torch.randn(16, 768).to(dtype), torch.randn(4096, 768).to(dtype)
    launches = {
        gated_ffn._KERNEL: lambda: gated_ffn.gated_ffn(x, w, "gelu_new", dtype),
        linear_relu._KERNEL: lambda: linear_relu.linear_relu(x, w),
        attention.kernel_for(dtype): lambda: attention.rel_attention(q, q, q, bias),
    }
    for kernel, call in launches.items():
        args, kwargs = _recorded(kernel, call)
        compiled = kernel.compile_for(args, kwargs, arch=86, config=kernel.single, UPCAST=False)
        assert 0 < compiled.metadata.shared <= SMEM_LIMIT, (kernel.name, kernel.single, compiled.metadata.shared)


def test_failure_kinds():
    import subprocess

    assert probe.failure_kind(_compilation_error()) == "CompilationError"
    assert probe.failure_kind(OutOfResources(1, 0, "shared memory")) == "OutOfResources"
    assert probe.failure_kind(FAILURES["no C compiler"]()) == "no C compiler"
    assert probe.failure_kind(FileNotFoundError(2, "No such file or directory", "gcc")) == "no C compiler"
    stub = subprocess.CalledProcessError(1, ["/usr/bin/gcc", "main.c", "-shared"])
    assert probe.failure_kind(stub) == "C compiler failed"
    assert probe.failure_kind(FAILURES["RuntimeError"]()) == "RuntimeError"


# ---- on a GPU (skipped without one; scripts/gpu_check.sh runs them) ----------------------------


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_real_probe_passes_on_this_gpu(dtype, monkeypatch, tmp_path):
    monkeypatch.undo()  # the real device facts and probe
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))
    probe.forget()
    device = torch.device("cuda", torch.cuda.current_device())
    facts, verdict = probe.check(device, dtype)
    assert verdict.ok, verdict.detail
    assert follow_backend("auto", device, dtype) == "triton" == resolve_backend("triton", device, dtype)
    assert probe.read_verdicts(facts)[verdict.dtype].ok and facts.name == torch.cuda.get_device_name(device)
    probe.forget()
