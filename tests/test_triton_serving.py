"""Serving under load, and faults, on a real tritonserver (loopback, bounded in requests and time):

* the fastenc ensemble driven by perf_analyzer batches and fails no request;
* malformed requests get clear errors while other clients are served;
* the fastenc-cpu encoder (fastenc's own cpu backend in the python backend) serves embeddings equal to
  the Python API's;
* an encoder model whose file is missing or corrupt fails to load with a readable log line and a reason
  in the repository index; the server does not hang, and with --exit-on-error (the default) exits;
* killing the server mid-load and starting it again loses no request silently: every request of
  export/triton/client.py ends in embeddings or an explicit error, and its retries (backoff, bounded
  deadline) carry the requests over the restart.

Small scale for CI: a tiny model, the pixart-alpha target (120 tokens), ~2 s per concurrency level, loopback.
Batching is asserted from the server's own counters (executions vs inferences of the encoder model),
not from timings, so a busy machine cannot flip it. perf_analyzer and the server come from the venv of
scripts/triton_env.sh.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import fastenc
from bench.serving import (PROMPTS, Server, free_ports, level_row, perf_analyzer_path, plot, run_level, start_server,
                           table, write_csv, write_input_data)
from fastenc.exporters import ExportRequest, export
from fastenc.exporters.triton_repo import TritonRepoRequest, write_triton_repo
from helpers import make_t5_tokenizer_json
from reference import TINY, Reference, write_distillt5
from test_triton_server import CLIENT, SETUP_HINT, VENV, triton_venv_problem

TARGET = "pixart-alpha"
PY = VENV / "bin" / "python"


@pytest.fixture(scope="module")
def venv():
    problem = triton_venv_problem()
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
    if not perf_analyzer_path(VENV).is_file():
        pytest.skip(f"no perf_analyzer in {VENV}: {SETUP_HINT}")
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

    # what bench.serving writes from these levels: the CSV round-trips, the plot is a PNG, the table has both rows
    setup = {"timestamp": "t", "encoder": "python", "model": "tiny", "target": TARGET, "instances": 1,
             "max_queue_delay_us": 5000, "preferred_batch_sizes": "", "max_batch_size": 8, "threads": 1,
             "loadavg_1min": "0", "machine": "m", "git_commit": "c", "command": "python -m bench.serving ..."}
    rows = [level_row(level, setup) for level in (c1, c8)]
    back = list(csv.DictReader(open(write_csv(tmp_path / "s.csv", rows), newline="")))
    assert [r["concurrency"] for r in back] == ["1", "8"] and back[1]["seq"] == "120"
    assert float(back[1]["mean_batch"]) == pytest.approx(c8.mean_batch, abs=0.01) and back[0]["batch_sizes"].startswith("1x")
    assert plot(rows, tmp_path / "s.png", "t").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(table(rows).splitlines()) == 4


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
    # the server's environment plans the cpu backend on its own (its runtimes may differ from this one's),
    # so it is held to the plan's fidelity floor against the fp32 reference, not to one engine's rounding
    want = fastenc.load(model["ckpt"], backend="torch", dtype="fp32", device="cpu", cache=False).encode(
        ["a cat", "a red fox in the snow"], target=TARGET)
    served = torch.from_numpy(np.array(got["data"], dtype=np.float32).reshape(got["shape"]))
    cos = torch.nn.functional.cosine_similarity(served, want.embeds.float(), dim=-1)  # [B, L]
    assert float(cos.mean()) >= 0.9995 and float(cos.min()) >= 0.999, (float(cos.mean()), float(cos.min()))


# ---------------------------------------------------------------------------- faults


def wait_for(predicate, timeout: float, what: str, server: Server) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s:\n{server.log_tail()}")
        time.sleep(0.25)


def repository_index(server: Server) -> dict[str, dict]:
    req = urllib.request.Request(f"http://{server.http}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {m["name"]: m for m in json.loads(resp.read())}


def broken_repo(model, folder, names=("missing", "corrupt", "cpubad")):
    """Encoder models only (their tokenizers and ensembles removed, to start fewer stubs): `missing` lost its
    ONNX file, `corrupt` has garbage in it, `cpubad` (fastenc-cpu) has truncated weights."""
    for name in names:
        backend = "fastenc-cpu" if name == "cpubad" else "python"
        write_triton_repo(TritonRepoRequest(model["export"], folder, encoder_backend=backend, name=name))
        shutil.rmtree(folder / name)
        shutil.rmtree(folder / f"{name}_tokenizer")
    version = {n: folder / f"{n}_encoder" / "1" for n in names}
    if "missing" in names:
        (version["missing"] / "encoder.fp32.onnx").unlink()
    if "corrupt" in names:
        corrupt = version["corrupt"] / "encoder.fp32.onnx"
        corrupt.unlink()  # files are hard links to the export's: replace, never write through
        corrupt.write_bytes(b"\x08\x07 not a protobuf" * 64)
    if "cpubad" in names:
        weights = version["cpubad"] / "checkpoint" / "model.safetensors"
        data = weights.read_bytes()
        weights.unlink()
        weights.write_bytes(data[: len(data) // 2])
    return folder


def test_encoder_that_cannot_load_fails_readably(venv, model, tmp_path):
    repo = broken_repo(model, tmp_path / "repo")
    server = start_server(repo, tmp_path / "server", venv=venv, wait_ready=False,
                          extra=["--exit-on-error=false", "--strict-readiness=false"])
    try:
        wait_for(server.ready, 180, "server ready (strict readiness off)", server)
        index = repository_index(server)
        reasons = {n: index[f"{n}_encoder"] for n in ("missing", "corrupt", "cpubad")}
        assert all(r["state"] == "UNAVAILABLE" for r in reasons.values()), reasons
        assert "encoder.fp32.onnx is missing" in reasons["missing"]["reason"], reasons
        assert "cannot load" in reasons["corrupt"]["reason"] and "encoder.fp32.onnx" in reasons["corrupt"]["reason"]
        assert "cannot load" in reasons["cpubad"]["reason"] and "model.safetensors" in reasons["cpubad"]["reason"]
        log = server.log_tail(200_000)
        for name in ("missing", "corrupt", "cpubad"):
            assert f"failed to load '{name}_encoder'" in log
        assert "fastenc encoder: model file" in log and "fastenc encoder: cannot load" in log
        assert not server.model_ready("missing_encoder")
    finally:
        server.stop()

    repo = broken_repo(model, tmp_path / "repo2", names=("missing",))
    server = start_server(repo, tmp_path / "server2", venv=venv, wait_ready=False)  # default: exit on error
    try:
        server.proc.wait(timeout=180)
        assert server.proc.returncode != 0
        assert "fastenc encoder: model file" in server.log_tail(200_000)
    finally:
        server.stop()


#: Runs in the Triton venv: THREADS clients send REQUESTS requests each through client.encode (retries on),
#: print one JSON line per finished request (ok or the error) and a marker line once the first ones are done.
LOAD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import client
url, threads, requests, deadline = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
lock = threading.Lock()
def emit(record):
    with lock:
        print(json.dumps(record), flush=True)
def worker(t):
    for i in range(requests):
        retries = []
        start = time.monotonic()
        try:
            out = client.encode(url, "fastenc", [f"prompt {t} {i}"], timeout=20, deadline=deadline,
                                on_retry=lambda attempt, exc: retries.append(attempt))
            emit({"id": [t, i], "ok": list(out["text_embeddings"].shape), "retries": len(retries),
                  "s": round(time.monotonic() - start, 2)})
        except client.ClientError as exc:
            emit({"id": [t, i], "error": str(exc), "retries": len(retries)})
        time.sleep(0.05)
ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print("done", flush=True)
"""


def test_kill_and_restart_mid_load_loses_no_request(venv, model, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(TritonRepoRequest(model["export"], repo, encoder_backend="python"))
    ports = free_ports(3)
    threads, requests = 4, 12
    server = start_server(repo, tmp_path / "server", venv=venv, ports=ports)
    load = None
    try:
        load = subprocess.Popen([str(PY), "-c", LOAD, str(CLIENT.parent), server.http, str(threads), str(requests),
                                 "90"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        lines = []
        while len(lines) < threads:  # some requests done: the load is under way
            line = load.stdout.readline()
            assert line, f"load client ended early: {load.stderr.read()[-3000:]}"
            lines.append(line)
        server.stop(signal.SIGKILL)  # mid-load: requests in flight lose their connection
        server = start_server(repo, tmp_path / "server", venv=venv, ports=ports)
        out, err = load.communicate(timeout=240)
        assert load.returncode == 0, err[-3000:]
    finally:
        if load is not None and load.poll() is None:
            os.killpg(load.pid, signal.SIGKILL)
            load.wait(timeout=10)
        server.stop()
    records = [json.loads(line) for line in lines + out.splitlines() if line.startswith("{")]
    ids = sorted(tuple(r["id"]) for r in records)
    assert ids == [(t, i) for t in range(threads) for i in range(requests)], "a request ended without an answer"
    errors = [r for r in records if "error" in r]
    assert not errors, errors  # the retries carried every request over the restart
    assert all(r["ok"] == [1, 120, TINY.projection_dim] for r in records)
    assert sum(r["retries"] for r in records) >= 1  # the restart was seen, and retried


def test_client_deadline_is_bounded_and_reported(venv, tmp_path):
    """Nothing listens: the client retries with backoff, then gives up at its deadline with one error line."""
    (port,) = free_ports(1)
    start = time.monotonic()
    run = subprocess.run([str(PY), str(CLIENT), "--url", f"127.0.0.1:{port}", "--deadline", "3", "--timeout", "1",
                          "-o", str(tmp_path / "out.npz"), "a cat"], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    assert run.returncode == 1 and not (tmp_path / "out.npz").exists()
    assert run.stderr.startswith("client.py: error: not served within the 3 s deadline"), run.stderr
    attempts = int(run.stderr.split("(")[1].split(" attempts")[0])
    assert attempts >= 3 and took < 30, (run.stderr, took)  # retried with backoff, and stopped
