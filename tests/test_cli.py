"""The command line at its boundary: flags, help, one-line errors, offline use, caches, start-up imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

import fastenc
from fastenc import caches, hub
from fastenc.cli import build_parser, main
from fastenc.errors import CheckpointError, ConfigError
from fastenc.info import describe_backend
from helpers import make_t5_tokenizer_json
from reference import TINY, Reference, write_distillt5

COMMANDS = ("encode", "info", "demo", "export", "verify", "triton-repo", "tune", "cache")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny DistillT5-layout checkpoint without a tokenizer (what an offline user has)."""
    return write_distillt5(Reference(TINY), TINY, tmp_path_factory.mktemp("cli") / "ck")


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No hub: HF_HUB_OFFLINE set and an empty hub cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)


def one_line_error(capsys, prefix: str = "fastenc") -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- flags and help


def test_every_flag_has_help_and_lists_its_choices():
    parser = build_parser("*")
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subparsers.choices) == set(COMMANDS)
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"fastenc {name} {action.option_strings or action.dest}: no help text"
            for choice in action.choices or ():
                assert str(choice) in text, f"fastenc {name} {action.option_strings}: choice {choice} not shown"


def test_bad_device_names_the_flag(capsys, tmp_path):
    for argv in (["encode", "--random-init", "--size", "small", "x", "-o", str(tmp_path / "o.st")], ["demo"]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--device", "nonsense"])
        assert info.value.code == 2
        err = one_line_error(capsys)
        assert "argument --device" in err and "'nonsense'" in err and "cuda:N" in err


def test_demo_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--repeats", "0"])
    assert info.value.code == 2
    assert "argument --repeats: expected a positive integer, got 0" in one_line_error(capsys)


def test_output_under_a_file_or_unwritable_fails_before_loading(capsys, tmp_path, ckpt):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["encode", "--checkpoint", str(ckpt), "--ids", "5,1", "-o", str(afile / "o.safetensors")]) == 2
    assert f"-o/--output {afile / 'o.safetensors'}: {afile} is a file, not a folder" in one_line_error(capsys)
    assert main(["export", "--random-init", "--size", "small", "--out", str(afile / "exp")]) == 2
    assert "--out" in one_line_error(capsys)
    # /proc takes no new files, even for root: the probe write fails, not a permission-bit guess
    assert main(["encode", "--checkpoint", str(ckpt), "--ids", "5,1", "-o", "/proc/fastenc-test.safetensors"]) == 2
    assert "cannot write in /proc" in one_line_error(capsys)


def test_lone_surrogate_prompt_is_one_line(capsys, tmp_path, ckpt):
    out = tmp_path / "o.safetensors"
    assert main(["encode", "--checkpoint", str(ckpt), "a fox \udcff in snow", "-o", str(out)]) == 2
    err = one_line_error(capsys)
    assert "prompt 1 is not valid UTF-8 text (byte 0xff at character 6)" in err and not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["encode", "--checkpoint", "MISSING", "x", "-o", "o.st"], "MISSING: no such file or directory"),
    (["encode", "--random-init", "--checkpoint", "MISSING", "--ids", "1", "-o", "o.st"], "exclude each other"),
    (["encode", "--ids", "1,x", "--random-init", "-o", "o.st"], "--ids '1,x': expected comma-separated integers"),
    (["demo", "--checkpoint", "MISSING", "--no-export"], "MISSING: no such file or directory"),
    (["export", "--checkpoint", "MISSING"], "MISSING: no such file or directory"),
    (["export", "--size", "small"], "size 'small' has no released checkpoint"),
    (["verify", "MISSING"], "MISSING"),
    (["triton-repo", "MISSING", "-o", "repo"], "MISSING"),
    (["cache", "clear", "nonsense"], "unknown cache 'nonsense'"),
])
def test_every_subcommand_reports_one_line(capsys, monkeypatch, tmp_path, argv, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))
    assert main(argv) != 0
    assert words in one_line_error(capsys, "fastenc: error: ")


def test_no_traceback_and_exit_codes_from_a_real_process(tmp_path):
    """argv bytes that are not UTF-8, an unknown command, a missing folder: one line each, no traceback."""
    env = {**os.environ, "FASTENC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    script = (  # none of these imports torch: help, info, caches, and the offline refusal of a hub download
        "import sys, fastenc.cli\n"
        "for argv in (['info'], ['--help'], ['cache', 'info'], ['export', '--size', 'base', '--trt'],\n"
        "             ['encode', '--size', 'base', 'a cat', '-o', 'x.safetensors']):\n"
        "    try:\n"
        "        fastenc.cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("NO-TORCH"), run.stdout + run.stderr
    assert "backend cpu" in run.stdout and "cpu-plans" in run.stdout
    assert run.stderr.count("hf download LifuWang/DistillT5 --local-dir DistillT5") == 2, run.stderr

    cmd = [sys.executable, "-m", "fastenc.cli"]
    bad = subprocess.run([*cmd, "encode", "--random-init", "--size", "small", b"caf\xe9", "-o", str(tmp_path / "o.st")],
                         capture_output=True, env={**env, "LC_ALL": "C.UTF-8"}, timeout=300)
    err = bad.stderr.decode()
    assert bad.returncode == 2 and "byte 0xe9 at character 3" in err and "Traceback" not in err, err
    for argv, code in ((["frobnicate"], 2), (["verify", str(tmp_path / "nope")], 2)):
        run = subprocess.run([*cmd, *argv], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == code and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr


# ---------------------------------------------------------------------------- offline, hub, released sizes


def test_export_size_base_offline_names_both_ways_out(capsys, offline):
    assert main(["export", "--size", "base", "--trt"]) == 2
    err = one_line_error(capsys, "fastenc: error: ")
    assert "LifuWang/DistillT5" in err and "HF_HUB_OFFLINE is set" in err
    assert "`hf download LifuWang/DistillT5 --local-dir DistillT5`" in err
    assert "--checkpoint DistillT5" in err and "--random-init" in err


def test_load_size_base_means_the_released_student(offline):
    with pytest.raises(CheckpointError) as info:
        fastenc.load(size="base")
    text = str(info.value)
    assert "hf download LifuWang/DistillT5 --local-dir DistillT5" in text and "random_init=True" in text
    with pytest.raises(ConfigError, match="size 'small' has no released checkpoint .* random_init=True"):
        fastenc.load(size="small")
    assert fastenc.load(size="base", random_init=True, backend="torch").random_init  # still random on request


def test_unreachable_hub_fails_at_once(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, but nothing answers: the probe says so before any download is tried."""
    import socket

    from huggingface_hub import constants

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = sock.getsockname()[1]
    sock.close()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "_endpoint", lambda: ("127.0.0.1", port))
    hub._probe.cache_clear()
    monkeypatch.chdir(tmp_path)
    try:
        assert "127.0.0.1" in hub.offline_reason()
        from fastenc.tokenizer import Tokenizer

        with pytest.raises(ConfigError) as info:
            Tokenizer.from_pretrained("black-forest-labs/FLUX.1-dev")
        assert "hf download black-forest-labs/FLUX.1-dev --include 'tokenizer*' --local-dir FLUX.1-dev" in str(info.value)
    finally:
        hub._probe.cache_clear()


# ---------------------------------------------------------------------------- encode offline


def test_encode_token_ids_offline(capsys, offline, ckpt, tmp_path):
    model = fastenc.load(ckpt, backend="torch", cache=False)
    ids = torch.zeros(2, 120, dtype=torch.long)
    ids[0, :3] = torch.tensor([5, 6, 1])
    ids[1, :2] = torch.tensor([7, 1])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = model(ids, mask)  # pixart-alpha passes the mask
    np.save(tmp_path / "ids.npy", np.array([[5, 6, 1], [7, 1, 0]]))
    save_numpy({"input_ids": ids[:, :3].contiguous().numpy(), "attention_mask": mask[:, :3].contiguous().numpy()},
               str(tmp_path / "ids.safetensors"))
    for n, source in enumerate((["--ids", "5,6,1", "--ids", "7,1"], ["--ids", str(tmp_path / "ids.safetensors")])):
        out = tmp_path / f"out{n}.safetensors"
        assert main(["encode", "--checkpoint", str(ckpt), "--backend", "torch", *source, "--target", "pixart-alpha",
                     "-o", str(out)]) == 0
        got = load_file(out)
        torch.testing.assert_close(got["text_embeddings"], want)
        assert torch.equal(got["attention_mask"], mask)
        assert f"wrote {out}" in capsys.readouterr().out
    out = tmp_path / "npy.safetensors"  # a .npy without a mask: every given id counts, padding follows
    assert main(["encode", "--checkpoint", str(ckpt), "--backend", "torch", "--ids", str(tmp_path / "ids.npy"),
                 "--target", "pixart-alpha", "-o", str(out)]) == 0
    assert load_file(out)["attention_mask"][1, :3].tolist() == [1, 1, 1]
    assert main(["encode", "--checkpoint", str(ckpt), "--ids", "5,99999", "-o", str(out)]) == 2
    assert "--ids: token id 99999 is out of range" in one_line_error(capsys)


def test_encode_prompts_without_tokenizer_speaks_in_flags(capsys, offline, ckpt, tmp_path):
    assert main(["encode", "--checkpoint", str(ckpt), "a red fox", "-o", str(tmp_path / "o.st")]) == 2
    err = one_line_error(capsys)
    assert "--tokenizer DIR" in err and "--ids" in err and "fastenc.load" not in err
    tok = make_t5_tokenizer_json(tmp_path / "tok").parent
    assert main(["encode", "--checkpoint", str(ckpt), "--tokenizer", str(tok), "a red fox", "-o",
                 str(tmp_path / "o.st")]) == 0


# ---------------------------------------------------------------------------- caches, info


def test_cache_info_and_clear_delete_only_fastencs_files(capsys, monkeypatch, tmp_path):
    from fastenc.backends.cpu import plan_cache_dir

    root = tmp_path / "cache"
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(root))
    monkeypatch.delenv("FASTENC_BENCH_CACHE", raising=False)
    dirs = {c.name: c.path for c in caches.cache_dirs()}
    assert dirs["cpu-plans"] == plan_cache_dir()  # the cpu backend writes where `cache` looks
    from fastenc.cache import default_disk_dir

    assert dirs["embeddings"] == default_disk_dir()  # so does the embedding cache's disk store
    plan = dirs["cpu-plans"] / ("0123456789abcdef01234567.json")
    plan.parent.mkdir(parents=True)
    plan.write_text(json.dumps({"weights": []}))
    foreign = dirs["cpu-plans"] / "notes.txt"
    foreign.write_text("mine")
    bench = dirs["bench"] / "base-t5init-seed0" / "export"
    bench.mkdir(parents=True)
    (bench / "encoder.onnx").write_bytes(b"\0" * 4096)
    (bench / "export.json").write_text(json.dumps({"files": {"encoder.onnx": {"size": 4096}}}))  # what it wrote
    emb = dirs["embeddings"] / ("ab" * 32 + ".safetensors")
    emb.parent.mkdir(parents=True)
    emb.write_bytes(b"\0" * 100)

    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(root) in out and "4.0 KB" in out and "hf cache" in out
    assert main(["cache", "clear", "cpu-plans", "bench"]) == 0
    out = capsys.readouterr().out
    assert "cleared cpu-plans" in out and "cleared bench" in out and "embeddings" not in out
    assert not plan.exists() and not (dirs["bench"] / "base-t5init-seed0").exists()
    assert foreign.read_text() == "mine" and emb.exists()
    assert main(["cache", "clear"]) == 0
    assert not emb.exists() and foreign.exists()


def test_backend_labels(ckpt):
    enc = fastenc.load(ckpt, backend="torch", cache=False)
    assert describe_backend(enc) == "fastenc torch fp32"
    enc16 = fastenc.load(ckpt, backend="torch", dtype="bf16", cache=False)
    assert describe_backend(enc16) == "fastenc torch bf16"
    from fastenc.backends.cpu import prepare

    from types import SimpleNamespace

    model = prepare(enc.model, int8="all", tune_malloc=False)
    cpu = SimpleNamespace(backend="cpu", model=model, dtype=torch.bfloat16, device=torch.device("cpu"), graphs=None)
    assert describe_backend(cpu) == "fastenc cpu (bf16 + int8 W8A8)"
    assert describe_backend(SimpleNamespace(**{**vars(cpu), "model": prepare(model, int8="none")})) == \
        "fastenc cpu (bf16)"


def test_readme_command_lines_parse_as_written():
    """Every `fastenc ...` line in README's command-line block is accepted by the parser, flags and choices."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("## Command line"):]
    block = block[block.index("```") + 3:]
    lines = [line.split("  #")[0].strip() for line in block[: block.index("```")].splitlines()]
    lines = [line for line in lines if line.startswith("fastenc ")]
    assert len(lines) >= 8
    parser = build_parser("*")
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.command in COMMANDS, line


def test_bench_cache_is_where_cache_info_looks(monkeypatch, tmp_path):
    from bench.exports import cache_root  # bench/ lives in the source tree (as in tests/test_bench.py)

    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTENC_BENCH_CACHE", raising=False)
    assert cache_root() == {c.name: c.path for c in caches.cache_dirs()}["bench"] == tmp_path / "bench"


def test_library_messages_are_worded_as_flags():
    from fastenc.cli import cli_words

    assert cli_words("backend 'cpu' computes in bf16, not float16; pass dtype='bf16' or leave it out, or use "
                     "backend='torch'") == ("backend 'cpu' computes in bf16, not float16; pass --dtype bf16 or leave "
                                            "it out, or use --backend torch")
    assert cli_words("no tokenizer: pass tokenizer=FOLDER_OR_HUB_ID to fastenc.load") == \
        "no tokenizer: pass --tokenizer FOLDER_OR_HUB_ID"
    assert cli_words("pass a checkpoint or random_init=True with size=...") == \
        "pass a checkpoint or --random-init with --size ..."
