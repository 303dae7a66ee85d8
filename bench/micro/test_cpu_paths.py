"""Micro-benchmarks: tokenizer, torch backend (fp32), fastenc cpu backend, ONNX Runtime, int8 GEMM."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench import exports
from fastenc.backends import cpu as fcpu

from .conftest import SIZE


def test_tokenizer_flux_dev(benchmark, tmp_path):
    from fastenc.tokenizer import Tokenizer
    from tests.helpers import PROMPTS, make_t5_tokenizer_json

    tok = Tokenizer.from_pretrained(make_t5_tokenizer_json(tmp_path))
    benchmark(lambda: tok(PROMPTS, max_length=512))


@torch.inference_mode()
def test_torch_fp32(benchmark, model32, ids):
    benchmark(lambda: model32(ids))


@pytest.fixture(scope="module")
def cpu_model(model32):
    ok, why = fcpu.fast_path_supported()
    if not ok:
        pytest.skip(why)
    return fcpu.prepare(copy.deepcopy(model32), source=f"bench:{SIZE}:seed0")


@torch.inference_mode()
def test_cpu_backend(benchmark, cpu_model, ids):
    benchmark(lambda: cpu_model(ids))


@pytest.fixture(scope="module")
def ort_session(model32):
    key = exports.model_key(SIZE, 0)
    out = exports.ensure_export(exports.saved_checkpoint(model32, key), exports.export_dir(key), int8=True,
                                max_batch=4, max_seq=512)
    return out


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_onnxruntime(benchmark, ort_session, ids, dtype):
    sess = exports.OrtSession(exports.onnx_file(ort_session, dtype), threads=torch.get_num_threads())
    benchmark(lambda: sess(ids))


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_linear_512x768x4096(benchmark, kind):
    x = torch.randn(512, 768)  # [M, K]
    w = torch.randn(4096, 768) * 768**-0.5  # [N, K]
    if kind == "fp32":
        benchmark(lambda: F.linear(x, w))
    elif kind == "bf16":
        xb, wb = x.bfloat16(), w.bfloat16()
        benchmark(lambda: F.linear(xb, wb))
    else:
        q = fcpu.quantize_weight(w)
        xb = x.bfloat16()
        benchmark(lambda: fcpu.int8_linear(xb, q))
