"""Encoders follow their weights: backend resolution per device, moves and casts, CUDA-graph
invalidation, locking, and the refusal to interpret CUDA tensors. The CPU tests check the logic;
the ``gpu`` tests (skipped without CUDA) check the same on a GPU, as scripts/gpu_check.sh runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastenc
import fastenc.backends as backends
from fastenc.backends import follow_backend
from fastenc.errors import BackendUnavailable, ConfigError
from fastenc.kernels import graphs
from fastenc.model import T5Encoder
from fastenc.ops import TORCH_OPS
from reference import TINY, rel_err

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Make ``auto`` treat this CPU as one with native bf16 (the ``cpu`` backend itself runs on any x86)."""
    monkeypatch.setattr(backends, "cpu_fast_path", lambda: (True, "forced for this test"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return fastenc.save(T5Encoder(TINY), tmp_path_factory.mktemp("follow") / "tiny")


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))


def _ids(B: int = 2, L: int = 9) -> torch.Tensor:
    return torch.randint(2, TINY.vocab_size, (B, L))


# ---- which backend runs where ------------------------------------------------------------------


def _kernels_pass_their_check(monkeypatch):
    """A CUDA GPU whose triton kernels passed the first-contact probe (tests/test_gpu_first_contact.py
    covers the probe and its failures)."""
    from fastenc.backends import probe

    facts = probe.GpuFacts("test GPU", "9.0", "test", torch.__version__, "test")
    monkeypatch.setattr(probe, "gpu_facts", lambda device: facts)
    monkeypatch.setattr(probe, "run_probe", lambda device, dtype: None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    probe.forget()


@pytest.mark.parametrize("requested,device,dtype,fast,want", [
    ("auto", "cuda", torch.bfloat16, False, "triton"),
    ("auto", "cuda:1", torch.float32, False, "triton"),
    ("auto", "cpu", torch.bfloat16, True, "cpu"),
    ("auto", "cpu", torch.bfloat16, False, "torch"),  # no native bf16: the reference
    ("auto", "cpu", torch.float32, True, "torch"),  # fp32 weights are never cast behind the caller's back
    ("auto", "cpu", torch.float16, True, "torch"),
    ("auto", "meta", torch.bfloat16, True, "torch"),
    ("torch", "cuda", torch.bfloat16, True, "torch"),
    ("cpu", "cpu", torch.bfloat16, False, "cpu"),  # asked for explicitly: runs even without native bf16
    ("cpu", "cpu", torch.float32, True, "torch"),
    ("cpu", "cuda", torch.bfloat16, True, "triton"),  # moved off the CPU: what auto picks there
    ("triton", "cpu", torch.bfloat16, True, "cpu"),
    ("triton", "cpu", torch.float32, True, "torch"),
    ("triton", "cuda", torch.float16, False, "triton"),
])
def test_follow_backend(monkeypatch, requested, device, dtype, fast, want):
    monkeypatch.setattr(backends, "cpu_fast_path", lambda: (fast, "test"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _kernels_pass_their_check(monkeypatch)
    assert follow_backend(requested, torch.device(device), dtype) == want


def test_follow_backend_without_triton_and_with_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "_triton_importable", lambda: False)
    assert follow_backend("auto", torch.device("cuda"), torch.bfloat16) == "torch"
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton asked for on the CPU: its interpreter
    assert follow_backend("triton", torch.device("cpu"), torch.float32) == "triton"
    with pytest.raises(ConfigError, match="'onnxruntime' does not follow the weights"):
        follow_backend("onnxruntime", torch.device("cpu"), torch.float32)


# ---- moves and casts on the CPU ---------------------------------------------------------------


def test_auto_encoder_reselects_its_op_table_when_its_dtype_changes(checkpoint, bf16_cpu):
    enc = fastenc.load(checkpoint, dtype="fp32", cache=False)  # fp32 asked for: the reference
    assert (enc.requested_backend, enc.backend, enc.dtype) == ("auto", "torch", torch.float32)
    ids = _ids()
    with torch.no_grad():
        fp32 = enc(ids)
    enc.to(torch.bfloat16)
    assert enc.backend == "cpu"  # reported at once; installed by the next forward
    with torch.no_grad():
        bf16 = enc(ids)
    assert enc.model.ops.name == "cpu" and enc.model.cpu_plan.measured and enc.graphs is None  # planned here
    assert bf16.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(bf16.float(), fp32, dim=-1).min() > 0.99
    enc.to("meta")  # no kernels on meta: the reference op table, no graphs
    assert enc.backend == "torch" and enc.device.type == "meta"


def test_cpu_fast_path_is_kept_and_says_so(checkpoint, bf16_cpu, caplog):
    enc = fastenc.load(checkpoint, cache=False)
    assert (enc.backend, enc.dtype) == ("cpu", torch.bfloat16)
    before = {n: p.detach().clone() for n, p in enc.model.named_parameters()}
    ids = _ids()
    with torch.no_grad():
        want = enc(ids)
    with caplog.at_level("INFO", logger="fastenc"):
        enc.to(torch.float32)
        enc.float()
        torch.nn.Sequential(enc).to(torch.float32)  # a parent's generic cast: fp32 and back to bf16, exactly
    assert (enc.backend, enc.dtype) == ("cpu", torch.bfloat16)
    assert caplog.text.count("kept the cpu backend") == 3
    assert sum(r.levelname == "WARNING" for r in caplog.records if "kept the cpu" in r.message) == 1
    for n, p in enc.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n
    with torch.no_grad():
        got = enc(ids)  # storage changed under the parent's cast: the int8 weights were re-made
    assert enc.model.ops.num_int8 == len(enc.model.int8_plan.weights)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["to", "half", "parent"])
def test_fp16_keeps_the_ffn_output_projection_in_fp32(checkpoint, how):
    enc = fastenc.load(checkpoint, backend="torch", cache=False)
    if how == "to":
        enc.to(torch.float16)
    elif how == "half":
        enc.half()
    else:
        torch.nn.Sequential(enc).to(torch.float16)
    assert enc.dtype == torch.float16
    assert all(b.ffn.wo.weight.dtype == torch.float32 for b in enc.model.blocks)
    assert enc.model.blocks[0].ffn.wi.weight.dtype == torch.float16


def test_explicit_torch_backend_stays_and_graph_artifacts_do_not_follow(checkpoint):
    enc = fastenc.load(checkpoint, backend="torch", cache=False)
    enc.to(torch.bfloat16)
    with torch.no_grad():
        enc(_ids())
    assert enc.backend == "torch" and enc.model.ops is TORCH_OPS


def test_threads_install_the_op_table_once(checkpoint, bf16_cpu, monkeypatch):
    """Many threads calling an encoder right after a move: one of them prepares the cpu path, all agree."""
    import fastenc.backends.cpu_plan as cpu_plan

    enc = fastenc.load(checkpoint, dtype="fp32", cache=False)
    enc.to(torch.bfloat16)
    calls = []
    real = cpu_plan.prepare_planned
    monkeypatch.setattr(cpu_plan, "prepare_planned", lambda model, **kw: (calls.append(1), real(model, **kw))[1])
    ids = _ids(3, 11)
    results, errors = [None] * 6, []

    def work(i):
        try:
            with torch.no_grad():
                results[i] = enc(ids)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=0)


# ---- CUDA-graph invalidation rules (checked on CPU tensors; the GPU tests replay) ----------------


def test_graph_signature_tracks_storage_dtype_and_device():
    model = T5Encoder(TINY).eval()
    runner = graphs.CudaGraphRunner(model)
    sig = runner.signature()
    assert len(sig) == len(list(model.parameters()))
    with torch.no_grad():
        model.blocks[0].ffn.wo.weight.mul_(2.0)  # in place: a graph sees it, nothing to invalidate
    assert runner.signature() == sig
    model.blocks[0].ffn.wo.weight = torch.nn.Parameter(model.blocks[0].ffn.wo.weight.detach().clone())
    assert runner.signature() != sig  # replaced (load_state_dict(assign=True), accelerate hooks)
    sig = runner.signature()
    model.to(torch.bfloat16)
    assert runner.signature() != sig
    sig = runner.signature()
    model.to("meta")
    assert runner.signature() != sig and runner.device().type == "meta"


def test_graph_runner_drops_graphs_when_the_weights_change():
    model = T5Encoder(TINY).eval()
    runner = graphs.CudaGraphRunner(model)
    assert runner.check_weights() is False  # first look: records the signature
    runner._graphs[(1, 32)] = object()  # as if a bucket had been captured
    assert runner.check_weights() is False and len(runner._graphs) == 1  # nothing moved
    model.to(torch.float16)
    assert runner.check_weights() is True and not runner._graphs and runner.stats.invalidations == 1
    assert runner.check_weights() is False


def test_moves_wait_for_replays_and_drop_graphs_without_deadlock():
    """A move holds the runner's lock (replays in flight come first); the runner sees it and drops the
    graphs on its next check, under the same re-entrant lock."""
    model = T5Encoder(TINY).eval()
    runner = graphs.CudaGraphRunner(model)
    enc = fastenc.Encoder(model, backend="torch", graphs=runner)
    assert enc.graphs is runner
    runner.check_weights()
    runner._graphs[(1, 32)] = object()
    done = threading.Event()

    def move():
        enc.to(torch.bfloat16)
        enc.to("meta")  # another device: graphs and pool dropped at once
        done.set()

    t = threading.Thread(target=move)
    t.start()
    t.join(timeout=30)
    assert done.is_set(), "moving the encoder deadlocked on the graph runner's lock"
    assert enc.backend == "torch" and runner.device().type == "meta"
    with runner.quiesced():
        assert runner.check_weights() is True
    assert not runner._graphs and runner.stats.invalidations == 1


def test_encoder_owns_no_graphs_off_cuda(checkpoint):
    enc = fastenc.load(checkpoint, backend="torch", cache=False)
    assert enc.graphs is None and "graphs" not in dict(enc.named_children())


# ---- the interpreter never runs CUDA tensors silently --------------------------------------------


def test_interpreted_kernels_refuse_cuda_tensors(monkeypatch):
    from fastenc.kernels._common import Kernel
    from fastenc.kernels.rms_norm import _add_rms_norm_kernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = Kernel(_add_rms_norm_kernel)  # made while TRITON_INTERPRET=1: triton hands out the interpreter
    assert not kernel._gpu_compiled
    with pytest.raises(BackendUnavailable, match="imported with TRITON_INTERPRET=1.*unset TRITON_INTERPRET"):
        kernel(torch.device("cuda", 0), lambda meta: (1,))  # refused before any argument is touched


# ---- on a GPU ------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _eager(enc, ids, mask=None):
    with torch.no_grad():
        return enc.model(ids.to(enc.device), None if mask is None else mask.to(enc.device))


@gpu
def test_gpu_auto_encoder_follows_to_cuda_and_back(checkpoint):
    ref = fastenc.load(checkpoint, backend="torch", device="cuda", dtype="fp32", cache=False)
    enc = fastenc.load(checkpoint, device="cpu", dtype="fp32", cache=False)  # as T5Replacement.from_pretrained
    ids = _ids(2, 40)
    with torch.no_grad():
        want = ref(ids)
    enc.to("cuda")
    assert enc.backend == "triton"
    with torch.inference_mode():
        got = enc(ids)
    assert enc.model.ops.name == "triton" and enc.graphs is not None and enc.graphs.stats.replays == 1
    assert rel_err(got, want) <= 1e-3
    enc.to("cpu")
    with torch.inference_mode():
        back = enc(ids)
    assert enc.backend in ("torch", "cpu") and enc.graphs is None and back.device.type == "cpu"
    assert rel_err(back, want.cpu()) <= 1e-3


@gpu
def test_gpu_graphs_are_invalidated_by_moves_casts_and_new_weights(checkpoint):
    enc = fastenc.load(checkpoint, backend="triton", device="cuda", dtype="fp32", cache=False)
    ids = _ids(2, 40).cuda()
    with torch.inference_mode():
        first = enc(ids)
    runner = enc.graphs
    assert runner.stats.captures == 1
    enc.to(torch.bfloat16)
    with torch.inference_mode():
        bf16 = enc(ids)  # just moved: eager
        assert runner.stats.captures == 1 and runner.stats.eager == 1
        bf16 = enc(ids)  # stayed put: captured for the new weights
    assert runner.stats.invalidations == 1 and runner.stats.captures == 2 and bf16.dtype == torch.bfloat16
    assert rel_err(bf16, _eager(enc, ids)) <= 2e-2
    enc.cpu()
    enc.cuda()
    with torch.inference_mode():
        again = enc(ids)
    assert rel_err(again, _eager(enc, ids)) <= 2e-2
    fresh = T5Encoder(TINY).to("cuda", torch.bfloat16)
    enc.model.load_state_dict(fresh.state_dict(), assign=True)  # new storage, no .to involved
    with torch.inference_mode():
        new = enc(ids)
    assert rel_err(new, _eager(enc, ids)) <= 2e-2 and rel_err(new, again) > 1e-2
    assert first.dtype == torch.float32


@gpu
def test_gpu_threads_on_their_own_streams_share_one_runner(checkpoint):
    enc = fastenc.load(checkpoint, backend="triton", device="cuda", dtype="bf16", cache=False)
    inputs = [_ids(b, l).cuda() for b, l in [(1, 20), (2, 70), (3, 100), (1, 20), (4, 128), (2, 70)]]
    want = [_eager(enc, x) for x in inputs]
    results, errors = {}, []

    def work(i):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream), torch.inference_mode():
                outs = [enc(inputs[i]) for _ in range(5)]
            stream.synchronize()
            results[i] = outs
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        for out in outs:
            assert rel_err(out, want[i]) <= 2e-2


@gpu
def test_gpu_interpreter_is_refused_for_cuda_tensors(checkpoint):
    code = ("import torch, fastenc; from fastenc.kernels import rms_norm\n"
            "x = torch.randn(4, 64, device='cuda'); w = torch.ones(64, device='cuda')\n"
            "try:\n    rms_norm.rms_norm(x, w, 1e-6)\nexcept fastenc.errors.BackendUnavailable as e:\n"
            "    print('refused:', e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "refused:" in run.stdout and "TRITON_INTERPRET" in run.stdout, run.stdout + run.stderr


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device_computes_there(checkpoint):
    ref = fastenc.load(checkpoint, backend="torch", device="cuda:1", dtype="fp32", cache=False)
    enc = fastenc.load(checkpoint, backend="triton", device="cuda:1", dtype="fp32", cache=False)
    ids = _ids(2, 40)
    torch.cuda.set_device(0)
    with torch.inference_mode():
        got, want = enc(ids), ref(ids)
    assert got.device == torch.device("cuda", 1) and rel_err(got, want) <= 1e-3


def _tiny_flux():
    """A tiny random Flux pipeline (diffusers is optional on a GPU machine)."""
    pytest.importorskip("diffusers", reason="diffusers is not installed here (the offload round trip needs it)")
    import test_diffusers as td

    return td


@gpu
def test_gpu_pinned_encoder_and_offload_round_trip(checkpoint, tmp_path):
    td = _tiny_flux()
    from fastenc.integrations import use_in_pipeline

    dirs = {"t5": tmp_path / "t5", "clip": tmp_path / "clip"}
    from helpers import make_t5_tokenizer_json

    make_t5_tokenizer_json(dirs["t5"])
    td._write_clip_tokenizer(dirs["clip"])
    torch.manual_seed(0)
    fastenc.save(T5Encoder(td.CFG), tmp_path / "enc")
    # pinned: the pipeline on CUDA, the encoder on the CPU; embeddings come back on CUDA
    enc = fastenc.load(tmp_path / "enc", device="cpu", cache=False)
    pipe = td.make_flux(dirs)
    use_in_pipeline(pipe, enc, pin_device="cpu")
    placed = (enc.device, enc.backend, enc.dtype)
    pipe.to("cuda")
    assert (enc.device, enc.backend, enc.dtype) == placed
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat", None, max_sequence_length=td.SEQ)[0]
    assert embeds.device.type == "cuda"
    td.generate(pipe, "a cat")
    assert (enc.device, enc.backend, enc.dtype) == placed
    assert all(p.device.type == "cpu" for p in enc.parameters())  # no GPU memory for text encoding
    # offload: the encoder moves to CUDA for its forward (triton + graphs) and back, every call
    enc2 = fastenc.load(tmp_path / "enc", device="cpu", cache=False)
    pipe2 = td.make_flux(dirs)
    use_in_pipeline(pipe2, enc2)
    pipe2.enable_model_cpu_offload()
    for _ in range(2):
        td.generate(pipe2, "a cat")
        assert enc2.device.type == "cpu"  # offloaded after use
    with torch.no_grad():
        embeds2 = pipe2.encode_prompt("a cat", None, max_sequence_length=td.SEQ)[0]
    assert enc2.backend == "triton" or enc2.device.type == "cpu"
    cos = torch.nn.functional.cosine_similarity(embeds2.float().cuda(), embeds.float(), dim=-1)
    assert cos.min() > 0.99  # GPU kernels after the offload round trip vs the pinned CPU path
    pipe2.maybe_free_model_hooks()


# ---- bench/gpu.py: its CPU-side logic (the GPU run is scripts/gpu_check.sh's) ---------------------


@pytest.fixture(scope="module")
def bench_gpu():
    import importlib

    return importlib.import_module("bench.gpu")


def test_bench_gpu_arguments(bench_gpu):
    args = bench_gpu.parse_args(["--shapes", "1x512, 8x77", "--candidates", "fastenc,t5-xxl", "--compile-budget", "30",
                                 "--ort-shape", "2x64"])
    assert args.shapes == [(1, 512), (8, 77)] and args.candidates == ["fastenc", "t5-xxl"]
    assert args.compile_budget == 30.0 and args.ort_shape == (2, 64) and args.out_dir == bench_gpu.RESULTS_DIR
    default = bench_gpu.parse_args([])
    assert default.shapes == [(1, 512), (1, 77), (8, 77), (8, 512)] and default.candidates == list(bench_gpu.CANDIDATES)
    for bad in (["--shapes", "1x513"], ["--shapes", "0x77"], ["--shapes", "1by77"], ["--candidates", "fastenc,tensorrt"],
                ["--reps", "0"], ["--compile-budget", "-1"]):
        with pytest.raises(SystemExit) as exc:
            bench_gpu.parse_args(bad)
        assert exc.value.code == 2


def test_bench_gpu_csv_and_summary(bench_gpu, tmp_path):
    R = bench_gpu.Row
    rows = [R("fastenc", "base", 1, "bf16", 1, 512, "latency", "ms", 0.28, 0.30, 0.33, 50),
            R("fastenc", "base", 1, "bf16", 1, 512, "peak_memory", "GB", 0.5, 0.5, 0.5),
            R("torch-compile", "base", 1, "bf16", 1, 512, "latency", "ms", 0.5, 0.6, 0.7, 50),
            R("t5-xxl", "xxl", 9, "bf16", 1, 512, "latency", "ms", 9.0, 9.5, 10.0, 50)]
    path = bench_gpu.write_csv(tmp_path / "r" / f"gpu-{bench_gpu.gpu_slug('NVIDIA H200')}.csv", rows,
                               {"timestamp": "t", "gpu": "NVIDIA H200", "versions": "v", "git_commit": "c"})
    assert path.name == "gpu-nvidia-h200.csv"
    import csv

    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == bench_gpu.COLUMNS and len(read) == 4
    assert read[0]["candidate"] == "fastenc" and read[0]["p50"] == "0.3" and read[0]["gpu"] == "NVIDIA H200"
    text = "\n".join(bench_gpu.summary(rows))
    assert "PASS latency <= 0.35 ms: 0.300 ms" in text and "MISS >= 1.5x torch.compile: 2.00x" not in text
    assert "PASS >= 1.5x torch.compile: 2.00x" in text and "PASS >= 25x T5-XXL eager: 31.7x" in text
    assert "MISS peak memory <= 0.4 GB: 0.500 GB" in text
    assert "n/a" in "\n".join(bench_gpu.summary(rows[:2]))  # rows missing: said so, not guessed
    assert bench_gpu.parse_rows('noise\n{"candidate": "x", "model": "m", "params": 1, "dtype": "bf16", "batch": 1, '
                                '"seq": 2, "metric": "latency", "unit": "ms", "p20": 1, "p50": 2, "p80": 3}\n{bad')[0].p50 == 2


def test_bench_gpu_skips_without_cuda(bench_gpu, capsys):
    if CUDA:
        pytest.skip("checks the no-GPU path; scripts/gpu_check.sh runs the benchmark on a GPU")
    assert bench_gpu.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("skipped:") and "CUDA" in out[0]
