"""pytest-benchmark micro-benchmarks of the CPU paths; run them explicitly:

    pytest bench/micro --benchmark-only [--benchmark-autosave]

They are outside the default test paths and assert nothing about speed. ``FASTENC_MICRO_SIZE``
picks the student size (default ``small``; ``base`` is the paper's shape, slower to set up).
"""

import os

import pytest

from bench import common

SIZE = os.environ.get("FASTENC_MICRO_SIZE", "small")


@pytest.fixture(scope="session")
def model32():
    return common.build_model(SIZE)


@pytest.fixture(scope="session", params=[(1, 77), (1, 512)], ids=lambda p: f"B{p[0]}xL{p[1]}")
def ids(request, model32):
    batch, seq = request.param
    return common.sample_ids(model32.config, batch, seq, seed=1)
