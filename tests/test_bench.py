"""The benchmarks (tiny grids, CPU) and the CPU fast path's accuracy and mechanics."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

from bench import common
from fastenc.backends import cpu as fcpu
from fastenc.errors import ConfigError

from reference import TINY



@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_BENCH_CACHE", str(tmp_path / "bench-cache"))
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "fastenc-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread avoids waiting on a descheduled OpenMP peer
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- benchmark scripts


def test_latency_quick_tiny_grid_writes_csv_table_and_plot(tmp_path, capsys, monkeypatch):
    from bench import latency

    results = tmp_path / "committed-results"
    monkeypatch.setattr(common, "RESULTS_DIR", results)  # without --save nothing may land there
    rc = latency.main(["--quick", "--tiny", "--backends", "torch,cpu,onnxruntime,tensorrt", "--batch", "1,2",
                       "--seq", "16", "--reps", "2", "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert not results.exists()
    runs = list((tmp_path / "bench-cache" / "runs").glob("latency-*/latency.csv"))
    assert len(runs) == 1, runs
    out_csv, out_png = runs[0], runs[0].with_suffix(".png")
    assert f"bench cache: {tmp_path / 'bench-cache'} holds" in text
    assert "RANDOM weights" in text
    assert "skip     tiny tensorrt" in text  # unavailable backends get a one-line reason
    assert "vs xxl: speed-up" in text
    with open(out_csv, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.CSV_COLUMNS
        rows = list(reader)
    backends = {r["backend"] for r in rows}
    assert {"torch", "onnxruntime"} <= backends
    if fcpu.fast_path_supported()[0]:
        assert "cpu" in backends
        assert "plan ready in" in text  # the cpu rows time what fastenc.load gives: the plan's engine
    for model in ("tiny", "tiny-xxl"):
        for backend in backends:
            got = {(r["metric"], r["batch"]) for r in rows if r["model"] == model and r["backend"] == backend}
            assert {("latency", "1"), ("latency", "2"), ("memory", "1"), ("weights", "1")} <= got, (model, backend)
    lat = [r for r in rows if r["metric"] == "latency"]
    assert all(0 < float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in lat)
    assert all(r["weights"] == "random" and r["git_commit"] and "torch=" in r["versions"] for r in rows)
    assert all(int(r["params"]) == common.param_count(common.TINY_SIZES[r["model"]]) for r in rows)
    # every student row has a speed-up against the teacher of its family
    table = [line.split() for line in text.splitlines() if line.startswith("tiny ")]
    assert table and all(cols[-3].endswith("x") for cols in table)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_cli_reads_the_csv(tmp_path):
    from bench import plot

    rows = []
    for model, params, lat, mem in (("s", 1e6, 2.0, 10.0), ("xxl", 4e9, 50.0, 9000.0)):
        for metric, value in (("latency", lat), ("memory", mem)):
            rows.append(common.Row(model, int(params), "torch", "bf16", 1, 77, metric, "ms",
                                   common.Stats(value * 0.9, value, value * 1.1, 5)))
    path = common.append_csv(tmp_path / "r.csv", rows, common.run_context(torch.device("cpu"), "random"))
    assert plot.main(["--csv", str(path), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert plot.main(["--csv", str(path), "--out", str(tmp_path / "q.png"), "--seq", "512"]) == 2


def test_pipeline_cpu_variant(tmp_path, capsys):
    from bench import pipeline

    rc = pipeline.main(["--device", "cpu", "--student", "tiny", "--teacher", "tiny-xxl", "--prompts", "2",
                        "--seq", "32", "--csv", str(tmp_path / "p.csv")])
    text = capsys.readouterr().out
    assert rc == 0 and "CPU-only variant" in text
    assert "t5-xxl on cpu" in text and "fastenc student (cpu)" in text
    metrics = {r["metric"] for r in common.read_csv(tmp_path / "p.csv")}
    assert metrics == {"latency", "peak_host_memory", "held_host_memory"}


def test_cpu_path_runs_each_candidate_in_its_own_process_and_writes_only_where_told(tmp_path, capsys,
                                                                                     monkeypatch):
    from bench import cpu_path

    results = tmp_path / "committed-results"
    monkeypatch.setattr(common, "RESULTS_DIR", results)
    out = tmp_path / "run" / "side.csv"
    rc = cpu_path.main(["--size", "tiny", "--shapes", "1x16,2x8", "--rounds", "1", "--warmup", "0", "--threads", "1",
                        "--candidates", "torch-fp32,cpu,torch-bf16", "--emulated-bf16", "--contention",
                        "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and not results.exists()
    rows = common.read_csv(out)
    got = {(r["backend"], r["batch"], r["seq"], r["metric"]): float(r["p50"]) for r in rows}
    for name in ("torch-fp32", "cpu", "torch-bf16"):
        for b, l_ in (("1", "16"), ("2", "8")):
            for metric in ("latency", "cpu_time", "first_call", "cos_mean", "cos_worst", "cos_mean_padded_prompts",
                           "cos_worst_padded_prompts", "latency_one_core_busy"):
                assert (name, b, l_, metric) in got, (name, b, l_, metric)
    for metric in ("cos_mean", "cos_worst_padded_prompts"):
        assert got[("torch-fp32", "1", "16", metric)] == pytest.approx(1.0, abs=1e-6)  # the reference itself
        assert got[("cpu", "1", "16", metric)] >= 0.999
    assert all("cpus;" in r["device"] and "load" in r["device"] and r["threads"] == "1" for r in rows)
    md = out.with_suffix(".md").read_text()
    assert "**fastenc cpu (" in md and "plan ready in" in md  # the default, with the plan it runs
    assert "Fidelity floor: mean cos-sim >= 0.9995 and worst token >= 0.999" in md and "ISA class: " in md
    assert "padded prompts: cos mean / worst" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 core busy" in text and "slowdown" in text
    # --save writes the machine-named files under bench/results as well
    rc = cpu_path.main(["--size", "tiny", "--shapes", "1x8", "--rounds", "1", "--warmup", "0", "--threads", "1",
                        "--candidates", "torch-fp32", "--out", str(tmp_path / "run2"), "--save"])
    assert rc == 0 and (tmp_path / "run2" / "cpu_path.csv").is_file()
    assert (results / f"cpu_path-{common.machine_slug()}.csv").is_file()


def _probe_builder(name, options, threads):
    import os

    if name == "broken":
        raise ValueError("no such runtime\nsecond line")
    info = torch.tensor([float(os.getpid()), float(torch.get_num_threads()), float(os.environ["OMP_NUM_THREADS"]),
                         float(os.environ.get("OMP_WAIT_POLICY") == "PASSIVE")])
    return (lambda ids: info), "probe", ""


def test_worker_processes_are_isolated_and_report_errors_in_one_line():
    import os

    from bench import workers

    policy = os.environ.get("OMP_WAIT_POLICY")
    pool = [workers.start(f"probe{i}", _probe_builder, {}, threads=1, env={"OMP_WAIT_POLICY": "PASSIVE"} if i else None)
            for i in range(2)]
    try:
        infos = [w.request("first", torch.zeros(1, 2, dtype=torch.long).numpy())["out"] for w in pool]
        pids = {int(i[0]) for i in infos}
        assert len(pids) == 2 and os.getpid() not in pids  # one process per candidate
        assert all(int(i[1]) == 1 and int(i[2]) == 1 for i in infos)  # threads set for torch and OpenMP
        assert [int(i[3]) for i in infos] == [0, 1]  # extra environment per worker
        assert os.environ.get("OMP_WAIT_POLICY") == policy  # ... and the parent's left as it was
        samples = pool[0].request("time", torch.zeros(1, 2, dtype=torch.long).numpy(), 3)
        assert len(samples) == 3 and all(wall >= 0 and cpu >= 0 for wall, cpu in samples)
    finally:
        for w in pool:
            w.stop()
    assert all(not w.process.is_alive() for w in pool)
    with pytest.raises(workers.WorkerError, match=r"^ValueError: no such runtime \(test_bench.py:\d+\)$"):
        workers.start("broken", _probe_builder, {}, threads=1)


# ----------------------------------------------------------------------------- models used by the benchmarks


def test_transformers_encoder_shares_weights_and_matches():
    model = common.build_model(TINY)
    hf = common.TransformersEncoder(model)
    ids = common.sample_ids(TINY, 2, 19)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.inference_mode():
        a, b = model(ids, mask), hf(ids, mask)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b[1, :11], a[1, :11], rtol=1e-4, atol=1e-5)
    assert common.tensor_bytes(hf) == common.tensor_bytes(model)  # views, no copies


def test_t5_init_scales_queries_like_t5():
    model = common.build_model(TINY, seed=3)
    qkv = model.blocks[0].attn.qkv.weight
    inner = TINY.inner_dim
    q_std, k_std = float(qkv[:inner].detach().std()), float(qkv[inner:2 * inner].detach().std())
    assert q_std == pytest.approx(k_std * TINY.d_kv**-0.5, rel=0.2)
    assert torch.equal(common.build_model(TINY, seed=3).embed.weight, model.embed.weight)
    assert sum(p.numel() for p in model.parameters()) == common.param_count(TINY)


# ----------------------------------------------------------------------------- the CPU fast path


#: Small enough for the suite, deep enough (8 layers) for quantisation error to build up.
MID = TINY.replace(d_model=256, d_ff=704, num_layers=8, num_heads=4, d_kv=64, vocab_size=4096, num_buckets=32,
                   max_distance=128, projection_dim=1024, name="mid")


def test_cpu_fast_path_accuracy_vs_fp32():
    model = common.build_model(MID)
    ids = common.sample_ids(MID, 2, 96, seed=5)
    with torch.inference_mode():
        ref = model(ids)  # [B, L, P] fp32
    fast = fcpu.prepare(copy.deepcopy(model), source="test:mid")
    assert fast.compute_dtype == torch.bfloat16 and fast.ops.num_int8 > 0
    with torch.inference_mode():
        out = fast(ids)
    cos = F.cosine_similarity(out.float(), ref, dim=-1)  # [B, L]
    assert float(cos.mean()) >= 0.999
    assert float(cos.min()) >= 0.998
    assert fast.int8_plan.cos >= fcpu.DEFAULT_MIN_COS
    all_int8 = fcpu.prepare(copy.deepcopy(model), int8="all")  # what the plan protects against
    with torch.inference_mode():
        worst = float(F.cosine_similarity(all_int8(ids).float(), ref, dim=-1).mean())
    assert worst < float(cos.mean())


def test_plan_orders_quantisation_from_the_last_layers():
    cfg = TINY.replace(num_layers=6)
    model = common.build_model(cfg)
    fcpu.prepare(model, min_cos=0.99999)  # too strict for everything: a suffix (maybe empty) of FFN layers
    names = model.int8_plan.weights
    for kind in ("wi", "wo"):
        layers = sorted(i for i in range(6) if f"blocks.{i}.ffn.{kind}.weight" in names)
        assert layers == list(range(6 - len(layers), 6))


@pytest.mark.parametrize("shape", [(1, 1, 33), (2, 9, 64), (3, 41, 341)])
def test_int8_linear_close_to_float(shape):
    x = torch.randn(*shape)  # [..., K]
    w = torch.randn(57, shape[-1]) * shape[-1] ** -0.5  # [N, K]
    b = torch.randn(57)
    y = fcpu.int8_linear(x, fcpu.quantize_weight(w), b)
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert float((y - ref).norm() / ref.norm()) < 0.03


def test_changed_weight_falls_back_to_float_gemm():
    ops = fcpu.CpuOps()
    w = torch.randn(16, 32)
    ops.quantize(w)
    x = torch.randn(4, 32)
    assert not torch.equal(ops.linear(x, w), F.linear(x, w))  # int8 result differs slightly
    with torch.no_grad():
        w.mul_(2.0)  # in-place edit bumps the version counter
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w))
    assert ops.num_int8 == 0


def test_prepare_rejects_bad_modes():
    model = common.build_model(TINY)
    with pytest.raises(ConfigError, match="int8 must be one of"):
        fcpu.prepare(model, int8="most")
    with pytest.raises(ConfigError, match="unknown weights"):
        fcpu.prepare(common.build_model(TINY), int8=["blocks.0.attn.nope.weight"])


def test_prepare_none_is_bf16_only():
    model = fcpu.prepare(common.build_model(TINY), int8="none")
    assert model.ops.num_int8 == 0 and model.compute_dtype == torch.bfloat16
    assert model.int8_plan.weights == ()
