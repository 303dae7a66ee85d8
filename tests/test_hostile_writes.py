"""Writing only where told, round two: an output whose folder does not exist is refused before any work by
every command that writes one (export --out, demo --out, encode -o, triton-repo -o, and the Python export
and Triton-repository writers), and nothing is created. ``python -m train`` creates the missing parents of
run.output_dir (the shipped configs write under ``runs/``), and says so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fastenc.cli import main
from fastenc.errors import ConfigError
from tiny_checkpoint import write_checkpoint

IDS = ["--ids", "3,4,1"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ck") / "micro")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.rstrip("\n")


@pytest.mark.parametrize("argv, flag", [
    (["export", "--checkpoint", "{ck}", "--max-seq", "16", "--max-batch", "1", "--no-verify", "--out", "{out}"],
     "--out"),
    (["demo", "--size", "small", "--no-export", "--out", "{out}"], "--out"),
    (["encode", "--checkpoint", "{ck}", *IDS, "-o", "{out}/y.safetensors"], "-o/--output"),
    (["triton-repo", "{ck}", "-o", "{out}"], "-o/--out"),
])
def test_an_output_in_a_missing_folder_is_refused_and_nothing_is_created(argv, flag, ck, tmp_path, capsys):
    out = tmp_path / "nonexistent" / "dir"
    argv = [a.format(ck=ck, out=out) for a in argv]
    target = Path(argv[-1])
    assert main(argv) == 2
    assert one_line(capsys) == (f"fastenc: error: {flag} {target}: the folder {target.parent} does not exist "
                                "(create it first)")
    assert list(tmp_path.iterdir()) == []


def test_the_python_writers_refuse_a_missing_parent_too(ck, tmp_path):
    from fastenc.exporters.pipeline import ExportRequest, export
    from fastenc.exporters.triton_repo import TritonRepoRequest, write_triton_repo

    out = tmp_path / "nonexistent" / "export"
    with pytest.raises(ConfigError) as info:
        export(ExportRequest(out=out, checkpoint=str(ck), max_batch=1, max_seq=16, verify=False))
    assert str(info.value) == f"--out {out}: the folder {out.parent} does not exist (create it first)"
    with pytest.raises(ConfigError) as info:
        write_triton_repo(TritonRepoRequest(ck, out))
    assert str(info.value) == f"--out {out}: the folder {out.parent} does not exist (create it first)"
    assert list(tmp_path.iterdir()) == []


def test_train_creates_the_missing_parents_of_its_output_folder_and_says_so(tmp_path, caplog):
    from train.__main__ import check_output_dir
    from train.config import TrainConfig

    cfg = TrainConfig.from_dict({"run": {"output_dir": str(tmp_path / "runs" / "flux-base")}})
    with caplog.at_level(logging.WARNING, logger="fastenc.train"):
        check_output_dir(cfg, "--output-dir")
    assert caplog.messages == [f"train: creating {tmp_path / 'runs'} for run.output_dir "
                               f"{tmp_path / 'runs' / 'flux-base'} (it does not exist)"]
    caplog.clear()
    deeper = TrainConfig.from_dict({"run": {"output_dir": str(tmp_path / "a" / "b" / "run")}})
    with caplog.at_level(logging.WARNING, logger="fastenc.train"):
        check_output_dir(deeper, None)
    assert caplog.messages == [f"train: creating {tmp_path / 'a'} for run.output_dir {tmp_path / 'a' / 'b' / 'run'} "
                               "(with 1 folder(s) below it)"]
    assert list(tmp_path.iterdir()) == []  # checked before any work: created when the run starts
