"""Hostile checkpoints: every value read from config.json, the shard index and the safetensors header is
checked before anything is built; each failure is one FastencError naming the file and the key.
Property-based tests throw random JSON and bytes at the three parsers."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import fastenc
from fastenc.config import EncoderConfig
from fastenc.errors import CheckpointError, ConfigError, FastencError
from tiny_checkpoint import MICRO, write_checkpoint

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _load(path):
    return fastenc.load(path, backend="torch", cache=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pristine") / "ck")


@pytest.fixture()
def ck(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ck"))


@pytest.fixture(scope="module")
def pristine_sharded(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("sharded") / "ck", shards=2)


@pytest.fixture()
def sharded(pristine_sharded, tmp_path) -> Path:
    return Path(shutil.copytree(pristine_sharded, tmp_path / "sharded"))


def _edit_config(ck: Path, **changes) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(changes)
    (ck / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------- config.json values


@pytest.mark.parametrize("key, value, message", [
    ("d_model", "abc", "key 'd_model' must be an integer in 1..65536, got 'abc'"),
    ("num_heads", 0, "key 'num_heads' must be an integer in 1..1024, got 0"),
    ("num_layers", True, "key 'num_layers' must be an integer in 1..1024, got True"),
    ("num_layers", 1_000_000_000, "key 'num_layers' must be an integer in 1..1024, got 1000000000"),
    ("d_ff", 24.0, "key 'd_ff' must be an integer in 1..262144, got 24.0"),
    ("vocab_size", 10**12, "key 'vocab_size' must be an integer in 1..4194304, got 1000000000000"),
    ("d_kv", None, "key 'd_kv' must be an integer in 1..4096, got None"),
    ("layer_norm_epsilon", "nan", "key 'layer_norm_epsilon' must be a finite number in (0, 1], got 'nan'"),
    ("layer_norm_epsilon", -1e-6, "key 'layer_norm_epsilon' must be a finite number in (0, 1], got -1e-06"),
    ("layer_norm_epsilon", False, "key 'layer_norm_epsilon' must be a finite number in (0, 1], got False"),
    ("feed_forward_proj", 7, "key 'feed_forward_proj' must be a string (at most 200 characters), got 7"),
    ("feed_forward_proj", "gated-swish", "unsupported feed_forward_proj 'gated-swish'"),
    ("fastenc", [1], "key 'fastenc' must be a JSON object, got [1]"),
    ("fastenc", {"projection_dim": "16"}, "key 'fastenc.projection_dim' must be an integer in 1..65536 or null"),
    ("fastenc", {"projector_bias": "no"}, "key 'fastenc.projector_bias' must be true or false, got 'no'"),
])
def test_bad_config_values_name_file_and_key(ck, key, value, message):
    _edit_config(ck, **{key: value})
    with pytest.raises(ConfigError) as info:
        _load(ck)
    assert str(info.value) == f"{ck / 'config.json'}: {message}" or str(info.value).startswith(
        f"{ck / 'config.json'}: {message}")


def test_projector_input_must_match_d_model(ck):
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["fastenc"]  # DistillT5's own keys decide the projector
    cfg["project_in_dim"] = 8
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"^{ck / 'config.json'}: project_in_dim 8 != d_model 16$"):
        _load(ck)


@pytest.mark.parametrize("changes, message", [
    ({"relative_attention_num_buckets": 2}, "key 'relative_attention_num_buckets' must be at least 4 (T5's "
                                           "bidirectional buckets), got 2"),
    ({"relative_attention_max_distance": 2}, "key 'relative_attention_max_distance' must exceed "
                                            "relative_attention_num_buckets // 4 = 2, got 2"),
])
def test_relative_attention_buckets_that_cannot_work(ck, changes, message):
    _edit_config(ck, **changes)  # used to end in ZeroDivisionError / IndexError at the first forward
    with pytest.raises(ConfigError) as info:
        _load(ck)
    assert str(info.value) == f"{ck / 'config.json'}: {message}"


def test_nan_literal_epsilon(ck):
    text = (ck / "config.json").read_text().replace('"layer_norm_epsilon": 1e-06', '"layer_norm_epsilon": NaN')
    assert "NaN" in text
    (ck / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config.json: key 'layer_norm_epsilon' must be a finite number in "
                                          r"\(0, 1\], got nan$"):
        _load(ck)


@pytest.mark.parametrize("key, value, message", [
    ("num_layers", 5, "num_layers=5 but {dir} holds only 2 encoder blocks"),
    ("vocab_size", 100, "vocab_size, d_model = [100, 16] do not match {dir}/model.safetensors: "
                        "'encoder.shared.weight' has shape [320, 16]"),
    ("d_kv", 4, "num_heads*d_kv, d_model = [8, 16] do not match {dir}/model.safetensors: "
                "'encoder.encoder.block.0.layer.0.SelfAttention.q.weight' has shape [16, 16]"),
    ("num_heads", 4, "relative_attention_num_buckets, num_heads = [8, 4] do not match {dir}/model.safetensors: "
                     "'encoder.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight' has shape [8, 2]"),
    ("feed_forward_proj", "relu", "feed_forward_proj is not gated but {dir} has wi_0/wi_1 FFN weights"),
])
def test_config_inconsistent_with_tensors(ck, key, value, message):
    _edit_config(ck, **{key: value})
    with pytest.raises(CheckpointError) as info:
        _load(ck)
    assert str(info.value) == f"{ck / 'config.json'}: " + message.format(dir=ck)


def test_huge_layer_count_fails_at_once(ck):
    _edit_config(ck, num_layers=1024)  # within the bound, but the file holds 2 blocks: nothing is built
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_layers=1024 but .* holds only 2 encoder blocks"):
        _load(ck)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"{\"d_model\": " + b"1" * 5000 + b"}", "not valid JSON (ValueError: Exceeds the limit"),
    (b"[" * 100_000, "not valid JSON"),
    (b"{not json", "not valid JSON (Expecting property name"),
    (b"", "not valid JSON (Expecting value"),
])
def test_unreadable_config_json(ck, content, message):
    (ck / "config.json").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        _load(ck)
    assert str(info.value).startswith(f"{ck / 'config.json'}: {message}")


def test_config_json_that_is_a_folder(ck):
    (ck / "config.json").unlink()
    (ck / "config.json").mkdir()
    (ck / "config.json" / "x").write_text("{}")
    # a folder named config.json is not a config file: the shapes decide, as without one
    assert _load(ck).config.num_layers == MICRO.num_layers


# ---------------------------------------------------------------------------- weights


def _rewrite(file: Path, edit) -> None:
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_names_the_tensor(ck, value):
    name = "encoder.encoder.block.1.layer.1.DenseReluDense.wo.weight"
    _rewrite(ck / "model.safetensors", lambda s: s[name].view(-1).__setitem__(3, value))
    with pytest.raises(CheckpointError) as info:
        _load(ck)
    assert str(info.value) == (f"{ck / 'model.safetensors'}: tensor {name!r} holds 1 non-finite value(s) (NaN or inf)"
                               f" of {16 * 24}; the checkpoint is corrupt")


def test_fp16_overflow_is_named(ck):
    name = "final_projection.3.weight"
    _rewrite(ck / "model.safetensors", lambda s: s[name].view(-1).__setitem__(0, 1e6))
    with pytest.raises(CheckpointError, match=f"model.safetensors: {name} overflows float16 .* load it in bf16 or fp32"):
        fastenc.load(ck, backend="torch", dtype="fp16", cache=False)
    assert torch.isfinite(_load(ck).model.projector.fc2.weight).all()  # fp32 holds it


def test_integer_weights_are_refused(ck):
    name = "encoder.encoder.final_layer_norm.weight"
    _rewrite(ck / "model.safetensors", lambda s: s.__setitem__(name, torch.ones(16, dtype=torch.int64)))
    with pytest.raises(CheckpointError, match=f"model.safetensors: {name!r} has dtype I64, expected a floating-point"):
        _load(ck)


def test_missing_tensor_without_config_is_named(ck):
    (ck / "config.json").unlink()
    _rewrite(ck / "model.safetensors", lambda s: s.pop("encoder.shared.weight"))
    with pytest.raises(CheckpointError, match=r"missing key 'encoder.shared.weight' \(needed to infer the config"):
        _load(ck)


def test_zero_heads_in_tensor_shapes_without_config(ck):
    (ck / "config.json").unlink()
    name = "encoder.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    _rewrite(ck / "model.safetensors", lambda s: s.__setitem__(name, torch.zeros(8, 0)))
    with pytest.raises(CheckpointError, match=rf"{name}' has shape \[8, 0\], expected 2 non-zero dims"):
        _load(ck)


# ---------------------------------------------------------------------------- shard index


def _write_index(ck: Path, data) -> Path:
    index = ck / "model.safetensors.index.json"
    index.write_text(data if isinstance(data, str) else json.dumps(data))
    return index


def _weight_map(ck: Path) -> dict:
    return json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]


def test_sharded_checkpoint_loads(sharded, ck):
    ids = torch.randint(0, MICRO.vocab_size, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(_load(sharded)(ids), _load(ck)(ids), rtol=0, atol=0)


@pytest.mark.parametrize("shard", ["/etc/passwd.safetensors", "../outside.safetensors", "sub/x.safetensors",
                                   "..", "model.bin", "", "a\\..\\b.safetensors"])
def test_shard_names_cannot_leave_the_folder(sharded, shard):
    write_checkpoint(sharded.parent / "elsewhere")
    shutil.copy(sharded.parent / "elsewhere" / "model.safetensors", sharded.parent / "outside.safetensors")
    wm = _weight_map(sharded)
    first = sorted(wm)[0]
    wm[first] = shard
    index = _write_index(sharded, {"weight_map": wm})
    with pytest.raises(CheckpointError) as info:
        _load(sharded)
    assert str(info.value) == (f"{index}: weight_map[{first!r}] = {shard!r} is not a .safetensors file name in the "
                               "checkpoint folder (paths and '..' are refused)")


@pytest.mark.parametrize("data, message", [
    ({"weight_map": ["a"]}, "key 'weight_map' must be a non-empty object of tensor name -> shard file name, got list"),
    ({"weight_map": {}}, "key 'weight_map' must be a non-empty object"),
    ({"metadata": {}}, "key 'weight_map' must be a non-empty object of tensor name -> shard file name, got NoneType"),
    ([], "expected a JSON object, got list"),
    ("{bad", "not valid JSON"),
])
def test_malformed_index(sharded, data, message):
    index = _write_index(sharded, data)
    with pytest.raises(CheckpointError) as info:
        _load(sharded)
    assert str(info.value).startswith(f"{index}: {message}")


def test_shard_name_not_a_string(sharded):
    wm = _weight_map(sharded)
    first = sorted(wm)[0]
    wm[first] = 3
    index = _write_index(sharded, {"weight_map": wm})
    with pytest.raises(CheckpointError, match=rf"^{index}: weight_map\['{first}'\] must be a file name, got 3$"):
        _load(sharded)


def test_index_not_utf8(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_bytes(b"\x80" + index.read_bytes())
    with pytest.raises(CheckpointError, match=rf"^{index}: not UTF-8 text \(byte 0\)$"):
        _load(sharded)


# ---------------------------------------------------------------------------- property-based


def _json_values():
    leaves = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                         max_size=3), max_leaves=8)


CONFIG_KEYS = ["d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size", "relative_attention_num_buckets",
               "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj", "project_in_dim",
               "project_out_dim", "fastenc"]


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), _json_values() | st.integers(0, 40), max_size=4),
       drop=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2))
def test_random_config_values_end_in_a_load_or_a_fastenc_error(pristine, tmp_path_factory, changes, drop):
    ck = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("prop") / "ck"))
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(changes)
    for k in drop:
        cfg.pop(k, None)
    (ck / "config.json").write_text(json.dumps(cfg))
    try:
        enc = _load(ck)
    except FastencError as exc:
        assert str(exc).startswith(str(ck)), exc  # names the file
        return
    assert enc.config.num_layers == MICRO.num_layers and math.isfinite(enc.config.eps)
    with torch.no_grad():  # what loads also runs: a finite result or one FastencError
        try:
            out = enc(torch.randint(0, MICRO.vocab_size, (1, 40)))
        except FastencError:
            return
    assert torch.isfinite(out).all()


@SETTINGS
@given(data=_json_values() | st.binary(max_size=64))
def test_random_config_json_documents(pristine, tmp_path_factory, data):
    ck = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("propjson") / "ck"))
    (ck / "config.json").write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    with pytest.raises(FastencError, match=f"^{ck / 'config.json'}: "):
        _load(ck)


@SETTINGS
@given(data=st.dictionaries(st.text(max_size=4) | st.sampled_from(["weight_map"]),
                            _json_values() | st.dictionaries(st.text(max_size=30), _json_values() | st.sampled_from(
                                ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                 "../model-00001-of-00002.safetensors", "/tmp/x.safetensors"]), max_size=4),
                            max_size=3))
def test_random_index_documents(pristine_sharded, tmp_path_factory, data):
    ck = Path(shutil.copytree(pristine_sharded, tmp_path_factory.mktemp("propidx") / "ck"))
    _write_index(ck, data)
    try:
        _load(ck)
    except FastencError as exc:
        assert str(exc).startswith(str(ck)), exc
    else:
        raise AssertionError("a random index cannot describe the whole checkpoint")


@SETTINGS
@given(header=st.dictionaries(
    st.sampled_from(["encoder.shared.weight", "final_projection.3.weight", "__metadata__", "x"]),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "F8_E4M3", "Q"]),
                           "shape": st.lists(st.integers(-1, 2**40), max_size=3),
                           "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)}) | _json_values(),
    max_size=3), tail=st.binary(max_size=64), header_len_delta=st.sampled_from([0, 0, 0, 1, -1, 10**6]))
def test_random_safetensors_headers(tmp_path_factory, header, tail, header_len_delta):
    ck = tmp_path_factory.mktemp("propst")
    raw = json.dumps(header).encode()
    (ck / "model.safetensors").write_bytes(struct.pack("<Q", max(0, len(raw) + header_len_delta)) + raw + tail)
    try:
        _load(ck)
    except FastencError as exc:
        assert str(exc).startswith(str(ck)) or "no T5 encoder tensors" in str(exc), exc
    else:
        raise AssertionError("a random header cannot describe a T5 checkpoint")


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4),
       in_header=st.booleans())
def test_flipped_bytes_in_a_checkpoint(pristine, tmp_path_factory, flips, in_header):
    ck = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("propflip") / "ck"))
    file = ck / "model.safetensors"
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    for pos, xor in flips:
        pos = pos % (n + 8) if in_header else 8 + n + pos % (len(data) - 8 - n)
        data[pos] ^= xor
    file.write_bytes(bytes(data))
    try:
        enc = _load(ck)
    except FastencError as exc:
        assert str(exc).startswith(str(ck)), exc
        return
    assert all(torch.isfinite(p).all() for p in enc.model.parameters())


def test_config_dict_api_validates_too():
    with pytest.raises(ConfigError, match=r"^config.json: expected a JSON object, got list$"):
        EncoderConfig.from_hf_dict([])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^EncoderConfig.eps must be a finite number in \(0, 1\], got nan$"):
        MICRO.replace(eps=float("nan"))
    with pytest.raises(ConfigError, match=r"^EncoderConfig.gated must be a bool, got 1$"):
        MICRO.replace(gated=1)


# ---------------------------------------------------------------------------- tokenizer files, load arguments


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[1, 2]", b'{"pad_token": 5, "eos_token": {"content": []}}'])
def test_bad_tokenizer_config_falls_back_to_t5_specials(tmp_path, content, caplog):
    from fastenc.tokenizer import Tokenizer
    from helpers import make_t5_tokenizer_json

    make_t5_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert "ignoring unreadable tokenizer config" in caplog.text or "(not a string); using '<pad>'" in caplog.text


@pytest.mark.parametrize("content", [b"[]", b"\xff", b'{"model": 3}'])
def test_unusable_tokenizer_json_is_skipped_with_a_clear_error(tmp_path, content):
    from fastenc.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"no T5 tokenizer.json or spiece.model found in {tmp_path}.*; skipped "
                                          rf"{tmp_path / 'tokenizer.json'} \((unreadable|unknown) model"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint": 5}, "checkpoint must be a path or hub id (str), got int"),
    ({"checkpoint": ""}, "checkpoint '' is not a path or hub id"),
    ({"random_init": 1, "size": "small"}, "random_init must be True or False, got 1"),
    ({"random_init": True, "size": "small", "seed": -1}, "seed must be a non-negative integer, got -1"),
    ({"random_init": True, "size": 3}, "size must be a string, got int"),
    ({"random_init": True, "device": "nonsense"}, "device must be a device such as 'cpu' or 'cuda:0', got 'nonsense'"),
    ({"random_init": True, "backend": None}, "backend must be a string, got NoneType"),
    ({"random_init": True, "cache": "yes"}, "cache must be True, False or an EmbeddingCache, got str"),
    ({"random_init": True, "tokenizer": 5}, "tokenizer must be a folder, file or hub id, a fastenc.Tokenizer or a "
                                            "tokenizers.Tokenizer, got int"),
    ({"checkpoint": "x", "subfolder": "../up"}, "subfolder '../up' must be a relative folder inside the checkpoint"),
    ({"checkpoint": "x", "subfolder": "/abs"}, "subfolder '/abs' must be a relative folder inside the checkpoint"),
])
def test_load_arguments_are_checked_first(kwargs, message):
    with pytest.raises(ConfigError) as info:
        fastenc.load(**kwargs)
    assert str(info.value) == message
