"""``fastenc verify`` and the check at the end of ``fastenc export``: table, bounds, exit codes."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from fastenc.cli import main
from fastenc.errors import CheckpointError
from fastenc.exporters.artifacts import read_config, read_manifest, read_sidecar, write_manifest, write_sidecar
from fastenc.exporters.contract import Profile
from fastenc.exporters.verify import BOUNDS, Report, Row, check_bound, verify
from reference import TINY, Reference, write_distillt5

HEADER = ("backend", "dtype", "artifact", "max abs err", "mean cos-sim", "worst-token cos", "bound", "result")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """No tokenizer: verify falls back to fixed random token ids."""
    return write_distillt5(Reference(TINY, seed=3), TINY, tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["export", "--checkpoint", str(checkpoint), "--max-batch", "2", "--max-seq", "40",
                 "--out", str(out)]) == 0
    return out


def test_export_prints_artifacts_and_table(export_dir, checkpoint, capsys):
    assert main(["export", "--checkpoint", str(checkpoint), "--max-batch", "2", "--max-seq", "40",
                 "--out", str(export_dir)]) == 0
    out = capsys.readouterr().out
    assert f"reused  {export_dir / 'onnx' / 'encoder.fp32.onnx'}" in out
    for word in HEADER:
        assert word in out


def test_verify_table_and_exit_status(export_dir, capsys):
    assert main(["verify", str(export_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["backend", "dtype", "artifact", "max", "abs", "err", "mean", "cos-sim",
                                "worst-token", "cos", "bound", "result"]
    assert len(lines) == 3
    for line in lines[1:]:
        cols = line.split()
        assert cols[:2] == ["onnxruntime", "fp32"] and cols[-1] == "pass"
        assert float(cols[3]) <= 1e-4 and 0.9999 <= float(cols[4]) <= 1.0 + 1e-6


def test_verify_report_values(export_dir):
    report = verify(export_dir)
    assert report.ok and [r.artifact for r in report.rows] == ["onnx/encoder.fp32.onnx", "onnx/encoder.fp32.ort-cpu.onnx"]
    for row in report.rows:
        assert row.max_abs <= 1e-4 and row.worst_cos <= row.mean_cos <= 1.0 + 1e-6


def _tamper(directory: Path, name: str, scale: float = 1.01, *, resign: bool = True) -> None:
    """Scale the largest weight of an ONNX model (same file size). With ``resign`` the sidecar and the
    manifest are rewritten to match, as a wrong but self-consistent export would be."""
    path = directory / "onnx" / name
    proto = onnx.load(str(path))
    big = max(proto.graph.initializer, key=lambda t: math.prod(t.dims))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * scale, big.name))
    onnx.save(proto, str(path))
    if resign:
        meta = read_sidecar(path)
        write_sidecar(path, kind=meta["kind"], backend=meta["backend"], dtype=meta["dtype"], inputs=meta["inputs"],
                      profile=Profile.from_dict(meta["profile"]), files=[path])
        resign_manifest(directory)


def resign_manifest(directory: Path) -> None:
    """Rewrite the manifest's sizes and hashes for the folder as it is now."""
    m = read_manifest(directory)
    write_manifest(directory, source=m["source"], fingerprint=m["fingerprint"], cfg=read_config(directory),
                   target=m["target"], profile=Profile.from_dict(m["profile"]),
                   artifacts=[directory / a for a in m["artifacts"]])


@pytest.fixture
def tampered(export_dir, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    _tamper(copy, "encoder.fp32.onnx")
    return copy


def test_verify_exits_1_when_a_bound_is_missed(tampered, capsys):
    assert main(["verify", str(tampered)]) == 1
    captured = capsys.readouterr()
    fail = [line for line in captured.out.splitlines() if "FAIL" in line]
    assert len(fail) == 1 and "onnx/encoder.fp32.onnx " in fail[0]
    assert "1 artifact(s) missed their bound" in captured.err


def test_export_fails_loudly_when_verify_misses(tampered, checkpoint, capsys):
    """The tampered model is reused (its recorded inputs match), then the check at the end fails."""
    rc = main(["export", "--checkpoint", str(checkpoint), "--max-batch", "2", "--max-seq", "40", "--out", str(tampered)])
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fastenc: error: verification failed: onnxruntime fp32 onnx/encoder.fp32.onnx")
    assert "(max abs <= 0.0001)" in captured.err and "FAIL" in captured.out


def test_corrupt_artifact_is_refused_before_anything_runs(tampered, capsys):
    path = tampered / "onnx" / "encoder.fp32.ort-cpu.onnx"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"ort-cpu\.onnx: \d+ bytes but \d+ were written \(truncated or "
                                              r"replaced\); re-export with `fastenc export \.\.\. --force`"):
        verify(tampered)
    assert main(["verify", str(tampered)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc: error: ") and err.count("\n") == 1 and "truncated or replaced" in err


def test_unsigned_tamper_is_refused_by_verify(export_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    _tamper(copy, "encoder.fp32.onnx", resign=False)
    with pytest.raises(CheckpointError, match=r"encoder\.fp32\.onnx: content differs from the export manifest"):
        verify(copy)


def test_checkpoint_moved_and_checkpoint_override(export_dir, checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    manifest = copy / "export.json"
    manifest.write_text(manifest.read_text().replace(str(checkpoint.resolve()), str(tmp_path / "gone")))
    with pytest.raises(CheckpointError, match=r"is gone; pass it with `fastenc verify DIR --checkpoint PATH`"):
        verify(copy)
    assert verify(copy, checkpoint=str(moved)).ok
    other = write_distillt5(Reference(TINY, seed=4), TINY, tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"not the checkpoint these artifacts were exported from"):
        verify(copy, checkpoint=str(other))


def test_verify_on_a_directory_that_is_not_an_export(checkpoint, tmp_path, capsys):
    assert main(["verify", str(checkpoint)]) == 2
    assert "export manifest (run `fastenc export` first) not found" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no such export directory" in capsys.readouterr().err


def test_bounds():
    assert BOUNDS == {"fp32": ("max_abs", 1e-4), "fp16": ("mean_cos", 0.9999), "bf16": ("mean_cos", 0.9999),
                      "int8": ("mean_cos", 0.995)}
    assert check_bound("fp32", 1e-4, 0.0) and not check_bound("fp32", 1.1e-4, 1.0)
    assert check_bound("bf16", 1.0, 0.9999) and not check_bound("fp16", 0.0, 0.99989)
    assert check_bound("int8", 1.0, 0.995) and not check_bound("int8", 0.0, 0.994)
    assert not check_bound("fp32", float("nan"), 1.0) and not check_bound("bf16", 0.0, float("nan"))


def test_table_marks_skipped_and_failed_rows():
    report = Report([Row("tensorrt", "bf16", "trt/x.plan", note="TensorRT is not installed"),
                     Row("onnxruntime", "int8", "onnx/encoder.int8.onnx", 0.5, 0.99, 0.9, "FAIL")])
    text = report.table().splitlines()
    assert "skip (TensorRT is not installed)" in text[1] and "cos >= 0.9999" in text[1]
    assert "0.990000" in text[2] and "FAIL" in text[2] and not report.ok
