"""Hostile training input: ``python -m train`` checks every value before any work, reports each failure
as one line naming the file (or flag) and key, exits 2 for bad input and 1 for a failed write, and
never shows a traceback unless asked (``-v``). Damaged checkpoints fall back to the newest readable
one, another run's checkpoint is refused, a torn metrics line is dropped, and a second trainer in a
live trainer's output folder is refused."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_train_support import fresh_accelerate_state, world  # noqa: F401 (fixtures)
from train.__main__ import main as train_main

#: The embedding baseline: one optimizer step per batch, no DiT forward (its width comes from config.json).
EMBEDDING = {"loss": "embedding", "max_steps": 6, "save_every": 2, "keep_checkpoints": 3}


def write_config(path: Path, raw: dict) -> str:
    path.write_text(json.dumps(raw))
    return str(path)


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def config_file(world, tmp_path: Path, **sections) -> tuple[str, Path]:
    out = tmp_path / "out"
    raw = world.config(out, run=dict(EMBEDDING))
    _deep_update(raw, sections)
    return write_config(tmp_path / "train.json", raw), out


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.rstrip("\n")


def fresh_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------- values, before any work


@pytest.mark.parametrize("sections, flags, message", [
    ({"optim": {"betas": [1.5, 0.999]}}, [], "{cfg}: optim.betas[0]=1.5: must be a finite number in [0, 1)"),
    ({"optim": {"eps": -1}}, [], "{cfg}: optim.eps=-1.0: must be a finite number > 0"),
    ({"optim": {"weight_decay": -0.5}}, [], "{cfg}: optim.weight_decay=-0.5: must be a finite number >= 0"),
    ({"optim": {"warmup_steps": -5}}, [], "{cfg}: optim.warmup_steps=-5: must be an integer in 0..1000000000000"),
    ({"run": {"seed": -1}}, [], "{cfg}: run.seed=-1: must be an integer in 0..4294967295"),
    ({"run": {"seed": 2**32}}, [], "{cfg}: run.seed=4294967296: must be an integer in 0..4294967295"),
    ({"data": {"components": {"quality": {"weight": float("nan")}}}}, [],
     "{cfg}: data.components.quality.weight = nan is not a finite number"),
    ({"data": {"components": {"text": {"weight": float("inf")}}}}, [],
     "{cfg}: data.components.text.weight = inf is not a finite number"),
    ({"data": {"components": {"text": {"repeats": 10**9}}}}, [],
     "{cfg}: data.components.text.repeats=1000000000: must be an integer in 1..1000000"),
    ({}, ["--lr", "inf"], "--lr: optim.lr = inf is not a finite number"),
    ({}, ["--set", "optim.max_grad_norm=NaN"], "--set: optim.max_grad_norm = nan is not a finite number"),
    ({}, ["--seed", "-1"], "--seed: run.seed=-1: must be an integer in 0..4294967295"),
    ({"run": {"collapse_threshold": 2}}, [], "{cfg}: run.collapse_threshold=2.0: must be a finite number in [-1, 1]"),
])
def test_bad_values_are_one_line_before_any_work(world, tmp_path, capsys, sections, flags, message):
    cfg, out = config_file(world, tmp_path, **sections)
    assert train_main(["--config", cfg, *flags]) == 2
    assert one_line(capsys) == "train: error: " + message.format(cfg=cfg)
    assert not out.exists()  # nothing was started


def test_the_boundary_holds_in_a_fresh_process(tmp_path):
    """``python -m train`` itself: one line on stderr, status 2, no traceback."""
    run = subprocess.run([sys.executable, "-m", "train", "--lr", "inf"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert (run.returncode, run.stderr) == (2, "train: error: --lr: optim.lr = inf is not a finite number\n")


def test_a_loss_that_turns_non_finite_stops_the_run(world, tmp_path, capsys):
    cfg, out = config_file(world, tmp_path)
    assert train_main(["--config", cfg, "--lr", "1e30"]) == 2  # finite, but AdamW's steps blow up
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"train: error: step \d+: the loss is nan; training stopped without saving this state "
                        r"\(the last checkpoint is kept\)\. Lower optim.lr \(it was [0-9.e+]+\) or check the data "
                        r"and dtypes", err), err
    assert not (out / "student").exists() and not (out / ".train.lock").exists()


def test_an_epoch_too_large_to_hold_is_refused(tmp_path):
    from fastenc.errors import ConfigError
    from train.config import TrainConfig
    from train.data import PromptStream, load_components

    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(100)))
    cfg = TrainConfig.from_dict({"data": {"components": {"x": {"paths": [str(tmp_path / "p.txt")],
                                                              "repeats": 10**6}}}}).data
    with pytest.raises(ConfigError) as info:
        PromptStream(cfg, load_components(cfg), seed=0)
    assert str(info.value) == ("data.components.x: 100 prompts x repeats 1000000 = 100000000 samples per epoch; "
                               "at most 67108864 (lower data.components.x.repeats)")


@pytest.mark.parametrize("suffix, text, fmt", [
    (".json", "[" * 100_000, "JSON"),
    (".toml", "a = " + "[" * 100_000, "TOML"),
    (".yaml", "[" * 100_000, "YAML"),
])
def test_deeply_nested_config_names_its_format(tmp_path, capsys, suffix, text, fmt):
    path = tmp_path / f"train{suffix}"
    path.write_text(text)
    assert train_main(["--config", str(path)]) == 2
    assert one_line(capsys) == f"train: error: {path}: not valid {fmt} (too deeply nested)"


def test_deeply_nested_prompt_file(world, tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    cfg, _ = config_file(world, tmp_path, data={"components": {"deep": {"paths": [str(deep)]}}})
    assert train_main(["--config", cfg]) == 2
    assert one_line(capsys) == f"train: error: {deep}: not valid JSON (too deeply nested)"


# ---------------------------------------------------------------------------- the output folder


def test_output_folder_that_cannot_be_written(world, tmp_path, capsys):
    cfg, _ = config_file(world, tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert train_main(["--config", cfg, "--output-dir", str(afile)]) == 2
    assert one_line(capsys) == f"train: error: --output-dir: run.output_dir {afile}: exists and is not a folder"
    assert train_main(["--config", cfg, "--set", f"run.output_dir={afile / 'run'}"]) == 2
    assert one_line(capsys) == f"train: error: --set: run.output_dir {afile / 'run'}: {afile} is a file, not a folder"
    # /proc takes no new files, even for root: the probe write fails, not a permission-bit guess
    assert train_main(["--config", cfg, "--output-dir", "/proc/fastenc-train/run"]) == 2
    assert one_line(capsys).startswith("train: error: --output-dir: run.output_dir /proc/fastenc-train/run: cannot "
                                       "write in /proc (")


def test_a_write_that_fails_mid_run_exits_1(world, tmp_path, capsys, monkeypatch):
    from train import checkpoint

    def full(folder, name, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / f"{name}.json"))

    monkeypatch.setattr(checkpoint, "save_tree", full)
    cfg, out = config_file(world, tmp_path)
    assert train_main(["--config", cfg, "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    tmp = out / "checkpoints" / ".step-00000001.tmp"
    assert err.splitlines()[-1] == f"train: error: {tmp / 'optimizer.json'}: No space left on device"


def test_unexpected_errors_are_one_line_and_v_shows_the_traceback(world, tmp_path, capsys, monkeypatch):
    import train.loop

    def bug(cfg):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(train.loop, "train", bug)
    cfg, _ = config_file(world, tmp_path)
    assert train_main(["--config", cfg]) == 1
    assert one_line(capsys) == "train: internal error: ZeroDivisionError: boom (run with -v for the traceback)"
    with pytest.raises(ZeroDivisionError):
        train_main(["--config", cfg, "-v"])


# ---------------------------------------------------------------------------- resume

_STOPPED: dict[str, Path] = {}


@pytest.fixture
def stopped(world, tmp_path_factory, tmp_path) -> Path:
    """A copy of a run stopped at step 4 of 6, with checkpoints at steps 2 and 4."""
    if "run" not in _STOPPED:
        out = tmp_path_factory.mktemp("stopped") / "run"
        cfg = write_config(out.parent / "train.json", world.config(out, run=dict(EMBEDDING)))
        assert train_main(["--config", cfg, "--stop-after-steps", "4"]) == 0
        fresh_state()
        _STOPPED["run"] = out
    copy = Path(shutil.copytree(_STOPPED["run"], tmp_path / "run"))
    assert [p.name for p in sorted((copy / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    return copy


def resume(world, out: Path, *flags: str) -> int:
    cfg = write_config(out.parent / "resume.json", world.config(out, run=dict(EMBEDDING)))
    return train_main(["--config", cfg, *flags])


def _truncate(file: Path) -> str:
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: size // 2])
    return f"{file}: truncated ({size // 2} bytes; its header describes {size})"


def _garbage(file: Path) -> str:
    file.write_text("garbage{")
    return f"{file}: unreadable (JSONDecodeError: Expecting value: line 1 column 1 (char 0))"


@pytest.mark.parametrize("name, damage", [
    ("student/model.safetensors", _truncate), ("optimizer.safetensors", _truncate),
    ("rng-0.safetensors", _truncate), ("trainer.json", _garbage), ("trainer_state.json", _garbage),
])
def test_a_damaged_newest_checkpoint_falls_back(world, stopped, caplog, name, damage):
    newest, older = stopped / "checkpoints" / "step-00000004", stopped / "checkpoints" / "step-00000002"
    reason = damage(newest / name)
    with caplog.at_level(logging.INFO, logger="fastenc.train"):
        assert resume(world, stopped, "--resume", "auto") == 0
    assert f"resume=auto: skipping {newest}: {reason}" in caplog.messages
    assert f"resumed from {older}" in caplog.messages
    assert (stopped / "checkpoints" / "step-00000004.damaged" / name).is_file()  # set aside, not rotated in
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (stopped / "student" / "model.safetensors").is_file()


def test_a_named_damaged_checkpoint_is_one_line(world, stopped, capsys):
    newest = stopped / "checkpoints" / "step-00000004"
    reason = _truncate(newest / "rng-0.safetensors")
    assert resume(world, stopped, "--resume", str(newest)) == 2
    assert one_line(capsys) == f"train: error: {reason}"


def test_another_runs_checkpoint_is_refused(world, stopped, capsys):
    newest = stopped / "checkpoints" / "step-00000004"
    weights = newest / "student" / "model.safetensors"
    state = load_file(str(weights))
    rows = state["embed.weight"].shape[0]
    state["embed.weight"] = torch.zeros(rows, 8)  # a student of another width wrote it
    save_file(state, str(weights))
    assert resume(world, stopped, "--resume", str(newest)) == 2
    assert one_line(capsys) == (
        f"train: error: {newest}: written by another run (student/model.safetensors: 'embed.weight' has shape "
        f"[{rows}, 8], this run's student [{rows}, 16]); resume it with the config that wrote it, or train "
        "without --resume / in another output folder")


def test_a_torn_metrics_line_is_dropped(world, stopped, caplog):
    metrics = stopped / "metrics.jsonl"
    n = len(metrics.read_text().splitlines()) + 1
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "st')  # killed mid-write
    with caplog.at_level(logging.INFO, logger="fastenc.train"):
        assert resume(world, stopped, "--resume", "auto", "--max-steps", "5") == 0
    assert (f"{metrics}: dropped line {n}, which is not a JSON record (the torn last line of an interrupted run)"
            in caplog.messages)
    fresh_state()  # and the next resume reads the file it left
    assert resume(world, stopped, "--resume", "auto") == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- one trainer per folder


def test_a_second_trainer_in_a_live_folder_is_refused(world, tmp_path, capsys):
    cfg, out = config_file(world, tmp_path)
    out.mkdir()
    lock = out / ".train.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"f = open({str(lock)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); f.write(f'{{os.getpid()}}\\n'); f.flush()\n"
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train_main(["--config", cfg]) == 2
        assert one_line(capsys) == (f"train: error: {out}: in use by another trainer (pid {holder.pid}; lock file "
                                    f"{lock}); wait for it to finish, stop it, or choose another run.output_dir")
        assert not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_trainers_lock_is_taken_over(world, tmp_path, caplog):
    cfg, out = config_file(world, tmp_path)
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / ".train.lock").write_text(f"{pid}\n")
    with caplog.at_level(logging.INFO, logger="fastenc.train"):
        assert train_main(["--config", cfg, "--max-steps", "1"]) == 0
    assert f"{out / '.train.lock'}: lock left by pid {pid}, which is no longer running; taken over" in caplog.messages
    assert not (out / ".train.lock").exists()  # released when the run ended


# ---------------------------------------------------------------------------- property-based

PROPERTY_KEYS = ["optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.warmup_steps",
                 "optim.max_grad_norm", "optim.ema_decay", "optim.schedule", "run.seed", "run.max_steps",
                 "run.collapse_threshold", "data.batch_size", "data.components.x.weight", "data.components.x.repeats",
                 "dit.guidance", "dit.num_inference_steps"]


def _values():
    from hypothesis import strategies as st

    numbers = (st.integers(-2**70, 2**70) | st.integers(-3, 70) | st.floats(allow_nan=True, allow_infinity=True)
               | st.sampled_from([0, 1, 0.5, 0.999, 1e-8, -0.0, 2**32, 10**9]))
    return (numbers | st.none() | st.booleans() | st.text(max_size=4) | st.lists(numbers, max_size=3)
            | st.dictionaries(st.text(max_size=3), numbers, max_size=2))


def _plausible():
    """Values a config could hold, edges included (half the draws: the other half are hostile)."""
    from hypothesis import strategies as st

    def unit(lo, hi):
        return st.floats(lo, hi, allow_nan=False)

    return {
        "optim.lr": unit(1e-12, 10.0), "optim.betas": st.lists(unit(0.0, 0.9999), min_size=2, max_size=2),
        "optim.eps": unit(1e-12, 1.0), "optim.weight_decay": unit(0.0, 10.0), "optim.warmup_steps": st.integers(0, 99),
        "optim.max_grad_norm": unit(0.0, 10.0), "optim.ema_decay": unit(1e-3, 0.999) | st.none(),
        "optim.schedule": st.sampled_from(["linear", "constant"]), "run.seed": st.integers(0, 2**32 - 1),
        "run.max_steps": st.integers(1, 10**12), "run.collapse_threshold": unit(-1.0, 1.0),
        "data.batch_size": st.integers(1, 64), "data.components.x.weight": unit(0.0, 1e300),
        "data.components.x.repeats": st.integers(1, 10**6),
        "dit.guidance": st.lists(unit(0.0, 100.0), min_size=1, max_size=3),
        "dit.num_inference_steps": st.integers(1, 1000),
    }


def test_random_values_end_in_a_run_or_one_named_error(tmp_path):
    """Whatever the values, validation either refuses them in one ConfigError naming the file, or what it
    accepts builds and steps torch's AdamW, seeds every RNG and draws batches without an error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fastenc.errors import ConfigError
    from train.config import TrainConfig
    from train.data import PromptStream, load_components
    from train.loop import lr_factor

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na fox\n")
    source = str(tmp_path / "train.json")

    plausible = _plausible()
    pairs = st.sampled_from(PROPERTY_KEYS).flatmap(lambda k: st.tuples(st.just(k), plausible[k] | _values()))

    @settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(changes=st.lists(pairs, min_size=1, max_size=3).map(dict))
    def check(changes):
        raw = {"student": {"init": "/m"}, "dit": {"path": "/d"},
               "data": {"components": {"x": {"paths": [str(prompts)]}}}}
        for key, value in changes.items():
            *sections, name = key.split(".")
            node = raw
            for part in sections:
                node = node.setdefault(part, {})
            node[name] = value
        try:
            cfg = TrainConfig.from_dict(raw, source=source).validate(source)
        except ConfigError as exc:
            assert str(exc).startswith(f"{source}: ") and "\n" not in str(exc), exc
            return
        o = cfg.optim
        param = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([param], lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        param.sum().backward()
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([param], o.max_grad_norm)
        opt.step()
        from accelerate.utils import set_seed

        set_seed(cfg.run.seed)
        try:  # what depends on the prompts is checked once they are read: still one line
            stream = PromptStream(cfg.data, load_components(cfg.data), seed=cfg.run.seed)
        except ConfigError as exc:
            assert str(exc) == "data.stages[0]: component weights sum to 0", exc
            return
        assert len(stream.next_batch().prompts) == cfg.data.batch_size
        total = cfg.run.max_steps or stream.total_batches
        assert 0.0 <= lr_factor(0, warmup=o.warmup_steps, total=total, schedule=o.schedule) <= 1.0

    check()


def test_the_teacher_cache_command_has_the_same_boundary(world, tmp_path, capsys):
    from train import cache_teacher

    cfg, _ = config_file(world, tmp_path, optim={"betas": [0.9, 1.0]})
    assert cache_teacher.main(["--config", cfg, "--output", str(tmp_path / "cache")]) == 2
    assert one_line(capsys) == (f"train.cache_teacher: error: {cfg}: optim.betas[1]=1.0: must be a finite number "
                                "in [0, 1)")
    with pytest.raises(SystemExit) as info:
        cache_teacher.main(["--config", cfg, "--batch-size", "x"])
    assert info.value.code == 2
    assert one_line(capsys) == ("python -m train.cache_teacher: error: argument --batch-size: invalid int value: 'x' "
                                "(see `python -m train.cache_teacher --help`)")
