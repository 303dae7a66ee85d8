"""The CUDA hot path, checked on the CPU: the default dtype and backend per compute capability, CUDA
graphs under accelerate-style offload moves (capture counts), the micro-batch budget per backend, and
per-call host syncs (counted, zero for device tensors) with an O(1) weight check per replay.

Device properties are faked (``torch.cuda.get_device_capability``, the probe's facts); the decision code
and the graph runner's bookkeeping are the real ones. The ``gpu`` tests repeat the offload and sync
counts on a GPU and are skipped without CUDA."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging

import pytest
import torch
from torch import nn

import fastenc
import fastenc.errors
import fastenc.inputs
import fastenc.backends as backends
from fastenc.api import parse_dtype
from fastenc.backends import CUDA_DEFAULTS, cuda_default, follow_backend, probe, resolve_backend

CUDA = torch.device("cuda")
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A CUDA GPU as the decision code sees it (kernels that pass their first-contact probe); ``gpu.cap``
    sets its compute capability, ``gpu.probes`` lists the probes run."""
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(backends, "_triton_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    class Gpu:
        cap = (9, 0)
        probes: list = []

    def capability(device=None):
        return Gpu.cap

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(probe, "gpu_facts", lambda device: probe.GpuFacts(
        "test GPU", "%d.%d" % Gpu.cap, "test", torch.__version__, "test"))
    monkeypatch.setattr(probe, "run_probe", lambda device, dtype: Gpu.probes.append(dtype))
    monkeypatch.setattr(backends, "_BELOW_LOGGED", [])
    probe.forget()
    yield Gpu
    probe.forget()


# ---- (a) the default dtype and backend per compute capability -----------------------------------------


@pytest.mark.parametrize("cap,dtype,backend", [
    ((7, 0), torch.float16, "torch"),  # V100
    ((7, 5), torch.float16, "torch"),  # T4, RTX 20xx
    ((8, 0), torch.bfloat16, "triton"),  # A100
    ((8, 6), torch.bfloat16, "triton"),  # A10, RTX 30xx
    ((8, 9), torch.bfloat16, "triton"),  # L4, RTX 40xx
    ((9, 0), torch.bfloat16, "triton"),  # H100, H200
    ((12, 0), torch.bfloat16, "triton"),
])
def test_default_dtype_and_backend_per_capability(gpu, cap, dtype, backend):
    gpu.cap = cap
    assert cuda_default(CUDA).dtype == dtype and cuda_default(CUDA).backend == backend
    assert parse_dtype(None, CUDA) == dtype  # what fastenc.load(device="cuda") computes in
    assert parse_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_backend("auto", CUDA) == backend
    for weights in (torch.float16, torch.bfloat16, torch.float32):  # weights moved onto it in any dtype
        assert follow_backend("auto", CUDA, weights) == backend
    assert resolve_backend("triton", CUDA) == "triton"  # asked for explicitly: it runs there anyway
    assert follow_backend("torch", CUDA, dtype) == "torch"
    if backend == "torch":  # auto never compiles a kernel it will not run
        assert gpu.probes == [parse_dtype(None, CUDA)]  # only the explicit triton request probed


def test_the_capability_table_is_ordered_and_says_why(gpu, caplog):
    assert [row.since for row in CUDA_DEFAULTS] == sorted(row.since for row in CUDA_DEFAULTS)
    assert CUDA_DEFAULTS[0].since == (0, 0) and all(row.why for row in CUDA_DEFAULTS)
    gpu.cap = (7, 5)
    with caplog.at_level(logging.INFO, logger="fastenc"):
        assert resolve_backend("auto", CUDA) == "torch"
        assert resolve_backend("auto", CUDA) == "torch"
    said = [r.getMessage() for r in caplog.records if "below sm_80" in r.getMessage()]
    assert len(said) == 1 and "torch op table" in said[0] and "no MMA" in said[0]


def test_rocm_and_unreadable_capabilities_take_the_newest_row(gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    gpu.cap = (7, 5)  # what a ROCm build reports says nothing about NVIDIA's MMA
    assert cuda_default(CUDA) == CUDA_DEFAULTS[-1] and parse_dtype(None, CUDA) == torch.bfloat16
    monkeypatch.setattr(torch.version, "hip", None)

    def unreadable(device=None):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "get_device_capability", unreadable)
    assert cuda_default(CUDA) == CUDA_DEFAULTS[-1]  # the first-contact check reports the driver instead


# ---- (c) the micro-batch budget matches what the running backend allocates ---------------------------


def test_activation_bytes_count_scores_only_for_matmul_attention():
    from fastenc.api import FUSED_ATTENTION_MAX_HEAD_DIM, activation_bytes
    from fastenc.config import get_size

    cfg, L = get_size("base"), 512
    for dtype, item in ((torch.bfloat16, 4), (torch.float32, 4)):
        dense = activation_bytes(cfg, L, dtype, "torch")
        assert activation_bytes(cfg, L, dtype, "cpu") == dense == activation_bytes(cfg, L, dtype)
        assert dense - activation_bytes(cfg, L, dtype, "triton") == cfg.num_heads * L * L * (3 * 4 + item)
    assert (1 << 30) // activation_bytes(cfg, L, torch.bfloat16, "torch") == 10
    assert (1 << 30) // activation_bytes(cfg, L, torch.bfloat16, "triton") == 19
    wide = dataclasses.replace(cfg, d_kv=FUSED_ATTENTION_MAX_HEAD_DIM + 64, name="wide-heads")
    assert activation_bytes(wide, L, torch.bfloat16, "triton") == activation_bytes(wide, L, torch.bfloat16, "torch")


def test_the_head_dim_bound_is_the_kernels():
    from fastenc.api import FUSED_ATTENTION_MAX_HEAD_DIM
    from fastenc.kernels import attention

    for d, fused in ((64, True), (FUSED_ATTENTION_MAX_HEAD_DIM, True), (FUSED_ATTENTION_MAX_HEAD_DIM + 1, False)):
        assert attention.supported(torch.empty(1, 2, 8, d)) is fused


def _encoder(backend: str, graphs: bool = False):
    from fastenc.kernels.graphs import CudaGraphRunner
    from fastenc.model import T5Encoder
    from reference import TINY

    model = T5Encoder(TINY).eval()
    return fastenc.Encoder(model, backend=backend, graphs=CudaGraphRunner(model) if graphs else None)


def test_micro_batch_per_backend_and_graph_bucket():
    from fastenc.api import activation_bytes
    from fastenc.kernels.graphs import BATCH_BUCKETS, bucket_for
    from reference import TINY

    torch_enc, triton_eager, triton_graphs = _encoder("torch"), _encoder("triton"), _encoder("triton", graphs=True)
    assert (torch_enc.backend, triton_eager.backend, triton_graphs.backend) == ("torch", "triton", "triton")
    assert triton_graphs.graphs is not None and triton_eager.graphs is None
    L = 120  # pixart-alpha: the graphs run it as the 128 bucket
    budget = 5 * activation_bytes(TINY, L, torch.float32, "torch")
    for enc in (torch_enc, triton_eager, triton_graphs):
        enc.activation_budget = budget
    assert torch_enc.micro_batch(L) == 5
    eager = budget // activation_bytes(TINY, L, torch.float32, "triton")
    assert triton_eager.micro_batch(L) == eager > 5  # no score tensors: more prompts per pass
    padded = budget // activation_bytes(TINY, bucket_for(L, triton_graphs.graphs.seq_buckets), torch.float32, "triton")
    step = triton_graphs.micro_batch(L)
    assert step == max(b for b in BATCH_BUCKETS if b <= padded) and step < padded  # a whole bucket: no padded rows
    assert triton_graphs.micro_batch(600) == budget // activation_bytes(TINY, 600, torch.float32, "triton")  # eager
    triton_graphs.activation_budget = 1  # less than one prompt: still one per pass
    assert triton_graphs.micro_batch(L) == 1 and torch_enc.micro_batch(L) == 5


# ---- (b) CUDA graphs under offload moves; (d) the O(1) weight check -------------------------------------


class _Graph:
    """Stands in for a captured CUDA graph: remembers the parameter addresses it was captured against and
    refuses to replay once they changed (a real graph would read freed or foreign memory)."""

    def __init__(self, model, ids, mask):
        self.model, self.ids, self.mask = model, ids, mask
        self.addresses = _addresses(model)
        self.out = model(ids, mask)

    def replay(self):
        if _addresses(self.model) != self.addresses:
            raise AssertionError("a graph was replayed after the weights moved")
        self.out.copy_(self.model(self.ids, self.mask))


def _addresses(model):
    return [(p.data_ptr(), p.dtype) for p in model.parameters()]


def _simulated():
    """The real CudaGraphRunner with its CUDA steps (device guard, stream waits, the capture) done on the CPU."""
    from fastenc.kernels.graphs import CudaGraphRunner

    class Simulated(CudaGraphRunner):
        def _graphable(self, device):
            return True

        def _on(self, device):
            return contextlib.nullcontext()

        def _wait_previous(self, device):
            pass

        def _record_done(self, device):
            pass

        def _record_graph(self, ids, mask, device):
            graph = _Graph(self.model, ids, mask)
            return graph, graph.out

    return Simulated


def _offloaded(seed: int = 0):
    from fastenc.model import T5Encoder
    from reference import TINY

    torch.manual_seed(seed)
    model = T5Encoder(TINY).eval()
    runner = _simulated()(model)
    return fastenc.Encoder(model, backend="torch", graphs=runner), runner


def _away_and_back(enc, same_addresses: bool, keep: list):
    """One offload round trip as accelerate's hooks make it (``module.to`` away and back, through the
    encoder's own ``_apply``): the weights return to their old storage or to new storage (the old kept
    alive so the allocator cannot hand its addresses out again)."""
    held = {k: v for k, v in enc.model.state_dict().items()}
    keep.append(held)
    nn.Module.to(enc, torch.float64)  # away: other storage (the CPU cannot leave for another device here)
    keep.append([p.detach() for p in enc.parameters()])
    if same_addresses:
        enc.model.load_state_dict(held, assign=True)  # back into the very blocks it left
    else:
        nn.Module.to(enc, torch.float32)  # back, elsewhere


IDS = torch.randint(2, 500, (2, 20))


def test_offload_round_trips_reuse_the_graphs_when_the_weights_come_back_to_their_addresses():
    enc, runner = _offloaded()
    with torch.no_grad():
        want = enc.model(IDS)
    keep: list = []
    for _ in range(6):
        _away_and_back(enc, same_addresses=True, keep=keep)
        with torch.inference_mode():
            torch.testing.assert_close(enc(IDS), want)
    assert runner.captures == 1 and runner.stats.replays == 6 and runner.stats.eager == 0
    assert runner.stats.invalidations == 0


def test_offload_round_trips_to_new_addresses_run_eagerly_and_capture_once_settled():
    enc, runner = _offloaded()
    with torch.no_grad():
        want = enc.model(IDS)
    with torch.inference_mode():
        torch.testing.assert_close(enc(IDS), want)  # loaded in place: captured on the first call
    assert runner.captures == 1 and runner.stats.replays == 1
    keep: list = []
    for call in range(6):
        _away_and_back(enc, same_addresses=False, keep=keep)
        with torch.inference_mode():
            torch.testing.assert_close(enc(IDS), want)
        if call == 0:
            assert runner.stats.live == [(2, 32)]  # kept: the weights may still come back
    assert runner.captures == 1 and runner.stats.eager == 6 and runner.stats.replays == 1
    assert runner.stats.invalidations == 1 and not runner.stats.live  # the stale graphs' pool is freed
    with torch.inference_mode():  # the placement stays put from now on: seen by the last call and this one
        for _ in range(3):
            torch.testing.assert_close(enc(IDS), want)
    assert runner.captures == 2 and runner.stats.eager == 6 and runner.stats.replays == 4


def test_a_move_under_live_graphs_never_replays_them():
    """The runner on its own (on a GPU the encoder keeps it across casts; on the CPU a cast re-selects the
    op table and drops it)."""
    enc, runner = _offloaded()
    with torch.inference_mode():
        runner(IDS)
        enc.to(torch.bfloat16)
        with torch.no_grad():
            want = enc.model(IDS)
        for _ in range(3):
            torch.testing.assert_close(runner(IDS), want)  # _Graph raises if a stale graph were replayed
    assert runner.captures == 2 and runner.stats.eager == 1 and runner.stats.invalidations == 1


def _counting_signatures(runner, monkeypatch):
    reads = []
    real = type(runner).signature

    def signature(self):
        reads.append(1)
        return real(self)

    monkeypatch.setattr(type(runner), "signature", signature)
    return reads


@pytest.mark.parametrize("how", ["encoder.to", "model.to", "model.cast(fp16)", "new Parameter",
                                 "load_state_dict(assign=True)", "new submodule"])
def test_the_weight_check_is_o1_per_call_and_sees_every_module_api_move(how, monkeypatch):
    from fastenc.model import RMSNorm

    enc, runner = _offloaded()
    with torch.inference_mode():
        runner(IDS)  # captured (Encoder's registration of the model made it read the weights once more)
    reads = _counting_signatures(runner, monkeypatch)
    with torch.inference_mode():
        for _ in range(20):
            runner(IDS)
    assert reads == [] and runner.captures == 1 and runner.stats.replays == 21  # no parameter walked per call
    model = enc.model
    with torch.no_grad():
        if how == "encoder.to":
            enc.to(torch.bfloat16)
        elif how == "model.to":
            model.to(torch.bfloat16)
        elif how == "model.cast(fp16)":
            model.cast(torch.float16)
        elif how == "new Parameter":
            model.blocks[0].ffn.wo.weight = nn.Parameter(model.blocks[0].ffn.wo.weight.detach().clone() * 2)
        elif how == "load_state_dict(assign=True)":
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        else:
            norm = RMSNorm(model.config.d_model, model.config.eps)
            norm.weight.data.fill_(0.5)
            model.final_norm = norm
        want = model(IDS)
    with torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(runner(IDS), want)
    assert len(reads) == 1  # one full read after the move, then O(1) again
    assert runner.captures == 2 and runner.stats.invalidations == 1


def test_a_model_that_cannot_say_it_moved_is_read_every_call(monkeypatch):
    enc, runner = _offloaded()
    monkeypatch.setattr(type(enc.model), "weights_moves", None)
    reads = _counting_signatures(runner, monkeypatch)
    with torch.inference_mode():
        for _ in range(4):
            runner(IDS)
    assert len(reads) == 4 and runner.captures == 1 and runner.stats.replays == 4


@pytest.mark.gpu
def test_gpu_offload_round_trips_capture_once(tmp_path):
    from fastenc.model import T5Encoder
    from reference import TINY, rel_err

    torch.manual_seed(0)
    fastenc.save(T5Encoder(TINY), tmp_path / "tiny")
    enc = fastenc.load(tmp_path / "tiny", backend="triton", device="cuda", dtype="bf16", cache=False)
    ids = torch.randint(2, TINY.vocab_size, (2, 40))
    with torch.inference_mode():
        want = enc(ids)
    runner = enc.graphs
    assert runner.captures == 1
    captures = []
    for _ in range(8):  # what enable_model_cpu_offload does around each call
        enc.to("cpu")
        enc.to("cuda")
        with torch.inference_mode():
            got = enc(ids)
        assert rel_err(got, want) <= 2e-2
        captures.append(runner.captures)
    # replayed (the same blocks came back) or eager; at most one more capture, for blocks that come back
    # the same from the second round trip on (the load allocated its own), and none after that
    assert enc.graphs is runner and captures[-1] <= 2 and captures[-1] == captures[2], captures


# ---- (d) no host syncs on the device path; checks of device tensors reported without one ----------------

HOST_READS = ("item", "cpu", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


def _count_host_reads(monkeypatch, only_cuda: bool = False):
    """Count calls of every torch.Tensor method that reads a value back to the host."""
    counts: collections.Counter = collections.Counter()
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            if not only_cuda or self.is_cuda:
                counts[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


@pytest.fixture
def device_tensors(monkeypatch):
    """CPU tensors treated as device tensors (checked the way CUDA ones are)."""
    from fastenc import inputs

    monkeypatch.setattr(inputs, "HOST_DEVICE_TYPES", frozenset())


def _mask(B=2, L=20, dtype=torch.float32):
    mask = torch.ones(B, L, dtype=dtype)
    mask[1, 15:] = 0
    return mask


def test_the_device_path_reads_nothing_back_per_call(device_tensors, monkeypatch):
    enc, runner = _offloaded()
    mask = _mask()
    with torch.no_grad():
        want = enc.model(IDS, mask)
    with torch.inference_mode():
        enc(IDS, mask)  # captured; the status buffer made
        counts = _count_host_reads(monkeypatch)
        outs = [enc(IDS, mask) for _ in range(5)]
    assert sum(counts.values()) == 0, dict(counts)
    assert runner.stats.replays == 6
    for out in outs:
        torch.testing.assert_close(out, want)


def test_the_counter_sees_the_host_path_read_back(monkeypatch):
    enc, _ = _offloaded()
    with torch.inference_mode():
        enc(IDS, _mask())
        counts = _count_host_reads(monkeypatch)
        enc(IDS, _mask())
    assert counts["__bool__"] == 2 and counts["__float__"] == 2  # ids, mask; the result's min and max


def _bad_ids():
    ids = IDS.clone()
    ids[1, 3] = 600  # TINY's vocabulary is 512
    return ids


def test_device_checks_raise_the_host_message_at_the_next_call(device_tensors):
    enc, _ = _offloaded()
    with pytest.raises(fastenc.errors.InputError) as host:
        fastenc.inputs.check_token_inputs(_bad_ids(), None, 512)
    with torch.inference_mode():
        out = enc(_bad_ids())  # returns: nothing was read back
        assert torch.isfinite(out).all()  # the forward ran on ids clamped into the vocabulary
        with pytest.raises(fastenc.errors.InputError) as err:
            enc(IDS)
    assert str(err.value) == f"{host.value} (found on cpu after call 1 returned; input_ids [2, 20])"
    assert str(err.value) == ("input_ids out of range [0, 512): input_ids[1, 3] = 600 (found on cpu after call 1 "
                              "returned; input_ids [2, 20])")
    with torch.inference_mode():
        enc(IDS)  # a good call after the failure was reported
        enc.synchronize()


@pytest.mark.parametrize("dtype,value,shown", [(torch.float32, 0.5, "0.5"), (torch.long, 2, "2"),
                                               (torch.int32, -1, "-1")])
def test_device_mask_checks_at_synchronize(device_tensors, dtype, value, shown):
    enc, _ = _offloaded()
    mask = _mask(dtype=dtype)
    mask[0, 2] = value
    with torch.inference_mode():
        enc(IDS, mask)
    with pytest.raises(fastenc.errors.InputError) as err:
        enc.synchronize()
    assert str(err.value) == (f"attention_mask must hold only 0 and 1: attention_mask[0, 2] = {shown} (found on cpu "
                              "after call 1 returned; input_ids [2, 20])")
    enc.synchronize()  # reported once


def test_device_result_checks_name_the_rows(device_tensors):
    enc, _ = _offloaded()
    with torch.no_grad():
        enc.model.final_norm.weight[5] = float("nan")  # in place: every row
    with torch.inference_mode():
        enc(IDS)
    with pytest.raises(fastenc.errors.NumericsError) as err:
        enc.synchronize()
    assert str(err.value) == ("the encoder output holds non-finite values (NaN/inf) in 2 of 2 inputs (first: row 0); "
                              "the weights or the compute dtype (float32) overflow - check the checkpoint, or use "
                              "dtype='fp32' (found on cpu after call 1 returned; input_ids [2, 20])")
    with torch.inference_mode():
        enc(IDS[:1])
    with pytest.raises(fastenc.errors.NumericsError, match=r"in 1 of 1 inputs .* after call 2 returned"):
        enc(IDS)  # or at the next call


@pytest.mark.gpu
def test_gpu_calls_make_no_host_sync(tmp_path, monkeypatch):
    from fastenc.model import T5Encoder
    from reference import TINY, rel_err

    torch.manual_seed(0)
    fastenc.save(T5Encoder(TINY), tmp_path / "tiny")
    enc = fastenc.load(tmp_path / "tiny", backend="triton", device="cuda", dtype="bf16", cache=False)
    ids, mask = IDS.cuda(), _mask().cuda()
    with torch.inference_mode():
        want = enc.model(ids, mask)
        enc(ids, mask)  # capture, status buffer
        counts = _count_host_reads(monkeypatch, only_cuda=True)
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        try:
            outs = [enc(ids, mask) for _ in range(5)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sum(counts.values()) == 0, dict(counts)
    enc.synchronize()
    for out in outs:
        assert rel_err(out, want) <= 2e-2
    bad = ids.clone()
    bad[1, 3] = TINY.vocab_size
    with torch.inference_mode():
        enc(bad)
    with pytest.raises(fastenc.errors.InputError, match=r"input_ids\[1, 3\] = 512 \(found on cuda:0 after call"):
        enc.synchronize()


def test_runner_settings_are_checked():
    from fastenc.errors import ConfigError
    from fastenc.kernels.graphs import CudaGraphRunner
    from fastenc.model import T5Encoder
    from reference import TINY

    model = T5Encoder(TINY)
    with pytest.raises(ConfigError, match=r"^stable_calls must be >= 1, got 0$"):
        CudaGraphRunner(model, stable_calls=0)
    with pytest.raises(ConfigError, match=r"^max_graphs must be >= 1, got 0$"):
        CudaGraphRunner(model, max_graphs=0)
