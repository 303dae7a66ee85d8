"""Provenance is compared wherever export.json records it: ``fastenc.load`` of an export folder says when
the checkpoint it was exported from changed since (it runs the exported artifacts, not the new weights),
and ``fastenc triton-repo --encoder-backend fastenc-cpu`` refuses to copy changed or foreign weights beside
the export's tokenizer and config. (``fastenc verify``: tests/test_hostile_artifacts2.py.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.cli import main
from fastenc.exporters.artifacts import changed_source, checkpoint_identity, read_manifest
from helpers import make_t5_tokenizer_json
from tiny_checkpoint import write_checkpoint

pytest.importorskip("onnxruntime")


@pytest.fixture
def source_and_export(tmp_path) -> tuple[Path, Path]:
    from fastenc.exporters.pipeline import ExportRequest, export

    source = write_checkpoint(tmp_path / "ck")
    make_t5_tokenizer_json(source)
    out = tmp_path / "export"
    export(ExportRequest(out=out, checkpoint=str(source), tokenizer=str(source), max_batch=1, max_seq=120,
                         target="pixart-alpha", verify=False))
    return source.resolve(), out


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.rstrip("\n")


def changed_sentence(source: Path) -> str:
    return (f"the checkpoint the artifacts came from ({source}) changed since the export (its fingerprint is not "
            "the one export.json recorded)")


def test_export_json_records_a_cheap_identity_beside_the_fingerprint(source_and_export):
    source, out = source_and_export
    manifest = read_manifest(out)
    assert manifest["source"]["identity"] == checkpoint_identity(source)
    assert changed_source(manifest) is None and changed_source(manifest, quick=True) is None
    os.utime(source / "model.safetensors")  # touched, same bytes: the identity differs, the fingerprint does not
    assert changed_source(manifest, quick=True) is None


def test_load_of_an_export_says_the_checkpoint_changed_since(source_and_export, caplog):
    source, out = source_and_export
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        fastenc.load(out, backend="onnxruntime", cache=False)
    assert "changed since the export" not in caplog.text
    write_checkpoint(source, seed=1)  # retrained in place: same names, other weights
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        enc = fastenc.load(out, backend="onnxruntime", cache=False)
    assert [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()] == [
        f"fastenc: {out}: {changed_sentence(source)}; this encoder runs the exported artifacts, not its new weights "
        f"(re-export with `fastenc export --checkpoint {source} ...` to serve them)"]
    assert enc(torch.tensor([[3, 4, 1]])).shape == (1, 3, 16)  # the export itself is intact and still runs


def test_triton_repo_fastenc_cpu_refuses_new_weights_beside_the_old_tokenizer(source_and_export, tmp_path, capsys):
    source, out = source_and_export
    original = tmp_path / "original"
    shutil.copytree(source, original)
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(out), "-o", str(repo), "--encoder-backend", "fastenc-cpu"]) == 0
    capsys.readouterr()
    write_checkpoint(source, seed=1)
    args = ["triton-repo", str(out), "-o", str(tmp_path / "repo2"), "--encoder-backend", "fastenc-cpu"]
    assert main(args) == 2
    assert one_line(capsys) == (
        f"fastenc: error: {changed_sentence(source)}: fastenc-cpu would serve its new weights beside the export's "
        f"tokenizer and config; re-export with `fastenc export --checkpoint {source} ...`, or pass the exported "
        "weights with --checkpoint PATH")
    other = write_checkpoint(tmp_path / "other", seed=2)
    assert main([*args, "--checkpoint", str(other)]) == 2
    assert one_line(capsys) == (
        f"fastenc: error: --checkpoint {other}: not the checkpoint {out} was exported from (its fingerprint is not "
        "the one export.json recorded); fastenc-cpu would serve its weights beside the export's tokenizer and config; "
        f"export it first (`fastenc export --checkpoint {other} ...`)")
    assert not (tmp_path / "repo2").exists()
    assert main([*args, "--checkpoint", str(original)]) == 0  # the exported weights, wherever they are now
    served = tmp_path / "repo2" / "fastenc_encoder" / "1" / "checkpoint" / "model.safetensors"
    assert served.read_bytes() == (original / "model.safetensors").read_bytes()
    # the onnxruntime encoder serves the export's own graph: the changed checkpoint does not matter
    assert main(["triton-repo", str(out), "-o", str(tmp_path / "repo3")]) == 0
    assert json.loads((out / "export.json").read_text())["source"]["path"] == str(source)
