"""bench/gpu.py's logic on the CPU (no timings): the order of the run, the pre-warm that launches the
kernels exactly as the CUDA-graph runner will, the rows' host-sync and tuning notes, the choice of the
row the targets read, and scripts/gpu_check.sh's bounds."""

from __future__ import annotations

import contextlib
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from bench import gpu
from fastenc.kernels import _common, attention, gated_ffn, linear_relu, rms_norm
from fastenc.kernels.graphs import CudaGraphRunner
from fastenc.kernels.ops import TritonOps
from fastenc.model import T5Encoder
from reference import TINY

ROOT = Path(__file__).resolve().parents[1]


# ---- the order of a run --------------------------------------------------------------------------


def test_every_candidate_runs_the_target_shape_first():
    args = gpu.parse_args([])
    assert args.shapes[0] == (1, 512)
    steps = gpu.plan(args)
    assert steps[:3] == [("student", [(1, 512)]), ("t5-xxl", [(1, 512)]), ("torch-compile", [(1, 512)])]
    assert steps[3:6] == [(name, [(1, 77), (8, 77), (8, 512)]) for name in ("student", "t5-xxl", "torch-compile")]
    assert steps[-1] == ("onnxruntime-cpu", [(1, 77)])

    args = gpu.parse_args(["--shapes", "8x77,1x512,1x512", "--candidates", "fastenc,torch-compile"])
    assert gpu.plan(args) == [("student", [(1, 512)]), ("torch-compile", [(1, 512)]),
                              ("student", [(8, 77)]), ("torch-compile", [(8, 77)])]
    args = gpu.parse_args(["--shapes", "2x64,1x77", "--candidates", "t5-xxl"])  # no target shape: one pass
    assert gpu.plan(args) == [("t5-xxl", [(2, 64), (1, 77)])]
    assert gpu.target_first([(8, 512), (1, 512), (1, 77)]) == [(1, 512), (8, 512), (1, 77)]


# ---- the pre-warm: the graph runner's launches, tuned before the peak window ----------------------


def _launch_keys(run) -> list[tuple]:
    """(kernel, tuning-key values) of every kernel launch ``run`` makes, recorded instead of run."""
    kernels = [rms_norm._KERNEL, attention._KERNEL, attention._KERNEL_FP32, gated_ffn._KERNEL, linear_relu._KERNEL]
    keys = []
    with contextlib.ExitStack() as stack:
        records = [(k, stack.enter_context(k.recording())) for k in kernels]
        run()
    for kernel, calls in records:
        for args, kwargs in calls:
            values = {**dict(zip(kernel._arg_names, args)), **kwargs}
            keys.append((kernel.name, tuple(values[n] for n in kernel._key if n in values),
                         tuple(str(v.dtype) for v in values.values() if isinstance(v, torch.Tensor))))
    return sorted(keys, key=repr)


@pytest.mark.parametrize("batch,seq", [(1, 50), (3, 77), (2, 512)])
def test_the_prewarm_launches_what_the_graph_runner_launches(batch, seq):
    model = T5Encoder(TINY).eval()
    model.ops = TritonOps("cpu")
    runner = CudaGraphRunner(model)
    ids = torch.randint(2, TINY.vocab_size, (batch, seq))
    warm_ids, warm_mask = gpu.graph_inputs(runner, ids)
    bucket = runner.buckets(batch, seq)
    assert tuple(warm_ids.shape) == bucket and warm_mask is not None and warm_mask.dtype == torch.long
    assert warm_mask[:batch, :seq].all() and not warm_mask[batch:].any() and not warm_mask[:, seq:].any()
    # what CudaGraphRunner._capture launches the model with: the bucket's ids and a mask of ones
    captured = (torch.full(bucket, runner.pad_id, dtype=torch.long), torch.ones(bucket, dtype=torch.long))
    with torch.inference_mode():
        warm = _launch_keys(lambda: model(warm_ids, warm_mask))
        want = _launch_keys(lambda: model(*captured))
        unmasked = _launch_keys(lambda: model(ids))
    assert warm == want and len(warm) > 3
    has_mask = [key for name, key, _ in warm if name == attention._KERNEL.name]
    assert has_mask and all(True in key for key in has_mask)
    assert unmasked != want  # the old pre-warm (no mask, unpadded): attention would tune again in the window


def test_beyond_the_buckets_the_prewarm_is_the_call_itself():
    runner = CudaGraphRunner(T5Encoder(TINY))
    ids = torch.ones(64, 16, dtype=torch.long)  # batch over the largest bucket: the runner runs it eagerly
    warm_ids, warm_mask = gpu.graph_inputs(runner, ids)
    assert warm_ids is ids and warm_mask is None
    assert gpu.graph_inputs(None, ids) == (ids, None)


def test_a_tuning_inside_the_window_is_named_in_the_rows(monkeypatch):
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**29)
    monkeypatch.setattr(gpu, "time_events", lambda fn, warmup, reps: (fn(), (1.0, 2.0, 3.0))[1])
    args = gpu.parse_args(["--reps", "7"])
    quiet = gpu.measure("fastenc", lambda: None, "base", 10, 1, 512, args, note="n", syncs=lambda fn: 0)
    assert [r.metric for r in quiet] == ["latency", "peak_memory"] and quiet[1].p50 == 0.5
    assert quiet[0].note == "n; 0 host syncs/call" and quiet[0].n == 7

    def tunes():
        monkeypatch.setattr(_common, "_TUNED", [_common.tunings() + 2])

    rows = gpu.measure("fastenc", tunes, "base", 10, 1, 512, args, syncs=lambda fn: 3)
    assert "3 host syncs/call" in rows[0].note and "2 kernel key(s) tuned inside the window" in rows[1].note
    assert gpu.host_syncs_of(rows[0]) == 3 and gpu.host_syncs_of(quiet[0]) == 0


# ---- host syncs: the row the targets read carries none the baselines do not ---------------------


def _rows(candidate, ms, peak, syncs):
    return gpu.window_rows(candidate, "base", 10, 1, 512, 5, (ms, ms, ms), peak, candidate, syncs, 0)


def test_a_sync_free_user_call_is_the_target_row():
    user, graphs = _rows("fastenc", 0.30, 0.35, 0), _rows("fastenc-graphs", 0.28, 0.30, 0)
    rows = gpu.sync_free_target(user, graphs, baseline_syncs=0)
    assert [(r.candidate, r.metric) for r in rows] == [("fastenc", "latency"), ("fastenc", "peak_memory"),
                                                        ("fastenc-graphs", "latency"),
                                                        ("fastenc-graphs", "peak_memory")]
    assert gpu._find(rows, "fastenc", 1, 512).p50 == 0.30


def test_a_user_call_with_host_syncs_is_not_the_target_row():
    user, graphs = _rows("fastenc", 0.50, 0.38, 3), _rows("fastenc-graphs", 0.28, 0.30, 0)
    rows = gpu.sync_free_target(user, graphs, baseline_syncs=0)
    fast, call = gpu._find(rows, "fastenc", 1, 512), gpu._find(rows, "fastenc-call", 1, 512)
    assert fast.p50 == 0.28 and gpu.host_syncs_of(fast) == 0  # the replay, without the checks that sync
    assert call.p50 == 0.50 and gpu.host_syncs_of(call) == 3
    assert gpu._find(rows, "fastenc", 1, 512, "peak_memory").p50 == 0.38  # the capture window's peak is kept
    assert not gpu._find(rows, "fastenc-graphs", 1, 512)
    assert gpu.sync_free_target(user, graphs, baseline_syncs=3)[0].candidate == "fastenc"  # as many as they make

    xxl = _rows("t5-xxl", 20.0, 9.6, 0)
    lines = gpu.summary(rows + xxl)
    assert "PASS latency <= 0.35 ms: 0.280 ms" in lines
    assert any(line.startswith("host syncs per call: fastenc 0, baselines 0 (the user call makes 3: its row is "
                               "fastenc-call, 0.500 ms)") for line in lines)


def test_count_host_syncs_counts_the_warnings_and_restores_the_mode(monkeypatch):
    modes = [0]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))

    def two_syncs():
        for _ in range(2):  # the same line twice: both counted
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("something else", UserWarning)

    assert gpu.count_host_syncs(two_syncs) == 2 and modes == [0, "warn", 0]
    with pytest.raises(ZeroDivisionError):
        gpu.count_host_syncs(lambda: 1 / 0)
    assert modes[-1] == 0


# ---- scripts/gpu_check.sh ------------------------------------------------------------------------


def test_the_gpu_check_script_is_bounded_and_lets_pytest_report():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    total = int(re.search(r"GPU_CHECK_SECONDS:-(\d+)", text)[1])
    assert total <= 8 * 60
    pytest_line = next(line for line in text.splitlines() if "-m pytest" in line)
    assert "timeout -s INT" in pytest_line  # SIGINT: pytest writes its summary and junit XML, then exits
    assert "--junitxml" in pytest_line and "FASTENC_AUTOTUNE=0" in pytest_line
    assert "tests/test_tuning_cache.py" in text
    assert re.search(r"carry=\[\"\.whl\"\]", text)  # the device run names the git-excluded wheels
    assert "--compile-budget 240" in text  # max-autotune needs 70-100 s per shape
