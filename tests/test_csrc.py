"""The C++ client in csrc/: built with CMake against the torch wheel's libtorch, run on prompts,
compared with the Python API (token ids equal, embeddings within 1e-4 in fp32), and its errors.

The build goes to csrc/build (ignored by git) and is reused across runs; the AOTInductor package
comes from fastenc's own exporter (``fastenc.exporters.aoti.compile_package``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastenc
import fastenc.targets
from helpers import PROMPTS, make_t5_spiece_model
from reference import TINY, Reference, write_distillt5

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc"
BUILD = SOURCE / "build"
EXE = BUILD / "fastenc-embed"
INSTALL_HINT = "run `bash scripts/ci_system_deps.sh` (apt-get install libsentencepiece-dev cmake g++ make)"

#: Non-empty prompts, a truncated one among them, plus unicode and odd whitespace.
CPP_PROMPTS = [p for p in PROMPTS if p] + ["Café “quotes” — naïve 東京 😀", "  tabs\tand  spaces  "]
MAX_BATCH, MAX_SEQ = 8, 256  # the package's profile: flux-dev's 512 is outside it


def missing_prerequisite() -> str | None:
    """What system package the build lacks, or None when cmake, a C++ compiler and sentencepiece are there."""
    if shutil.which("cmake") is None:
        return "cmake"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "a C++ compiler (g++)"
    headers = [Path(p) / "sentencepiece_processor.h" for p in ("/usr/include", "/usr/local/include")]
    pkg = shutil.which("pkg-config")
    found = any(h.is_file() for h in headers) or (
        pkg is not None and subprocess.run([pkg, "--exists", "sentencepiece"]).returncode == 0
    )
    return None if found else "the sentencepiece C++ library (libsentencepiece-dev)"


def build_client() -> Path:
    """Configure (first time, or for another torch) and build csrc/ into csrc/build; a no-op rebuild is instant."""
    prefix = f"CMAKE_PREFIX_PATH:UNINITIALIZED={torch.utils.cmake_prefix_path}"
    cache = BUILD / "CMakeCache.txt"
    configured = cache.is_file() and prefix in cache.read_text(errors="replace").splitlines()
    configure = ["cmake", "-S", str(SOURCE), "-B", str(BUILD), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if not cache.is_file() and shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    steps = [] if configured else [configure]  # `cmake --build` re-runs configure when CMakeLists.txt changes
    for cmd in (*steps, ["cmake", "--build", str(BUILD), "-j", jobs]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    assert EXE.is_file()
    return EXE


def build_aoti_package(model: torch.nn.Module, path: Path, max_batch: int, max_seq: int) -> Path:
    """The encoder as an AOTInductor package through fastenc's exporter (int32 ids/mask, profile metadata)."""
    from fastenc.exporters.aoti import compile_package, profile_metadata
    from fastenc.exporters.contract import make_profile

    profile = make_profile(max_batch, max_seq)
    return compile_package(model, path, profile, metadata=profile_metadata(profile))


@pytest.fixture(scope="module")
def exe():
    missing = missing_prerequisite()
    if missing:
        pytest.skip(f"building csrc/ needs {missing}: {INSTALL_HINT}")
    return build_client()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random encoder (Python API), its .pt2 package, and a T5-style spiece.model."""
    root = tmp_path_factory.mktemp("csrc")
    ckpt = write_distillt5(Reference(TINY), TINY, root / "ck")
    spiece = make_t5_spiece_model(root / "tok")
    enc = fastenc.load(ckpt, tokenizer=spiece.parent, device="cpu", dtype="fp32", cache=False)
    package = build_aoti_package(enc.model, root / "encoder.fp32.cpu.pt2", MAX_BATCH, MAX_SEQ)
    return {"enc": enc, "package": package, "spiece": spiece, "root": root}


def embed(exe: Path, assets, *args: str, prompts=CPP_PROMPTS, output: str = "out.safetensors"):
    """Run fastenc-embed; returns (completed process, output path)."""
    out = assets["root"] / output
    out.unlink(missing_ok=True)
    cmd = [str(exe), "--model", str(assets["package"]), "--tokenizer", str(assets["spiece"]), "-o", str(out),
           "--threads", "2", *args, "--", *prompts]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300), out


def assert_one_error_line(run: subprocess.CompletedProcess, *fragments: str) -> None:
    assert run.returncode != 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastenc-embed: error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


#: Every target the package's 256 tokens hold: masked (PixArt-α, Mochi) and not (Flux, LTX-Video, CogVideoX).
CPP_TARGETS = ["pixart-alpha", "flux-schnell", "mochi", "ltx-video", "cogvideox"]


@pytest.mark.parametrize("target", CPP_TARGETS)
def test_matches_python_api(exe, assets, target):
    run, out = embed(exe, assets, "--target", target)
    assert run.returncode == 0, run.stderr
    got = load_file(str(out))
    want = assets["enc"].encode(CPP_PROMPTS, target=target)
    assert torch.equal(got["input_ids"], assets["enc"].tokenizer(CPP_PROMPTS, target=target).input_ids)
    assert torch.equal(got["attention_mask"], want.mask)
    assert got["text_embeddings"].dtype == torch.float32
    length = fastenc.config.max_length_for(target)
    assert got["text_embeddings"].shape == want.embeds.shape == (len(CPP_PROMPTS), length, TINY.projection_dim)
    err = (got["text_embeddings"] - want.embeds).abs().max().item()
    assert err <= 1e-4, f"max abs error {err}"


def test_truncation_and_npy_output(exe, assets):
    """--max-length 16 keeps 15 tokens + </s> like the Python tokenizer; .npy loads with numpy."""
    run, out = embed(exe, assets, "--max-length", "16", output="out.npy")
    assert run.returncode == 0, run.stderr
    assert "truncated" in run.stderr
    enc = assets["enc"]
    batch = enc.tokenizer(CPP_PROMPTS, max_length=16)
    assert batch.num_truncated >= 1
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (len(CPP_PROMPTS), 16, 64)
    with torch.no_grad():
        want = enc(batch.input_ids).numpy()  # Flux's rule (the default target): no mask
    assert np.abs(got - want).max() <= 1e-4
    run, out = embed(exe, assets, "--max-length", "16", "--batch-size", "3")  # three calls, same result
    assert run.returncode == 0, run.stderr
    chunked = load_file(str(out))
    assert torch.equal(chunked["input_ids"], batch.input_ids)
    assert np.abs(chunked["text_embeddings"].numpy() - want).max() <= 1e-4


def test_prompts_file_and_forced_mask(exe, assets, tmp_path):
    """--prompts-file adds one prompt per line; --mask on passes the mask to a Flux-length encode."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red fox\r\nA sculptor waving a poster stating 'user'.\n", encoding="utf-8")
    run, out = embed(exe, assets, "--target", "flux-schnell", "--mask", "on", "--prompts-file", str(prompts_file),
                     prompts=["a cat"])
    assert run.returncode == 0, run.stderr
    prompts = ["a cat", "a red fox", "A sculptor waving a poster stating 'user'."]
    enc = assets["enc"]
    batch = enc.tokenizer(prompts, target="flux-schnell")
    got = load_file(str(out))
    assert torch.equal(got["input_ids"], batch.input_ids)
    with torch.no_grad():
        want = enc(batch.input_ids, batch.attention_mask)
    assert (got["text_embeddings"] - want).abs().max().item() <= 1e-4


def test_missing_model_file(exe, assets, tmp_path):
    run = subprocess.run([str(exe), "--model", str(tmp_path / "nope.pt2"), "--tokenizer", str(assets["spiece"]),
                          "-o", str(tmp_path / "o.npy"), "a cat"], capture_output=True, text=True, timeout=60)
    assert_one_error_line(run, "nope.pt2", "not found")
    assert not (tmp_path / "o.npy").exists()


def test_missing_tokenizer_file(exe, assets, tmp_path):
    run = subprocess.run([str(exe), "--model", str(assets["package"]), "--tokenizer", str(tmp_path / "spiece.model"),
                          "-o", str(tmp_path / "o.npy"), "a cat"], capture_output=True, text=True, timeout=60)
    assert_one_error_line(run, str(tmp_path / "spiece.model"), "not found")


def test_model_that_is_not_a_package(exe, assets, tmp_path):
    run = subprocess.run([str(exe), "--model", str(assets["spiece"]), "--tokenizer", str(assets["spiece"]),
                          "-o", str(tmp_path / "o.npy"), "a cat"], capture_output=True, text=True, timeout=60)
    assert_one_error_line(run, "spiece.model", "not an AOTInductor .pt2 package")


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_prompt(exe, assets, bad):
    run, out = embed(exe, assets, prompts=["a cat", bad])
    assert_one_error_line(run, "prompt 2 of 2", "empty prompt")
    assert not out.exists()


def test_shape_outside_the_package_profile(exe, assets):
    run, out = embed(exe, assets, "--target", "flux-dev")  # 512 > the package's max_seq
    assert_one_error_line(run, "seq=512", f"seq 1..{MAX_SEQ}")
    assert not out.exists()
    run, _ = embed(exe, assets, "--max-length", "8", prompts=["a cat"] * (MAX_BATCH + 1))
    assert_one_error_line(run, f"batch={MAX_BATCH + 1}", f"batch 1..{MAX_BATCH}")


def test_usage_errors(exe, assets, tmp_path):
    run, _ = embed(exe, assets, "--target", "sdxl")
    assert_one_error_line(run, "unknown target 'sdxl'; choose one of "
                          + ", ".join(t for t in fastenc.targets.TARGETS if t != "wan"))  # the Python table's rows
    assert run.stderr.strip().endswith("mochi")
    run, _ = embed(exe, assets, "--target", "wan")
    assert_one_error_line(run, "target 'wan': its pipeline cleans the prompts (ftfy, HTML entities, whitespace) and "
                          "zeroes the embeddings past each prompt, which fastenc-embed does not do; use the Python "
                          "API (encode(prompts, target=\"wan\")) or `fastenc triton-repo --target wan`")
    run = subprocess.run([str(exe), "--model", str(assets["package"]), "--tokenizer", str(assets["spiece"]),
                          "-o", str(tmp_path / "o.txt"), "a cat"], capture_output=True, text=True, timeout=60)
    assert_one_error_line(run, ".safetensors or .npy")
    assert run.returncode == 2
    help_run = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "--tokenizer" in help_run.stdout
