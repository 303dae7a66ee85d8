"""The set-up's promise that a machine without a GPU gets the CPU build of torch: ``scripts/bootstrap.sh``
asks pip for a dry-run report of ``-c constraints-cpu.txt torch==2.13.0`` and lets ``scripts/torch_build.py``
decide. The decision is tested on real pip reports (tests/data, captured on Linux x86_64 with pip 26.3), and,
where the network allows, on pip's live resolution against plain PyPI and PyTorch's CPU index."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"

_spec = importlib.util.spec_from_file_location("torch_build", REPO / "scripts" / "torch_build.py")
torch_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_build)


def report(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_plain_pypi_on_linux_x86_64_resolves_to_the_cuda_build():
    sample = report("pip-report-pypi-linux-x86_64.json")
    assert sample["environment"]["platform_machine"] == "x86_64"
    names = {e["metadata"]["name"] for e in sample["install"]}
    assert "nvidia-cublas" in names and "cuda-toolkit" in names  # what "GBs of CUDA packages" means
    assert torch_build.decide(sample) == "cuda"


def test_a_cpu_wheel_at_hand_is_the_cpu_build():
    sample = report("pip-report-cpu-wheel-at-hand.json")
    torch = next(e for e in sample["install"] if e["metadata"]["name"] == "torch")
    assert torch["metadata"]["version"] == "2.13.0+cpu"
    assert torch_build.decide(sample) == "cpu"


@pytest.mark.parametrize("text, build", [
    ("", "unknown"),  # the dry run failed (offline): bootstrap tries the plain install, whose error is shown
    ("not json", "unknown"),
    ('{"version": "1", "install": []}', "unknown"),
    ('{"install": [{"metadata": {"name": "torch", "version": "2.13.0+cu130"}}]}', "cuda"),
    ('{"install": [{"metadata": {"name": "torch", "version": "2.13.0"}}, '
     '{"metadata": {"name": "nvidia_cudnn_cu13", "version": "9"}}]}', "cuda"),
    ('{"install": [{"metadata": {"name": "Torch", "version": "2.13.0"}}]}', "cpu"),  # e.g. macOS arm64
    ("[" * 100_000, "unknown"),
])
def test_the_decision_on_edge_reports(text, build):
    assert torch_build.decide_text(text) == build


def test_the_script_prints_one_word_and_bootstrap_uses_it():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "torch_build.py")], check=True, text=True,
                          input=(DATA / "pip-report-pypi-linux-x86_64.json").read_text(), capture_output=True)
    assert done.stdout == "cuda\n"
    script = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert '| "$py" scripts/torch_build.py' in script and '[ "$build" = cuda ]' in script
    assert f"--index-url {CPU_INDEX}" in script


def _reachable(url: str) -> bool:
    host = url.split("/")[2]
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def _dry_run(*index: str) -> dict:
    """pip's report for what bootstrap.sh asks, as on an ordinary machine: no pip config, no local wheels."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                           "--report", "-", "-c", str(REPO / "constraints-cpu.txt"), "torch==2.13.0", *index],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="PyPI's torch is the CUDA build on Linux x86_64 only")
def test_live_resolution_plain_pypi_then_the_cpu_index():
    if not _reachable(PYPI):
        pytest.skip(f"network unavailable: {PYPI} cannot be reached, so pip's live resolution is not checked "
                    "(the decision is checked on the recorded reports above)")
    assert torch_build.decide(_dry_run("--index-url", PYPI)) == "cuda"
    if not _reachable(CPU_INDEX):
        pytest.skip(f"network unavailable: {CPU_INDEX} cannot be reached from here, so the CPU index's resolution "
                    "is not checked (plain PyPI's was: the CUDA build, as bootstrap.sh expects)")
    resolved = _dry_run("--index-url", CPU_INDEX, "--extra-index-url", PYPI)  # what bootstrap.sh installs then
    torch = next(e for e in resolved["install"] if e["metadata"]["name"] == "torch")
    assert torch["metadata"]["version"] == "2.13.0+cpu" and torch_build.decide(resolved) == "cpu"
