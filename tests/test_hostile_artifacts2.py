"""Deleting and writing only what was asked (cache clear with $HOME as the cache, demo --out, encode -o,
closed pipes, the suite's own caches), artifacts that cannot be silently unusable (a tokenizer larger than
the vocabulary, empty or garbage spiece.model), messages that name the real cause (local paths never
looked up on the hub, tokenizer files that are no regular file, foreign tokenizer objects, pinning to a
missing GPU, an export folder passed as a checkpoint) and a checkpoint changed in place after its export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

import fastenc
from fastenc import caches, hub
from fastenc.cli import main
from fastenc.errors import BackendUnavailable, CheckpointError, ConfigError, FastencError
from fastenc.tokenizer import Tokenizer
from helpers import make_t5_tokenizer_json
from tiny_checkpoint import MICRO, write_checkpoint

TESTS = Path(__file__).resolve().parent
IDS = ["--ids", "3,4,1"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ck") / "micro")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    make_t5_tokenizer_json(directory)
    return directory


@pytest.fixture(scope="module")
def exported(ck, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from fastenc.exporters.pipeline import ExportRequest, export

    out = tmp_path_factory.mktemp("export") / "micro"
    export(ExportRequest(out=out, checkpoint=str(ck), max_batch=1, max_seq=16, verify=False))
    return out


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub lookup fails the test: local-looking paths must never reach it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"looked up on the hub: {args}")

    monkeypatch.setattr(hub, "download_checkpoint", refuse)
    monkeypatch.setattr(hub, "fetch_file", refuse)


def _fastenc_checkpoint(directory: Path) -> int:
    """What fastenc.save writes in a bench model's checkpoint/ (layout marks included); returns its bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"fastenc": {"layout": "fastenc"}}))
    save_file({"embed.weight": torch.zeros(4, 2)}, str(directory / "model.safetensors"),
              metadata={"format": "pt", "layout": "fastenc"})
    return sum((directory / n).stat().st_size for n in ("config.json", "model.safetensors"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------- cache clear: files only


def test_cache_clear_with_home_as_the_cache_deletes_only_files_fastenc_wrote(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(home))
    monkeypatch.delenv("FASTENC_BENCH_CACHE", raising=False)
    emb, plans, bench = home / "embeddings", home / "cpu-plans", home / "bench"
    # the user's own things, some named the way fastenc names its files
    notes = emb / ".tmp-notes"
    notes.mkdir(parents=True)
    (notes / "todo.txt").write_text("mine")
    (emb / ("ab" * 32 + ".safetensors")).mkdir()  # a folder named like an entry
    (plans / ("0" * 24 + ".json")).mkdir(parents=True)  # a folder named like a plan
    (plans / "notes.txt").write_text("mine")
    mine = tmp_path / "elsewhere"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"mine")
    bench.mkdir()
    (bench / "checkpoint-0123456789ab").symlink_to(mine, target_is_directory=True)  # never followed
    model = bench / "base-t5init-seed0"
    (model / "checkpoint").mkdir(parents=True)
    (model / "notes.txt").write_text("mine")
    (model / "checkpoint" / "mine.txt").write_text("mine")
    (model / "export" / "onnx").mkdir(parents=True)
    (model / "export" / "onnx" / "mine.onnx").write_bytes(b"mine")  # not in the manifest
    # what fastenc wrote
    (emb / ("ef" * 32 + ".safetensors")).write_bytes(b"\0" * 100)
    (emb / ".tmp-abc12_xy.safetensors").write_bytes(b"\0" * 10)
    (plans / ("engine-" + "1" * 24 + ".json")).write_text("{}")
    weights_size = _fastenc_checkpoint(model / "checkpoint")
    (model / "export" / "onnx" / "encoder.fp32.onnx").write_bytes(b"\0" * 200)
    manifest = json.dumps({"files": {"onnx/encoder.fp32.onnx": {"size": 200}, "onnx/mine.onnx": {"size": 1},
                                     "../../notes.txt": {"size": 4}}})
    (model / "export" / "export.json").write_text(manifest)

    assert main(["cache", "clear"]) == 0
    freed = {"cpu-plans": (2, 1), "embeddings": (110, 2), "bench": (weights_size + 200 + len(manifest), 4)}
    assert capsys.readouterr().out.splitlines() == [
        f"cleared {c.name:<11} {caches.human(freed.get(c.name, (0, 0))[0]):>9} in {freed.get(c.name, (0, 0))[1]} "
        f"files  ({c.path})" for c in caches.cache_dirs()] + [f"freed {caches.human(sum(s for s, _ in freed.values()))}"]
    assert (notes / "todo.txt").read_text() == "mine"
    assert (emb / ("ab" * 32 + ".safetensors")).is_dir()
    assert (plans / ("0" * 24 + ".json")).is_dir() and (plans / "notes.txt").read_text() == "mine"
    assert (mine / "model.safetensors").read_bytes() == b"mine"
    assert (model / "notes.txt").read_text() == "mine" and (model / "checkpoint" / "mine.txt").read_text() == "mine"
    assert (model / "export" / "onnx" / "mine.onnx").read_bytes() == b"mine"
    assert not (emb / ("ef" * 32 + ".safetensors")).exists() and not (model / "export" / "export.json").exists()
    assert not (model / "checkpoint" / "model.safetensors").exists()


def test_cache_clear_removes_a_bench_model_folder_it_emptied(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "root"))
    monkeypatch.delenv("FASTENC_BENCH_CACHE", raising=False)
    model = tmp_path / "root" / "bench" / "small-t5init-seed3"
    _fastenc_checkpoint(model / "checkpoint")
    theirs = tmp_path / "root" / "bench" / "base-t5init-seed0" / "checkpoint"  # named like one, not fastenc's
    theirs.mkdir(parents=True)
    (theirs / "config.json").write_text(json.dumps({"d_model": 8}))
    save_file({"w": torch.zeros(2)}, str(theirs / "model.safetensors"))
    assert main(["cache", "clear", "bench"]) == 0
    assert not model.exists() and sorted(p.name for p in theirs.iterdir()) == ["config.json", "model.safetensors"]
    shutil.rmtree(theirs.parent)
    assert main(["cache", "clear", "bench"]) == 0
    assert not (tmp_path / "root" / "bench").exists() and (tmp_path / "root").is_dir()


# ---------------------------------------------------------------------------- demo --out, encode -o


def test_demo_out_holding_the_users_files_is_refused_and_left_alone(tmp_path, capsys):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "thesis.tex").write_text("mine")
    assert main(["demo", "--size", "small", "--no-export", "--out", str(mydata)]) == 2
    assert _one_line(capsys) == (
        f"fastenc: error: --out {mydata}: holds files the demo does not write (thesis.tex); the demo keeps what it "
        "makes in a folder of its own, to be deleted whole, so choose a new or empty folder\n")
    assert sorted(p.name for p in mydata.iterdir()) == ["thesis.tex"]


def test_demo_out_is_never_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--size", "small", "--no-export", "--out", "."]) == 2
    assert _one_line(capsys) == (
        "fastenc: error: --out .: is the current folder or one above it; the demo keeps what it makes in a folder "
        "of its own, to be deleted whole, so choose a folder of its own (e.g. --out fastenc-demo)\n")
    assert list(tmp_path.iterdir()) == []


def test_demo_export_subfolder_follows_exports_rule(tmp_path, capsys):
    demo = tmp_path / "demo"
    (demo / "export").mkdir(parents=True)
    (demo / "export" / "notes.txt").write_text("mine")
    assert main(["demo", "--size", "small", "--out", str(demo)]) == 2
    assert _one_line(capsys) == (
        f"fastenc: error: --out {demo / 'export'}: holds files an export does not write (notes.txt); an export "
        "replaces its whole folder, so choose a new or empty folder\n")
    assert sorted(p.name for p in demo.rglob("*")) == ["export", "notes.txt"]


def test_encode_output_in_a_missing_folder_is_refused(ck, tmp_path, capsys):
    out = tmp_path / "nonexistent" / "dir" / "y.safetensors"
    assert main(["encode", "--checkpoint", str(ck), *IDS, "-o", str(out)]) == 2
    assert _one_line(capsys) == (f"fastenc: error: -o/--output {out}: the folder {out.parent} does not exist "
                                 "(create it first)\n")
    assert not (tmp_path / "nonexistent").exists()


def test_encode_to_stdout_writes_the_safetensors_bytes_and_no_file(ck, tmp_path, monkeypatch, capsysbinary):
    monkeypatch.chdir(tmp_path)
    assert main(["encode", "--checkpoint", str(ck), "--backend", "torch", *IDS, "-o", "-"]) == 0
    captured = capsysbinary.readouterr()
    tensors = load_safetensors(captured.out)
    assert tensors["text_embeddings"].shape == (1, 512, MICRO.output_dim)
    assert tensors["attention_mask"][0, :3].tolist() == [1, 1, 1]
    assert captured.err.decode().endswith(f"of safetensors to standard output: text_embeddings [1, 512, "
                                          f"{MICRO.output_dim}] float32, attention_mask [1, 512]\n")
    assert list(tmp_path.iterdir()) == []


def test_encode_to_stdout_on_a_terminal_is_refused(ck, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["encode", "--checkpoint", str(ck), *IDS, "-o", "-"]) == 2
    assert _one_line(capsys) == ("fastenc: error: -o/--output -: standard output is a terminal; redirect it to a "
                                 "file or a pipe (e.g. `-o - > out.safetensors`), or give a file name\n")
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_ends_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)  # `| head -1` that has already gone
    env = {**os.environ, "FASTENC_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(TESTS.parent)}
    run = subprocess.run([sys.executable, "-c", "import sys; from fastenc.cli import main; sys.exit(main())",
                          "cache", "info"], stdout=write, stderr=subprocess.PIPE, env=env, timeout=120)
    os.close(write)
    assert run.stderr.decode() == "" and run.returncode == 141


def test_the_suite_keeps_its_caches_out_of_the_users_home():
    import conftest

    for name, sub in conftest.SESSION_CACHES.items():
        if name not in conftest.PRESET:
            assert os.environ[name] == os.path.join(conftest.SESSION_CACHE_ROOT, sub)
    if "FASTENC_CACHE_DIR" not in conftest.PRESET:
        assert caches.cache_root() == Path(conftest.SESSION_CACHE_ROOT) / "fastenc"


# ---------------------------------------------------------------------------- artifacts never silently unusable


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, tok_dir, capsys):
    small = write_checkpoint(tmp_path / "small-vocab", MICRO.replace(vocab_size=64))
    size = Tokenizer.from_pretrained(tok_dir).vocab_size
    assert size > 64
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(small), "--tokenizer", str(tok_dir), "--max-batch", "1",
                 "--max-seq", "16", "--out", str(out)]) == 2
    assert _one_line(capsys) == (
        f"fastenc: error: --tokenizer {tok_dir}: {size} token ids, but the model's embedding table has 64 rows: "
        "not this model's tokenizer (an export bundling it would fail on its ids); pass the tokenizer the model "
        "was trained with\n")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["small-vocab"]


def test_empty_spiece_model_is_an_error_naming_it(tmp_path):
    pytest.importorskip("sentencepiece")
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(info.value) == f"{tmp_path / 'spiece.model'}: an empty file (0 bytes), not a SentencePiece model"


def test_garbage_spiece_model_is_an_error_naming_it(tmp_path, ck):
    pytest.importorskip("sentencepiece")
    (tmp_path / "spiece.model").write_bytes(b"\x00\xffnot a model\x08\x01" * 64)
    message = f"{tmp_path / 'spiece.model'}: not a SentencePiece model (sentencepiece cannot parse it)"
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(info.value) == message
    with pytest.raises(ConfigError) as again:
        fastenc.load(ck, backend="torch", tokenizer=tmp_path, cache=False)
    assert str(again.value) == message


# ---------------------------------------------------------------------------- messages that name the cause


@pytest.mark.parametrize("path", ["./nonexistent", "../nonexistent/ck", "/nonexistent/ck", "~/nonexistent-fastenc/ck",
                                  "models/ck"])
def test_local_looking_checkpoint_is_never_a_hub_id(path, tmp_path, monkeypatch, capsys, no_hub):
    (tmp_path / "here" / "models").mkdir(parents=True)  # models/ exists: models/ck is a path, not owner/name
    monkeypatch.chdir(tmp_path / "here")
    assert main(["encode", "--checkpoint", path, *IDS, "-o", "o.safetensors"]) == 2
    assert _one_line(capsys) == f"fastenc: error: {path}: no such file or directory\n"
    with pytest.raises(CheckpointError) as info:
        fastenc.load(path, backend="torch")
    assert str(info.value) == f"{path}: no such file or directory"


@pytest.mark.parametrize("kind, message", [
    ("dangling", "owner/name: a symbolic link to gone, which does not exist"),
    ("loop", "owner/name: a symbolic link loop (too many levels of symbolic links)"),
])
def test_a_symlink_checkpoint_is_never_a_hub_id(kind, message, tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.chdir(tmp_path)
    Path("owner").mkdir()
    os.symlink("gone" if kind == "dangling" else "name", "owner/name")
    assert main(["encode", "--checkpoint", "owner/name", *IDS, "-o", "o.safetensors"]) == 2
    assert _one_line(capsys) == f"fastenc: error: {message}\n"
    with pytest.raises(CheckpointError) as info:
        fastenc.load("owner/name", backend="torch")
    assert str(info.value) == message


@pytest.mark.parametrize("path", ["./missing-tok", "../missing-tok/tok", "models/tok"])
def test_local_looking_tokenizer_is_never_a_hub_id(path, tmp_path, monkeypatch, no_hub):
    (tmp_path / "here" / "models").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained(path)
    assert str(info.value) == f"tokenizer path {path!r} does not exist"
    Path("owner").mkdir()
    os.symlink("gone", "owner/name")
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained("owner/name")
    assert str(info.value) == "owner/name: is a symbolic link to a missing gone, not a regular file"


@pytest.mark.parametrize("kind, what", [
    ("fifo", "a FIFO (named pipe)"),
    ("folder", "a folder"),
    ("zero", "a symbolic link to /dev/zero (a character device)"),
])
def test_tokenizer_json_that_is_no_regular_file_is_an_error_at_load(kind, what, ck, tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    tok = copy / "tokenizer.json"
    if kind == "fifo":
        os.mkfifo(tok)
    elif kind == "folder":
        tok.mkdir()
    else:
        tok.symlink_to("/dev/zero")
    message = f"{tok}: is {what}, not a regular file"
    with pytest.raises(ConfigError) as info:
        fastenc.load(copy, backend="torch", cache=False)
    assert str(info.value) == message
    with pytest.raises(ConfigError) as direct:  # named itself, or its folder, as --tokenizer
        Tokenizer.from_pretrained(tok if kind != "folder" else copy)
    assert str(direct.value) == message


def test_a_foreign_tokenizer_object_is_refused_at_load(ck, tok_dir):
    with pytest.raises(ConfigError) as info:
        fastenc.load(ck, backend="torch", tokenizer=lambda texts, **kw: None, cache=False)
    assert str(info.value) == ("tokenizer must be a folder, file or hub id, a fastenc.Tokenizer or a "
                               "tokenizers.Tokenizer, got function")
    from transformers import T5TokenizerFast

    hf = T5TokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    with pytest.raises(ConfigError) as info:
        fastenc.load(ck, backend="torch", tokenizer=hf)
    assert str(info.value) == ("tokenizer must be a folder, file or hub id, a fastenc.Tokenizer or a "
                               f"tokenizers.Tokenizer, got {type(hf).__name__}; for a transformers tokenizer pass its "
                               "folder (save_pretrained) or its backend_tokenizer")
    from tokenizers import Tokenizer as HFTokenizer

    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    enc = fastenc.load(ck, backend="torch", tokenizer=raw, cache=False)  # a tokenizers.Tokenizer is wrapped
    assert isinstance(enc.tokenizer, Tokenizer)
    assert enc.encode("a cat", target="sd3").embeds.shape == (1, 256, MICRO.output_dim)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_pinning_to_cuda_without_a_gpu_is_a_fastenc_error(device, ck):
    pytest.importorskip("transformers")
    from fastenc.integrations.text_encoder import T5Replacement

    enc = fastenc.load(ck, backend="torch", cache=False)
    with pytest.raises(BackendUnavailable) as info:
        T5Replacement(enc, keep_on=device)
    assert isinstance(info.value, FastencError)
    assert str(info.value) == (f"keep_on/pin_device '{device}': no CUDA device is visible here (torch sees no "
                               "GPU); pin to 'cpu'")
    assert enc.device.type == "cpu"


def test_an_export_folder_as_checkpoint_says_to_pass_a_backend(exported, tmp_path, capsys):
    assert main(["encode", "--checkpoint", str(exported), *IDS, "-o", str(tmp_path / "o.safetensors")]) == 2
    assert _one_line(capsys) == (
        f"fastenc: error: {exported}: an export folder written by `fastenc export` (export.json), not a checkpoint: "
        "pass --backend onnxruntime to run its artifacts, or the checkpoint it was exported from\n")
    with pytest.raises(CheckpointError) as info:
        fastenc.load(exported)
    assert str(info.value) == (
        f"{exported}: an export folder written by `fastenc export` (export.json), not a checkpoint: pass "
        "backend='onnxruntime' to run its artifacts, or the checkpoint it was exported from")
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------------------- provenance


def test_verify_says_the_checkpoint_changed_since_the_export(ck, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from fastenc.exporters.pipeline import ExportRequest, export

    source = tmp_path / "ck"
    shutil.copytree(ck, source)
    out = tmp_path / "export"
    export(ExportRequest(out=out, checkpoint=str(source), max_batch=1, max_seq=16, verify=False))
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    write_checkpoint(source, seed=1)  # retrained in place: same names, other weights
    assert main(["verify", str(out)]) == 2
    assert _one_line(capsys) == (
        f"fastenc: error: the checkpoint the artifacts came from ({source.resolve()}) changed since the export (its "
        f"fingerprint is not the one export.json recorded): re-export with `fastenc export --checkpoint "
        f"{source.resolve()} ...`, or pass the original with `fastenc verify DIR --checkpoint PATH`\n")
    assert main(["verify", str(out), "--checkpoint", str(ck)]) == 0  # the original still verifies
