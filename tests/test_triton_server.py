"""`fastenc triton-repo`: generated configs parse as Triton ModelConfig messages, and a real
Triton Inference Server serves the repository on loopback with embeddings equal to the Python API's.

The server is the ``tritonserver`` bundled in nvidia-pytriton (python backend only), run from the
separate venv that ``scripts/triton_env.sh`` creates (it pins numpy<2). It serves the tokenizer and an
encoder that runs the exported ONNX file through ONNX Runtime inside the python backend
(``--encoder-backend python``); the onnxruntime_onnx and tensorrt_plan configurations are checked by
parsing only, since that server has no such backends.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import fastenc
from fastenc.errors import CheckpointError, ConfigError
from fastenc.exporters import ExportRequest, export
from fastenc.targets import get_target
from fastenc.exporters.triton_repo import TritonRepoRequest, add_triton_command, encoder_config, write_triton_repo
from helpers import make_t5_tokenizer_json
from reference import TINY, Reference, write_distillt5

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FASTENC_TRITON_VENV", ROOT / ".venv-triton"))
PY = VENV / "bin" / "python"
SERVE = ROOT / "export" / "triton" / "serve_pytriton.sh"
CLIENT = ROOT / "export" / "triton" / "client.py"
SETUP_HINT = "run `bash scripts/triton_env.sh` (and `bash scripts/ci_system_deps.sh` for libpython3.11)"
READY_TIMEOUT_S = 180
PROMPTS2 = ["a cat", "A photo of a red fox sitting in the snow, highly detailed."]

#: Parses each config.pbtxt given on the command line into Triton's ModelConfig (unknown fields
#: raise) and prints a JSON summary; runs in the Triton venv, which has tritonclient.
PARSE = r"""
import json, sys
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
out = {}
for path in sys.argv[1:]:
    try:
        cfg = text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        out[path] = {"error": str(exc)}
        continue
    out[path] = {
        "name": cfg.name, "platform": cfg.platform, "backend": cfg.backend, "max_batch_size": cfg.max_batch_size,
        "dynamic_batching": cfg.HasField("dynamic_batching"),
        "inputs": {t.name: [model_config_pb2.DataType.Name(t.data_type), list(t.dims)] for t in cfg.input},
        "outputs": {t.name: [model_config_pb2.DataType.Name(t.data_type), list(t.dims)] for t in cfg.output},
        "steps": [s.model_name for s in cfg.ensemble_scheduling.step],
        "default_model_filename": cfg.default_model_filename,
        "parameters": {k: v.string_value for k, v in cfg.parameters.items()},
    }
print(json.dumps(out))
"""


def triton_venv_problem() -> str | None:
    if not PY.is_file():
        return f"no Triton venv at {VENV}"
    version = subprocess.run([str(PY), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if ctypes.util.find_library(f"python{version}") is None:
        return f"the python backend stub needs the system libpython{version} (Debian package libpython{version})"
    check = subprocess.run([str(PY), "-c", "import pytriton, tritonclient.http, onnxruntime, fastenc.tokenizer"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        return f"the Triton venv is incomplete ({check.stderr.strip().splitlines()[-1:]})"
    return None


@pytest.fixture(scope="module")
def triton_venv():
    problem = triton_venv_problem()
    if problem:
        pytest.skip(f"{problem}: {SETUP_HINT}")
    return PY


def parse_configs(paths: list[Path]) -> dict[str, dict]:
    run = subprocess.run([str(PY), "-c", PARSE, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny encoder checkpoint with tokenizer, exported to ONNX with seq up to 256 and batch up to 4."""
    root = tmp_path_factory.mktemp("triton")
    ckpt = write_distillt5(Reference(TINY), TINY, root / "ck")
    make_t5_tokenizer_json(ckpt)
    out = root / "export"
    export(ExportRequest(out=out, checkpoint=str(ckpt), max_batch=4, target="flux-schnell", verify=False))
    return {"root": root, "ckpt": ckpt, "export": out}


@pytest.fixture(scope="module")
def wan_exported(tmp_path_factory):
    """A tiny umT5 encoder (transformers' UMT5EncoderModel, every layer its own bias table) with a tokenizer,
    exported for Wan (512 tokens, batch up to 4)."""
    import transformers

    root = tmp_path_factory.mktemp("triton-wan")
    torch.manual_seed(0)
    hf = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False)).eval()
    ckpt = root / "umt5"
    hf.save_pretrained(ckpt, safe_serialization=True)
    make_t5_tokenizer_json(ckpt)
    out = root / "export"
    export(ExportRequest(out=out, checkpoint=str(ckpt), max_batch=4, max_seq=512, target="wan", verify=False))
    return {"root": root, "ckpt": ckpt, "export": out}


@pytest.fixture(scope="module")
def repos(exported, wan_exported):
    """`served`: three python-backend ensembles (PixArt with the mask, Flux-schnell without, Wan with its
    finish step) in one repository; `production`: the onnxruntime_onnx repository the bundled server cannot load."""
    served = exported["root"] / "repo"
    pixart = write_triton_repo(TritonRepoRequest(exported["export"], served, encoder_backend="python",
                                                 target="pixart-alpha", name="fastenc"))
    flux = write_triton_repo(TritonRepoRequest(exported["export"], served, encoder_backend="python",
                                               name="fastenc_flux"))
    wan = write_triton_repo(TritonRepoRequest(wan_exported["export"], served, encoder_backend="python",
                                              name="fastenc_wan"))
    production = write_triton_repo(TritonRepoRequest(exported["export"], exported["root"] / "prod"))
    return {"served": served, "pixart": pixart, "flux": flux, "wan": wan, "production": production}


# ---------------------------------------------------------------------------- configs


def test_every_config_parses_as_model_config(triton_venv, repos, tmp_path):
    trt = tmp_path / "trt" / "config.pbtxt"
    trt.parent.mkdir()
    trt.write_text(encoder_config("fastenc_encoder", platform="tensorrt_plan", max_batch_size=4,
                                  output_type="TYPE_BF16", output_dim=4096, model_file="encoder.trt10.8.sm90.bf16.plan",
                                  instance_kind="gpu", delay_us=100))
    paths = sorted(repos["served"].glob("*/config.pbtxt")) + sorted(repos["production"].root.glob("*/config.pbtxt"))
    assert len(paths) == 13
    parsed = parse_configs([*paths, trt])
    assert not [p for p, c in parsed.items() if "error" in c], parsed
    by_name = {(Path(p).parts[-3], c["name"]): c for p, c in parsed.items()}

    enc = by_name[("prod", "fastenc_encoder")]
    assert enc["platform"] == "onnxruntime_onnx" and enc["max_batch_size"] == 4 and enc["dynamic_batching"]
    assert enc["default_model_filename"] == "encoder.fp32.onnx"
    assert (repos["production"].encoder / "1" / "encoder.fp32.onnx").is_file()
    assert enc["inputs"] == {"input_ids": ["TYPE_INT32", [-1]], "attention_mask": ["TYPE_INT32", [-1]]}
    assert enc["outputs"] == {"text_embeddings": ["TYPE_FP32", [-1, TINY.projection_dim]]}

    trt_cfg = parsed[str(trt)]
    assert trt_cfg["platform"] == "tensorrt_plan" and trt_cfg["outputs"]["text_embeddings"][0] == "TYPE_BF16"

    ens = by_name[("repo", "fastenc")]
    assert ens["platform"] == "ensemble" and ens["steps"] == ["fastenc_tokenizer", "fastenc_encoder"]
    assert ens["inputs"] == {"text": ["TYPE_STRING", [1]]}
    assert set(ens["outputs"]) == {"text_embeddings", "attention_mask"}

    tok = by_name[("repo", "fastenc_tokenizer")]
    assert tok["backend"] == "python" and tok["parameters"]["max_length"] == "120"
    assert tok["parameters"]["pass_mask"] == "true"
    flux_tok = by_name[("repo", "fastenc_flux_tokenizer")]
    assert flux_tok["parameters"]["max_length"] == "256" and flux_tok["parameters"]["pass_mask"] == "false"
    assert by_name[("repo", "fastenc_encoder")]["backend"] == "python"

    # wan: the encoder's output goes through the finish step, which zeroes the padding
    assert repos["pixart"].finish is None and repos["flux"].finish is None
    assert repos["wan"].finish == repos["served"] / "fastenc_wan_finish"
    wan = by_name[("repo", "fastenc_wan")]
    assert wan["steps"] == ["fastenc_wan_tokenizer", "fastenc_wan_encoder", "fastenc_wan_finish"]
    assert wan["outputs"] == {"text_embeddings": ["TYPE_FP32", [-1, 32]], "attention_mask": ["TYPE_INT32", [-1]]}
    finish = by_name[("repo", "fastenc_wan_finish")]
    assert finish["backend"] == "python" and finish["parameters"] == {"target": "wan"}
    assert finish["inputs"] == {"encoder_embeddings": ["TYPE_FP32", [-1, 32]], "attention_mask": ["TYPE_INT32", [-1]]}
    assert finish["outputs"] == {"text_embeddings": ["TYPE_FP32", [-1, 32]]}
    wan_tok = by_name[("repo", "fastenc_wan_tokenizer")]
    assert wan_tok["parameters"]["target"] == "wan" and wan_tok["parameters"]["max_length"] == "512"
    assert wan_tok["parameters"]["pass_mask"] == "true"


def test_parser_rejects_a_bad_config(triton_venv, tmp_path):
    """The check above is real: a misspelt field does not parse."""
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "x"\nmax_batch_sise: 4\n')
    assert "error" in parse_configs([bad])[str(bad)]


def test_writer_refuses_bad_requests(exported, tmp_path):
    with pytest.raises(ConfigError, match="--max-seq 512"):  # flux-dev pads to 512 > the export's 256
        write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r", target="flux-dev"))
    with pytest.raises(ConfigError, match="1..4"):
        write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r", max_batch_size=8))
    write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r"))
    with pytest.raises(ConfigError, match="--force"):
        write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r"))
    write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r", force=True))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["fastenc", "fastenc_encoder", "fastenc_tokenizer"]


def test_triton_repo_command(exported, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fastenc")
    add_triton_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["triton-repo", str(exported["export"]), "-o", str(tmp_path / "r"), "--target", "sd3",
                              "--encoder-backend", "python", "--tokenizer", str(exported["ckpt"]), "--name", "sd3"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "sd3_encoder" in out and "python" in out and "256 tokens" in out
    assert 'string_value: "256"' in (tmp_path / "r" / "sd3_tokenizer" / "config.pbtxt").read_text()
    assert (tmp_path / "r" / "sd3_tokenizer" / "1" / "tokenizer.json").is_file()
    assert (tmp_path / "r" / "sd3_encoder" / "1" / "model.py").is_file()


# ---------------------------------------------------------------------------- real server


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def server(triton_venv, repos, tmp_path_factory):
    """tritonserver on 127.0.0.1 with free ports, ready within READY_TIMEOUT_S; stopped on teardown."""
    work = tmp_path_factory.mktemp("tritonserver")
    http, grpc, metrics = free_ports(3)
    log_path = work / "server.log"
    env = {**os.environ, "FASTENC_TRITON_VENV": str(VENV), "FASTENC_TRITON_WORKDIR": str(work)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", str(SERVE), str(repos["served"]), str(http), str(grpc), str(metrics)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    url = f"127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while http_status(f"http://{url}/v2/health/ready") != 200:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-6000:]}")
            time.sleep(0.25)
        yield {"url": url, "log": log_path}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its python stubs
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def infer(server, model: str, prompts: list[str], out: Path) -> subprocess.CompletedProcess:
    """A tritonclient HTTP request through export/triton/client.py (run in the Triton venv)."""
    return subprocess.run([str(PY), str(CLIENT), "--url", server["url"], "--model", model, "-o", str(out), *prompts],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(exported):
    return fastenc.load(exported["ckpt"], device="cpu", dtype="fp32", cache=False)


@pytest.mark.parametrize("model,target", [("fastenc", "pixart-alpha"), ("fastenc_flux", "flux-schnell")])
def test_server_matches_python_api(server, reference, model, target, tmp_path):
    run = infer(server, model, PROMPTS2, tmp_path / "out.npz")
    assert run.returncode == 0, run.stderr + server["log"].read_text()[-4000:]
    got = np.load(tmp_path / "out.npz")
    want = reference.encode(PROMPTS2, target=target)
    assert got["text_embeddings"].dtype == np.float32
    assert got["text_embeddings"].shape == tuple(want.embeds.shape) == (2, fastenc.config.max_length_for(target), 64)
    assert np.array_equal(got["attention_mask"], want.mask.numpy())
    err = np.abs(got["text_embeddings"] - want.embeds.numpy()).max()
    assert err <= 1e-4, f"max abs error {err}"


#: Prompts Wan's prompt_clean changes: HTML entities (escaped twice) and runs of whitespace.
WAN_PROMPTS = ["a  cat &amp;amp; a\tdog  ", "A photo of a red fox sitting in the snow, highly detailed."]


def test_server_serves_wan_as_its_pipeline_feeds_the_transformer(server, wan_exported, tmp_path):
    """Prompts cleaned by the tokenizer model, the padding zeroed by the finish step: the ensemble returns
    what encode(target='wan') does, and that differs from the encoder's raw output on uncleaned prompts."""
    run = infer(server, "fastenc_wan", WAN_PROMPTS, tmp_path / "out.npz")
    assert run.returncode == 0, run.stderr + server["log"].read_text()[-4000:]
    got = np.load(tmp_path / "out.npz")
    enc = fastenc.load(wan_exported["ckpt"], device="cpu", dtype="fp32", cache=False)
    want = enc.encode(WAN_PROMPTS, target="wan")
    assert got["text_embeddings"].shape == tuple(want.embeds.shape) == (2, 512, 32)
    assert np.array_equal(got["attention_mask"], want.mask.numpy())
    err = np.abs(got["text_embeddings"] - want.embeds.numpy()).max()
    assert err <= 1e-4, f"max abs error {err}"
    pad = got["attention_mask"] == 0
    assert pad.any() and not got["text_embeddings"][pad].any()  # every padded row exactly zero
    raw = enc.tokenizer(WAN_PROMPTS, max_length=512, warn=False).input_ids  # [2, 512] without prompt_clean
    cleaned = enc.tokenizer(get_target("wan").prepare(WAN_PROMPTS), max_length=512, warn=False).input_ids
    assert get_target("wan").prepare(WAN_PROMPTS)[0] == "a cat & a dog"
    assert not torch.equal(raw[0], cleaned[0]) and torch.equal(raw[1], cleaned[1])  # so the cleaning was served


def test_replacing_a_wan_repository_drops_its_finish_step(wan_exported, tmp_path):
    out = tmp_path / "r"
    first = write_triton_repo(TritonRepoRequest(wan_exported["export"], out))
    assert first.finish is not None and (first.finish / "1" / "model.py").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["fastenc", "fastenc_encoder", "fastenc_finish",
                                                     "fastenc_tokenizer"]
    second = write_triton_repo(TritonRepoRequest(wan_exported["export"], out, target="pixart-alpha", force=True))
    assert second.finish is None
    assert sorted(p.name for p in out.iterdir()) == ["fastenc", "fastenc_encoder", "fastenc_tokenizer"]
    assert "fastenc_finish" not in (out / "fastenc" / "config.pbtxt").read_text()


def test_server_rejects_a_batch_over_max_batch_size(server, tmp_path):
    run = infer(server, "fastenc", ["a cat"] * 5, tmp_path / "out.npz")  # max_batch_size 4
    assert run.returncode == 1 and not (tmp_path / "out.npz").exists()
    assert run.stderr.startswith("client.py: error:") and "batch" in run.stderr, run.stderr


# ---------------------------------------------------------------------------- staging, fastenc-cpu configs


def test_failed_run_leaves_no_partial_repository(exported, tmp_path):
    """A tokenizer that cannot be read fails the run after staging began: no new folder, no staging left
    over, an existing repository untouched."""
    from fastenc.errors import FastencError

    bad = tmp_path / "not-a-tokenizer"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ not json")
    (tmp_path / "new").mkdir()
    with pytest.raises(FastencError, match="tokenizer"):
        write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "new" / "repo", tokenizer=str(bad)))
    assert list((tmp_path / "new").iterdir()) == []  # no repo, no .repo.staging-*

    existing = tmp_path / "existing"
    write_triton_repo(TritonRepoRequest(exported["export"], existing, name="other"))
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    with pytest.raises(FastencError, match="tokenizer"):
        write_triton_repo(TritonRepoRequest(exported["export"], existing, tokenizer=str(bad)))
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before


def test_fastenc_cpu_and_batching_configs_parse(triton_venv, exported, tmp_path):
    repo = write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r", encoder_backend="fastenc-cpu",
                                               instance_count=2, preferred_batch_sizes=(2, 4), max_queue_delay_us=2000,
                                               threads=1))
    assert repo.encoder_platform == "python"
    ckpt = repo.encoder / "1" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    assert (repo.encoder / "1" / "model.py").read_text().startswith('"""Triton python-backend model: fastenc\'s own')
    parsed = parse_configs([repo.encoder / "config.pbtxt"])[str(repo.encoder / "config.pbtxt")]
    assert "error" not in parsed, parsed
    assert parsed["parameters"] == {"checkpoint": "checkpoint", "backend": "cpu", "threads": "1"}
    assert parsed["outputs"]["text_embeddings"] == ["TYPE_FP32", [-1, TINY.projection_dim]]
    text = (repo.encoder / "config.pbtxt").read_text()
    assert "preferred_batch_size: [ 2, 4 ]" in text and "count: 2" in text and "KIND_CPU" in text
    with pytest.raises(ConfigError, match="--preferred-batch-sizes"):
        write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r2", preferred_batch_sizes=(8,)))
    with pytest.raises(ConfigError, match="--instance-count"):
        write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r2", instance_count=0))
    with pytest.raises(CheckpointError, match="--checkpoint"):
        write_triton_repo(TritonRepoRequest(exported["export"], tmp_path / "r2", encoder_backend="fastenc-cpu",
                                            checkpoint=str(tmp_path / "nowhere")))
    assert not (tmp_path / "r2").exists()
