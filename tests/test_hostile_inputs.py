"""Hostile encoder inputs: prompt types, lone surrogates, out-of-range ids and non-0/1 masks on the torch and
ONNX Runtime backends, non-finite outputs, micro-batching, and 10,000 prompts at flux-dev in bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastenc
from fastenc.errors import ConfigError, InputError, NumericsError
from helpers import make_t5_tokenizer_json
from tiny_checkpoint import MICRO, write_checkpoint

V = MICRO.vocab_size
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    directory = write_checkpoint(tmp_path_factory.mktemp("inputs") / "ck")
    make_t5_tokenizer_json(directory)
    return directory


@pytest.fixture()
def enc(ck):
    return fastenc.load(ck, backend="torch")  # default cache on: the generator case used to crash with it


@pytest.fixture(scope="module")
def ort_enc(ck, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from fastenc.exporters.pipeline import ExportRequest, export

    result = export(ExportRequest(out=tmp_path_factory.mktemp("ort") / "exp", checkpoint=str(ck), max_batch=2,
                                  max_seq=16, verify=False))
    return fastenc.load(result.directory, backend="onnxruntime", cache=False)


# ---------------------------------------------------------------------------- prompts


def _gen():
    yield "a cat"


@pytest.mark.parametrize("prompts, message", [
    (None, "prompts must be a str or a sequence (list, tuple) of str, got NoneType"),
    (b"a cat", "prompts must be a str or a sequence (list, tuple) of str, got bytes"),
    (7, "prompts must be a str or a sequence (list, tuple) of str, got int"),
    ({"a cat"}, "prompts must be a str or a sequence (list, tuple) of str, got set"),
    (_gen(), "prompts must be a str or a sequence (list, tuple) of str, got generator; iterate encode_batches() "
             "for iterators"),
    (iter(["a cat"]), "prompts must be a str or a sequence (list, tuple) of str, got list_iterator; iterate "
                      "encode_batches() for iterators"),
    ([], "prompts is empty"),
    (["a cat", None], "prompts[1] is NoneType, expected str"),
    (("a cat", b"a dog"), "prompts[1] is bytes, expected str"),
    (["a cat", ["nested"]], "prompts[1] is list, expected str"),
    ("a \ud800 cat", "prompts[0] holds a lone surrogate U+D800 at character 2: not valid Unicode text (decode its "
                     "source with errors='replace')"),
    (["fine", "x\udcff"], "prompts[1] holds a lone surrogate U+DCFF at character 1: not valid Unicode text (decode "
                          "its source with errors='replace')"),
])
def test_encode_refuses_what_is_not_str_or_a_sequence_of_str(enc, prompts, message):
    with pytest.raises(InputError) as info:
        enc.encode(prompts, target="pixart-alpha")
    assert str(info.value) == message
    assert len(enc.cache) == 0  # nothing half-done was cached


ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=24)  # surrogates, controls, NUL included


def _valid(p) -> bool:
    if not isinstance(p, str):
        return False
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=ANY_TEXT | st.lists(ANY_TEXT | st.none() | st.integers() | st.binary(max_size=3), max_size=4)
       | st.tuples(ANY_TEXT, ANY_TEXT) | st.none() | st.integers() | st.binary(max_size=4))
def test_random_prompts_encode_or_raise_input_error(enc, prompts):
    items = [prompts] if isinstance(prompts, str) else prompts
    ok = isinstance(items, (list, tuple)) and len(items) > 0 and all(_valid(p) for p in items)
    try:
        out = enc.encode(prompts, target="pixart-alpha")
    except InputError:
        assert not ok
        return
    assert ok and out.embeds.shape == (len(items), 120, MICRO.output_dim) and torch.isfinite(out.embeds).all()


def test_the_tokenizer_refuses_lone_surrogates_too(enc):
    with pytest.raises(InputError, match=r"^prompts\[0\] holds a lone surrogate U\+DC80 at character 0"):
        enc.tokenizer(["\udc80abc"], max_length=8)


def test_str_tuple_and_list_give_the_same_embeddings(enc):
    one = enc.encode("a cat", target="pixart-alpha").embeds
    tup = enc.encode(("a cat", "a dog"), target="pixart-alpha").embeds
    lst = enc.encode(["a cat", "a dog"], target="pixart-alpha").embeds
    assert torch.equal(one[0], tup[0]) and torch.equal(tup, lst)


def test_encode_batches_streams_any_iterable(ck):
    enc = fastenc.load(ck, backend="torch", cache=False)
    prompts = [f"a photo of {n} cats" for n in range(7)]
    batches = list(enc.encode_batches((p for p in prompts), target="pixart-alpha", batch_size=3))
    assert [b.embeds.shape[0] for b in batches] == [3, 3, 1]
    whole = enc.encode(prompts, target="pixart-alpha")
    torch.testing.assert_close(torch.cat([b.embeds for b in batches]), whole.embeds)
    assert torch.equal(torch.cat([b.mask for b in batches]), whole.mask)
    assert not torch.is_inference_mode_enabled()  # the generator does not leak inference mode to the caller


@pytest.mark.parametrize("prompts, kwargs, error, message", [
    (iter(["a", "b", "c", "d", 5]), {"batch_size": 2}, InputError, "prompts[4] is int, expected str"),
    (iter([]), {}, InputError, "prompts is empty"),
    (None, {}, InputError, "prompts must be a str or an iterable of str, got NoneType"),
    (["a"], {"batch_size": 0}, ConfigError, "batch_size must be a positive integer, got 0"),
    (["a"], {"batch_size": True}, ConfigError, "batch_size must be a positive integer, got True"),
])
def test_encode_batches_bad_input(enc, prompts, kwargs, error, message):
    with pytest.raises(error) as info:
        list(enc.encode_batches(prompts, target="pixart-alpha", **kwargs))
    assert str(info.value) == message


def test_output_budget_points_to_encode_batches(enc):
    with pytest.raises(InputError) as info:
        enc.encode(["a cat", "a dog"], target="flux-dev", max_output_bytes=1000)
    assert str(info.value) == (
        "encode() of 2 prompts at target 'flux-dev' would return 64.0 KiB ([2, 512, 16] float32), over "
        "max_output_bytes=1000 B; iterate encode_batches(prompts, target='flux-dev', batch_size=...) to stream them, "
        "or pass a larger max_output_bytes")
    with pytest.raises(ConfigError, match=r"^max_output_bytes must be a positive integer, got -1$"):
        enc.encode("a cat", max_output_bytes=-1)


def test_forward_and_encode_run_in_micro_batches(ck):
    enc = fastenc.load(ck, backend="torch", cache=False)
    ids = torch.randint(2, V, (9, 12))
    with torch.no_grad():
        want = enc(ids)  # one pass under the default budget
        sizes = []
        hook = enc.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        enc.activation_budget = 2 * fastenc.api.activation_bytes(MICRO, 12, torch.float32)
        assert enc.micro_batch(12) == 2
        got = enc(ids)
        hook.remove()
    assert sizes == [2, 2, 2, 2, 1]
    torch.testing.assert_close(got, want)


def test_repeated_prompts_in_one_call_are_computed_once(ck):
    enc = fastenc.load(ck, backend="torch", cache=False)
    sizes = []
    enc.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    out = enc.encode(["a cat", "a dog", "a cat", "a cat"], target="pixart-alpha")
    assert sizes == [2] and torch.equal(out.embeds[0], out.embeds[2]) and torch.equal(out.embeds[0], out.embeds[3])


# ---------------------------------------------------------------------------- ids and masks, every backend


BAD_TENSORS = [
    (torch.tensor([[5, -1, 7]]), None, "input_ids out of range [0, 320): input_ids[0, 1] = -1"),
    (torch.tensor([[5, 6], [7, V]]), None, "input_ids out of range [0, 320): input_ids[1, 1] = 320"),
    (torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [2, 0]]),
     "attention_mask must hold only 0 and 1: attention_mask[1, 0] = 2"),
    (torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, -1], [1, 0]]),
     "attention_mask must hold only 0 and 1: attention_mask[0, 1] = -1"),
    (torch.tensor([[5, 6]]), torch.tensor([[1.0, 0.5]]), "attention_mask must hold only 0 and 1: "
                                                          "attention_mask[0, 1] = 0.5"),
    (torch.tensor([[5, 6]]), [[1, 1]], "attention_mask must be a tensor or None, got list"),
    (torch.tensor([[True, False]]), None, "input_ids must be integer token ids, got torch.bool"),
    (torch.zeros(1, 0, dtype=torch.long), None, "input_ids is empty (shape (1, 0))"),
    ([[1, 2]], None, "input_ids must be a 2-D tensor [B, L], got list ()"),
]


@pytest.mark.parametrize("ids, mask, message", BAD_TENSORS)
def test_bad_ids_and_masks_torch(ck, ids, mask, message):
    enc = fastenc.load(ck, backend="torch", cache=False)
    with pytest.raises(InputError) as info:
        enc(ids, mask)
    assert str(info.value) == message


@pytest.mark.parametrize("ids, mask, message", BAD_TENSORS)
def test_bad_ids_and_masks_onnxruntime(ort_enc, ids, mask, message):
    with pytest.raises(InputError) as info:
        ort_enc(ids, mask)
    assert str(info.value) == message
    with pytest.raises(InputError) as info:  # the runner itself checks too (it is used without Encoder)
        ort_enc.model(ids, mask)
    assert str(info.value) == message


def test_graph_backends_micro_batch_within_their_profile(ort_enc):
    assert ort_enc.micro_batch(16) == 2  # the export's max_batch, whatever the memory budget allows
    with pytest.raises(InputError, match=r"batch=3"):  # forward itself stays exact: the profile decides
        ort_enc(torch.ones(3, 4, dtype=torch.long))


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    directory = write_checkpoint(tmp_path / "v200", MICRO.replace(vocab_size=200))
    make_t5_tokenizer_json(directory)
    enc = fastenc.load(directory, backend="torch", cache=False)
    size = enc.tokenizer.vocab_size
    assert size > 200
    with pytest.raises(ConfigError) as info:
        enc.encode("a cat")
    assert str(info.value) == (f"the tokenizer has {size} token ids but the model's embedding table has 200 rows: "
                               "it is not this model's tokenizer")


def test_onnxruntime_still_runs_good_ids(ort_enc, ck):
    ids = torch.tensor([[5, 6, 1], [V - 1, 1, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ref = fastenc.load(ck, backend="torch", cache=False)
    with torch.no_grad():
        torch.testing.assert_close(ort_enc(ids, mask), ref(ids, mask), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- non-finite output


def test_non_finite_output_is_an_error(ck):
    enc = fastenc.load(ck, backend="torch")
    with torch.no_grad():
        enc.model.projector.fc2.weight.fill_(3e38)  # finite weights whose product overflows float32
        with pytest.raises(NumericsError) as info:
            enc(torch.tensor([[5, 6, 1], [7, 1, 0]]))
    assert str(info.value) == ("the encoder output holds non-finite values (NaN/inf) in 2 of 2 inputs (first: row 0); "
                               "the weights or the compute dtype (float32) overflow - check the checkpoint, or use "
                               "dtype='fp32'")
    with pytest.raises(NumericsError, match=r"in 1 of 1 inputs .* \(prompts from index 0\)$"):
        enc.encode(["a cat"], target="pixart-alpha")
    assert len(enc.cache) == 0  # a non-finite result is never cached


# ---------------------------------------------------------------------------- 10,000 prompts


MANY = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import torch
    import fastenc
    from fastenc.config import EncoderConfig
    from helpers import make_t5_tokenizer_json
    from tiny_checkpoint import write_checkpoint

    cfg = EncoderConfig(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8, vocab_size=320, num_buckets=8,
                        max_distance=16, projection_dim=None, name="nano")
    ck = write_checkpoint(Path(sys.argv[1]) / "ck", cfg)
    make_t5_tokenizer_json(ck)
    enc = fastenc.load(ck, backend="torch")  # the default in-memory cache, bounded in bytes
    enc.activation_budget = 64 << 20
    torch.set_num_threads(1)  # steady under a loaded machine
    enc.encode(["warm up"] * 3)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    misses = enc.cache.stats.misses
    prompts = [f"a photo of {i % 100} red foxes in the snow" for i in range(10_000)]
    out = enc.encode(prompts, target="flux-dev")  # one call: [10000, 512, 8] fp32 = 164 MB of output
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    with torch.no_grad():
        ids = enc.tokenizer(prompts[:3] + prompts[-2:], target="flux-dev").input_ids
        want = enc(ids)
    rows = torch.cat([out.embeds[:3], out.embeds[-2:]])
    print(json.dumps({"shape": list(out.embeds.shape), "peak": peak, "output": out.embeds.nbytes + out.mask.nbytes,
                      "max_err": float((rows - want).abs().max()), "cache_bytes": enc.cache.nbytes,
                      "computed": enc.cache.stats.misses - misses}))
""")


def test_ten_thousand_prompts_at_flux_dev_in_bounded_memory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", MANY, str(tmp_path), str(TESTS)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [10_000, 512, 8] and result["max_err"] <= 1e-5
    assert result["computed"] == 100  # each distinct prompt once, the rest from the cache
    # peak growth: the output (+ its one copy in the cache, 100 entries) plus micro-batch activations
    # (64 MiB budget) and slack; one 10,000-row forward would need > 10 GB of attention scores.
    assert result["peak"] < result["output"] + 400 * 2**20, result
