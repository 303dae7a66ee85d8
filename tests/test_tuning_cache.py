"""Autotuning choices per device kind, kept between processes (fastenc/kernels/tuning.py).

A stub kernel runs under triton's real autotuner: only the jitted function (:class:`FakeJit`, which
records the meta-parameters each launch runs with) and the benchmark (:class:`Bench`, timings the test
chooses per GPU) are stand-ins, as are the device facts (``tuning.device_kind``). The kernel class, the
tuning table and triton's ``Autotuner`` are the real ones. One test runs a real kernel on a GPU."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from fastenc import caches
from fastenc.kernels import _common, tuning
from fastenc.kernels._common import Kernel

CUDA0, CUDA1 = torch.device("cuda:0"), torch.device("cuda:1")
DEVICE_KIND = tuning.device_kind  # the real one (the fixture below chooses the facts)
H100 = tuning.DeviceKind("NVIDIA H100 80GB HBM3", "9.0", 232448)
A10 = tuning.DeviceKind("NVIDIA A10", "8.6", 101376)
CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2) for b in (16, 32, 64)]
#: benchmark milliseconds per GPU and BLOCK: the H100 is fastest at 32, the A10 at 16
SPEED = {H100: {16: 3.0, 32: 1.0, 64: 2.0}, A10: {16: 1.0, 32: 4.0, 64: float("inf")}}


def _stub_tuned_kernel(X, N, BLOCK: tl.constexpr):
    pass


class FakeJit:
    """Stands in for ``triton.jit(fn)`` under the real Autotuner: each launch records its meta-parameters."""

    def __init__(self, fn):
        self.fn = fn
        self.arg_names = list(inspect.signature(fn).parameters)
        self.runs: list[dict] = []

    def run(self, *args, grid=None, warmup=False, **kwargs):
        self.runs.append(kwargs)

    def __getitem__(self, grid):  # an untuned launch
        return self.run


class Bench:
    """triton's ``do_bench`` for the stub: runs the call once and returns the current GPU's timing."""

    def __init__(self, jit: FakeJit):
        self.jit, self.gpu, self.calls = jit, H100, 0

    def __call__(self, kernel_call, quantiles=None):
        self.calls += 1
        kernel_call()
        t = SPEED[self.gpu][self.jit.runs[-1]["BLOCK"]]
        return [t, t, t]


def stub_kernel() -> tuple[Kernel, FakeJit, Bench]:
    """The stub kernel as fastenc builds one, with triton's real autotuner over :class:`FakeJit`."""
    kernel = Kernel(_stub_tuned_kernel, configs=CONFIGS, key=["N"], autotune=True)
    assert kernel.autotuned  # compiled (not interpreted) on CUDA tensors, as on a GPU
    jit = FakeJit(_stub_tuned_kernel)
    bench = Bench(jit)
    kernel._new_tuner = lambda: triton.autotune(configs=list(CONFIGS), key=["N"], do_bench=bench)(jit)
    return kernel, jit, bench


def launch(kernel: Kernel, device: torch.device, n: int = 100) -> None:
    kernel(device, lambda meta: (1,), torch.zeros(4), n)


@pytest.fixture(autouse=True)
def two_gpus(tmp_path, monkeypatch):
    """cuda:0 an H100, cuda:1 an A10 (current device 0), a fresh cache folder, nothing known in this process."""
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())  # the launch's device guard
    reads = []

    def kind(index):
        reads.append(index)
        return (H100, A10)[index]

    monkeypatch.setattr(tuning, "device_kind", kind)
    tuning.forget()
    yield reads
    tuning.forget()


def _table(kind: tuning.DeviceKind) -> dict:
    return json.loads((tuning.tuning_dir() / f"{kind.key()}.json").read_text())


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "fastenc"]


# ---- the device kind ---------------------------------------------------------------------------


def test_the_key_changes_with_capability_and_shared_memory(two_gpus):
    same = tuning.DeviceKind("NVIDIA A10", "8.6", 101376)
    assert same.key() == A10.key() and len(A10.key()) == 24
    assert tuning.DeviceKind("NVIDIA A10", "8.9", 101376).key() != A10.key()  # capability
    assert tuning.DeviceKind("NVIDIA A10", "8.6", 166912).key() != A10.key()  # shared memory per block
    assert tuning.DeviceKind("NVIDIA L4", "8.6", 101376).key() != A10.key()
    assert A10.label() == "NVIDIA A10 (sm_86, 99 KB shared memory per block)"
    assert tuning.kind_of(1) == tuning.kind_of(1) == A10 and tuning.kind_of(0) == H100
    assert two_gpus == [1, 0]  # read once per GPU and process


def test_device_kind_reads_the_gpus_properties(monkeypatch):
    from types import SimpleNamespace

    import triton.runtime

    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, shared_memory_per_block_optin=232448)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert DEVICE_KIND(0) == tuning.DeviceKind("NVIDIA H200", "9.0", 232448)
    del props.shared_memory_per_block_optin  # a torch that does not report it: triton's driver does
    utils = SimpleNamespace(get_device_properties=lambda index: {"max_shared_mem": 101376})
    monkeypatch.setattr(triton.runtime, "driver", SimpleNamespace(active=SimpleNamespace(utils=utils)))
    assert DEVICE_KIND(0).smem_per_block == 101376


def test_kernel_ids_follow_source_configs_and_key():
    base = tuning.kernel_id("k", "src", CONFIGS, ["N"])
    assert base == tuning.kernel_id("k", "src", list(CONFIGS), ["N"])
    assert base != tuning.kernel_id("k", "src 2", CONFIGS, ["N"])
    assert base != tuning.kernel_id("k", "src", CONFIGS[:2], ["N"])
    assert base != tuning.kernel_id("k", "src", CONFIGS, ["N", "M"])
    from fastenc.kernels import attention

    # one function, two config lists (16-bit and fp32 attention): two names in the tables
    assert attention._KERNEL.tuning_id != attention._KERNEL_FP32.tuning_id


# ---- kept between processes, never across device kinds -----------------------------------------


def test_a_choice_is_recorded_and_reused_by_a_new_instance(two_gpus):
    kernel, jit, bench = stub_kernel()
    tuned = _common.tunings()
    launch(kernel, CUDA0)
    assert bench.calls == 3 and jit.runs[-1]["BLOCK"] == 32  # benchmarked every config, ran the fastest
    assert _common.tunings() == tuned + 1
    launch(kernel, CUDA0)
    assert bench.calls == 3 and jit.runs[-1]["BLOCK"] == 32  # tuned once

    table = _table(H100)
    assert table["device"] == {"name": H100.name, "capability": "9.0", "smem_per_block": 232448}
    assert table["kernels"] == {kernel.tuning_id: {json.dumps([100, "torch.float32"]): tuning.config_record(CONFIGS[1])}}
    assert not [p for p in tuning.tuning_dir().iterdir() if p.name.endswith(".tmp")]  # written atomically

    tuning.forget()  # as a new process: a new kernel instance reads the table
    kernel2, jit2, bench2 = stub_kernel()
    launch(kernel2, CUDA0)
    assert bench2.calls == 0 and len(jit2.runs) == 1 and jit2.runs[0]["BLOCK"] == 32
    assert _common.tunings() == tuned + 1  # a recorded choice costs no benchmark
    launch(kernel2, CUDA0, n=200)  # a key the table does not have: tuned, and added
    assert bench2.calls == 3 and len(_table(H100)["kernels"][kernel.tuning_id]) == 2


def test_choices_never_cross_device_kinds(two_gpus):
    kernel, jit, bench = stub_kernel()
    launch(kernel, CUDA0)
    assert jit.runs[-1]["BLOCK"] == 32 and bench.calls == 3
    bench.gpu = A10
    launch(kernel, CUDA1)  # the same tuning key on another kind of GPU: benchmarked there
    assert bench.calls == 6 and jit.runs[-1]["BLOCK"] == 16
    launch(kernel, CUDA0)
    assert jit.runs[-1]["BLOCK"] == 32  # each GPU keeps its own choice in this process
    launch(kernel, CUDA1)
    assert jit.runs[-1]["BLOCK"] == 16 and bench.calls == 6
    assert H100.key() != A10.key()
    assert _table(A10)["kernels"][kernel.tuning_id] == {json.dumps([100, "torch.float32"]):
                                                        tuning.config_record(CONFIGS[0])}

    tuning.forget()  # a new process: each kind reads its own table
    kernel2, jit2, bench2 = stub_kernel()
    launch(kernel2, CUDA1)
    launch(kernel2, CUDA0)
    assert [r["BLOCK"] for r in jit2.runs] == [16, 32] and bench2.calls == 0


def test_a_second_process_reuses_the_recorded_choice(two_gpus, tmp_path):
    kernel, jit, bench = stub_kernel()
    launch(kernel, CUDA0)
    assert bench.calls == 3
    child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FASTENC_CACHE_DIR": str(tmp_path / "cache")},
                           cwd=Path(__file__).resolve().parents[1])
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout.strip().splitlines()[-1]) == {"h100": [32, 0], "a10": [16, 3]}


def _second_process() -> None:
    """Run by the test above in a child process: the H100 choice comes from the table, the A10 is tuned."""
    kinds = {0: H100, 1: A10}
    tuning.device_kind = kinds.__getitem__
    torch.cuda.current_device = lambda: 0
    torch.cuda.device = lambda device: nullcontext()
    kernel, jit, bench = stub_kernel()
    launch(kernel, CUDA0)
    h100 = [jit.runs[-1]["BLOCK"], bench.calls]
    bench.gpu = A10
    launch(kernel, CUDA1)
    print(json.dumps({"h100": h100, "a10": [jit.runs[-1]["BLOCK"], bench.calls]}))


# ---- damage, failures, the cache command ---------------------------------------------------------


DAMAGE = {
    "truncated": lambda good: good[: len(good) // 2],
    "not an object": lambda good: "[1, 2, 3]",
    "another version": lambda good: good.replace('"version": 1', '"version": 99'),
    "malformed entry": lambda good: good.replace('"kwargs"', '"kw"'),
    "binary": lambda good: "\udcff\x00garbage",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_table_is_ignored_with_one_warning(two_gpus, caplog, damage):
    kernel, jit, bench = stub_kernel()
    launch(kernel, CUDA0)
    path = tuning.tuning_dir() / f"{H100.key()}.json"
    good = path.read_text()
    path.write_text(DAMAGE[damage](good), encoding="utf-8", errors="surrogateescape")

    tuning.forget()
    kernel2, jit2, bench2 = stub_kernel()
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        launch(kernel2, CUDA0)  # the table is not used: tuned again, and the table rewritten whole
        launch(kernel2, CUDA0, n=300)
    (warning,) = _warnings(caplog)
    assert str(path) in warning.getMessage() and "damaged autotuning table" in warning.getMessage()
    assert H100.label() in warning.getMessage()
    assert bench2.calls == 6 and jit2.runs[-1]["BLOCK"] == 32
    assert set(_table(H100)["kernels"][kernel.tuning_id]) == {json.dumps([100, "torch.float32"]),
                                                              json.dumps([300, "torch.float32"])}


def test_a_choice_whose_every_config_failed_is_not_kept(two_gpus, monkeypatch):
    monkeypatch.setitem(SPEED, H100, {16: float("inf"), 32: float("inf"), 64: float("inf")})  # all OutOfResources
    kernel, jit, bench = stub_kernel()
    launch(kernel, CUDA0)
    assert bench.calls == 3
    assert not (tuning.tuning_dir() / f"{H100.key()}.json").exists()
    tuning.forget()
    kernel2, jit2, bench2 = stub_kernel()
    launch(kernel2, CUDA0)
    assert bench2.calls == 3  # benchmarked again in a new process


def test_an_unwritable_cache_costs_a_tuning_not_the_launch(two_gpus, monkeypatch):
    import fastenc.fileio

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fastenc.fileio, "atomic_write", fail)
    kernel, jit, bench = stub_kernel()
    launch(kernel, CUDA0)
    assert jit.runs[-1]["BLOCK"] == 32 and not tuning.tuning_dir().exists()


def test_untuned_launches_record_nothing(two_gpus):
    kernel, jit, bench = stub_kernel()
    kernel.single = CONFIGS[2]
    kernel._jitted = jit
    with _common.single_config_launches():  # the probe's launches: one config, no autotuner
        launch(kernel, CUDA0)
    assert bench.calls == 0 and jit.runs[-1]["BLOCK"] == 64 and not tuning.tuning_dir().exists()


def test_fastenc_cache_lists_and_clears_the_tables(two_gpus):
    kernel, _, _ = stub_kernel()
    launch(kernel, CUDA0)
    launch(kernel, CUDA1)
    (cache,) = [c for c in caches.cache_dirs() if c.name == "gpu-tuning"]
    assert cache.path == tuning.tuning_dir()
    assert sorted(p.name for p in cache.owned()) == sorted(f"{k.key()}.json" for k in (H100, A10))
    (cache.path / "notes.txt").write_text("mine")
    caches.clear(["gpu-tuning"])
    assert [p.name for p in cache.path.iterdir()] == ["notes.txt"]


# ---- on a GPU (skipped without one; scripts/gpu_check.sh runs it) --------------------------------


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None, reason="needs an NVIDIA GPU")
def test_a_real_kernel_tunes_once_per_device_kind(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real device facts and launches
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))
    tuning.forget()
    from fastenc.kernels import linear_relu

    real = linear_relu._KERNEL
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    want = torch.relu(x.float() @ w.float().t())
    fresh = [Kernel(real.fn, configs=real.all_configs, key=real._key, interpret_meta=real.interpret_meta,
                    smem=real._smem, elsize=real.elsize, autotune=True) for _ in range(2)]
    tuned = _common.tunings()
    for i, kernel in enumerate(fresh):
        monkeypatch.setattr(linear_relu, "_KERNEL", kernel)
        got = linear_relu.linear_relu(x, w)
        torch.cuda.synchronize()
        assert float((got.float() - want).norm() / want.norm()) < 2e-2
        assert _common.tunings() == tuned + 1  # the second instance ran the first one's recorded choice
        tuning.forget()
    kind = tuning.device_kind(torch.cuda.current_device())
    assert kind.smem_per_block > 48 * 1024 and _table(kind)["kernels"][fresh[0].tuning_id]
    assert fresh[0].tuning_id == fresh[1].tuning_id


if __name__ == "__main__":
    _second_process()
