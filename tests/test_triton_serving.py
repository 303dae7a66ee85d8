"""Serving under load: the fastenc ensemble on a real tritonserver, driven by perf_analyzer, batches
and fails no request; malformed requests get clear errors while others are served; the fastenc-cpu
encoder (fastenc's own cpu backend in the python backend) serves embeddings equal to the Python API's.

Small scale for CI: a tiny model, the pixart-alpha target (120 tokens), ~2 s per concurrency level, loopback.
Batching is asserted from the server's own counters (executions vs inferences of the encoder model),
not from timings, so a busy machine cannot flip it. perf_analyzer and the server come from the venv of
scripts/triton_env.sh.
"""

from __future__ import annotations

import json
import struct
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

import fastenc
from bench.serving import PROMPTS, perf_analyzer_path, run_level, start_server, write_input_data
from fastenc.exporters import ExportRequest, export
from fastenc.exporters.triton_repo import TritonRepoRequest, write_triton_repo
from helpers import make_t5_tokenizer_json
from reference import TINY, Reference, write_distillt5
from test_triton_server import SETUP_HINT, VENV, triton_venv_problem

TARGET = "pixart-alpha"


@pytest.fixture(scope="module")
def venv():
    problem = triton_venv_problem()
    if problem is None and not perf_analyzer_path(VENV).is_file():
        problem = f"no perf_analyzer in {VENV}"
    if problem:
        pytest.skip(f"{problem}: {SETUP_HINT}")
    return VENV


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    ckpt = write_distillt5(Reference(TINY), TINY, root / "ck")
    make_t5_tokenizer_json(ckpt)
    out = root / "export"
    export(ExportRequest(out=out, checkpoint=str(ckpt), max_batch=8, target=TARGET, verify=False))
    return {"root": root, "ckpt": ckpt, "export": out}


@pytest.fixture(scope="module")
def server(venv, model):
    """One server, two ensembles: `fastenc` (ONNX Runtime encoder) and `fcpu` (fastenc's cpu backend)."""
    repo = model["root"] / "repo"
    write_triton_repo(TritonRepoRequest(model["export"], repo, encoder_backend="python", max_queue_delay_us=5000,
                                        threads=1))
    write_triton_repo(TritonRepoRequest(model["export"], repo, encoder_backend="fastenc-cpu", name="fcpu", threads=1))
    srv = start_server(repo, model["root"] / "server", venv=venv)
    try:
        yield srv
    finally:
        srv.stop()


def post(server, model: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{server.http}/v2/models/{model}/infer", data=body, method="POST",
                                 headers={"Content-Type": "application/octet-stream", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, json.loads(raw)  # outputs are asked for as JSON: the reply is JSON either way


def infer_json(server, model: str, inputs: list[dict]) -> tuple[int, dict]:
    return post(server, model, json.dumps({"inputs": inputs}).encode())


def text_input(prompts: list[str]) -> dict:
    return {"name": "text", "shape": [len(prompts), 1], "datatype": "BYTES", "data": prompts}


def infer_raw_bytes(server, model: str, values: list[bytes]) -> tuple[int, dict]:
    """BYTES tensor in Triton's binary extension: lets a request carry bytes that are not UTF-8."""
    blob = b"".join(struct.pack("<I", len(v)) + v for v in values)
    header = json.dumps({"inputs": [{"name": "text", "shape": [len(values), 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "attention_mask"}]}).encode()
    return post(server, model, header + blob, {"Inference-Header-Content-Length": str(len(header))})


def good(server, model: str = "fastenc") -> dict:
    status, body = infer_json(server, model, [text_input(["a cat", "a red fox in the snow"])])
    assert status == 200, body
    return {o["name"]: o for o in body["outputs"]}


# ---------------------------------------------------------------------------- load


def test_perf_analyzer_load_batches_without_failures(server, tmp_path):
    data = write_input_data(tmp_path / "prompts.json", PROMPTS)
    c1 = run_level(server, "fastenc", "fastenc_encoder", 1, 1.5, data, tmp_path)
    c8 = run_level(server, "fastenc", "fastenc_encoder", 8, 1.5, data, tmp_path)
    for level in (c1, c8):  # run_level raises when perf_analyzer saw a request error
        assert level.failed == 0 and level.ensemble["failed"] == 0, level
        assert level.requests > 0 and level.ensemble["success"] == level.requests, level
        assert level.p50_ms > 0 and level.p99_ms >= level.p50_ms and level.prompts_per_s > 0
    assert c1.encoder["batches"] and set(c1.encoder["batches"]) == {1}, c1.encoder  # one request in flight
    assert max(c8.encoder["batches"]) > 1, c8.encoder  # dynamic batching formed batches
    assert c8.encoder["inferences"] >= 1.5 * c8.encoder["executions"], c8.encoder


# ---------------------------------------------------------------------------- malformed requests


def test_malformed_requests_get_clear_errors_and_others_are_served(server):
    bad = {
        "wrong dtype": (lambda: infer_json(server, "fastenc", [{"name": "text", "shape": [1, 1], "datatype": "INT32",
                                                                "data": [7]}]), "expects 'BYTES'"),
        "empty batch": (lambda: infer_json(server, "fastenc", [text_input([])]), "got 0"),  # Triton refuses it
        "non-UTF-8": (lambda: infer_raw_bytes(server, "fastenc", [b"a cat", b"\xff\xfe bad"]), "not valid UTF-8"),
        "1 MB prompt": (lambda: infer_json(server, "fastenc", [text_input(["x" * (1 << 20)])]),
                        "limited to 65536 bytes"),
    }
    results, served = {}, []

    def client():  # another client keeps encoding while the bad requests arrive
        for _ in range(4):
            served.append(good(server)["text_embeddings"]["shape"])

    thread = threading.Thread(target=client)
    thread.start()
    for name, (send, _) in bad.items():
        results[name] = send()
    thread.join(timeout=120)
    for name, (_, expected) in bad.items():
        status, body = results[name]
        assert status == 400 and expected in body.get("error", ""), (name, status, body, results)
    assert served == [[2, 120, TINY.projection_dim]] * 4
    status, body = infer_raw_bytes(server, "fastenc", ["a café".encode()])  # valid UTF-8 in binary form still works
    assert status == 200, body
    assert server.ready() and server.model_ready("fastenc_encoder")


# ---------------------------------------------------------------------------- fastenc cpu backend served


def test_fastenc_cpu_encoder_matches_python_api(server, model):
    got = good(server, "fcpu")["text_embeddings"]
    assert got["datatype"] == "FP32" and got["shape"] == [2, 120, TINY.projection_dim]
    want = fastenc.load(model["ckpt"], backend="cpu", device="cpu", cache=False).encode(
        ["a cat", "a red fox in the snow"], target=TARGET)
    err = np.abs(np.array(got["data"], dtype=np.float32).reshape(got["shape"]) - want.embeds.float().numpy()).max()
    assert err <= 1e-3, f"max abs error {err}"
