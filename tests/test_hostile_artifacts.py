"""Crafted, tampered and mixed export folders; names that try to leave their folder; leftovers of killed
runs; the umask; export flags checked before anything runs; ONNX Runtime sessions that do not spin.
One tiny export per module, copied per case."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.cli import main
from fastenc.errors import CheckpointError, ConfigError
from fastenc.exporters import artifacts
from fastenc.exporters.artifacts import (VERIFIED_NAME, check_export, read_config, read_manifest, safe_member, staged,
                                         write_manifest)
from fastenc.exporters.contract import Profile
from fastenc.exporters.pipeline import ExportRequest, export
from fastenc.exporters.triton_repo import TritonRepoRequest, write_triton_repo
from fastenc.exporters.verify import verify
from helpers import make_t5_tokenizer_json
from reference import TINY, Reference, write_distillt5

REEXPORT = "re-export with `fastenc export ... --force`"
TAMPERED = "content differs from the export manifest (sha256 mismatch: tampered, corrupted or mixed with another export)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    ck = write_distillt5(Reference(TINY, seed=2), TINY, tmp_path_factory.mktemp("ck") / "tiny")
    make_t5_tokenizer_json(ck)
    return ck


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    export(ExportRequest(out=out, checkpoint=str(checkpoint), max_batch=2, target="pixart-alpha", verify=False))
    return out


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    d = tmp_path / "export"
    shutil.copytree(exported, d)
    return d


def _request(checkpoint: Path, out: Path) -> ExportRequest:
    return ExportRequest(out=out, checkpoint=str(checkpoint), max_batch=2, target="pixart-alpha", verify=False)


def _flip(path: Path, offset: int = 4096) -> None:
    """Change one byte in place (same size), then give the file its old mtime back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _resign(directory: Path) -> None:
    """Rewrite the manifest for the folder as it is now (what a forger would do)."""
    m = json.loads((directory / "export.json").read_text())
    write_manifest(directory, source=m["source"], fingerprint=m["fingerprint"], cfg=read_config(directory),
                   target=m["target"], profile=Profile.from_dict(m["profile"]),
                   artifacts=[directory / a for a in m["artifacts"]])


def _triton(export_dir: Path, out: Path) -> None:
    write_triton_repo(TritonRepoRequest(export_dir=export_dir, out=out))


# ---------------------------------------------------------------------------- tampered and mixed folders


def test_same_size_tamper_with_mtime_restored_is_refused_by_load_verify_and_triton_repo(copy, tmp_path, capsys):
    fastenc.load(copy, backend="onnxruntime", cache=False)  # remembers the verified digests
    assert (copy / VERIFIED_NAME).is_file()
    for name in ("encoder.fp32.ort-cpu.onnx", "encoder.fp32.onnx"):  # what load, and triton-repo, read
        _flip(copy / "onnx" / name)
    message = f"{copy / 'onnx' / 'encoder.fp32.ort-cpu.onnx'}: {TAMPERED}; {REEXPORT}"
    with pytest.raises(CheckpointError) as exc:
        fastenc.load(copy, backend="onnxruntime", cache=False)
    assert str(exc.value) == message
    with pytest.raises(CheckpointError, match=r"encoder\.fp32\.(ort-cpu\.)?onnx: content differs"):
        verify(copy)
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc: error: ") and TAMPERED in err and REEXPORT in err and err.count("\n") == 1
    with pytest.raises(CheckpointError) as exc:
        _triton(copy, tmp_path / "repo")
    assert str(exc.value) == f"{copy / 'onnx' / 'encoder.fp32.onnx'}: {TAMPERED}; {REEXPORT}"
    assert not (tmp_path / "repo").exists()


def test_digests_are_remembered_but_not_trusted_across_writes(copy, monkeypatch):
    calls = []
    real = artifacts.file_digest
    monkeypatch.setattr(artifacts, "file_digest", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    artifacts._verified.clear()
    check_export(copy)
    assert len(calls) == len(read_manifest(copy)["files"])
    calls.clear()
    artifacts._verified.clear()  # a new process: the record in the folder still saves the hashing
    check_export(copy)
    assert calls == []
    _flip(copy / "config.json", offset=10)  # same size, same mtime: the ctime tells
    with pytest.raises(CheckpointError, match=r"config\.json: content differs"):
        check_export(copy)
    assert calls == ["config.json"]


def test_mixed_folder_is_refused(copy, tmp_path):
    """Another checkpoint's config and tokenizer beside this export's ONNX (what a killed export once left)."""
    other = write_distillt5(Reference(dataclasses.replace(TINY, d_ff=40), seed=3), dataclasses.replace(TINY, d_ff=40),
                            tmp_path / "other")
    make_t5_tokenizer_json(other, vocab_size=200)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(other / name, copy / name)
    refused = r"(config|tokenizer)\.json: (content differs|\d+ bytes but \d+ were written \(truncated or replaced\))"
    with pytest.raises(CheckpointError, match=refused + ".*--force"):
        fastenc.load(copy, backend="onnxruntime", cache=False)
    with pytest.raises(CheckpointError, match=refused):
        verify(copy)
    with pytest.raises(CheckpointError, match=refused):
        _triton(copy, tmp_path / "repo")


def test_folder_without_manifest_or_of_an_older_format_is_refused(copy):
    manifest = json.loads((copy / "export.json").read_text())
    (copy / "export.json").write_text(json.dumps({**manifest, "version": 1, "files": None}))
    with pytest.raises(CheckpointError, match=rf"export\.json: written by another fastenc version.*{REEXPORT}"):
        fastenc.load(copy, backend="onnxruntime")
    (copy / "export.json").unlink()
    with pytest.raises(CheckpointError, match=rf"artifacts without an export manifest.*{REEXPORT}"):
        fastenc.load(copy, backend="onnxruntime")


# ---------------------------------------------------------------------------- names that try to leave the folder


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../b", "..", ".", "", "a\\b", "x\0y", "C:x", "a/b", 7])
def test_safe_member_refuses(name, tmp_path):
    with pytest.raises(CheckpointError, match="refusing file name"):
        safe_member(tmp_path, name, where="test")


def test_safe_member_refuses_symlinks_out_and_accepts_plain_names(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "inside" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(CheckpointError, match="resolves outside"):
        safe_member(tmp_path / "inside", "link/x.onnx", where="test", nested=True)
    assert safe_member(tmp_path / "inside", "onnx/x.onnx", where="test", nested=True) == tmp_path / "inside/onnx/x.onnx"


def test_crafted_sidecar_names_do_not_write_outside_the_repository(copy, tmp_path):
    """A sidecar listing ``../../x`` (manifest re-signed, as a forger would) once overwrote a file outside -o."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    crafted = os.path.relpath(victim, tmp_path / "repo" / "fastenc_encoder" / "1")
    side = json.loads((copy / "onnx" / "encoder.fp32.onnx.json").read_text())
    side["files"][crafted] = victim.stat().st_size
    (copy / "onnx" / "encoder.fp32.onnx.json").write_text(json.dumps(side))
    _resign(copy)
    with pytest.raises(CheckpointError, match=r"refusing file name '\.\./"):
        _triton(copy, tmp_path / "repo")
    with pytest.raises(CheckpointError, match=r"refusing file name '\.\./"):
        fastenc.load(copy, backend="onnxruntime", dtype="fp32")
    assert victim.read_text() == "keep me" and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("field, value", [("files", {"../outside.txt": {"size": 1, "sha256": "0" * 64}}),
                                          ("artifacts", ["/etc/passwd"]), ("artifacts", ["onnx/../../x.onnx"])])
def test_crafted_manifest_names_are_refused(copy, field, value):
    manifest = json.loads((copy / "export.json").read_text())
    manifest[field] = {**manifest[field], **value} if field == "files" else value
    (copy / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing file name"):
        check_export(copy)
    with pytest.raises(CheckpointError, match="refusing file name"):
        fastenc.load(copy, backend="onnxruntime")


# ---------------------------------------------------------------------------- leftovers, umask, the --out folder


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(copy, checkpoint, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        beside = [copy.parent / f".{copy.name}.staging-{dead_pid}-0badc0de", copy.parent / f".{copy.name}.old-{dead_pid}-0000beef"]
        for d in beside:
            (d / "onnx").mkdir(parents=True)
            (d / "onnx" / "encoder.fp32.onnx").write_bytes(b"x" * 1000)
        alive = copy.parent / f".{copy.name}.staging-{live.pid}-12345678"
        alive.mkdir()
        inside = [copy / f".staging-{dead_pid}-deadbeef", copy / ".config.json.abcd.tmp"]
        inside[0].mkdir()
        inside[1].write_text("half")
        export(_request(checkpoint, copy))  # everything reused
        assert not any(p.exists() for p in beside + inside) and alive.is_dir()
        repo = tmp_path / "repo"  # the staging folders of `staged` (triton-repo) carry the pid too
        (repo / f".staging-{dead_pid}-cafef00d").mkdir(parents=True)
        with staged(repo) as tmp:
            assert tmp.name.startswith(f".staging-{os.getpid()}-")
        assert list(repo.iterdir()) == []
    finally:
        live.kill()
        live.wait()


def test_export_folders_and_files_follow_the_umask(copy, checkpoint):
    old = os.umask(0o027)
    try:
        export(_request(checkpoint, copy))
    finally:
        os.umask(old)
    for path in [copy, *copy.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))


def test_out_holding_other_files_is_refused_and_left_alone(checkpoint):
    before = sorted(p.name for p in checkpoint.iterdir())
    with pytest.raises(ConfigError, match=r"--out .*holds files an export does not write \(.*model\.safetensors"):
        export(_request(checkpoint, checkpoint))
    assert sorted(p.name for p in checkpoint.iterdir()) == before


# ---------------------------------------------------------------------------- flags


@pytest.mark.parametrize("change, message", [
    ({"max_seq": 100000}, "--max-seq 100000 is more than 4096"),
    ({"max_batch": 10**6}, "--max-batch 1000000 is more than 1024"),
    ({"max_seq": 0}, "--max-seq must be a positive integer, got 0"),
    ({"dtype": "int4"}, "--dtype: unknown dtype 'int4'"),
    ({"opset": 9}, "opset must be an integer in 17.."),
    ({"seed": -1}, "--seed must be an integer in 0..2**63-1, got -1"),
    ({"device": "tpu"}, "--device must be cpu or cuda, got 'tpu'"),
    ({"external_data_threshold": -5}, "external_data_threshold must be a byte count >= 0"),
])
def test_export_flags_are_checked_before_anything(checkpoint, tmp_path, change, message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as exc:
        export(dataclasses.replace(_request(checkpoint, out), **change))
    assert message in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_absurd_max_seq_from_the_command_line_is_one_line(checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(checkpoint), "--max-seq", "100000", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc: error: --max-seq 100000 is more than 4096") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- ONNX Runtime sessions


def test_onnxruntime_sessions_do_not_spin_and_use_torchs_threads(exported):
    enc = fastenc.load(exported, backend="onnxruntime", cache=False)
    options = enc.model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == torch.get_num_threads() and options.inter_op_num_threads == 1
