"""bench.umt5: Wan's umT5-XXL text stage against a base-size umT5 student (a tiny grid here; the full
size only where the machine holds it, which the benchmark checks before building anything)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from bench import common, latency, umt5


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_BENCH_CACHE", str(tmp_path / "bench-cache"))
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "fastenc-cache"))


def test_tiny_run_times_teacher_and_student_and_scales_the_teacher_to_full_depth(tmp_path, capsys, monkeypatch):
    results = tmp_path / "committed-results"
    monkeypatch.setattr(common, "RESULTS_DIR", results)  # without --save nothing may land there
    rc = umt5.main(["--tiny", "--quick", "--teacher-layers", "3", "--backends", "torch", "--seq", "16", "--reps", "2",
                    "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and not results.exists()
    (out_csv,) = (tmp_path / "bench-cache" / "runs").glob("umt5-*/umt5.csv")
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    teacher, student = umt5.TINY[0].replace(num_layers=3, name="tiny-umt5-xxl-3of4L"), umt5.TINY[1]
    for cfg in (teacher, student):
        got = {r["metric"] for r in rows if r["model"] == cfg.name and r["backend"] == "torch" and r["seq"] == "16"}
        assert got == {"latency", "memory", "weights"}, (cfg.name, got)
        assert {int(r["params"]) for r in rows if r["model"] == cfg.name} == {common.param_count(cfg)}
    assert all(r["weights"] == "random" for r in rows)
    assert "tiny-umt5-xxl at all 4 layers, scaled from 3 measured" in text and "RANDOM weights" in text
    measured = float(next(r["p50"] for r in rows if r["model"] == teacher.name and r["metric"] == "latency"))
    scaled = next(cols for cols in map(str.split, text.splitlines()) if cols[:2] == ["tiny-umt5-xxl", "torch"])
    assert float(scaled[4]) == pytest.approx(measured * 4 / 3, rel=0.01, abs=0.051)  # printed to 0.1 ms


def test_a_teacher_the_machine_cannot_hold_is_refused_before_anything_is_built(monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("nothing may be built")

    monkeypatch.setattr(latency, "run_grid", never)
    monkeypatch.setattr(umt5, "available_bytes", lambda device: 16 * 10**9)
    assert umt5.main([]) == 1
    err = capsys.readouterr().err
    fit = umt5.layers_that_fit(umt5.UMT5_XXL, 16 * 10**9, 4)
    assert err.startswith("bench.umt5: umT5-XXL needs ~22.7 GB for its fp32 weights (5.68 B parameters)")
    assert "16.0 GB available, so it cannot hold it" in err and f"--teacher-layers {fit} " in err
    per_layer = [common.param_count(umt5.teacher_config(umt5.UMT5_XXL, n)) * 4 * umt5.HEADROOM for n in (fit, fit + 1)]
    assert per_layer[0] <= 16e9 < per_layer[1] and err.count("\n") == 1
    # the suggested layer count then passes the check; a machine without room for one layer gets no suggestion
    assert umt5.memory_verdict(umt5.UMT5_XXL, fit, umt5.UMT5_BASE, 16 * 10**9, 4) is None
    monkeypatch.setattr(umt5, "available_bytes", lambda device: 10**9)
    assert umt5.main(["--teacher-layers", "1"]) == 1
    assert "no --teacher-layers helps here" in capsys.readouterr().err


def test_shapes_are_wans_umt5_xxl_and_transformers_runs_the_same_weights():
    """param_count matches transformers' UMT5EncoderModel of Wan's config (5.7 B, built on the meta device),
    and the transformers backend's UMT5EncoderModel computes what fastenc's model computes."""
    import transformers

    cfg = umt5.UMT5_XXL
    with torch.device("meta"):
        hf = transformers.UMT5EncoderModel(transformers.UMT5Config(
            vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    assert common.param_count(cfg) == sum(p.numel() for p in hf.parameters()) and 5.6e9 < common.param_count(cfg) < 5.8e9
    tiny = umt5.TINY[1]
    model = common.build_model(tiny, seed=1)
    assert sum(p.numel() for p in model.parameters()) == common.param_count(tiny)
    ref = common.TransformersEncoder(model)
    ids = common.sample_ids(tiny, 2, 24)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert type(ref.encoder).__name__ == "UMT5EncoderModel"


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        umt5.main(["--tiny", "--teacher-layers", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--teacher-layers must be in 1..4, got 5" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        umt5.main(["--backends", "onnxruntime"])
    assert "unknown backend 'onnxruntime'; choose from transformers, torch, cpu" in capsys.readouterr().err


def test_default_backends_are_the_ones_the_device_runs():
    assert umt5.parse_args(["--tiny"]).backends == ["transformers", "torch", "cpu"]
    assert umt5.parse_args(["--tiny", "--device", "cuda"]).backends == ["transformers", "torch", "triton"]
    assert umt5.parse_args(["--tiny", "--device", "cuda", "--quick"]).backends == ["transformers", "torch"]


def test_the_gpu_check_times_wans_text_stage_on_the_gpu():
    text = (Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh").read_text()
    line = next(line for line in text.splitlines() if "-m bench.umt5" in line and not line.startswith("#"))
    assert "--device cuda" in line and "--backends transformers,triton" in line and line.lstrip().startswith("timeout")
