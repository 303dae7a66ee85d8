"""Messages that name the real cause, round two: memory exhaustion says so with the size it tried (random
init and a valid checkpoint under an address-space cap, each in its own process), a path that is not valid
UTF-8 says so with its bytes escaped, and public functions answer bad arguments (a CUDA device this machine
lacks, a wrong type) with one FastencError subclass, never AssertionError, TypeError or AttributeError."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.cli import main
from fastenc.config import EncoderConfig
from fastenc.errors import BackendUnavailable, CheckpointError, ConfigError, FastencError, InputError, OutOfMemory
from fastenc.errors import is_out_of_memory
from fastenc.tokenizer import Tokenizer
from helpers import make_t5_tokenizer_json
from tiny_checkpoint import write_checkpoint

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
IDS = ["--ids", "3,4,1"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    directory = write_checkpoint(tmp_path_factory.mktemp("ck") / "micro")
    make_t5_tokenizer_json(directory)
    return directory


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.rstrip("\n")


# ---------------------------------------------------------------------------- memory exhaustion

#: The child imports fastenc and torch, then caps its address space at what it uses now plus MARGIN MiB
#: (a cap set before the imports would fail them): the allocation under test is the first that cannot fit.
CAPPED = textwrap.dedent("""
    import resource, sys
    import torch  # noqa: F401
    import fastenc.api, fastenc.cli

    def vm_size():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

    cap = vm_size() + int(sys.argv[1]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.exit(fastenc.cli.main(sys.argv[2:]))
""")


def capped_error(margin_mib: int, *args: str, tmp_path: Path) -> str:
    """``fastenc ARGS`` under the cap: it must exit 2 with no traceback; its last stderr line."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CAPPED, str(margin_mib), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=240)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    return done.stderr.rstrip("\n").splitlines()[-1]


OOM_TAIL = r"; free memory or raise the limit, or use a smaller size or dtype"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_random_init_out_of_memory_names_the_size_it_tried(tmp_path):
    last = capped_error(512, "encode", "--size", "xl", "--random-init", "--backend", "torch", *IDS, "-o",
                        str(tmp_path / "o.safetensors"), tmp_path=tmp_path)
    assert re.fullmatch(r"fastenc: error: out of memory: the xl encoder \(random init, 1,249M parameters in float32 "
                        r"on cpu\) needs 5\.0 GB, which this process could not allocate \(.*can't allocate memory.*\)"
                        + re.escape(OOM_TAIL), last), last


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_a_valid_checkpoint_under_a_memory_cap_is_not_called_unreadable(tmp_path):
    cfg = EncoderConfig(d_model=512, d_ff=1024, num_layers=2, num_heads=8, d_kv=64, vocab_size=32128,
                        projection_dim=4096, name="mid")
    big = write_checkpoint(tmp_path / "big", cfg)  # ~160 MB of fp32 weights
    weights = big / "model.safetensors"
    last = capped_error(64, "encode", "--checkpoint", str(big), "--backend", "torch", *IDS, "-o",
                        str(tmp_path / "o.safetensors"), tmp_path=tmp_path)
    assert re.fullmatch(rf"fastenc: error: out of memory: mapping {re.escape(str(weights))} needs "
                        rf"{weights.stat().st_size / 1e9:.1f} GB, which this process could not allocate \(.*\)"
                        + re.escape(OOM_TAIL), last), last  # not "not a readable safetensors file"


@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 50331648 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes."), True),
    (OSError(12, "Cannot allocate memory"), True),
    (RuntimeError("Error while deserializing header: MetadataIncompleteBuffer"), False),
    (ValueError("bad value"), False),
])
def test_what_counts_as_memory_exhaustion(exc, oom):
    assert is_out_of_memory(exc) is oom


def test_out_of_memory_is_a_fastenc_error_and_a_memory_error():
    assert issubclass(OutOfMemory, FastencError) and issubclass(OutOfMemory, MemoryError)


# ---------------------------------------------------------------------------- paths that are not UTF-8


NOT_UTF8 = ("the path is not valid UTF-8 (byte 0xff at position {pos}); fastenc reads checkpoints and tokenizers "
            "through UTF-8 paths only: rename it, or link to it from a UTF-8 name")


@pytest.fixture
def latin1_folder(ck, tmp_path) -> tuple[str, str]:
    """A copy of the checkpoint in a folder named with a byte that is not UTF-8: (path as Python sees it, shown)."""
    raw = os.fsencode(tmp_path) + b"/caf\xff"
    os.mkdir(raw)
    for name in os.listdir(ck):
        with open(ck / name, "rb") as src, open(raw + b"/" + os.fsencode(name), "wb") as dst:
            dst.write(src.read())
    return os.fsdecode(raw), raw.decode("utf-8", "backslashreplace")


def test_a_checkpoint_folder_that_is_not_utf8_says_so(latin1_folder, tmp_path, capsys):
    path, shown = latin1_folder
    message = f"{shown}: " + NOT_UTF8.format(pos=len(os.fsencode(tmp_path)) + 4)
    assert main(["encode", "--checkpoint", path, *IDS, "-o", str(tmp_path / "o.safetensors")]) == 2
    assert one_line(capsys) == f"fastenc: error: {message}"
    with pytest.raises(CheckpointError) as info:
        fastenc.load(path, backend="torch")
    assert str(info.value) == message


def test_a_tokenizer_folder_that_is_not_utf8_says_so(latin1_folder, tmp_path):
    path, shown = latin1_folder
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained(path)
    assert str(info.value) == f"{shown}: " + NOT_UTF8.format(pos=len(os.fsencode(tmp_path)) + 4)


# ---------------------------------------------------------------------------- bad arguments: FastencError only


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals of a machine without a GPU")
def test_a_cuda_device_on_a_machine_without_one_is_backend_unavailable(ck):
    with pytest.raises(BackendUnavailable) as info:
        fastenc.load(ck, backend="torch", device="cuda")
    assert str(info.value) == ("device 'cuda': no CUDA device is visible here (torch sees no GPU); pass device='cpu' "
                               "or leave it out")
    enc = fastenc.load(ck, backend="torch", cache=False)
    with pytest.raises(BackendUnavailable) as info:
        enc.to("cuda:0")
    assert str(info.value) == ("Encoder.to 'cuda:0': no CUDA device is visible here (torch sees no GPU); keep it on "
                               "'cpu'")
    assert enc.device.type == "cpu"


@pytest.mark.parametrize("call, error, message", [
    (lambda enc: enc.to("bogus"), ConfigError, "Encoder.to: Expected one of cpu, cuda"),
    (lambda enc: fastenc.load(enc.source, device="bogus"), ConfigError,
     "device must be a device such as 'cpu' or 'cuda:0', got 'bogus'"),
    (lambda enc: fastenc.load(enc.source, device=5.5), ConfigError,
     "device must be a device such as 'cpu' or 'cuda:0' (a string or torch.device), got float"),
    (lambda enc: fastenc.save(enc, 5), ConfigError,
     "fastenc.save: directory must be a folder path (str or os.PathLike), got 5"),
    (lambda enc: fastenc.T5Encoder(None), ConfigError,
     "T5Encoder takes an EncoderConfig (e.g. fastenc.SIZES['base']), got NoneType"),
    (lambda enc: Tokenizer.from_pretrained(5), ConfigError,
     "tokenizer must be a folder, file or hub id (str or os.PathLike), got 5"),
    (lambda enc: enc.tokenizer(5), InputError, "prompts must be a str or a sequence (list, tuple) of str, got int"),
    (lambda enc: enc.tokenizer([]), InputError, "prompts is empty"),
])
def test_public_functions_answer_bad_arguments_with_a_fastenc_error(ck, call, error, message):
    enc = fastenc.load(ck, backend="torch", cache=False)
    with pytest.raises(error) as info:
        call(enc)
    assert str(info.value).startswith(message), str(info.value)


# ---------------------------------------------------------------------------- said before any work


@pytest.mark.parametrize("model_args, where", [
    (["--checkpoint", "{bare}"], "none beside the checkpoint"),
    (["--size", "xl", "--random-init"], "random weights come without one"),
])
def test_prompts_without_a_tokenizer_are_refused_before_the_model_is_built(model_args, where, tmp_path, capsys,
                                                                            monkeypatch):
    bare = write_checkpoint(tmp_path / "bare")  # config.json + model.safetensors, no tokenizer.json
    import fastenc.api

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing tokenizer was said")

    monkeypatch.setattr(fastenc.api, "load", refuse)
    monkeypatch.setattr(fastenc, "load", refuse)
    argv = ["encode", *[a.format(bare=bare) for a in model_args], "a prompt", "-o", str(tmp_path / "o.safetensors")]
    assert main(argv) == 2
    assert one_line(capsys) == (f"fastenc: error: no tokenizer for these prompts ({where}): pass --tokenizer DIR (a "
                                "folder with tokenizer.json, e.g. Flux's tokenizer_2), or token ids with --ids")


def test_the_cli_runs_the_int8_onnx_artifact_and_says_where_int8_belongs(ck, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from fastenc.exporters.pipeline import ExportRequest, export

    out = tmp_path / "export"
    export(ExportRequest(out=out, checkpoint=str(ck), int8=True, max_batch=1, max_seq=120, target="pixart-alpha",
                         verify=False))
    enc = fastenc.load(out, backend="onnxruntime", dtype="int8", cache=False)
    assert enc.model.artifact.name == "encoder.int8.onnx"
    got = tmp_path / "int8.safetensors"
    assert main(["encode", "--checkpoint", str(out), "--backend", "onnxruntime", "--dtype", "int8", *IDS,
                 "--target", "pixart-alpha", "-o", str(got)]) == 0
    from safetensors.torch import load_file

    want = enc(torch.tensor([[3, 4, 1] + [0] * 117]), torch.tensor([[1, 1, 1] + [0] * 117]))
    assert torch.equal(load_file(got)["text_embeddings"], want)
    capsys.readouterr()
    assert main(["encode", "--checkpoint", str(ck), "--dtype", "int8", *IDS, "-o", str(tmp_path / "o.safetensors")]) == 2
    assert one_line(capsys) == (
        "fastenc: error: --dtype int8 runs the int8 ONNX artifact of `fastenc export --int8`: pass --backend "
        "onnxruntime and the export folder as --checkpoint (the cpu backend's int8 GEMMs need no flag: it is the "
        "default on the CPU)")


def test_an_unknown_special_token_in_tokenizer_config_names_the_file_and_key(tmp_path):
    make_t5_tokenizer_json(tmp_path)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"pad_token": "<PAD>", "eos_token": "</s>"}))
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(info.value) == (f"{cfg}: pad_token '<PAD>' is not a token of {tmp_path / 'tokenizer.json'} (a "
                               "tokenizer_config.json from another tokenizer?)")
    cfg.write_text(json.dumps({"eos_token": {"content": "[SEP]"}}))
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(info.value).startswith(f"{cfg}: eos_token '[SEP]' is not a token of ")
