"""The cpu backend's ONNX Runtime engine: fastenc's ONNX export with the planned weights as per-token
int8 GEMMs. Its numbers are the op table's int8 numbers (the planner picks the weight set on the op
table and runs it here), its uint8 x uint8 GEMM is exact where uint8 x int8 saturates on AVX2, a cached
plan reads its graph instead of exporting, and the engine steps aside when the weights change.
Timings are fake: speed lives in ``python -m bench.cpu_path``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastenc
from bench import common
from fastenc.backends import cpu as fcpu
from fastenc.backends import cpu_onnxruntime as cort
from fastenc.backends import cpu_plan as plan_mod
from fastenc.errors import BackendUnavailable

from reference import TINY
from test_cpu_backend import OUTLIER_CFG, outlier_model
from test_cpu_plan import fake_times

pytest.importorskip("onnxruntime")
INT8 = "onnxruntime fp32 + int8 (per-token)"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "fastenc-cache"))
    monkeypatch.delenv("FASTENC_CPU_ENGINES", raising=False)  # every engine (conftest leaves ONNX Runtime out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_uint8_by_uint8_is_exact_at_full_range():
    """The reason both operands are uint8: at full 8-bit range (u8 255 and 1 around 128, weights +-127) the
    int32 result must be exact; ONNX Runtime's uint8 x int8 kernel saturates pairs of products on AVX2."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.choice(np.array([1, 255], np.uint8), (64, 256))  # [M, K]: the extremes of x / scale = +-127
    b = rng.choice(np.array([1, 255], np.uint8), (256, 96))  # [K, N]: weights +-127 stored around 128
    zp = numpy_helper.from_array(np.array(cort.ZERO_POINT, np.uint8), "zp")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b", "zp", "zp"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [64, 96])],
                              [numpy_helper.from_array(b, "b"), zp])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = (a.astype(np.int64) - 128) @ (b.astype(np.int64) - 128)
    np.testing.assert_array_equal(session.run(None, {"a": a})[0], want)


def _saturating_session(fmt, weight):
    """A uint8 x int8 kernel as AVX2's vpmaddubsw computes it: adjacent products summed in int16 with
    saturation, then accumulated in int32."""
    class Session:
        def run(self, _outputs, feeds):
            a = feeds["a"].astype(np.int64)  # [M, K]
            pairs = a[:, 0::2, None] * weight[None, 0::2] + a[:, 1::2, None] * weight[None, 1::2]  # [M, K/2, N]
            acc = np.clip(pairs, -32768, 32767).sum(1) - cort.ZERO_POINT * weight.sum(0)
            return [acc.astype(np.int32)]

    return Session() if fmt == "int8" else real_session(fmt, weight)


real_session = cort._gemm_session


def test_the_weight_format_is_exact_here_and_a_saturating_kernel_is_refused(monkeypatch):
    """The int8 GEMMs' weight format is one whose MatMulInteger is exact at full range on this CPU; a
    uint8 x int8 kernel that saturates pairs of products (AVX2 without VNNI) is found inexact, and the
    engine then stores its weights as uint8."""
    fmt = cort.weight_format()
    assert fmt in cort.WEIGHT_FORMATS and cort.gemm_exact(fmt) and cort.gemm_exact("uint8")
    monkeypatch.setattr(cort, "_gemm_session", _saturating_session)
    cort.weight_format.cache_clear()
    try:
        assert not cort.gemm_exact("int8")
        assert cort.weight_format() == "uint8"
    finally:
        cort.weight_format.cache_clear()


@pytest.mark.parametrize("fmt", cort.WEIGHT_FORMATS)
def test_one_rewritten_gemm_is_the_op_tables_int8_linear(fmt):
    """One MatMul rewritten (3-D input, an outlier channel, so SmoothQuant factors apply) computes what
    fastenc.backends.cpu.int8_linear computes, to fp32 rounding, with either weight format where its kernel
    is exact here (on AVX2 without VNNI the int8 one saturates, and the engine never uses it there)."""
    if fmt != "uint8" and not cort.gemm_exact(fmt):
        assert cort.weight_format() == "uint8"
        return
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    gen = torch.Generator().manual_seed(0)
    k, n, m = 128, 96, 40
    w = torch.randn(n, k, generator=gen)  # [N, K]
    x = torch.randn(1, m, k, generator=gen)  # [1, M, K]
    x[..., 3] *= 20
    q = fcpu.quantize_weight(w, x.abs().reshape(-1, k).amax(0))
    assert q.inv_smooth is not None
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])],
                              [numpy_helper.from_array(w.t().contiguous().numpy(), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert cort.quantize_graph(proto, {"w": w}, {"w": q}, fmt) == ["w"]
    assert not any(node.op_type == "MatMul" for node in proto.graph.node)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    want = fcpu.int8_linear(x, q)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert (want - x @ w.t()).abs().max() > 1e-3 * float(want.abs().max())  # int8 numbers, not the fp32 product


def test_the_int8_graph_computes_the_op_tables_int8_numbers_on_outlier_weights():
    """Every GEMM int8 on outlier-heavy weights (SmoothQuant factors in play): the engine's output is the
    op table's int8_linear output, token for token (not merely close to fp32), with and without a mask."""
    model = outlier_model()
    names = fcpu.linear_weight_names(model)
    engine = cort.OrtEngine(model, int8_weights=names)
    sim = copy.deepcopy(model)
    fcpu.prepare(sim, int8=names, dtype=torch.float32, attention="matmul")
    assert sim.ops.num_int8 == len(names) and any(w.inv_smooth is not None for w in sim.ops._int8.values())
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(2, OUTLIER_CFG.vocab_size, (2, 37), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    with torch.inference_mode():
        for m in (None, mask):
            out, want, ref = engine(ids, m), sim(ids, m), model(ids, m)
            keep = (m if m is not None else torch.ones_like(ids)).bool()
            cos_int8 = F.cosine_similarity(out[keep], want[keep], dim=-1)
            cos_fp32 = F.cosine_similarity(out[keep], ref[keep], dim=-1)
            # the same numerics: much nearer the op table's int8 output than fp32 is (not bit for bit: an fp32
            # difference elsewhere in the graph can move a value across a rounding step of a later layer)
            assert float(cos_int8.mean()) > 0.9999 and 1 - float(cos_int8.mean()) < 0.5 * (1 - float(cos_fp32.mean()))
    fmt = cort.weight_format()
    assert engine.weight_format == fmt and f"({len(names)} GEMMs, {fmt} weights)" in engine.label


def test_a_weight_the_graph_does_not_hold_is_refused():
    model = common.build_model(TINY, seed=1)
    params = dict(model.named_parameters())
    name = "blocks.0.ffn.wo.weight"
    import onnx

    proto = onnx.load_from_string(cort.export_graph(model))
    other = fcpu.quantize_weight(torch.randn_like(params[name]))
    with pytest.raises(BackendUnavailable, match=r"the exported graph has no MatMul for blocks\.0\.ffn\.wo\.weight"):
        cort.quantize_graph(proto, {name: torch.randn_like(params[name])}, {name: other})


def test_an_edited_weight_retires_the_engine():
    model = common.build_model(TINY, seed=2)
    engine = cort.OrtEngine(model, int8_weights=["projector.fc1.weight"])
    ids = torch.randint(2, TINY.vocab_size, (1, 9))
    assert engine(ids) is not None
    with torch.no_grad():
        model.blocks[0].ffn.wo.weight.mul_(2)
    assert engine.stale() and engine(ids) is None


def test_a_cpu_without_native_int8_gets_onnxruntime_int8_and_a_cached_plan_reads_its_graph(monkeypatch, tmp_path,
                                                                                           caplog):
    """fp32 plan (no native bf16): the search offers ONNX Runtime fp32 and fp32 + int8, never op-table int8
    candidates when torch's int8 GEMM is a reference loop; the chosen graph is kept beside the plan, a later
    load reads it (no export), and a damaged file is exported again, never served."""
    import fastenc.backends as backends

    monkeypatch.setattr(backends, "cpu_fast_path", lambda: (False, "forced: no AVX512-BF16 or AMX"))
    monkeypatch.setattr(fcpu, "native_int8_mm", lambda: False)
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({INT8: 1.0}))
    model = outlier_model()
    fastenc.save(model, tmp_path / "ckpt")
    enc = fastenc.load(tmp_path / "ckpt", cache=False)
    plan = enc.model.cpu_plan
    names = {mm.candidate.name for mm in plan.measured}
    assert {"onnxruntime fp32", INT8} <= names and not any(mm.candidate.engine == "eager" and mm.candidate.int8
                                                           for mm in plan.measured)
    assert plan.chosen.name == INT8 and plan.int8_weights and enc.model.cpu_engine.kind == "onnxruntime", plan.table()
    assert enc.model.ops.num_int8 == 0  # the fallback op table stays float
    graph = cort.graph_file(enc.model.cpu_engine.graph_cache)
    assert graph.is_file() and not list(graph.parent.glob("*.ort.onnx.*"))
    ids = torch.randint(2, OUTLIER_CFG.vocab_size, (2, 31), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        first = enc(ids)
        cos = F.cosine_similarity(first, model(ids), dim=-1)
    assert float(cos.mean()) >= plan_mod.MIN_COS and float(cos.min()) >= plan_mod.MIN_WORST
    assert fastenc.info.describe_backend(enc).startswith("fastenc cpu (ONNX Runtime ")
    listed = [v for k, v in fastenc.info.collect(probe=True).items() if k.startswith("cpu plan ")]
    assert len(listed) == 1 and listed[0].startswith(INT8) and "; ONNX Runtime graph cached, " in listed[0]

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    real_export = cort.export_graph
    monkeypatch.setattr(cort, "export_graph", no_export)
    again = fastenc.load(tmp_path / "ckpt", cache=False)
    assert again.model.cpu_engine.from_cache
    assert again.model.cpu_engine.weight_format == cort.weight_format()  # recorded in the cached graph
    with torch.inference_mode():
        torch.testing.assert_close(again(ids), first)
    monkeypatch.setattr(cort, "export_graph", real_export)
    graph.write_bytes(b"not an onnx graph")
    with caplog.at_level("WARNING", logger="fastenc"):
        third = fastenc.load(tmp_path / "ckpt", cache=False)
    assert not third.model.cpu_engine.from_cache and "is unusable" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(third(ids), first)
    assert graph.stat().st_size > 1000  # rewritten


def test_a_plan_that_does_not_run_onnxruntime_keeps_no_graph(monkeypatch, tmp_path):
    import fastenc.backends as backends

    monkeypatch.setattr(backends, "cpu_fast_path", lambda: (False, "forced"))
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({"eager fp32, sdpa attention": 1.0}))
    fastenc.save(common.build_model(TINY, seed=4), tmp_path / "ckpt")
    enc = fastenc.load(tmp_path / "ckpt", cache=False)
    assert enc.model.cpu_plan.chosen.engine == "eager"
    assert not list(fcpu.plan_cache_dir().glob(f"*{cort.GRAPH_SUFFIX}"))
