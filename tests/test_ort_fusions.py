"""fastenc.backends.ort_fusions: the exported RMSNorm, tanh-GELU and attention chains become ONNX Runtime's
fused kernels, computing what the unfused graph and the torch model compute; a chain that does not match
exactly (a value read elsewhere, another constant) is left as exported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import common
from fastenc.backends import cpu_onnxruntime as cort
from fastenc.backends import ort_fusions
from fastenc.exporters.contract import ATTENTION_MASK, INPUT_IDS

from reference import TINY

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _session(proto_or_bytes):
    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_the_exported_encoder_fuses_every_norm_and_gelu_and_computes_the_same(activation):
    cfg = TINY.replace(activation=activation)
    model = common.build_model(cfg, seed=3)
    graph = cort.export_graph(model)
    proto = onnx.load_from_string(graph)
    done = ort_fusions.fuse(proto)
    gelus = cfg.num_layers if activation == "gelu_new" else 0
    assert done == {"rms_norm": 2 * cfg.num_layers + 1, "gelu": gelus, "attention": cfg.num_layers}
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Pow", "Tanh", "Reciprocal", "Softmax"}
    assert "MultiHeadAttention" in ops
    assert ("FastGelu" in ops) == bool(gelus) and "SimplifiedLayerNormalization" in ops
    ids = torch.randint(2, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    feed = {INPUT_IDS: ids.int().numpy(), ATTENTION_MASK: mask.int().numpy()}
    fused, plain = _session(proto).run(None, feed)[0], _session(graph).run(None, feed)[0]
    with torch.inference_mode():
        want = model(ids, mask).numpy()
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5 * float(np.abs(plain).max()))
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _rms_graph(eps_add: str = "Add", rsqrt_out: bool = False, exponent: float = 2.0):
    """x [3, 8] -> x * rsqrt(mean(x^2) + 1e-6) * w, as fastenc's export writes it."""
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
             helper.make_node(eps_add, ["mean", "eps"], ["var"]),
             helper.make_node("Sqrt", ["var"], ["std"]),
             helper.make_node("Reciprocal", ["std"], ["rsqrt"]),
             helper.make_node("Mul", ["x", "rsqrt"], ["normed"]),
             helper.make_node("Mul", ["w", "normed"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])]
    if rsqrt_out:
        outputs.append(helper.make_tensor_value_info("rsqrt", TensorProto.FLOAT, [3, 1]))
    inits = [c("two", exponent), c("eps", 1e-6), c("w", np.linspace(0.5, 2, 8)),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_an_rms_norm_chain_fuses_with_its_epsilon():
    proto = _rms_graph()
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    want = _session(proto).run(None, {"x": x})[0]
    assert ort_fusions.fuse(proto) == {"rms_norm": 1, "gelu": 0, "attention": 0}
    (node,) = proto.graph.node
    assert node.op_type == "SimplifiedLayerNormalization" and list(node.input) == ["x", "w"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1 and abs(attrs["epsilon"] - 1e-6) < 1e-12
    np.testing.assert_allclose(_session(proto).run(None, {"x": x})[0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change", ["an intermediate is a graph output", "x^3, not x^2", "eps subtracted"])
def test_a_chain_that_does_not_match_exactly_is_left_as_exported(change):
    proto = {"an intermediate is a graph output": lambda: _rms_graph(rsqrt_out=True),
             "x^3, not x^2": lambda: _rms_graph(exponent=3.0),
             "eps subtracted": lambda: _rms_graph(eps_add="Sub")}[change]()
    before = proto.SerializeToString()
    assert ort_fusions.fuse(proto) == {"rms_norm": 0, "gelu": 0, "attention": 0}
    assert proto.SerializeToString() == before


def _gelu_graph(a: float = ort_fusions.GELU_A):
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    names = iter(f"t{i}" for i in range(20))
    nodes, value = [helper.make_node("Pow", ["x", "three"], [v := next(names)])], None
    value = v
    for op, other in (("Mul", "a"), ("Add", "x"), ("Mul", "c"), ("Tanh", None), ("Add", "one"), ("Mul", "half"),
                      ("Mul", "x")):
        out = next(names) if op != "Mul" or other != "x" else "y"
        nodes.append(helper.make_node(op, [other, value] if other else [value], [out]))
        value = out
    inits = [c("three", 3.0), c("a", a), c("c", ort_fusions.GELU_C), c("one", 1.0), c("half", 0.5)]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_tanh_gelu_chain_fuses_and_another_constant_does_not():
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32) * 3
    proto = _gelu_graph()
    want = _session(proto).run(None, {"x": x})[0]
    assert ort_fusions.fuse(proto) == {"rms_norm": 0, "gelu": 1, "attention": 0}
    assert [n.op_type for n in proto.graph.node] == ["FastGelu"]
    np.testing.assert_allclose(_session(proto).run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    other = _gelu_graph(a=0.05)
    assert ort_fusions.fuse(other) == {"rms_norm": 0, "gelu": 0, "attention": 0}


def test_an_attention_whose_scores_are_read_elsewhere_is_left_as_exported():
    model = common.build_model(TINY, seed=5)
    proto = onnx.load_from_string(cort.export_graph(model))
    first = next(n for n in proto.graph.node if n.op_type == "Softmax")
    proto.graph.output.append(helper.make_tensor_value_info(first.output[0], TensorProto.FLOAT, None))
    done = ort_fusions.fuse(proto)
    assert done["attention"] == TINY.num_layers - 1
    assert [n.op_type for n in proto.graph.node].count("Softmax") == 1
    ids = torch.randint(2, TINY.vocab_size, (1, 11), generator=torch.Generator().manual_seed(6))
    out = _session(proto).run(None, {INPUT_IDS: ids.int().numpy(), ATTENTION_MASK: np.ones((1, 11), np.int32)})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(out, model(ids).numpy(), rtol=1e-4, atol=1e-5)
