"""Triton kernels against their torch references, and the triton backend against the torch one.

Without a GPU the kernels run through triton's interpreter on CPU tensors. That choice is made
per launch from the tensors' device (``fastenc/kernels/_common.py``), so these tests need no
``TRITON_INTERPRET`` in the environment and set nothing that other test modules could see
(``monkeypatch.setenv`` only where ``fastenc.load`` must accept the CPU interpreter).
The interpreter is slow: CPU cases use small heads and L <= 77; L = 333 and 512 run on a GPU.
Under the interpreter, fp32 -> bf16 conversions truncate instead of rounding to nearest, so
bf16 tolerances allow about one bf16 step per rounding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import triton

import fastenc
from fastenc.errors import BackendUnavailable, ConfigError
from fastenc.kernels import TritonOps, attention, gated_ffn, graphs, linear_relu, offline, rms_norm, triton_ops
from fastenc.model import T5Encoder
from fastenc.ops import TORCH_OPS, relative_position_bucket
from reference import TINY, Reference, cos_per_token, rel_err, write_distillt5

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LONG_ON_GPU = "L=333/512 under triton's CPU interpreter is too slow for CI; these shapes run on a GPU"
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=LONG_ON_GPU)]
SEQ_LENS = [1, 7, 77, pytest.param(333, marks=GPU_ONLY), pytest.param(512, marks=GPU_ONLY)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _key_mask(B: int, L: int, padded: bool) -> torch.Tensor | None:
    """None, or a [B, L] mask with one row per sequence and a different real length per row
    (row 0 full, row 1 two thirds, row 2 empty, later rows shorter and shorter but never empty)."""
    if not padded:
        return None
    if B == 1:
        lengths = [max(1, L - 2)]
    else:
        pattern = [L, max(1, (2 * L) // 3), 0]
        lengths = [pattern[i] if i < 3 else max(1, L // (i - 1)) for i in range(B)]
    return (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 8])
def test_key_mask_has_a_row_per_sequence(B):
    mask = _key_mask(B, 20, padded=True)
    assert mask.shape == (B, 20)
    lengths = mask.sum(1).tolist()
    assert lengths[0] == (20 if B > 1 else 18)
    if B >= 3:
        assert lengths[2] == 0 and all(n > 0 for i, n in enumerate(lengths) if i != 2)
    assert _key_mask(B, 20, padded=False) is None


# -- residual add + RMSNorm ------------------------------------------------------------

@pytest.mark.parametrize("L", SEQ_LENS)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("D", [48])  # not a power of two: the row tile is masked
@pytest.mark.parametrize("residual_dtype,weight_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),  # fp16 runs keep the residual stream in fp32
])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(L, B, D, residual_dtype, weight_dtype, with_delta):
    x = (torch.randn(B, L, D) * 3).to(DEVICE, residual_dtype)
    delta = torch.randn(B, L, D, device=DEVICE).to(weight_dtype) if with_delta else None
    w = (torch.rand(D) + 0.5).to(DEVICE, weight_dtype)
    got_sum, got = rms_norm.add_rms_norm(x, delta, w, 1e-6)
    want_sum, want = rms_norm.reference(x, delta, w, 1e-6)
    assert got.dtype == want.dtype == weight_dtype and got.shape == (B, L, D)
    assert got_sum.dtype == residual_dtype
    tol = TOL[weight_dtype if weight_dtype != torch.float32 else residual_dtype]
    assert rel_err(got_sum, want_sum) <= tol
    assert rel_err(got, want) <= tol


def test_rms_norm_eps_and_zero_rows():
    x = torch.zeros(2, 5, 16, device=DEVICE)
    x[1] = 1e-4
    w = torch.full((16,), 2.0, device=DEVICE)
    got = rms_norm.rms_norm(x, w, 1e-6)
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # 0 * rsqrt(eps), no NaN
    torch.testing.assert_close(got, TORCH_OPS.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


# -- relative-position-bias attention --------------------------------------------------

def _qkv(B: int, L: int, H: int, dk: int, dtype: torch.dtype):
    """Strided [B, H, L, dk] views of one fused [B, L, 3*H*dk] projection, as the model makes them."""
    qkv = torch.randn(B, L, 3 * H * dk, device=DEVICE).to(dtype)
    return qkv.view(B, L, 3, H, dk).permute(2, 0, 3, 1, 4).unbind(0)


def _attention_case(B, L, H, dk, buckets, dtype, padded, table_scale=3.0):
    q, k, v = _qkv(B, L, H, dk, dtype)
    table = (torch.randn(buckets[0], H, device=DEVICE) * table_scale).to(dtype)
    bias = TritonOps(DEVICE).position_bias(table, L, _key_mask(B, L, padded), *buckets, dtype)
    got = attention.rel_attention(q, k, v, bias)
    # reference in fp32 on the same (rounded) inputs: the dense 16-bit reference itself overflows
    # its additive fp16 mask, so it is no ground truth for the 16-bit kernels
    want = attention.reference(q.float(), k.float(), v.float(), bias)
    return got, want


@pytest.mark.parametrize("L", SEQ_LENS)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("buckets", [(8, 20), (32, 128)], ids=["tiny-buckets", "t5-buckets"])
def test_attention_fp32(L, B, padded, buckets):
    got, want = _attention_case(B, L, 2, 8 if not CUDA else 64, buckets, torch.float32, padded)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,B", [(7, 3), (77, 3), pytest.param(512, 3, marks=GPU_ONLY)])
def test_attention_half(dtype, L, B):
    got, want = _attention_case(B, L, 2, 64, (32, 128), dtype, padded=True)
    assert got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("L", [300, pytest.param(512, marks=GPU_ONLY)])
def test_attention_bucket_boundaries(L):
    """q = k = 0 leaves softmax(bias) alone: every distance's bucket (ties at 16/32/64, saturation
    past max_distance) must match T5's. One head keeps the interpreter fast even at L = 300."""
    z = torch.zeros(1, 1, L, 16, device=DEVICE)
    v = torch.randn(1, 1, L, 16, device=DEVICE)
    table = torch.randn(32, 1, device=DEVICE)
    for mask in (None, (torch.arange(L) < L - 37).long()[None].to(DEVICE)):
        bias = TritonOps(DEVICE).position_bias(table, L, mask, 32, 128, torch.float32)
        got = attention.rel_attention(z, z, v, bias)
        assert rel_err(got, attention.reference(z, z, v, bias)) <= 1e-5


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 256), (24, 100), (32, 10)])
def test_bucket_steps_reproduce_t5_buckets(num_buckets, max_distance):
    """The kernel's staircase (min(d, max_exact) + #steps passed, plus the sign half) is T5's bucket."""
    half, max_exact = attention.bucket_params(num_buckets, max_distance)
    steps = torch.tensor(attention.bucket_steps(num_buckets, max_distance))
    rel = torch.arange(-3000, 3001)
    dist = rel.abs()
    staircase = (rel > 0).long() * half + dist.clamp(max=max_exact) + (dist[:, None] >= steps[None, :]).sum(1)
    assert torch.equal(staircase, relative_position_bucket(rel, num_buckets, max_distance))


def test_attention_fully_padded_row_is_uniform():
    """A sequence with no real token: every key equally masked -> the dense reference's uniform average."""
    q, k, v = _qkv(2, 9, 2, 8, torch.float32)
    mask = torch.tensor([[1] * 9, [0] * 9], device=DEVICE)
    bias = TritonOps(DEVICE).position_bias(torch.randn(8, 2, device=DEVICE), 9, mask, 8, 20, torch.float32)
    got = attention.rel_attention(q, k, v, bias)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1], v[1].mean(dim=1, keepdim=True).expand_as(got[1]), rtol=1e-5, atol=1e-6)
    assert rel_err(got, attention.reference(q, k, v, bias)) <= 1e-5


def test_position_bias_is_never_dense():
    """The Triton op table hands attention the table and mask only, never an [H, L, L] bias."""
    B, L, H = 3, 77, 4
    mask = torch.ones(B, L, dtype=torch.long, device=DEVICE)
    bias = TritonOps(DEVICE).position_bias(torch.randn(32, H, device=DEVICE), L, mask, 32, 128, torch.bfloat16)
    sizes = [t.numel() for t in (bias.table, bias.mask, bias.steps)]
    assert sum(sizes) == 32 * H + B * L + 7 < H * L * L
    assert bias.table.dtype == torch.bfloat16 and bias.mask.dtype == torch.int32


def test_attention_output_layout_makes_reshape_free():
    q, k, v = _qkv(2, 7, 3, 8, torch.float32)
    bias = TritonOps(DEVICE).position_bias(torch.randn(8, 3, device=DEVICE), 7, None, 8, 20, torch.float32)
    out = TritonOps(DEVICE).attention(q, k, v, bias)  # [B, H, L, dk]
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()
    assert merged.reshape(2, 7, 24).data_ptr() == out.data_ptr()


# -- gated FFN (wi_0 | wi_1) and linear + activation -----------------------------------

@pytest.mark.parametrize("L", SEQ_LENS)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu"])
@pytest.mark.parametrize("dtype,out_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),  # fp16 compute, fp32 wo: the gate product is written in fp32
])
def test_gated_ffn(L, B, act, dtype, out_dtype):
    K, F = 48, 40  # neither a multiple of the tiles
    x = torch.randn(B, L, K, device=DEVICE).to(dtype)
    wi = (torch.randn(2 * F, K, device=DEVICE) * K**-0.5).to(dtype)
    got = gated_ffn.gated_ffn(x, wi, act, out_dtype)
    want = gated_ffn.reference(x.float(), wi.float(), act, torch.float32)
    assert got.shape == (B, L, F) and got.dtype == out_dtype
    assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("L", SEQ_LENS)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_relu(L, B, with_bias, dtype):
    K, N = 40, 72
    x = torch.randn(B, L, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) * K**-0.5).to(dtype)
    b = (torch.randn(N, device=DEVICE) * 0.5).to(dtype) if with_bias else None
    got = linear_relu.linear_relu(x, w, b)
    want = linear_relu.reference(x.float(), w.float(), None if b is None else b.float(), "relu", torch.float32)
    assert got.shape == (B, L, N) and got.dtype == dtype
    assert (got >= 0).all()
    assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("act", [None, "gelu_new"])
def test_linear_act_other_activations(act):
    x = torch.randn(2, 5, 24, device=DEVICE)
    w = torch.randn(20, 24, device=DEVICE) * 0.2
    got = linear_relu.linear_act(x, w, None, act, torch.float32)
    assert rel_err(got, linear_relu.reference(x, w, None, act, torch.float32)) <= 1e-5


def test_gemm_rejects_bad_shapes():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="wi must be"):
        gated_ffn.gated_ffn(x, torch.randn(7, 8, device=DEVICE), "gelu_new", torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        linear_relu.linear_act(x, torch.randn(4, 9, device=DEVICE), None, "relu", torch.float32)
    with pytest.raises(ValueError, match="unsupported activation"):
        linear_relu.linear_act(x, torch.randn(4, 8, device=DEVICE), None, "swish", torch.float32)


# -- the backend: selection and whole-model parity -------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    ref = Reference(TINY)
    with torch.no_grad():  # bf16-representable weights: bf16 runs then differ only in activations
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return write_distillt5(ref, TINY, tmp_path_factory.mktemp("tiny-kernels") / "ck")


def _ids(B: int, L: int) -> torch.Tensor:
    ids = torch.randint(3, TINY.vocab_size, (B, L))
    ids[:, -1] = 1
    return ids


def test_triton_backend_on_cpu_needs_the_interpreter(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        triton_ops("cpu")
    with pytest.raises(BackendUnavailable, match="needs a CUDA device"):
        fastenc.load(tiny_checkpoint, backend="triton", device="cpu", cache=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(triton_ops("cpu"), TritonOps)


@pytest.mark.parametrize("B,L,padded", [(1, 1, False), (3, 13, True), (2, 77, False)])
def test_whole_model_fp32_parity(tiny_checkpoint, monkeypatch, B, L, padded):
    """Triton backend vs the fp32 torch backend: max relative error <= 1e-3."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by fastenc.load only; kernels pick per launch
    kw = dict(device=DEVICE, dtype="fp32", cache=False)
    ref = fastenc.load(tiny_checkpoint, backend="torch", **kw)
    enc = fastenc.load(tiny_checkpoint, backend="triton", **kw)
    assert enc.backend == "triton" and isinstance(enc.model.ops, TritonOps)
    ids = _ids(B, L)
    mask = _key_mask(B, L, padded)
    with torch.no_grad():
        want, got = ref(ids, mask), enc(ids, mask)
    assert got.shape == (B, L, TINY.projection_dim)
    assert rel_err(got, want) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,padded", [(1, 77, False), (3, 512, True), (8, 512, False)])
def test_whole_model_bf16_cos_sim(tiny_checkpoint, B, L, padded):
    """bf16 triton vs fp32 torch: cos-sim >= 0.9999 on every real token (bf16-exact weights)."""
    ref = fastenc.load(tiny_checkpoint, backend="torch", device="cuda", dtype="fp32", cache=False)
    enc = fastenc.load(tiny_checkpoint, backend="triton", device="cuda", dtype="bf16", cache=False)
    ids = _ids(B, L)
    mask = _key_mask(B, L, padded)
    with torch.no_grad():
        want, got = ref(ids, mask), enc(ids, mask)
    cos = cos_per_token(got, want)  # [B, L]
    keep = mask.bool().cuda() if mask is not None else torch.ones_like(cos, dtype=torch.bool)
    assert cos[keep].min() >= 0.9999


# -- CUDA graphs -----------------------------------------------------------------------

def test_bucket_for_and_padding():
    assert graphs.bucket_for(1, graphs.SEQ_BUCKETS) == 32
    assert graphs.bucket_for(77, graphs.SEQ_BUCKETS) == 77
    assert graphs.bucket_for(120, graphs.SEQ_BUCKETS) == 128
    assert graphs.bucket_for(513, graphs.SEQ_BUCKETS) is None
    ids = torch.tensor([[5, 6, 1], [7, 1, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    pids, pmask = graphs.pad_inputs(ids, mask, 4, 5, pad_id=0)
    assert pids.tolist() == [[5, 6, 1, 0, 0], [7, 1, 0, 0, 0], [0] * 5, [0] * 5]
    assert pmask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0] * 5, [0] * 5]
    _, pmask = graphs.pad_inputs(ids, None, 2, 4)
    assert pmask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match="do not fit"):
        graphs.pad_inputs(ids, None, 1, 5)


@pytest.mark.parametrize("padded", [False, True])
def test_padding_to_a_bucket_keeps_the_result(padded):
    """What a graph replay computes (inputs padded to the bucket, then sliced) equals the plain call."""
    model = T5Encoder(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids, mask = _ids(3, 11), _key_mask(3, 11, padded)
    with torch.no_grad():
        want = model(ids, mask)
        got = model(*graphs.pad_inputs(ids, mask, 4, 32))[:3, :11]
    if mask is not None:  # the empty row's output is an average over padding either way
        got, want = got[:2], want[:2]
    assert rel_err(got, want) <= 1e-5


def test_graph_runner_runs_cpu_inputs_eagerly():
    model = T5Encoder(TINY).eval()
    runner = graphs.CudaGraphRunner(model, max_graphs=2)
    ids = _ids(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(runner(ids), model(ids))
    assert runner.stats.eager == 1 and runner.stats.captures == 0


@pytest.mark.gpu
def test_graph_runner_replays_and_stays_bounded(tiny_checkpoint):
    enc = fastenc.load(tiny_checkpoint, backend="triton", device="cuda", dtype="fp32", cache=False)
    runner = graphs.CudaGraphRunner(enc.model, batch_buckets=(1, 4), seq_buckets=(32, 128), max_graphs=2)
    # buckets (1,32) (4,128) (1,128) (1,32) (4,128): three evictions; (5,10) and (2,600) fit none
    shapes = [(1, 20), (3, 100), (1, 100), (1, 30), (4, 128), (5, 10), (2, 600)]
    for B, L in shapes:
        ids = _ids(B, L).cuda()
        mask = _key_mask(B, L, padded=B > 1)
        mask = mask.cuda() if mask is not None else None
        with torch.no_grad():
            want = enc.model(ids, mask)
        got = runner(ids, mask)
        rows = mask.bool().any(-1) if mask is not None else torch.ones(B, dtype=torch.bool, device="cuda")
        assert got.shape == want.shape
        assert rel_err(got[rows], want[rows]) <= 1e-3
    assert len(runner.stats.live) <= 2
    assert runner.stats.captures == 5 and runner.stats.evictions == 3
    assert runner.stats.replays == 5 and runner.stats.eager == 2


# -- the micro-benchmark ---------------------------------------------------------------

def test_kernel_bench_skips_without_gpu(capsys):
    if CUDA:
        pytest.skip("checks the no-GPU path; with a GPU the benchmark really runs")
    path = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("skipped:") and "GPU" in out[0]


# -- the GPU build, checked without a GPU ----------------------------------------------

def _ptxas() -> Path:
    return offline.ptxas()


def _hopper_build_available() -> bool:
    return offline.have_ptxas()


NO_PTXAS = f"triton's bundled ptxas is missing ({offline.ptxas()}): the GPU build cannot be checked here"


def _record_launch(op: str):
    """One bf16 launch of ``op`` at the base student's widths, recorded instead of run (``attention_fp32``:
    the fp32 attention launch)."""
    if op == "attention_fp32":
        return offline.record_launch("attention", torch.float32)
    return offline.record_launch(op, torch.bfloat16)


@pytest.mark.skipif(not offline.have_ptxas(), reason=NO_PTXAS)
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("op", offline.OPS)
def test_every_config_compiles_and_fits_shared_memory(op, arch):
    """Every autotune config of each bf16 kernel (attention with the mask the graph runner passes) compiles
    for sm_80 and sm_90 and asks for no more shared memory than one block may use there (163 / 227 KB):
    the autotuner never meets a config that cannot run on these GPUs. The matrix kernels use the matrix
    units: Hopper's warpgroup MMA (wgmma) on sm_90 for tiles of 64 rows or more (a warpgroup's least),
    mma.sync otherwise and on sm_80; pointers aligned to 16 bytes are known to be."""
    kernel, launch = _record_launch(op)
    assert (op == "rms_norm") != bool(kernel.all_configs)  # rms_norm alone is not autotuned
    for config in kernel.all_configs or [None]:
        compiled = kernel.compile_for(*launch, arch=arch, config=config, UPCAST=False)
        label = (op, arch, offline.describe(config))
        assert compiled.asm.get("cubin"), label
        assert 0 < compiled.metadata.shared <= offline.SMEM_PER_BLOCK[arch], (label, compiled.metadata.shared)
        assert "tt.divisibility = 16" in compiled.asm["ttir"], label
        if op != "rms_norm":
            wgmma = arch == 90 and config.kwargs["BLOCK_M"] >= 64
            assert ("warp_group_dot" in compiled.asm["ttgir"]) == wgmma, label
            assert "mma" in compiled.asm["ptx"], label


def test_the_compile_check_knows_each_architectures_shared_memory():
    assert offline.SMEM_PER_BLOCK[80] == 163 * 1024 and offline.SMEM_PER_BLOCK[90] == 227 * 1024
    assert offline.SMEM_PER_BLOCK[86] == offline.SMEM_PER_BLOCK[89] == 99 * 1024
    build = offline.Build("gated_ffn", "bf16", 86, "128x128x32 w8 s3", shared=99 * 1024 + 1)
    assert not build.fits and offline.Build("gated_ffn", "bf16", 80, "", shared=99 * 1024 + 1).fits
    assert not offline.Build("gated_ffn", "bf16", 80, "", shared=1, error="CompilationError: x").fits
    with pytest.raises(ConfigError) as err:
        offline.record_launch("softmax", torch.bfloat16)
    assert str(err.value) == "unknown op 'softmax'; choose from rms_norm, attention, gated_ffn, linear_relu"


def _compile_matrix():
    path = Path(__file__).resolve().parents[1] / "scripts" / "compile_matrix.py"
    spec = importlib.util.spec_from_file_location("compile_matrix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["fits", "untuned over", "none fits", "fails", "no ptxas"])
def test_the_compile_matrix_script_reports_what_does_not_fit(case, monkeypatch, capsys):
    """scripts/compile_matrix.py's table and verdict, with the compiler replaced by chosen results."""
    script = _compile_matrix()

    def fake_build(op, dtype, arch, config=None, launch=None):
        result = offline.Build(op, dtype, arch, offline.describe(config), shared=8 * 1024)
        single = launch[0].single if launch else None
        if op == "gated_ffn" and (case == "none fits" or (case == "untuned over" and config is single)):
            result.shared = 100 * 1024  # over sm_86's 99 KB
        if op == "linear_relu" and case == "fails" and config is single:
            result.error = "CompilationError: unsupported"
        return result

    monkeypatch.setattr(offline, "build", fake_build)
    monkeypatch.setattr(offline, "have_ptxas", lambda: case != "no ptxas")
    rc = script.main(["--arch", "80,86", "--dtype", "bf16", "--jobs", "1"])
    out = capsys.readouterr().out
    if case == "no ptxas":
        assert rc == 2 and out.startswith("skipped: triton's bundled ptxas is missing")
        return
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert "sm_86 KB" in out and "/99" in out and rc == (0 if case == "fits" else 1)
    if case == "fits":
        assert not problems and " over" not in out
    elif case == "untuned over":
        assert problems == ["PROBLEM gated_ffn bf16 sm_86: the untuned config (*) does not fit"]
    elif case == "none fits":
        assert problems == ["PROBLEM gated_ffn bf16 sm_86: no config fits 99 KB",
                            "PROBLEM gated_ffn bf16 sm_86: the untuned config (*) does not fit"]
    else:  # the failed build on each architecture, and the untuned config that does not run there
        assert "FAIL" in out and len(problems) == 4 and all(p.startswith("PROBLEM linear_relu bf16 ") for p in problems)
        assert sum("CompilationError: unsupported" in p for p in problems) == 2


def _jit_binder_specialization(fn, args, kwargs):
    """What triton's own launch binder computes (internal API, same in 3.6 and 3.7; None if it moved)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
        _, spec, _ = binder(*args, **kwargs)
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return None
    return spec


@pytest.mark.skipif(not CUDA and not _hopper_build_available(), reason="triton has no NVIDIA backend here")
@pytest.mark.parametrize("op", ["rms_norm", "attention", "gated_ffn", "linear_relu"])
def test_compile_check_specialises_like_the_jit(op):
    """compile_for's signature, constants and tt.divisibility attributes are the ones triton's JIT
    derives for the same launch (pointers aligned to 16, integers divisible by 16, ints equal to 1)."""
    from triton.runtime.jit import JITFunction

    from fastenc.kernels._common import jit_specialization

    kernel, (args, kwargs) = _record_launch(op)
    fn = JITFunction(kernel.fn)
    kw = {**kwargs, **(kernel.configs[0].kwargs if kernel.configs else {}), "UPCAST": False}
    kw = {k: v for k, v in kw.items() if k in fn.arg_names}
    values = {**dict(zip(fn.arg_names, args)), **kw}
    signature, consts, attrs = jit_specialization(fn, values)
    assert attrs, "a launch at the base student's widths has divisible arguments"
    spec = _jit_binder_specialization(fn, args, kw)
    if spec is None:
        pytest.skip(f"triton {triton.__version__}'s launch binder is not where this test looks for it")
    assert list(signature.values()) == [s[0] for s in spec]
    assert set(attrs) == {(i,) for i, s in enumerate(spec) if s[0] != "constexpr" and s[1] == "D"}
    assert all(consts[name] == s[1] for name, s in zip(fn.arg_names, spec) if s[0] == "constexpr")


def _ptxas_spill_stores(ptx: str, tmp_path: Path) -> list[int]:
    import re
    import subprocess

    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    run = subprocess.run([str(_ptxas()), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(tmp_path / "kernel.o")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return [int(n) for n in re.findall(r"(\d+) bytes spill stores", run.stderr)]


@pytest.mark.skipif(not _hopper_build_available(), reason=NO_PTXAS)
def test_fp32_attention_tiles_do_not_spill_on_hopper(tmp_path):
    """fp32 attention (IEEE dot, no tensor cores) gets its own tiles: none spills registers on sm_90."""
    kernel, (args, kwargs) = _record_launch("attention_fp32")
    assert kernel is attention._KERNEL_FP32 and kernel is not attention._KERNEL
    for config in kernel.configs:
        compiled = kernel.compile_for(args, kwargs, arch=90, config=config, UPCAST=False)
        spills = _ptxas_spill_stores(compiled.asm["ptx"], tmp_path)
        assert spills and max(spills) == 0, (config, spills)
