"""The main job (`fastenc demo`) offline: random-init student, loud banner, export + verify, latency table,
a kept output folder that lists what it holds, and the next commands."""

import shlex

from safetensors.torch import load_file

from fastenc.cli import main


def test_demo_offline_random_init(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder is under the working directory
    assert main(["demo", "--size", "small", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "NO CHECKPOINT GIVEN: running a RANDOM-INIT 'small' student" in out
    assert "RANDOM-INIT weights" in out
    assert "token ids [3, 512] -> embeddings [3, 512, 4096]" in out
    assert "onnx/encoder.fp32.onnx" in out and "pass" in out and "fail" not in out  # the verify table

    # latency table: repeats and spread stated, torch rows before ONNX Runtime, labels as the benchmarks print them
    assert "median and min-max of 2 timed runs after 1 warm-up" in out
    assert "torch timed before any ONNX Runtime session existed" in out
    rows = [line for line in out.splitlines() if line.split()[-3:-2] and line.split()[-3] in ("77", "512")]
    labels = [line[:34].strip() for line in rows]
    assert len(rows) == 4 and labels[0].startswith("fastenc ") and labels[2] == "ONNX Runtime fp32", rows
    for line in rows:
        low, high = map(float, line.split()[-1].split("-"))
        assert 0 < low <= float(line.split()[-2]) <= high

    # everything stays in ./fastenc-demo, listed with sizes, then the commands to try next
    folder = tmp_path / "fastenc-demo"
    assert (folder / "export" / "onnx" / "encoder.fp32.onnx").is_file()
    ids = load_file(folder / "token_ids.safetensors")
    emb = load_file(folder / "embeddings.safetensors")
    assert ids["input_ids"].shape == (3, 512) and emb["text_embeddings"].shape == (3, 512, 4096)
    assert "kept in fastenc-demo/ (" in out and "delete it with `rm -r fastenc-demo`" in out
    assert "token_ids.safetensors" in out and "embeddings.safetensors" in out
    next_steps = out[out.index("\nnext:\n"):]
    for command in ("fastenc encode", "fastenc verify fastenc-demo/export", "fastenc triton-repo fastenc-demo/export",
                    "python -m bench.latency"):
        assert command in next_steps, command

    # the first next step works as printed, offline, and gives the demo's embeddings back
    line = next(x for x in next_steps.splitlines() if "--ids" in x).split("#")[0]
    assert main(shlex.split(line)[1:]) == 0
    again = load_file(tmp_path / "embeddings.safetensors")["text_embeddings"]
    assert (again - emb["text_embeddings"]).abs().max() < 1e-4


def test_demo_bad_checkpoint_is_one_line(capsys, tmp_path):
    assert main(["demo", "--checkpoint", str(tmp_path / "missing"), "--no-export", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc: error: ") and err.count("\n") == 1


def test_readme_main_job_runs_verbatim_in_a_fresh_clone(tmp_path):
    """README's two commands are the ones the scripts and CI run; the main job runs as typed in a fresh
    clone (in the environment this suite runs in) and leaves nothing git would see."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    commands = dict(re.findall(r"^\| (main job|tests) \| `([^`]+)` \|$", (repo / "README.md").read_text(), re.M))
    assert commands == {"main job": "bash scripts/run.sh", "tests": "bash scripts/test.sh"}
    assert (repo / ".ci" / "run").read_text().strip().splitlines()[-1] == f"exec {commands['tests']}"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, timeout=120)
    venv = Path(sys.prefix)
    stamp = venv / ".fastenc-installed-dev"
    assert stamp.is_file(), f"{stamp} missing: set the environment up with `bash scripts/test.sh`"
    # the clone's pyproject.toml is no newer than this environment's install, so bootstrap reuses it
    os.utime(clone / "pyproject.toml", (stamp.stat().st_mtime - 1, stamp.stat().st_mtime - 1))
    argv = [*commands["main job"].split(), "--size", "small", "--no-export", "--repeats", "1", "--target", "pixart-alpha"]
    run = subprocess.run(argv, cwd=clone, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FASTENC_VENV": str(venv), "FASTENC_CACHE_DIR": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "kept in fastenc-demo/" in run.stdout and (clone / "fastenc-demo" / "embeddings.safetensors").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == "", status.stdout
