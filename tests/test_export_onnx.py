"""ONNX export + the ONNX Runtime backend: contract, parity over dynamic shapes, int8, fp16, external
data, base shape, idempotence and bad input. Each export runs once per module (tiny configs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import torch

import fastenc
from fastenc.errors import CheckpointError, ConfigError, InputError
from fastenc.exporters.artifacts import build_step, is_current, read_sidecar, sidecar_path, write_sidecar
from fastenc.exporters.contract import make_profile
from fastenc.exporters.onnx import uses_external_data
from fastenc.exporters.pipeline import ExportRequest, export
from helpers import PROMPTS, make_t5_tokenizer_json
from reference import TINY, Reference, cos_per_token, rel_err, write_distillt5

MAX_BATCH, MAX_SEQ = 4, 120  # pixart-alpha's length, so encode(target="pixart-alpha") fits


def _inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)  # [B, L]
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(1, batch):  # rows 1.. padded to decreasing lengths
        mask[i, max(1, seq - 3 * i):] = 0
    return ids, mask


@pytest.fixture(scope="module")
def ref():
    return Reference(TINY)


@pytest.fixture(scope="module")
def checkpoint(ref, tmp_path_factory) -> Path:
    directory = write_distillt5(ref, TINY, tmp_path_factory.mktemp("ck") / "tiny")
    make_t5_tokenizer_json(directory)
    return directory


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    result = export(ExportRequest(out=out, checkpoint=str(checkpoint), int8=True, max_batch=MAX_BATCH,
                                  target="pixart-alpha"))
    return result


@pytest.fixture(scope="module")
def torch_encoder(checkpoint):
    return fastenc.load(checkpoint, cache=False, backend="torch").requires_grad_(False)


# ---------------------------------------------------------------------------- contract


def test_graph_follows_the_contract(exported):
    proto = onnx.load(str(exported.directory / "onnx" / "encoder.fp32.onnx"))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for t in inputs.values():
        assert t.elem_type == onnx.TensorProto.INT32
        assert [d.dim_param for d in t.shape.dim] == ["batch", "seq"]
    (out,) = proto.graph.output
    assert out.name == "text_embeddings"
    dims = out.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", TINY.projection_dim]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_export_writes_config_tokenizer_manifest_and_sidecars(exported):
    d = exported.directory
    assert fastenc.EncoderConfig.from_json_file(d / "config.json").replace(name="tiny") == TINY
    assert (d / "tokenizer.json").is_file()
    manifest = json.loads((d / "export.json").read_text())
    assert manifest["profile"]["max_seq"] == 120 and manifest["profile"]["max_batch"] == MAX_BATCH
    assert sorted(manifest["artifacts"]) == ["onnx/encoder.fp32.onnx", "onnx/encoder.fp32.ort-cpu.onnx",
                                             "onnx/encoder.int8.onnx"]
    meta = read_sidecar(d / "onnx" / "encoder.fp32.ort-cpu.onnx")
    assert meta["kind"] == "onnx-ort" and meta["backend"] == "onnxruntime" and meta["dtype"] == "fp32"
    assert not list(d.rglob("*.tmp")) and not list(d.rglob(".staging-*"))
    assert exported.report.ok and len(exported.report.rows) == 3


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 17), (MAX_BATCH, MAX_SEQ)])
@pytest.mark.parametrize("kind", ["onnx-ort", "onnx"])
def test_onnxruntime_matches_transformers_over_dynamic_shapes(exported, ref, torch_encoder, kind, shape):
    from fastenc.backends.onnxruntime import OrtRunner
    from fastenc.exporters.artifacts import find_artifacts

    (path, meta), = [(p, m) for p, m in find_artifacts(exported.directory, "onnxruntime")
                     if m["kind"] == kind and m["dtype"] == "fp32"]
    runner = OrtRunner(torch_encoder.config, path, meta, torch.device("cpu"))
    ids, mask = _inputs(*shape, TINY.vocab_size, seed=shape[1])
    out = runner(ids, mask)  # [B, L, P]
    assert out.shape == (*shape, TINY.projection_dim) and out.dtype == torch.float32
    assert rel_err(out, ref(ids, mask)) < 1e-5
    assert float((out - torch_encoder(ids, mask)).abs().max()) <= 1e-4


def test_load_onnxruntime_backend_encodes_like_torch(exported, torch_encoder):
    enc = fastenc.load(exported.directory, backend="onnxruntime", cache=False)
    assert enc.backend == "onnxruntime" and enc.device == torch.device("cpu") and enc.dtype == torch.float32
    assert enc.config == torch_encoder.config and enc.tokenizer is not None
    assert enc.model.artifact.name == "encoder.fp32.ort-cpu.onnx"
    for target in ("pixart-alpha",):  # masked target; flux-dev (512) is beyond this export's profile
        got, want = enc.encode(PROMPTS[:3], target=target), torch_encoder.encode(PROMPTS[:3], target=target)
        assert torch.equal(got.mask, want.mask)
        assert float((got.embeds - want.embeds).abs().max()) <= 1e-4
    ids = _inputs(2, 9, TINY.vocab_size)[0]  # Flux calls T5 without a mask
    assert float((enc(ids) - torch_encoder(ids)).abs().max()) <= 1e-4


def test_int8_model_is_quantised_and_within_bound(exported, torch_encoder):
    path = exported.directory / "onnx" / "encoder.int8.onnx"
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}, ops
    enc = fastenc.load(exported.directory, backend="onnxruntime", dtype="int8", cache=False)
    assert enc.model.artifact == path
    ids, mask = _inputs(MAX_BATCH, 64, TINY.vocab_size)
    cos = cos_per_token(enc(ids, mask), torch_encoder(ids, mask))  # [B, L]
    assert float(cos.mean()) >= 0.995
    row = next(r for r in exported.report.rows if r.dtype == "int8")
    assert row.status == "pass" and row.mean_cos >= 0.995


# ---------------------------------------------------------------------------- idempotence


def test_second_export_reuses_every_artifact(exported, checkpoint):
    files = sorted(p for p in exported.directory.rglob("*.onnx"))
    before = {p: p.stat().st_mtime_ns for p in files}
    again = export(ExportRequest(out=exported.directory, checkpoint=str(checkpoint), int8=True, max_batch=MAX_BATCH,
                                 target="pixart-alpha", verify=False))
    assert again.built == [] and sorted(again.artifacts) == sorted(exported.artifacts)
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_build_step_reuses_rebuilds_and_forces(tmp_path):
    artifact = tmp_path / "a.bin"
    profile = make_profile(2, 8)
    builds = []

    def build(payload: bytes):
        def run():
            builds.append(payload)
            artifact.write_bytes(payload)
            return write_sidecar(artifact, kind="test", backend="onnxruntime", dtype="fp32", inputs={"v": len(builds)},
                                 profile=profile, files=[artifact])
        return run

    build_step(artifact, {"v": 1}, build(b"one"), force=False, what="t")
    _, built = build_step(artifact, {"v": 1}, build(b"two"), force=False, what="t")
    assert not built and artifact.read_bytes() == b"one"
    _, built = build_step(artifact, {"v": 1}, build(b"three"), force=True, what="t")  # --force
    assert built and artifact.read_bytes() == b"three"
    assert not is_current(artifact, {"v": 99})  # other inputs
    artifact.write_bytes(b"x")  # truncated/replaced file: not reused
    assert not is_current(artifact, {"v": 2})
    sidecar_path(artifact).write_text("{not json")
    assert not is_current(artifact, {"v": 2})


# ---------------------------------------------------------------------------- fp16 + external data


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    """A tiny checkpoint whose FFN output overflows fp16 (|wo x| > 65504), exported in fp16 with the
    external-data path forced (threshold 0 bytes)."""
    ref = Reference(TINY, seed=1)
    with torch.no_grad():
        for block in ref.encoder.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(1e5)
    ck = write_distillt5(ref, TINY, tmp_path_factory.mktemp("ck16") / "big")
    out = tmp_path_factory.mktemp("export16") / "fp16"
    result = export(ExportRequest(out=out, checkpoint=str(ck), dtype="fp16", max_batch=2, max_seq=32,
                                  external_data_threshold=0))
    return ck, result


def test_fp16_graph_keeps_ffn_output_and_residual_in_fp32(fp16_export):
    ck, result = fp16_export
    proto = onnx.load(str(result.directory / "onnx" / "encoder.fp16.onnx"))
    wo_shapes = ({TINY.d_ff, TINY.d_model},)
    big = [t for t in proto.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= TINY.d_model * 8]
    wo = [t for t in big if set(t.dims) in wo_shapes]
    assert len(wo) == TINY.num_layers and all(t.data_type == onnx.TensorProto.FLOAT for t in wo)
    others = [t for t in big if set(t.dims) not in wo_shapes]
    assert others and all(t.data_type == onnx.TensorProto.FLOAT16 for t in others)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_fp16_export_does_not_overflow(fp16_export):
    ck, result = fp16_export
    ffn_out = []
    model32 = fastenc.load(ck, cache=False, backend="torch")
    model32.model.blocks[0].ffn.register_forward_hook(lambda m, i, o: ffn_out.append(o.abs().max()))
    ids, mask = _inputs(2, 32, TINY.vocab_size)
    with torch.no_grad():
        want = model32(ids, mask)  # [B, L, P] fp32
    assert float(ffn_out[0]) > 65504  # a pure-fp16 graph would overflow here
    enc = fastenc.load(result.directory, backend="onnxruntime", cache=False)
    assert enc.dtype == torch.float16
    got = enc(ids, mask)  # [B, L, P] fp16
    assert torch.isfinite(got).all()
    assert float(cos_per_token(got, want).min()) > 0.999
    assert result.report.ok and {r.dtype for r in result.report.rows} == {"fp16"}


def test_external_data_files_are_written_and_loaded(fp16_export):
    _, result = fp16_export
    d = result.directory / "onnx"
    for name in ("encoder.fp16.onnx", "encoder.fp16.ort-cpu.onnx"):
        assert uses_external_data(d / name)
        assert (d / f"{name}.data").is_file()
        assert f"{name}.data" in read_sidecar(d / name)["files"]


def test_missing_external_data_is_one_clear_error(fp16_export, tmp_path):
    import shutil

    _, result = fp16_export
    copy = tmp_path / "copy"
    shutil.copytree(result.directory, copy)
    (copy / "onnx" / "encoder.fp16.ort-cpu.onnx.data").unlink()
    with pytest.raises(CheckpointError, match=r"encoder\.fp16\.ort-cpu\.onnx\.data: missing"):
        fastenc.load(copy, backend="onnxruntime")


# ---------------------------------------------------------------------------- base shape


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    """base-shape student with random weights (T5's initialisation)."""
    enc = fastenc.load(size="base", random_init=True, cache=False, backend="torch")
    ck = fastenc.save(enc, tmp_path_factory.mktemp("ckbase") / "base")
    out = tmp_path_factory.mktemp("exportbase") / "base"
    result = export(ExportRequest(out=out, checkpoint=str(ck), max_batch=2, max_seq=512, verify=False))
    return enc, result


def test_base_shape_parity(base_export):
    torch_enc, result = base_export
    enc = fastenc.load(result.directory, backend="onnxruntime", cache=False)
    assert enc.config.output_dim == 4096 and enc.config.d_model == 768
    for shape in [(1, 512), (2, 77)]:
        ids, mask = _inputs(*shape, enc.config.vocab_size)
        with torch.no_grad():
            want = torch_enc(ids, mask)  # [B, L, 4096]
        got = enc(ids, mask)
        assert got.shape == (*shape, 4096)
        assert float((got - want).abs().max()) <= 1e-4, shape


# ---------------------------------------------------------------------------- bad input


def test_batch_or_seq_beyond_profile(exported):
    enc = fastenc.load(exported.directory, backend="onnxruntime", cache=False)
    with pytest.raises(InputError, match=r"batch=5.*batch 1\.\.4"):
        enc(torch.zeros(5, 8, dtype=torch.long))
    with pytest.raises(InputError, match=r"seq=121.*seq 1\.\.120"):
        enc(torch.zeros(1, 121, dtype=torch.long))


@pytest.fixture
def broken_copy(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported.directory, copy)
    return copy


def test_missing_onnx_file(broken_copy):
    (broken_copy / "onnx" / "encoder.fp32.ort-cpu.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"encoder\.fp32\.ort-cpu\.onnx: missing"):
        fastenc.load(broken_copy, backend="onnxruntime")


def test_truncated_onnx_file(broken_copy):
    path = broken_copy / "onnx" / "encoder.fp32.ort-cpu.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"truncated or replaced"):
        fastenc.load(broken_copy, backend="onnxruntime")


def test_corrupt_onnx_file_of_the_same_size(broken_copy):
    path = broken_copy / "onnx" / "encoder.fp32.ort-cpu.onnx"
    path.write_bytes(os.urandom(path.stat().st_size))
    with pytest.raises(CheckpointError, match=r"ort-cpu\.onnx: content differs from the export manifest"):
        fastenc.load(broken_copy, backend="onnxruntime")


def test_no_artifact_of_that_dtype(exported):
    with pytest.raises(CheckpointError, match=r"no onnxruntime artifact with dtype bf16.*found"):
        fastenc.load(exported.directory, backend="onnxruntime", dtype="bf16")
    with pytest.raises(ConfigError, match=r"unknown dtype 'int4'"):
        fastenc.load(exported.directory, backend="onnxruntime", dtype="int4")


def test_not_an_export_directory(checkpoint):
    with pytest.raises(CheckpointError, match=r"no onnxruntime artifact"):
        fastenc.load(checkpoint, backend="onnxruntime")


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "int4"], "invalid choice: 'int4'"),
    (["--target", "flux-pro"], "invalid choice: 'flux-pro'"),
    (["--max-batch", "0"], "expected a positive integer, got 0"),
    (["--max-seq", "many"], "expected a positive integer, got 'many'"),
    (["--size", "huge", "--random-init"], "invalid choice: 'huge'"),
])
def test_unknown_flag_values(argv, message, capsys, tmp_path):
    from fastenc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", "--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "pass --checkpoint DIR|HUB_ID, "),
    (["--checkpoint", "/nonexistent/ck"], "/nonexistent/ck: no such file or directory"),
])
def test_bad_model_arguments_write_nothing(argv, message, capsys, tmp_path):
    from fastenc.cli import main

    assert main(["export", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
