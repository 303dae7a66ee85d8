"""An export folder is one transaction: ``fastenc export`` of checkpoint B over an export of A is
SIGKILLed at several points (a subprocess; ``FASTENC_TEST_KILL_AT`` picks the point: B fully staged
but not swapped, swapped by exchange but A not yet removed, between the two renames of the
fallback swap). After each kill
the folder loads and verifies as entirely A or entirely B, and the next run removes what the killed
one left behind."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.errors import FastencError
from fastenc.exporters.artifacts import VERIFIED_NAME, check_export, checkpoint_fingerprint
from fastenc.exporters.pipeline import ExportRequest, export
from fastenc.exporters.transaction import KILL_ENV
from fastenc.exporters.verify import verify
from helpers import make_t5_tokenizer_json
from reference import TINY, Reference, write_distillt5

MAX_BATCH, MAX_SEQ = 2, 16
TINY_B = dataclasses.replace(TINY, d_ff=40, name="tiny-b")  # another config.json, as well as other weights


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ck")
    a = write_distillt5(Reference(TINY, seed=0), TINY, root / "a")
    b = write_distillt5(Reference(TINY_B, seed=5), TINY_B, root / "b")
    make_t5_tokenizer_json(a)
    make_t5_tokenizer_json(b, vocab_size=200)  # another tokenizer.json too
    vocab = [len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]) for d in (a, b)]
    assert vocab[0] != vocab[1]
    return {"A": a, "B": b}


@pytest.fixture(scope="module")
def export_a(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "a"
    export(ExportRequest(out=out, checkpoint=str(checkpoints["A"]), max_batch=MAX_BATCH, max_seq=MAX_SEQ, verify=False))
    return out


def _request(checkpoint: Path, out: Path) -> ExportRequest:
    return ExportRequest(out=out, checkpoint=str(checkpoint), max_batch=MAX_BATCH, max_seq=MAX_SEQ, verify=False)


def _assert_whole(out: Path, which: str, checkpoints: dict[str, Path]) -> None:
    """``out`` is a complete, hash-consistent export of checkpoint ``which`` and nothing else."""
    manifest = check_export(out)  # every file against its sha256
    src = checkpoints[which]
    assert manifest["fingerprint"] == checkpoint_fingerprint(src)
    assert json.loads((out / "config.json").read_text())["d_ff"] == {"A": TINY.d_ff, "B": TINY_B.d_ff}[which]
    pieces = [[piece for piece, _ in json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]] for d in (out, src)]
    assert pieces[0] == pieces[1]
    report = verify(out)
    assert report.ok and len(report.rows) == 2
    ids = torch.randint(0, TINY.vocab_size, (MAX_BATCH, MAX_SEQ), generator=torch.Generator().manual_seed(1))
    got = fastenc.load(out, backend="onnxruntime", cache=False)(ids)  # [B, L, P]
    want = fastenc.load(src, backend="torch", cache=False)(ids)
    assert float((got - want).abs().max()) <= 1e-4


def _leftovers(out: Path) -> list[str]:
    beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    inside = [p.relative_to(out).as_posix() for p in out.rglob(".*") if p.name != VERIFIED_NAME] if out.is_dir() else []
    return sorted(beside + inside)


#: kill point -> (swap by atomic exchange?, which export the folder holds afterwards, leftover kinds)
POINTS = {
    "before-swap": (True, "A", {"staging"}),  # B built with its manifest (the last write), not swapped
    "after-swap": (True, "B", {"staging"}),  # exchanged: the staging name holds A, not yet removed
    "between-renames": (False, "B", {"new", "old"}),  # two-rename swap: no folder at --out until recovery
}


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_export_leaves_a_whole_export_and_no_leftovers_after_the_next_run(point, checkpoints, export_a, tmp_path):
    exchange, which, kinds = POINTS[point]
    out = tmp_path / "out"
    shutil.copytree(export_a, out)
    code = ("import sys; from fastenc.exporters import transaction; "
            f"transaction.USE_EXCHANGE = {exchange}; from fastenc.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = [sys.executable, "-c", code, "export", "--checkpoint", str(checkpoints["B"]), "--max-batch", str(MAX_BATCH),
            "--max-seq", str(MAX_SEQ), "--no-verify", "--out", str(out)]
    env = {**os.environ, KILL_ENV: point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    left = _leftovers(out)
    assert left and {name.split(".")[-1].split("-")[0] for name in left} == kinds, left
    assert out.is_dir() == (point != "between-renames")
    _assert_whole(out, which, checkpoints)  # a reader finishes an interrupted two-rename swap
    assert out.is_dir()

    again = export(_request(checkpoints[which], out))  # the next run: everything reused, leftovers gone
    assert again.built == [] and _leftovers(out) == []
    assert check_export(out)["fingerprint"] == checkpoint_fingerprint(checkpoints[which])


def test_a_failed_export_changes_nothing(checkpoints, export_a, tmp_path):
    """A step that fails (here: B's tokenizer.json is corrupt) leaves the previous export as it was,
    and no staging folder."""
    broken = tmp_path / "b"
    shutil.copytree(checkpoints["B"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    out = tmp_path / "out"
    shutil.copytree(export_a, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != VERIFIED_NAME}
    with pytest.raises(FastencError, match="tokenizer.json"):
        export(_request(broken, out))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != VERIFIED_NAME}
    assert after == before and _leftovers(out) == []
