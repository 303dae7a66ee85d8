"""TensorRT pieces that run without TensorRT: profile, engine naming, engine/GPU mismatch, the plan
file checks, the missing-TensorRT error, and the bf16 ONNX model the engine build consumes."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import onnx
import pytest
import torch

import fastenc
from fastenc.errors import BackendUnavailable, CheckpointError, ConfigError, FastencError, InputError
from fastenc.exporters.artifacts import read_sidecar, write_json, write_manifest, write_sidecar
from fastenc.exporters.contract import Profile, make_profile
from fastenc.exporters.pipeline import ExportRequest, export
from fastenc.exporters.tensorrt import (build_engine, check_engine_compat, engine_name, parse_engine_name,
                                        trt_short_version)
from reference import TINY, Reference, write_distillt5

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; these check its absence")


# ---------------------------------------------------------------------------- profile


def test_profile_from_flags():
    p = make_profile(4, 512)
    assert (p.min_shape(), p.opt_shape(), p.max_shape()) == ((1, 1), (1, 512), (4, 512))
    assert p.input_shapes() == {"input_ids": ((1, 1), (1, 512), (4, 512)),
                                "attention_mask": ((1, 1), (1, 512), (4, 512))}
    assert make_profile(8, 120, opt_batch=2, opt_seq=77).opt_shape() == (2, 77)
    assert Profile.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_batch=0, max_seq=512), "--max-batch must be a positive integer, got 0"),
    (dict(max_batch=4, max_seq=-1), "--max-seq must be a positive integer, got -1"),
    (dict(max_batch=True, max_seq=512), "--max-batch must be a positive integer"),
    (dict(max_batch=4, max_seq=512, opt_batch=5), "min <= opt <= max, got 1/5/4"),
])
def test_profile_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        make_profile(**kwargs)


def test_profile_check_names_the_artifact_and_range():
    p = make_profile(4, 256)
    p.check(4, 256, "x.plan")
    for batch, seq in [(5, 10), (1, 257), (0, 10)]:
        with pytest.raises(InputError, match=r"outside the profile x\.plan was built for \(batch 1\.\.4, seq 1\.\.256\)"):
            p.check(batch, seq, "x.plan")


# ---------------------------------------------------------------------------- naming + compatibility


def test_engine_name_carries_trt_version_gpu_and_dtype():
    assert engine_name("10.8.0.43", (9, 0), "bf16") == "encoder.trt10.8.sm90.bf16.plan"
    assert engine_name("10.13.2", (8, 9), "fp16") == "encoder.trt10.13.sm89.fp16.plan"
    assert parse_engine_name("encoder.trt10.8.sm90.bf16.plan") == {"trt": "10.8", "sm": "90", "dtype": "bf16"}
    assert parse_engine_name("encoder.fp32.onnx") is None
    assert trt_short_version("10.8.0.43") == "10.8"
    with pytest.raises(FastencError, match="unrecognised TensorRT version"):
        trt_short_version("ten")


@pytest.fixture
def engine_dir(tmp_path) -> Path:
    """An export directory holding an engine (random bytes) built, per its sidecar, on an H200 with TRT 10.8."""
    d = tmp_path / "export"
    write_json(d / "config.json", TINY.to_hf_dict())
    profile = make_profile(4, 120)
    plan = d / "trt" / engine_name("10.8.0.43", (9, 0), "bf16")
    plan.parent.mkdir(parents=True)
    plan.write_bytes(os.urandom(4096))
    write_sidecar(plan, kind="tensorrt", backend="tensorrt", dtype="bf16", inputs={}, profile=profile, files=[plan],
                  sha256=hashlib.sha256(plan.read_bytes()).hexdigest(), tensorrt_version="10.8.0.43",
                  compute_capability="sm90", gpu_name="NVIDIA H200")
    write_manifest(d, source={"kind": "checkpoint", "path": "/x"}, fingerprint="f", cfg=TINY, target="pixart-alpha",
                   profile=profile, artifacts=[plan])
    return d


def test_engine_for_another_gpu_and_trt_is_one_clear_error(engine_dir):
    plan = next((engine_dir / "trt").glob("*.plan"))
    meta = read_sidecar(plan)
    check_engine_compat(meta, trt_version="10.8.1.2", capability=(9, 0), where=plan)  # same major.minor + GPU: ok
    with pytest.raises(CheckpointError) as exc:
        check_engine_compat(meta, trt_version="10.9.0.34", capability=(8, 0), where=plan)
    message = str(exc.value)
    assert "TensorRT 10.8.0.43 (this machine has 10.9.0.34)" in message
    assert "sm90 / NVIDIA H200 (this GPU is sm80)" in message and "rebuild" in message
    with pytest.raises(CheckpointError, match=r"built for sm90 / NVIDIA H200 \(this GPU is sm89\)"):
        check_engine_compat(meta, trt_version="10.8.0.43", capability=(8, 9), where=plan)


def test_engine_needs_the_trt_release_that_built_it(engine_dir):
    """major.minor.patch must match (a patch mismatch used to reach TensorRT's generic failure)."""
    from fastenc.backends.tensorrt import check_trt_release, trt_release

    plan = next((engine_dir / "trt").glob("*.plan"))
    assert trt_release("10.8.0.43") == (10, 8, 0) and trt_release("10.8") is None
    check_trt_release("10.8.0.43", "10.8.0.12", plan)  # same release, another build number
    for here in ("10.8.1.2", "10.9.0.34", "11.0.0.1"):
        with pytest.raises(CheckpointError) as exc:
            check_trt_release("10.8.0.43", here, plan)
        assert f"built with TensorRT 10.8.0.43 but this machine has TensorRT {here}" in str(exc.value)
        assert "major.minor.patch" in str(exc.value) and "--trt --force" in str(exc.value)
    with pytest.raises(CheckpointError, match=r"records TensorRT version '10\.8', not major\.minor\.patch"):
        check_trt_release("10.8", "10.8.0.43", plan)


class _FakeContext:
    """Stand-in for the two TensorRT IExecutionContext calls bind() makes (TensorRT is not installable here)."""

    def __init__(self, accept_shapes: bool = True):
        self.accept_shapes = accept_shapes
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return self.accept_shapes

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True


def test_bind_sets_every_shape_and_address():
    from fastenc.backends.tensorrt import bind

    ids, mask, out = torch.zeros(2, 7, dtype=torch.int32), torch.ones(2, 7, dtype=torch.int32), torch.empty(2, 7, 64)
    ctx = _FakeContext()
    addresses = {"input_ids": ids.data_ptr(), "attention_mask": mask.data_ptr(), "text_embeddings": out.data_ptr()}
    bind(ctx, (2, 7), addresses)
    assert ctx.shapes == {"input_ids": (2, 7), "attention_mask": (2, 7)} and ctx.addresses == addresses
    with pytest.raises(FastencError, match=r"TensorRT rejected input shape \(2, 7\) for input_ids"):
        bind(_FakeContext(accept_shapes=False), (2, 7), addresses)


def test_each_graph_shape_gets_its_own_context():
    """CUDA graphs bake a context's bindings in: a context is never re-bound for a second shape."""
    from fastenc.backends.tensorrt import ShapeContexts

    pool = ShapeContexts(_FakeContext, limit=2)
    seen = {}
    for shape in [(1, 77), (2, 77), (1, 77), (1, 512), (2, 77)]:
        entry = pool.get(shape)
        if entry is None:
            entry = pool.new_context()
            pool.put(shape, entry)
        seen.setdefault(shape, set()).add(id(entry))
    # (1,77) and (2,77) live; (1,77) reused; (1,512) drops (2,77) (least recently used); (2,77) comes back new
    assert pool.created == 4 and pool.dropped == 2 and len(pool) == 2
    assert pool.shapes() == [(1, 512), (2, 77)]
    assert len(seen[(1, 77)]) == 1 and len(seen[(2, 77)]) == 2
    with pytest.raises(FastencError, match="could not create an execution context"):
        ShapeContexts(lambda: None).new_context()


@no_trt
def test_load_tensorrt_without_tensorrt(engine_dir):
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        fastenc.load(engine_dir, backend="tensorrt")


def test_corrupt_truncated_or_missing_engine_file(engine_dir):
    plan = next((engine_dir / "trt").glob("*.plan"))
    data = plan.read_bytes()
    plan.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"\.plan: content differs from the export manifest \(sha256 mismatch"):
        fastenc.load(engine_dir, backend="tensorrt")
    plan.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"truncated or replaced"):
        fastenc.load(engine_dir, backend="tensorrt")
    plan.unlink()
    with pytest.raises(CheckpointError, match=r"\.plan: missing"):
        fastenc.load(engine_dir, backend="tensorrt")


def test_no_engine_in_the_export(tmp_path):
    d = tmp_path / "export"
    write_json(d / "config.json", TINY.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"no tensorrt artifact \(export one with `fastenc export --trt`\)"):
        fastenc.load(d, backend="tensorrt")


def test_engine_needs_a_cuda_device(engine_dir):
    with pytest.raises(CheckpointError, match="TensorRT engines run on CUDA devices, not cpu"):
        fastenc.load(engine_dir, backend="tensorrt", device="cpu")


# ---------------------------------------------------------------------------- --trt without TensorRT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_distillt5(Reference(TINY), TINY, tmp_path_factory.mktemp("ck") / "tiny")


@no_trt
def test_export_trt_without_tensorrt_writes_nothing(checkpoint, tmp_path, capsys):
    from fastenc.cli import main

    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(checkpoint), "--trt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc: error: TensorRT is not installed") and "pip install tensorrt" in err
    assert err.count("\n") == 1
    assert not out.exists()


@no_trt
def test_build_engine_without_tensorrt(tmp_path):
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        build_engine(tmp_path / "encoder.bf16.onnx", tmp_path / "x.plan", make_profile(1, 8))
    assert not (tmp_path / "x.plan").exists()


# ---------------------------------------------------------------------------- the ONNX the engine consumes


@pytest.fixture(scope="module")
def bf16_export(checkpoint, tmp_path_factory):
    """What `fastenc export --trt` exports before building (bf16, strongly typed input for TensorRT)."""
    out = tmp_path_factory.mktemp("export") / "bf16"
    return export(ExportRequest(out=out, checkpoint=str(checkpoint), dtype="bf16", max_batch=2, max_seq=64))


def test_bf16_onnx_is_what_a_strongly_typed_build_needs(bf16_export):
    proto = onnx.load(str(bf16_export.directory / "onnx" / "encoder.bf16.onnx"))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT32 for i in proto.graph.input)
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    out = proto.graph.output[0]
    assert out.name == "text_embeddings" and out.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 256]
    assert weights and all(t.data_type == onnx.TensorProto.BFLOAT16 for t in weights)
    types = {t.data_type for t in proto.graph.initializer}
    assert onnx.TensorProto.DOUBLE not in types


def test_bf16_onnx_matches_torch_bf16(bf16_export):
    """ONNX Runtime's CPU provider has no bf16 kernels: verify runs it with onnx's reference evaluator."""
    (row,) = bf16_export.report.rows
    assert row.backend == "onnx-reference" and row.dtype == "bf16" and row.status == "pass"
    assert row.mean_cos >= 0.9999
    assert not (bf16_export.directory / "onnx" / "encoder.bf16.ort-cpu.onnx").exists()
    with pytest.raises(BackendUnavailable, match="CPU provider cannot run this bf16 model"):
        fastenc.load(bf16_export.directory, backend="onnxruntime", device="cpu")


@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason="needs TensorRT and a CUDA GPU")
def test_engine_round_trip_on_gpu(checkpoint, tmp_path):
    out = tmp_path / "trt"
    result = export(ExportRequest(out=out, checkpoint=str(checkpoint), trt=True, max_batch=2, max_seq=64))
    assert result.report.ok
    enc = fastenc.load(out, backend="tensorrt")
    ids = torch.randint(0, TINY.vocab_size, (2, 33))
    want = fastenc.load(checkpoint, device="cuda", dtype="bf16")(ids)
    cos = torch.nn.functional.cosine_similarity(enc(ids).float(), want.float(), dim=-1)
    assert float(cos.mean()) >= 0.9999
