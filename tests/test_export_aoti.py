"""AOTInductor: one CPU compile of a tiny model per session, then round trips and bad packages."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.errors import CheckpointError, InputError
from fastenc.exporters.aoti import check_package_compat
from fastenc.exporters.artifacts import read_sidecar
from fastenc.exporters.pipeline import ExportRequest, export
from reference import TINY, Reference, rel_err, write_distillt5

MAX_BATCH, MAX_SEQ = 4, 64


@pytest.fixture(scope="module")
def ref():
    return Reference(TINY)


@pytest.fixture(scope="module")
def exported(ref, tmp_path_factory):
    ck = write_distillt5(ref, TINY, tmp_path_factory.mktemp("ck") / "tiny")
    out = tmp_path_factory.mktemp("export") / "aoti"
    result = export(ExportRequest(out=out, checkpoint=str(ck), aoti=True, max_batch=MAX_BATCH, max_seq=MAX_SEQ))
    return ck, result


@pytest.fixture(scope="module")
def package(exported) -> Path:
    return exported[1].directory / "aoti" / "encoder.fp32.cpu.pt2"


def test_package_and_sidecar(exported, package):
    _, result = exported
    assert package in result.built and package.is_file()
    meta = read_sidecar(package)
    assert meta["kind"] == "aoti" and meta["device"] == "cpu" and meta["dtype"] == "fp32"
    assert meta["cpu_isa"]  # the instruction set the kernels were compiled for
    assert '"max_seq": 64' in meta["aoti_metadata"]["fastenc.profile"]  # carried inside the package too
    rows = {r.backend: r for r in result.report.rows}
    assert rows["aoti"].status == "pass" and rows["aoti"].max_abs <= 1e-4


@pytest.mark.parametrize("shape", [(1, 1), (2, 9), (MAX_BATCH, MAX_SEQ)])
def test_aoti_round_trip_matches_transformers(exported, ref, shape):
    _, result = exported
    enc = fastenc.load(result.directory, backend="aoti", cache=False)
    assert enc.backend == "aoti" and enc.device == torch.device("cpu") and enc.dtype == torch.float32
    ids = torch.randint(0, TINY.vocab_size, shape)
    mask = torch.ones(shape, dtype=torch.long)
    mask[0, shape[1] // 2 + 1:] = 0
    out = enc(ids, mask)  # [B, L, P]
    assert out.shape == (*shape, TINY.projection_dim)
    assert rel_err(out, ref(ids, mask)) < 1e-5


def test_aoti_rejects_shapes_beyond_its_profile(exported):
    enc = fastenc.load(exported[1].directory, backend="aoti", cache=False)
    with pytest.raises(InputError, match=r"batch=5.*encoder\.fp32\.cpu\.pt2"):
        enc(torch.zeros(5, 4, dtype=torch.long))
    with pytest.raises(InputError, match=r"seq=65"):
        enc(torch.zeros(1, 65, dtype=torch.long))


def test_package_for_a_wider_cpu_or_other_device(package):
    meta = read_sidecar(package)
    check_package_compat(meta, torch.device("cpu"), where=package, isa=meta["cpu_isa"].split()[0])
    with pytest.raises(CheckpointError, match=r"compiled for AVX512 CPUs and this CPU only has AVX2"):
        check_package_compat({**meta, "cpu_isa": "AVX512 AVX512_VNNI"}, torch.device("cpu"), where=package, isa="AVX2")
    with pytest.raises(CheckpointError, match=r"compiled for cpu, not cuda"):
        check_package_compat(meta, torch.device("cuda"), where=package)
    with pytest.raises(CheckpointError, match=r"compiled for sm90 and this GPU is sm80"):
        check_package_compat({**meta, "device": "cuda", "compute_capability": "sm90"}, torch.device("cuda"),
                             where=package, capability=(8, 0))


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(exported[1].directory, d)
    return d


def test_corrupt_package_of_the_same_size(copy):
    pt2 = copy / "aoti" / "encoder.fp32.cpu.pt2"
    pt2.write_bytes(os.urandom(pt2.stat().st_size))
    with pytest.raises(CheckpointError, match=r"encoder\.fp32\.cpu\.pt2: content differs from the export manifest"):
        fastenc.load(copy, backend="aoti")


def test_truncated_or_missing_package(copy):
    pt2 = copy / "aoti" / "encoder.fp32.cpu.pt2"
    pt2.write_bytes(pt2.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"truncated or replaced"):
        fastenc.load(copy, backend="aoti")
    pt2.unlink()
    with pytest.raises(CheckpointError, match=r"encoder\.fp32\.cpu\.pt2: missing"):
        fastenc.load(copy, backend="aoti")


def test_no_package_for_the_device(copy, tmp_path):
    shutil.rmtree(copy / "aoti")  # a folder missing what its manifest lists is incomplete, not package-less
    with pytest.raises(CheckpointError, match=r"encoder\.fp32\.cpu\.pt2\.json: missing \(listed in export\.json\)"):
        fastenc.load(copy, backend="aoti")
    plain = tmp_path / "plain"  # an export made without --aoti
    plain.mkdir()
    shutil.copy(copy / "config.json", plain)
    with pytest.raises(CheckpointError, match=r"no aoti artifact \(export one with `fastenc export --aoti`\)"):
        fastenc.load(plain, backend="aoti")


def test_second_export_reuses_the_package(exported, package):
    ck, result = exported
    mtime = package.stat().st_mtime_ns
    again = export(ExportRequest(out=result.directory, checkpoint=str(ck), aoti=True, max_batch=MAX_BATCH,
                                 max_seq=MAX_SEQ, verify=False))
    assert again.built == [] and package in again.artifacts and package.stat().st_mtime_ns == mtime


def test_sidecar_with_other_inputs_means_rebuild(exported, package):
    from fastenc.exporters.artifacts import is_current

    meta = read_sidecar(package)
    assert is_current(package, meta["inputs"])
    assert not is_current(package, {**meta["inputs"], "profile": {**meta["inputs"]["profile"], "max_seq": 128}})
    assert not is_current(package, {**meta["inputs"], "dtype": "bf16"})
