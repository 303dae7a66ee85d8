"""The cpu backend's planner: it picks the fastest candidate that meets the fidelity floor (never one
below it), its cache keys follow CPU, threads, versions and checkpoint, every candidate kind it can
choose keeps the floor on outlier-heavy weights and unseen inputs, and the OpenVINO engine matches
the reference and steps aside when the weights change.

Timings here are fake or irrelevant: speed lives in ``python -m bench.cpu_path``. These run on any
x86 CPU (bf16 is emulated where not native; the tiny shapes keep that cheap).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import fastenc
from bench import common
from fastenc.backends import cpu as fcpu
from fastenc.backends import cpu_plan as plan_mod
from fastenc.backends import cpu_openvino
from fastenc.backends.cpu_openvino import OpenVinoEngine
from fastenc.backends.cpu_plan import Candidate, CpuPlan, Measured
from fastenc.caches import human
from fastenc.errors import ConfigError

from reference import TINY
from test_cpu_backend import OUTLIER_CFG, outlier_model

SHAPES = ((1, 48), (1, 20))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "fastenc-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def m(c: Candidate, ms: float, passes: bool = True) -> Measured:
    return Measured(c, {"1x512": ms}, 0.9999 if passes else 0.99, 0.9998 if passes else 0.98, passes)


OV = Candidate("openvino")
EAGER = Candidate("eager", "sdpa")
EAGER_INT8 = Candidate("eager", "sdpa", int8=True)
OV_INT8 = Candidate("openvino", int8=True, precision="fp32")


def test_choose_takes_the_fastest_that_meets_the_floor_and_never_one_below():
    assert plan_mod.choose([m(OV, 90), m(EAGER, 100), m(EAGER_INT8, 70, passes=False)]).candidate == OV
    assert plan_mod.choose([m(OV, 120), m(EAGER, 100)]).candidate == EAGER
    assert plan_mod.choose([m(EAGER_INT8, 10, passes=False)]) is None
    assert plan_mod.choose([Measured(OV, note="failed: no compiler")]) is None  # never timed: never chosen


def fake_times(speed: dict[str, float]):
    """A stand-in for time_round_robin: ms by candidate name (default 100), scaled by the length."""
    def run(runners, shapes, cfg, rounds=plan_mod.ROUNDS, **kwargs):
        for c, r in runners.items():  # still call each once, as the real one does
            r(torch.randint(2, cfg.vocab_size, shapes[0]))
        return {c: {f"{b}x{s}": speed.get(c.name, 100.0) * s / 512 for b, s in shapes} for c in runners}
    return run


@pytest.mark.parametrize("fastest", ["openvino bf16", "eager bf16, matmul attention, erf GELU",
                                     "eager bf16, sdpa attention"])
def test_tune_installs_the_fastest_candidate_that_passes(monkeypatch, fastest):
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({fastest: 10.0}))
    model = common.build_model(TINY, seed=3)
    ref_model = copy.deepcopy(model)
    plan, engine = plan_mod.tune(model, shapes=SHAPES)
    assert plan.chosen.name == fastest
    assert (engine is not None) == (plan.chosen.engine == "openvino")
    names = {mm.candidate.name for mm in plan.measured}
    assert {"openvino bf16", "eager bf16, sdpa attention", "eager bf16, matmul attention, erf GELU"} <= names
    if plan.chosen.engine == "eager":  # the chosen op table is the one installed
        assert model.ops.attention_kind == plan.chosen.attention and model.ops.gelu_kind == plan.chosen.gelu
    assert model.embed.weight.dtype == torch.bfloat16 and model.cpu_plan == plan
    ids = torch.randint(2, TINY.vocab_size, (1, 33))
    with torch.inference_mode():
        out = engine(ids) if engine is not None else model(ids)
        cos = F.cosine_similarity(out.float(), ref_model(ids), dim=-1)
    assert float(cos.mean()) >= plan_mod.MIN_COS and float(cos.min()) >= plan_mod.MIN_WORST


def test_tune_never_picks_a_candidate_below_the_floor(monkeypatch):
    """The fastest candidate fails the floor (its fidelity is made bad): the next one is chosen."""
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({"openvino bf16": 1.0, "eager bf16, sdpa attention":
                                                                  50.0}))
    real = plan_mod.fidelity
    calls = []

    def fidelity(outs, refs, inputs):
        calls.append(1)
        return (0.9, 0.5) if len(calls) == 1 else real(outs, refs, inputs)  # the first scored is openvino

    monkeypatch.setattr(plan_mod, "fidelity", fidelity)
    plan, engine = plan_mod.tune(common.build_model(TINY, seed=3), shapes=SHAPES)
    ov = next(mm for mm in plan.measured if mm.candidate == OV)
    assert not ov.passes and ov.cos == 0.9
    assert plan.chosen.name == "eager bf16, sdpa attention" and engine is None
    assert "below the floor" in plan.table().splitlines()[-2] or "below the floor" in plan.table()


def test_tune_skips_what_is_past_the_budget_and_what_fails_to_build(monkeypatch):
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({}))

    def broken(*a, **k):
        raise RuntimeError("no C compiler\nmore")

    monkeypatch.setattr(plan_mod.cpu_openvino if hasattr(plan_mod, "cpu_openvino") else
                        __import__("fastenc.backends.cpu_openvino", fromlist=["x"]), "OpenVinoEngine", broken)
    plan, engine = plan_mod.tune(common.build_model(TINY, seed=3), shapes=SHAPES, budget_s=0.0)
    ov = next(mm for mm in plan.measured if mm.candidate == OV)
    assert ov.note == "failed: RuntimeError: no C compiler" and not ov.ms
    skipped = [mm for mm in plan.measured if mm.note.startswith("skipped")]
    assert skipped and all(not mm.ms for mm in skipped)
    assert engine is None and plan.chosen.engine == "eager"


def test_plan_round_trips_and_a_cached_plan_costs_no_search(monkeypatch):
    precision = plan_mod.default_precision()  # what prepare_planned plans in on this CPU
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({f"eager {precision}, matmul attention": 5.0}))
    a = plan_mod.prepare_planned(common.build_model(TINY, seed=3), source="test:tiny", shapes=SHAPES)
    assert CpuPlan.from_json(a.cpu_plan.to_json()) == a.cpu_plan

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(plan_mod, "tune", no_search)
    b = plan_mod.prepare_planned(common.build_model(TINY, seed=3), source="test:tiny", shapes=SHAPES)
    assert b.cpu_plan == a.cpu_plan and b.ops.attention_kind == "matmul" and b.cpu_engine is None
    key = plan_mod.plan_key("test:tiny", TINY, SHAPES, plan_mod.MIN_COS, plan_mod.MIN_WORST, precision)
    path = fcpu.plan_cache_dir() / f"{key}.json"
    for broken in ("not json", json.dumps({"version": plan_mod.PLAN_VERSION - 1}),
                   a.cpu_plan.to_json().replace('"matmul"', '"flash"')):
        path.write_text(broken)
        assert plan_mod.read_plan(key) is None  # unreadable, stale or unknown: searched again, never trusted


def test_cache_key_changes_with_cpu_threads_versions_checkpoint_and_shapes(monkeypatch):
    key = lambda source="a", shapes=SHAPES: plan_mod.plan_key(source, TINY, shapes, 0.9995, 0.999)  # noqa: E731
    base = key()
    assert key() == base
    assert key("b") != base and key(shapes=((1, 512),)) != base
    assert plan_mod.plan_key("a", TINY.replace(num_layers=3), SHAPES, 0.9995, 0.999) != base
    monkeypatch.setattr(plan_mod.fcpu, "cpu_model", lambda: "Other CPU")
    assert key() != base
    monkeypatch.undo()
    flags = set(plan_mod.cpu_flags())
    monkeypatch.setattr(plan_mod, "cpu_flags", lambda: flags ^ {"amx_bf16"})  # another ISA class than this one
    assert key() != base
    monkeypatch.undo()
    monkeypatch.setattr(plan_mod, "library_versions", lambda: "torch 9.9; openvino 9.9")
    assert key() != base
    monkeypatch.undo()
    torch.set_num_threads(2)
    try:
        assert key() != base
    finally:
        torch.set_num_threads(1)


def test_the_engines_the_search_may_use_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(plan_mod.ENGINES_ENV, raising=False)
    assert plan_mod.allowed_engines() == plan_mod.ENGINES
    everything = plan_mod.plan_key("a", TINY, SHAPES, 0.9995, 0.999)
    monkeypatch.setenv(plan_mod.ENGINES_ENV, " eager , openvino,eager")
    assert plan_mod.allowed_engines() == ("eager", "openvino")
    assert plan_mod.plan_key("a", TINY, SHAPES, 0.9995, 0.999) != everything  # a plan searched without one
    model = common.build_model(TINY, seed=3)
    plan, _ = plan_mod.tune(model, shapes=SHAPES, rounds=1, precision="fp32")
    assert {m.candidate.engine for m in plan.measured} == {"eager", "openvino"}
    monkeypatch.setenv(plan_mod.ENGINES_ENV, "eager,tensorrt")
    with pytest.raises(ConfigError) as err:
        plan_mod.allowed_engines()
    assert str(err.value) == ("$FASTENC_CPU_ENGINES='eager,tensorrt': 'tensorrt' is not one of eager, openvino, "
                              "onnxruntime (a comma-separated subset)")
    monkeypatch.setenv(plan_mod.ENGINES_ENV, " , ")
    with pytest.raises(ConfigError, match="no engine is not one of"):
        plan_mod.allowed_engines()


@pytest.mark.parametrize("candidate", [OV, EAGER, Candidate("eager", "matmul", gelu="erf"), EAGER_INT8,
                                       Candidate("eager", "sdpa", int8=True, gelu="erf"),
                                       Candidate("onnxruntime", precision="fp32"),
                                       Candidate("onnxruntime", int8=True, precision="fp32"), OV_INT8,
                                       Candidate("openvino", int8=True, precision="bf16")],
                         ids=lambda c: c.name)
def test_every_candidate_kind_that_passes_keeps_the_floor_on_outliers_and_unseen_inputs(candidate, monkeypatch):
    """Outlier-heavy weights (trained T5 v1.1 has residual channels tens of times larger): whatever the
    search marks as passing also meets the floor on inputs neither it nor the int8 calibration saw.
    The op table's int8 candidates are offered here whatever the CPU (same numbers; only slower where
    torch's int8 GEMM is not native); the ONNX Runtime int8 one is the fp32 plan's (CPUs without bf16), OpenVINO's
    is both plans', offered here also without VNNI (where it decompresses the int8 weights instead)."""
    monkeypatch.setattr(fcpu, "native_int8_mm", lambda: True)
    monkeypatch.setattr(cpu_openvino, "dynamic_int8", lambda: True)
    monkeypatch.delenv(plan_mod.ENGINES_ENV, raising=False)  # every engine (conftest leaves ONNX Runtime out)
    model = outlier_model()
    ref_model = copy.deepcopy(model)
    plan, engine = plan_mod.tune(model, shapes=((1, 40),), rounds=1, precision=candidate.precision)
    weights = ()
    if candidate.int8:  # the set the search measured, whichever candidate won (the plan keeps it only if int8)
        searched = copy.deepcopy(ref_model)
        fcpu.prepare(searched, int8="auto", attention="sdpa", dtype=candidate.dtype, act_group=cpu_openvino.DQ_GROUP)
        ov = candidate.engine == "openvino"  # OpenVINO's set: planned for its activations per group of channels
        weights = searched.int8_plan.grouped if ov else searched.int8_plan.weights
    got = next((mm for mm in plan.measured if mm.candidate == candidate), None)
    if got is None:  # an int8 candidate is offered only with a set: where bf16 alone sits at the floor, none is
        assert candidate.int8 and not weights and plan.chosen != candidate, candidate.name
        return
    if not got.passes:  # below the floor on these weights: never chosen, so nothing else to hold
        assert plan.chosen != candidate, f"{candidate.name} chosen below the floor ({got.cos:.5f} / {got.worst:.5f})"
        return
    assert not candidate.int8 or (weights and (plan.chosen != candidate or weights == plan.int8_weights))
    forced = CpuPlan(candidate, weights, plan.measured, plan.shapes)
    plan_mod._install(model, forced)
    eng = plan_mod._plan_engine(model, forced, None) if candidate.engine != "eager" else None
    gen = torch.Generator().manual_seed(4242)
    ids = torch.randint(2, OUTLIER_CFG.vocab_size, (3, 57), generator=gen)
    with torch.inference_mode():
        out = eng(ids) if eng is not None else model(ids)
        cos = F.cosine_similarity(out.float(), ref_model(ids), dim=-1)
    assert float(cos.mean()) >= plan_mod.MIN_COS and float(cos.min()) >= plan_mod.MIN_WORST, candidate.name


def test_openvino_engine_matches_the_reference_with_and_without_mask():
    model = common.build_model(TINY, seed=5)
    engine = OpenVinoEngine(model, precision="f32")
    ids = torch.randint(2, TINY.vocab_size, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.inference_mode():
        torch.testing.assert_close(engine(ids), model(ids), rtol=1e-4, atol=1e-4)
        got, want = engine(ids, mask), model(ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
    assert engine.label.startswith("OpenVINO ") and engine.label.endswith("fp32")


def test_an_encoder_whose_weights_change_leaves_the_openvino_engine(monkeypatch):
    """A cached plan that runs OpenVINO: after an in-place edit the op-table path runs the new weights."""
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({"openvino bf16": 1.0}))
    model = common.build_model(TINY, seed=6)
    path = fcpu.plan_cache_dir().parent / "ckpt"
    fastenc.save(model, path)
    enc = fastenc.load(path, backend="cpu", dtype="bf16", cache=False)
    assert enc.model.cpu_plan.chosen == OV and enc.model.cpu_engine is not None
    assert fastenc.info.describe_backend(enc).startswith("fastenc cpu (OpenVINO")
    ids = torch.randint(2, TINY.vocab_size, (1, 16))
    with torch.inference_mode():
        before = enc(ids)
        enc.model.projector.fc2.weight.mul_(2.0)
        after = enc(ids)
    assert enc.model.cpu_engine is None
    torch.testing.assert_close(after.float(), 2 * before.float() - enc.model.projector.fc2.bias.float()
                               if enc.model.projector.fc2.bias is not None else 2 * before.float(),
                               rtol=0.05, atol=0.05)


def test_fastenc_tune_prints_the_table_and_info_probe_shows_the_plan(monkeypatch, capsys, tmp_path):
    from fastenc import cli

    precision = plan_mod.default_precision()  # bf16 where native, else fp32: tune plans what load would run
    fastest = f"eager {precision}, sdpa attention"
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({fastest: 3.0}))
    model = common.build_model(TINY, seed=8)
    fastenc.save(model, tmp_path / "ckpt")
    assert cli.main(["tune", "--checkpoint", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert f"* {fastest}" in out and "floor: mean cos >= 0.9995 and worst token >= 0.999" in out
    assert cli.main(["tune", "--checkpoint", str(tmp_path / "ckpt")]) == 0
    assert "cached plan" in capsys.readouterr().out
    enc = fastenc.load(tmp_path / "ckpt", cache=False)  # the default load finds the plan tune cached
    assert enc.backend == "cpu" and enc.model.cpu_plan.chosen.name == fastest
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", "--checkpoint", str(tmp_path / "ckpt"), "--budget", "nan"])
    assert exit_.value.code == 2
    assert "argument --budget: expected a positive finite number, got nan" in capsys.readouterr().err
    assert cli.main(["tune", "--checkpoint", str(tmp_path / "ckpt"), "--dtype", "fp16"]) == 2
    assert "--dtype fp16: tune plans the cpu backend's own precision" in capsys.readouterr().err
    assert cli.main(["info", "--probe"]) == 0
    out = capsys.readouterr().out
    assert "cpu plans" in out and fastest in out


def test_a_cpu_without_native_bf16_gets_an_fp32_plan_never_emulated_bf16(monkeypatch, tmp_path):
    import fastenc.backends as backends

    monkeypatch.setattr(backends, "cpu_fast_path", lambda: (False, "forced: no AVX512-BF16 or AMX"))
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({"openvino fp32": 1.0}))
    model = common.build_model(TINY, seed=9)
    fastenc.save(model, tmp_path / "ckpt")
    enc = fastenc.load(tmp_path / "ckpt", cache=False)
    plan = enc.model.cpu_plan
    assert (enc.backend, enc.dtype) == ("cpu", torch.float32)
    assert {mm.candidate.precision for mm in plan.measured} == {"fp32"} and plan.chosen.name == "openvino fp32"
    assert enc.model.cpu_engine.precision == "f32" and enc.model.embed.weight.dtype == torch.float32
    assert fastenc.info.describe_backend(enc).endswith("fp32)")
    ids = torch.randint(2, TINY.vocab_size, (2, 13))
    with torch.inference_mode():
        torch.testing.assert_close(enc(ids), model(ids), rtol=1e-4, atol=1e-4)
    # fp32 asked for explicitly is the torch reference, as before
    assert fastenc.load(tmp_path / "ckpt", dtype="fp32", cache=False).backend == "torch"
    # backend="cpu" named explicitly plans in the CPU's own precision too; bf16 only when dtype asks for it
    named = fastenc.load(tmp_path / "ckpt", backend="cpu", cache=False)
    assert (named.backend, named.dtype, named.model.cpu_plan.chosen.precision) == ("cpu", torch.float32, "fp32")
    asked = fastenc.load(tmp_path / "ckpt", backend="cpu", dtype="bf16", cache=False)
    assert (asked.dtype, asked.model.cpu_plan.chosen.precision) == (torch.bfloat16, "bf16")
    with pytest.raises(ConfigError) as err:
        fastenc.load(tmp_path / "ckpt", backend="cpu", dtype="fp16", cache=False)
    assert str(err.value) == ("backend 'cpu' computes in bf16 or fp32 (with int8 GEMMs), not torch.float16; pass "
                              "dtype='bf16' or 'fp32' or leave it out, or use backend='torch'")


@pytest.mark.parametrize("given, code, want", [
    (None, "import fastenc", "PASSIVE"),  # set for the user: torch's OpenMP reads it when it loads
    ("ACTIVE", "import fastenc", "ACTIVE"),  # the user's own value is kept
    (None, "import torch, fastenc", "unset"),  # too late once torch is loaded: left alone
])
def test_importing_fastenc_first_keeps_openmp_threads_from_spinning(given, code, want):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", f"{code}; import os; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == want


def test_a_cached_openvino_plan_reads_its_graph_instead_of_converting(monkeypatch, caplog):
    """The first load saves the converted graph (ids + mask: one compiled model serves calls with and without
    a mask) beside the plan; later loads read it (no tracing), check it against the model, and a damaged or
    foreign graph is converted again and rewritten, never served; an earlier version's ids-only graph goes."""
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({"openvino bf16": 1.0, "openvino fp32": 1.0}))
    path = fcpu.plan_cache_dir().parent / "ckpt"
    fastenc.save(common.build_model(TINY, seed=7), path)
    first = fastenc.load(path, backend="cpu", dtype="bf16", cache=False)
    engine = first.model.cpu_engine
    assert engine is not None and engine.from_cache is False  # the search converted it
    xml, bin_ = cpu_openvino.graph_files(engine.graph_cache)
    assert xml.is_file() and bin_.is_file() and not list(xml.parent.glob(".*.tmp.*"))
    assert sorted(p.name for p in xml.parent.iterdir() if p.suffix in (".xml", ".bin")) == sorted([xml.name, bin_.name])
    ids = torch.randint(2, TINY.vocab_size, (2, 23))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with torch.inference_mode():
        want, want_masked = first(ids), first(ids, attention_mask=mask)
    with torch.inference_mode():  # no mask: all ones through the same graph
        full = first(ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(full, want, rtol=0, atol=0)
    listed = [v for k, v in fastenc.info.collect(probe=True).items() if k.startswith("cpu plan ")]
    assert len(listed) == 1 and "OpenVINO graph cached" in listed[0]
    legacy = [xml.with_name(xml.name.replace(".mask.", ".ids.")), bin_.with_name(bin_.name.replace(".mask.", ".ids."))]
    for p in legacy:  # what an earlier version kept beside it
        p.write_bytes(b"old")

    def converted():
        raise AssertionError("converted again")

    with monkeypatch.context() as patch, caplog.at_level("INFO", logger="fastenc"):
        patch.setattr(cpu_openvino.OpenVinoEngine, "_convert", lambda self: converted())
        caplog.clear()
        second = fastenc.load(path, backend="cpu", dtype="bf16", cache=False)
        assert second.model.cpu_engine.from_cache is True
        with torch.inference_mode():
            torch.testing.assert_close(second(ids), want, rtol=0, atol=0)
            torch.testing.assert_close(second(ids, attention_mask=mask)[mask.bool()], want_masked[mask.bool()],
                                       rtol=0, atol=0)
    # the log names what runs, not the op table's empty int8 set (that table only stands by)
    assert "runs openvino bf16; the op table (attention sdpa, float GEMMs) stands by" in caplog.text
    assert "int8: attention 0/" not in caplog.text
    assert not any(p.exists() for p in legacy)

    other = fcpu.plan_cache_dir().parent / "other"  # another checkpoint's graph put in this one's place
    fastenc.save(common.build_model(TINY, seed=8), other)
    foreign = fastenc.load(other, backend="cpu", dtype="bf16", cache=False).model.cpu_engine
    foreign_xml, foreign_bin = cpu_openvino.graph_files(foreign.graph_cache)
    bin_.write_bytes(foreign_bin.read_bytes())
    caplog.clear()
    third = fastenc.load(path, backend="cpu", dtype="bf16", cache=False)
    assert third.model.cpu_engine.from_cache is False
    assert "disagrees with the model; converting again" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(third(ids), want, rtol=0, atol=0)
    xml.write_text("<net")  # unreadable: converted again, with one warning naming the file
    caplog.clear()
    fourth = fastenc.load(path, backend="cpu", dtype="bf16", cache=False)
    assert fourth.model.cpu_engine.from_cache is False
    assert f"the cached OpenVINO graph {xml} is unreadable" in caplog.text
    assert cpu_openvino.graph_files(engine.graph_cache)[0].read_text().startswith("<?xml")


def test_a_plan_that_does_not_run_openvino_keeps_no_graph_and_cache_clear_deletes_them(monkeypatch):
    from fastenc import caches

    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({"eager bf16, matmul attention": 1.0,
                                                                  "eager fp32, matmul attention": 1.0}))
    path = fcpu.plan_cache_dir().parent / "ckpt"
    fastenc.save(common.build_model(TINY, seed=9), path)
    fastenc.load(path, backend="cpu", dtype="bf16", cache=False)
    folder = fcpu.plan_cache_dir()
    assert not list(folder.glob("*.xml")) and not list(folder.glob("*.bin"))
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({"openvino bf16": 1.0, "openvino fp32": 1.0}))
    plan_mod.prepare_planned(common.build_model(TINY, seed=9), source="test:graphs", shapes=SHAPES)
    graphs = sorted(p.name for p in folder.iterdir() if p.suffix in (".xml", ".bin"))
    assert len(graphs) == 2 and all(caches.GRAPH_NAME.fullmatch(n) for n in graphs)
    (folder / "notes.xml").write_text("the user's")
    (cache,) = [c for c in caches.cache_dirs() if c.name == "cpu-plans"]
    assert {p.name for p in cache.owned()} >= set(graphs)
    caches.clear(["cpu-plans"])
    assert sorted(p.name for p in folder.iterdir()) == ["notes.xml"]


def test_openvino_is_skipped_before_anything_is_converted_when_memory_is_short(monkeypatch, caplog):
    """Converting holds about 3.5x the fp32 weights and reading a cached graph about 2x: with less memory
    available the search skips OpenVINO (said in its table) and a cached OpenVINO plan runs the op table."""
    model = common.build_model(TINY, seed=11)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    def converted(self):
        raise AssertionError("converted although memory is short")

    with monkeypatch.context() as patch:
        patch.setattr(cpu_openvino, "available_memory", lambda: int(3.0 * fp32))
        patch.setattr(cpu_openvino.OpenVinoEngine, "_convert", converted)
        patch.setattr(plan_mod, "time_round_robin", fake_times({}))
        plan, engine = plan_mod.tune(model, shapes=SHAPES)
    ov = next(mm for mm in plan.measured if mm.candidate == OV)
    assert ov.note == (f"skipped: OpenVINO needs about {human(3.5 * fp32)} to convert and compile the model; "
                       f"{human(int(3.0 * fp32))} is available") and not ov.ms
    assert engine is None and plan.chosen.engine == "eager"
    assert "skipped: OpenVINO needs about" in plan.table()

    # a plan that runs OpenVINO, with its graph cached, then memory runs short
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({"openvino bf16": 1.0, "openvino fp32": 1.0}))
    plan_mod.prepare_planned(common.build_model(TINY, seed=11), source="test:memory", shapes=SHAPES)
    monkeypatch.setattr(cpu_openvino, "available_memory", lambda: int(1.5 * fp32))
    caplog.clear()
    again = plan_mod.prepare_planned(common.build_model(TINY, seed=11), source="test:memory", shapes=SHAPES)
    assert again.cpu_engine is None and again.cpu_plan.chosen.engine == "openvino"
    assert (f"the cpu plan runs OpenVINO, which failed here (BackendUnavailable: OpenVINO needs about "
            f"{human(2.0 * fp32)} to compile the cached graph") in caplog.text
    ids = torch.randint(2, TINY.vocab_size, (1, 9))
    with torch.inference_mode():
        assert torch.isfinite(again(ids).float()).all()  # the op table serves


def _ir_ops(xml) -> list:
    import openvino as ov

    return ov.Core().read_model(str(xml)).get_ordered_ops()


def test_openvino_int8_engine_stores_the_planned_weights_as_int8_and_smooths_their_inputs(tmp_path):
    """The planned weights become int8 constants with their per-channel scales (fastenc's own values), a
    smoothed weight's activations get their factors, and the output keeps the floor to the fp32 model."""
    import openvino as ov

    model = outlier_model()
    names = [n for n in fcpu.linear_weight_names(model) if ".attn." in n or n.startswith("projector.")]
    quantized = fcpu.quantized_weights(cpu_openvino.float_copy(model), names)
    smoothed = sum(q.inv_smooth is not None for q in quantized.values())
    assert 0 < smoothed < len(names)  # the outlier model's residual channels: some inputs are smoothed
    engine = OpenVinoEngine(model, precision="f32", int8_weights=names, graph_cache=tmp_path / "int8")
    plain = OpenVinoEngine(model, precision="f32", graph_cache=tmp_path / "float")
    assert engine.label.endswith(f"fp32 + int8 ({len(names)} GEMMs, activations per {cpu_openvino.DQ_GROUP} "
                                 "channels)")
    int8_ops = _ir_ops(cpu_openvino.graph_files(tmp_path / "int8", cpu_openvino.INT8_GRAPH_NAME)[0])
    float_ops = _ir_ops(cpu_openvino.graph_files(tmp_path / "float")[0])
    weights = [o for o in int8_ops if o.get_type_name() == "Constant" and o.get_output_element_type(0) == ov.Type.i8]
    assert len(weights) == len(names)
    assert sorted(list(w.get_output_shape(0)) for w in weights) == sorted(list(q.shape) for q in quantized.values())
    muls = [sum(o.get_type_name() == "Multiply" for o in ops) for ops in (int8_ops, float_ops)]
    assert muls[0] - muls[1] == len(names) + smoothed  # a scale per weight, a smoothing factor per smoothed one
    assert not cpu_openvino.graph_files(tmp_path / "int8")[0].exists()  # its own name: beside a float graph
    ids = torch.randint(2, OUTLIER_CFG.vocab_size, (2, 37), generator=torch.Generator().manual_seed(21))
    with torch.inference_mode():
        cos = F.cosine_similarity(engine(ids).float(), model(ids), dim=-1)
        torch.testing.assert_close(plain(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert float(cos.mean()) >= plan_mod.MIN_COS and float(cos.min()) >= plan_mod.MIN_WORST

    # under bf16 inference: the float weights stored rounded to bf16, the int8 values and their scales as they are
    bf16 = OpenVinoEngine(model, precision="bf16", int8_weights=names, graph_cache=tmp_path / "bf16")
    assert bf16.label.endswith(f"bf16 + int8 ({len(names)} GEMMs, activations per {cpu_openvino.DQ_GROUP} channels)")
    bf16_ops = _ir_ops(cpu_openvino.graph_files(tmp_path / "bf16", cpu_openvino.INT8_GRAPH_NAME)[0])
    consts = [o for o in bf16_ops if o.get_type_name() == "Constant"]
    assert sum(o.get_output_element_type(0) == ov.Type.i8 for o in consts) == len(names)
    scales = []  # each int8 constant -> Convert -> Multiply by its scale constant
    for w in (o for o in consts if o.get_output_element_type(0) == ov.Type.i8):
        (convert,) = [t.get_node() for t in w.output(0).get_target_inputs()]
        (mul,) = [t.get_node() for t in convert.output(0).get_target_inputs()]
        scale = mul.input_value(1).get_node()
        scales.append((scale.get_type_name(), scale.get_output_element_type(0).get_type_name(),
                       list(scale.get_output_shape(0))))
    assert sorted(scales) == sorted(("Constant", "f32", [q.shape[0], 1]) for q in quantized.values())  # not rounded
    float_left = [o for o in int8_ops if o.get_type_name() == "Constant" and o.get_output_element_type(0) == ov.Type.f32
                  and len(o.get_output_shape(0)) == 2 and 1 not in o.get_output_shape(0)
                  and o.get_output_shape(0)[0] * o.get_output_shape(0)[1] >= 4096]
    assert sum(o.get_output_element_type(0) == ov.Type.bf16 for o in consts) == len(float_left) > 0
    with torch.inference_mode():
        cos = F.cosine_similarity(bf16(ids).float(), model(ids), dim=-1)
    assert float(cos.mean()) >= plan_mod.MIN_COS and float(cos.min()) >= plan_mod.MIN_WORST


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_an_int8_graph_from_the_float_engines_trace_computes_what_its_own_trace_does(precision):
    """The int8 engine built on the float engine's traced graph (traced before the model was cast to bf16, as the
    search does) computes exactly what one traced from the cast model computes, where bf16 inference rounds the
    fp32 weights as the cast did (CPUs with native bf16; elsewhere OpenVINO computes in fp32 and only the cast
    model's rounding tells the two apart); the float engine's kept graph is its own, untouched by the
    compression."""
    from fastenc.backends import cpu_fast_path

    model = outlier_model()
    names = [n for n in fcpu.linear_weight_names(model) if ".attn." in n or n.startswith("projector.")]
    plain = OpenVinoEngine(model, precision=precision, keep_converted=True)
    if precision == "bf16":
        model.to(torch.bfloat16)
    from_base = OpenVinoEngine(model, precision=precision, int8_weights=names, base=plain)
    traced = OpenVinoEngine(model, precision=precision, int8_weights=names)
    assert from_base.converted is None and plain.converted is not None
    assert not any(o.get_output_element_type(0).get_type_name() == "i8" for o in plain.converted.get_ordered_ops())
    ids = torch.randint(2, OUTLIER_CFG.vocab_size, (2, 37), generator=torch.Generator().manual_seed(22))
    with torch.inference_mode():
        got, want = from_base(ids), traced(ids)
    if precision == "f32" or cpu_fast_path()[0]:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert float(F.cosine_similarity(got.float(), want.float(), dim=-1).min()) >= 0.999


def test_compress_weights_refuses_a_planned_weight_the_graph_does_not_hold():
    model = common.build_model(TINY, seed=5)
    engine = OpenVinoEngine(model, precision="f32")
    graph = engine._convert()
    params = dict(cpu_openvino.float_copy(model).named_parameters())
    name = "blocks.0.attn.o.weight"
    other = {name: params[name].detach() + 1.0}  # values the graph does not hold
    with pytest.raises(fastenc.BackendUnavailable) as err:
        cpu_openvino.compress_weights(graph, other, {name: fcpu.quantize_weight(other[name])})
    assert str(err.value) == f"the converted OpenVINO graph has no MatMul for {name}"


@pytest.mark.parametrize("vnni, precision, offered", [(True, "fp32", True), (False, "fp32", False),
                                                      (True, "bf16", True), (False, "bf16", False)])
def test_openvino_int8_is_offered_on_vnni_cpus_and_a_cached_plan_reads_its_graph(
        monkeypatch, vnni, precision, offered):
    """OpenVINO quantises activations on VNNI CPUs (AMX ones have it), under fp32 and bf16 inference alike:
    there the planned set is offered through it, its graph the float candidate's traced graph compressed (one
    trace for both); chosen, its int8 graph is the one kept, and a cached plan reads it."""
    ov_int8 = Candidate("openvino", int8=True, precision=precision)
    monkeypatch.setattr(cpu_openvino, "dynamic_int8", lambda: vnni)
    monkeypatch.setattr(plan_mod, "time_round_robin", fake_times({ov_int8.name: 1.0}))
    traces = []
    real_trace = cpu_openvino.OpenVinoEngine._trace
    monkeypatch.setattr(cpu_openvino.OpenVinoEngine, "_trace", lambda self, m: traces.append(self) or real_trace(self, m))
    model = common.build_model(TINY, seed=12)
    planned = plan_mod.prepare_planned(model, source="test:ov-int8", shapes=SHAPES, precision=precision)
    plan, engine = planned.cpu_plan, planned.cpu_engine
    names = {mm.candidate for mm in plan.measured}
    assert (ov_int8 in names) == offered and len(traces) == 1
    assert traces[0].converted is None  # the traced graph is not kept once the search is done with it
    folder = fcpu.plan_cache_dir()
    graphs = sorted(p.name for p in folder.iterdir() if p.suffix in (".xml", ".bin"))
    if not offered:
        assert plan.chosen != ov_int8
        return
    assert plan.chosen == ov_int8 and plan.int8_weights and engine.int8_weights == plan.int8_weights
    assert len(graphs) == 2 and all(".int8." in g for g in graphs)  # the float graph it beat is gone
    ids = torch.randint(2, TINY.vocab_size, (2, 17))
    with torch.inference_mode():
        want = planned(ids)

    def converted():
        raise AssertionError("converted again")

    monkeypatch.setattr(cpu_openvino.OpenVinoEngine, "_convert", lambda self: converted())
    again = plan_mod.prepare_planned(common.build_model(TINY, seed=12), source="test:ov-int8", shapes=SHAPES,
                                     precision=precision)
    assert again.cpu_engine.from_cache and again.cpu_engine.int8_weights == plan.int8_weights
    with torch.inference_mode():
        torch.testing.assert_close(again(ids), want, rtol=0, atol=0)
    listed = [v for k, v in fastenc.info.collect(probe=True).items() if k.startswith("cpu plan ")]
    assert len(listed) == 1 and listed[0].startswith(ov_int8.name) and "OpenVINO graph cached" in listed[0]


def test_round_robin_times_every_candidate_in_each_pass_after_an_untimed_call_per_engine_block():
    """Passes, not blocks of rounds: a change of machine load during the search hits every candidate alike;
    each engine's block starts with an untimed call (the other runtime's threads winding down), and the
    first pass warms every candidate."""
    a, b, c = EAGER, Candidate("eager", "matmul"), OV
    cost = {a: 1.0, b: 2.0, c: 3.0}
    now, calls = [0.0], []

    def runner(cand):
        def run(ids):
            calls.append(cand)
            now[0] += cost[cand] / 1e3
        return run

    times = plan_mod.time_round_robin({x: runner(x) for x in (a, b, c)}, ((1, 8),), TINY, rounds=3,
                                      clock=lambda: now[0], slack=10.0)  # no candidate is out of the race
    assert {x: pytest.approx(t["1x8"]) for x, t in times.items()} == cost
    first = [a, b, a, b, c, c]
    later = [a, a, b, c, c]
    assert calls == first + later + later


def test_round_robin_stops_timing_a_candidate_that_cannot_win_at_that_shape():
    """After each pass, a candidate below the floor, or one whose fastest call is over ``slack`` times the fastest
    contender's median, is not timed again at that shape; the next shape starts with every candidate."""
    a, b, below, c = EAGER, Candidate("eager", "matmul"), EAGER_INT8, OV
    cost = {(a, 8): 1.0, (b, 8): 1.4, (below, 8): 0.5, (c, 8): 2.0,  # at 8 tokens: b within 1.5x, OV not
            (a, 16): 2.0, (b, 16): 4.0, (below, 16): 1.0, (c, 16): 2.5}  # at 16: OV within, b not
    now, calls = [0.0], []

    def runner(cand):
        def run(ids):
            calls.append((cand, ids.shape[1]))
            now[0] += cost[(cand, ids.shape[1])] / 1e3
        return run

    counts: dict = {}
    times = plan_mod.time_round_robin({x: runner(x) for x in (a, b, below, c)}, ((1, 8), (1, 16)), TINY, rounds=3,
                                      clock=lambda: now[0], contenders={a, b, c}, slack=1.5, counts=counts)
    assert {x: {k: pytest.approx(v) for k, v in t.items()} for x, t in times.items()} == {
        x: {"1x8": cost[(x, 8)], "1x16": cost[(x, 16)]} for x in (a, b, below, c)}
    assert counts == {a: {"1x8": 3, "1x16": 3}, b: {"1x8": 3, "1x16": 1}, below: {"1x8": 1, "1x16": 1},
                      c: {"1x8": 1, "1x16": 3}}
    at8 = [x for x, n in calls if n == 8]
    at16 = [x for x, n in calls if n == 16]
    first = [a, b, below, a, b, below, c, c]  # every candidate warmed, then timed
    assert at8 == first + [a, a, b] * 2  # the eager block's untimed call, then a and b; OpenVINO is out
    assert at16 == first + [a, a, c, c] * 2


def test_the_plan_table_says_which_candidates_left_the_timing_early(monkeypatch):
    """The search's own timing, on a clock where OpenVINO costs 3x the op table: OpenVINO is timed once per shape
    and its row says so; the candidates that stay are timed in every pass."""
    real = plan_mod.time_round_robin

    def clocked(runners, shapes, cfg, rounds=plan_mod.ROUNDS, **kwargs):
        now = [0.0]

        def costed(c, run):
            def call(ids):
                run(ids)
                now[0] += (3.0 if c.engine == "openvino" else 1.0) * ids.shape[1] / 1e3
            return call

        kwargs["clock"] = lambda: now[0]
        return real({c: costed(c, r) for c, r in runners.items()}, shapes, cfg, rounds, **kwargs)

    monkeypatch.setattr(plan_mod, "time_round_robin", clocked)
    model = common.build_model(TINY, seed=3)
    plan, _ = plan_mod.tune(model, shapes=SHAPES, rounds=3, engines=("eager", "openvino"))
    notes = {m.candidate: m.note for m in plan.measured}
    keys = [plan_mod._shape_key(s) for s in SHAPES]
    assert notes[OV] == f"passes timed: {', '.join(f'{k} 1 of 3' for k in keys)} (over 1.5x the fastest)"
    assert all(note == "" for c, note in notes.items() if c.engine == "eager")
    assert f"({notes[OV]})" in plan.table() and plan.chosen.engine == "eager"
