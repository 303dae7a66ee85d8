"""Fusions of fastenc's exported ONNX graph into ONNX Runtime's fused CPU kernels, for the ``cpu``
backend's ONNX Runtime engine (:mod:`.cpu_onnxruntime`).

The export writes T5's RMSNorm and tanh-GELU as chains of element-wise nodes (``Pow``, ``ReduceMean``,
``Add``, ``Sqrt``, ``Reciprocal``, ``Mul`` ...) that ONNX Runtime's own fusions do not match, so each
chain costs several passes over its tensor. :func:`fuse` rewrites them, in place, into the one-pass
kernels ONNX Runtime's CPU provider has:

* ``x * rsqrt(mean(x^2) + eps) * w``  ->  ``SimplifiedLayerNormalization(x, w)`` (epsilon ``eps``);
* ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``  ->  ``com.microsoft.FastGelu(x)``;
* the attention of one layer, from the fused QKV projection ``[B, L, 3 H d]`` (reshaped to
  ``[B, L, 3, H, d]``, transposed, sliced) through ``softmax(q k^T + bias) v`` back to ``[B, L, H d]``
  -> ``Split`` + ``com.microsoft.MultiHeadAttention`` (scale 1, as T5 has none; the relative position
  bias plus mask as its ``attention_bias``), which skips the transposes and the score tensor's extra passes.

A chain is rewritten only when every intermediate value feeds the next node alone and every constant is
the one the formula needs; anything else is left as exported. The result computes the same function
to fp32 rounding (the engine checks the graph against the model before it serves).
"""

from __future__ import annotations

import math
from collections import defaultdict


MS_DOMAIN = "com.microsoft"
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def _scalar(inits: dict, name: str) -> float | None:
    from onnx import numpy_helper

    t = inits.get(name)
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    return float(a.reshape(())) if a.size == 1 else None


class _Graph:
    """Producers, consumers and initializers of a graph's nodes, for matching chains."""

    def __init__(self, graph):
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.users: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.users[i].append(n)
        self.producer = {o: n for n in self.nodes for o in n.output}

    def only_user(self, value: str, op: str):
        """The single node reading ``value`` when it is an ``op`` and ``value`` is no graph output."""
        users = self.users.get(value, [])
        if len(users) != 1 or users[0].op_type != op or value in self.outputs:
            return None
        return users[0]

    def other(self, node, value: str) -> str | None:
        """``node``'s input that is not ``value`` (binary ops), or None."""
        ins = list(node.input)
        if len(ins) != 2 or value not in ins:
            return None
        return ins[1] if ins[0] == value else ins[0]


def _near(value: float | None, want: float, rel: float = 1e-6) -> bool:
    return value is not None and abs(value - want) <= rel * abs(want)


def _rms_norm(g: _Graph, pow_node):
    """The RMSNorm chain starting at ``pow_node`` (x^2): (nodes, x, weight, eps, output) or None."""
    x = pow_node.input[0]
    if not _near(_scalar(g.inits, pow_node.input[1]), 2.0):
        return None
    mean = g.only_user(pow_node.output[0], "ReduceMean")
    if mean is None:
        return None
    axes = [list(a.ints) for a in mean.attribute if a.name == "axes"]  # before opset 18 an attribute, then an input
    keep = [a.i for a in mean.attribute if a.name == "keepdims"]
    axes = axes[0] if axes else (_const_ints(g, mean.input[1]) if len(mean.input) > 1 else None)
    if axes != [-1] or (keep and keep[0] != 1):
        return None
    add = g.only_user(mean.output[0], "Add")
    eps = _scalar(g.inits, g.other(add, mean.output[0])) if add is not None else None
    sqrt = g.only_user(add.output[0], "Sqrt") if eps is not None else None
    recip = g.only_user(sqrt.output[0], "Reciprocal") if sqrt is not None else None
    mul = g.only_user(recip.output[0], "Mul") if recip is not None else None
    if mul is None or g.other(mul, recip.output[0]) != x:
        return None
    scale = g.only_user(mul.output[0], "Mul")
    w = g.other(scale, mul.output[0]) if scale is not None else None
    if w is None or w not in g.inits or len(g.inits[w].dims) != 1:
        return None
    return [pow_node, mean, add, sqrt, recip, mul, scale], x, w, eps, scale.output[0]


def _gelu(g: _Graph, pow_node):
    """The tanh-GELU chain starting at ``pow_node`` (x^3): (nodes, x, output) or None."""
    x = pow_node.input[0]
    if not _near(_scalar(g.inits, pow_node.input[1]), 3.0):
        return None
    chain = [pow_node]
    value = pow_node.output[0]
    # (op, the other operand: a constant, or x itself)
    for op, want in (("Mul", GELU_A), ("Add", "x"), ("Mul", GELU_C), ("Tanh", None), ("Add", 1.0), ("Mul", 0.5),
                     ("Mul", "x")):
        node = g.only_user(value, op)
        if node is None:
            return None
        if want is not None:
            other = g.other(node, value)
            if want == "x":
                if other != x:
                    return None
            elif not _near(_scalar(g.inits, other), want, 1e-5):
                return None
        chain.append(node)
        value = node.output[0]
    return chain, x, value


def _const_ints(g: _Graph, name: str) -> list[int] | None:
    from onnx import numpy_helper

    t = g.inits.get(name)
    return [int(v) for v in numpy_helper.to_array(t).reshape(-1)] if t is not None else None


def _perm(node) -> list[int] | None:
    from onnx import helper

    for a in node.attribute:
        if a.name == "perm":
            return list(helper.get_attribute_value(a))
    return None


def _attention(g: _Graph, softmax):
    """The attention chain around ``softmax``: (nodes, qkv, bias, heads, output) or None."""
    producer = g.producer
    if any(a.name == "axis" and a.i not in (-1, 3) for a in softmax.attribute):
        return None
    add = producer.get(softmax.input[0])
    if add is None or add.op_type != "Add" or g.only_user(add.output[0], "Softmax") is None:
        return None
    qk = next((producer.get(i) for i in add.input if producer.get(i) is not None
               and producer[i].op_type == "MatMul" and g.only_user(i, "Add") is not None), None)
    if qk is None:
        return None
    bias = g.other(add, qk.output[0])
    kt = producer.get(qk.input[1])
    pv = g.only_user(softmax.output[0], "MatMul")
    if kt is None or kt.op_type != "Transpose" or _perm(kt) != [0, 1, 3, 2] or pv is None or pv.input[0] != softmax.output[0]:
        return None
    tr = g.only_user(pv.output[0], "Transpose")
    out = g.only_user(tr.output[0], "Reshape") if tr is not None and _perm(tr) == [0, 2, 1, 3] else None
    if out is None:
        return None
    picks = []
    for value, index in ((qk.input[0], 0), (kt.input[0], 1), (pv.input[1], 2)):
        sq = producer.get(value)
        sl = producer.get(sq.input[0]) if sq is not None and sq.op_type == "Squeeze" else None
        if sl is None or sl.op_type != "Slice" or len(sl.input) < 4 or _const_ints(g, sl.input[1]) != [index] \
                or _const_ints(g, sl.input[2]) != [index + 1] or _const_ints(g, sl.input[3]) != [0]:
            return None
        picks += [sl, sq]
    permute = producer.get(picks[0].input[0])
    if permute is None or permute.op_type != "Transpose" or _perm(permute) != [2, 0, 3, 1, 4] \
            or any(p.input[0] != permute.output[0] for p in picks[::2]) or len(g.users[permute.output[0]]) != 3:
        return None
    view = producer.get(permute.input[0])
    if view is None or view.op_type != "Reshape" or len(g.users[view.output[0]]) != 1:
        return None
    shape = producer.get(view.input[1])
    dims = [_const_ints(g, i) for i in shape.input[2:]] if shape is not None and shape.op_type == "Concat" else []
    if len(dims) != 3 or dims[0] != [3] or None in dims:
        return None
    heads, d = dims[1][0], dims[2][0]
    oshape = producer.get(out.input[1])
    if oshape is None or oshape.op_type != "Concat" or _const_ints(g, oshape.input[-1]) != [heads * d]:
        return None
    return [view, permute, *picks, kt, qk, add, softmax, pv, tr, out], view.input[0], bias, heads, out.output[0]


def fuse(proto) -> dict[str, int]:
    """Rewrite ``proto``'s RMSNorm, tanh-GELU and attention chains in place; returns how many of each."""
    from onnx import helper

    g = _Graph(proto.graph)
    drop: set[int] = set()
    replace: dict[int, list] = {}  # id of a chain's last node -> the fused nodes
    done = {"rms_norm": 0, "gelu": 0, "attention": 0}
    for node in g.nodes:
        if node.op_type == "Softmax":
            hit = _attention(g, node)
            if hit is None:
                continue
            chain, qkv, bias, heads, out = hit
            t = f"fused_attention_{done['attention']}"
            split = helper.make_node("Split", [qkv], [f"{t}_q", f"{t}_k", f"{t}_v"], axis=-1, num_outputs=3,
                                     name=f"{t}_split")  # [B, L, H d] each
            mha = helper.make_node("MultiHeadAttention", [f"{t}_q", f"{t}_k", f"{t}_v", "", "", bias], [out],
                                   domain=MS_DOMAIN, num_heads=heads, scale=1.0, name=t)
            done["attention"] += 1
            drop.update(id(n) for n in chain)
            replace[id(chain[-1])] = [split, mha]
            continue
        if node.op_type != "Pow" or id(node) in drop:
            continue
        hit = _rms_norm(g, node)
        if hit is not None:
            chain, x, w, eps, out = hit
            fused = helper.make_node("SimplifiedLayerNormalization", [x, w], [out], axis=-1, epsilon=eps,
                                     name=f"fused_rms_norm_{done['rms_norm']}")
            done["rms_norm"] += 1
        else:
            hit = _gelu(g, node)
            if hit is None:
                continue
            chain, x, out = hit
            fused = helper.make_node("FastGelu", [x], [out], domain=MS_DOMAIN, name=f"fused_gelu_{done['gelu']}")
            done["gelu"] += 1
        drop.update(id(n) for n in chain)
        replace[id(chain[-1])] = [fused]  # placed where the chain ends: its inputs exist by then
    if not replace:
        return done
    nodes = []
    for n in g.nodes:
        if id(n) in replace:
            nodes.extend(replace[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    if (done["gelu"] or done["attention"]) and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    used = {i for n in nodes for i in n.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return done
