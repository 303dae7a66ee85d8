"""Every checkpoint layout round-trips; every bad checkpoint gets one clear error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastenc
from fastenc.errors import CheckpointError, ConfigError
from reference import TINY, Reference, rel_err, write_distillt5, write_repacked

IDS = torch.tensor([[5, 17, 300, 42, 9, 1], [7, 7, 7, 1, 0, 0]])
MASK = (IDS != 0).long()


@pytest.fixture(scope="module")
def ref():
    return Reference(TINY)


@pytest.fixture(scope="module")
def want(ref):
    return ref(IDS, MASK)


@pytest.fixture()
def distill(ref, tmp_path):
    return write_distillt5(ref, TINY, tmp_path / "distill")


def _out(path, **kw):
    with torch.no_grad():
        return fastenc.load(path, cache=False, **kw, backend="torch")(IDS, MASK)


def test_distillt5_layout(distill, want):
    assert rel_err(_out(distill), want) <= 1e-6


def test_repacked_single_file_without_config(ref, tmp_path, want):
    path = write_repacked(ref, tmp_path / "repack" / "distill_t5.safetensors")
    enc = fastenc.load(path, cache=False, backend="torch")
    assert (enc.config.d_model, enc.config.num_layers, enc.config.num_heads) == (32, 2, 4)
    assert enc.config.projection_dim == 64 and enc.config.num_buckets == 8
    # max_distance is not visible in the shapes (TINY uses 20, the default is 128): a config.json
    # beside the file supplies it
    (path.parent / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    assert rel_err(_out(path), want) <= 1e-6


@pytest.mark.parametrize("kind", ["T5EncoderModel", "T5ForConditionalGeneration"])
def test_transformers_sharded(ref, tmp_path, kind):
    import transformers

    from reference import hf_config

    cfg = hf_config(TINY)
    if kind == "T5ForConditionalGeneration":
        cfg.is_encoder_decoder = True
        cfg.num_decoder_layers = 1
    torch.manual_seed(3)
    model = getattr(transformers, kind)(cfg).eval()
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    enc = fastenc.load(tmp_path / "hf", cache=False, backend="torch")
    assert enc.config.projection_dim is None and enc.config.output_dim == TINY.d_model
    with torch.no_grad():
        want = model.get_encoder()(input_ids=IDS, attention_mask=MASK).last_hidden_state
        assert rel_err(enc(IDS, MASK), want) <= 1e-6


def test_fastenc_save_round_trip(distill, tmp_path, want):
    enc = fastenc.load(distill, cache=False, backend="torch")
    out_dir = fastenc.save(enc, tmp_path / "saved")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert "blocks.0.attn.qkv.weight" in load_file(out_dir / "model.safetensors")
    assert rel_err(_out(out_dir), want) <= 1e-6
    half = fastenc.load(out_dir, dtype="bf16", cache=False, backend="torch")
    assert half.dtype == torch.bfloat16


def test_size_check(distill):
    with pytest.raises(ConfigError, match="d_model=32 but size 'base' has 768"):
        fastenc.load(distill, size="base", backend="torch")
    with pytest.raises(ConfigError, match="unknown size 'huge'"):
        fastenc.load(size="huge", random_init=True, backend="torch")


# ---------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        fastenc.load(tmp_path / "nope", backend="torch")


def test_directory_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        fastenc.load(tmp_path / "empty", backend="torch")


def test_pickle_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused"):
        fastenc.load(d, backend="torch")


def test_corrupt_header(distill):
    (distill / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        fastenc.load(distill, backend="torch")


def test_truncated_file(distill):
    f = distill / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fastenc.load(distill, backend="torch")


def test_missing_key(distill):
    f = distill / "model.safetensors"
    state = load_file(f)
    del state["encoder.encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    save_file(state, f)
    with pytest.raises(CheckpointError, match="missing key 'encoder.encoder.block.1.layer.1.DenseReluDense.wi_1"):
        fastenc.load(distill, backend="torch")


def test_unexpected_key(distill):
    f = distill / "model.safetensors"
    state = load_file(f)
    state["encoder.encoder.block.2.layer.0.layer_norm.weight"] = torch.ones(32)
    save_file(state, f)
    with pytest.raises(CheckpointError, match="unexpected key 'encoder.encoder.block.2.layer.0.layer_norm.weight'"):
        fastenc.load(distill, backend="torch")


def test_shape_mismatch(distill):
    cfg = json.loads((distill / "config.json").read_text())
    cfg["d_ff"] = 64
    (distill / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: d_ff, d_model = \[64, 32\] do not match .*"
                                              r"model.safetensors: '.*wi_0.weight' has shape \[48, 32\]"):
        fastenc.load(distill, backend="torch")


def test_bad_config_json(distill):
    (distill / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        fastenc.load(distill, backend="torch")


def test_hub_id_offline_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Pass a local directory holding config.json and model.safetensors"):
        fastenc.load("someone/missing-model", backend="torch")


def test_save_is_atomic(distill, tmp_path, monkeypatch):
    enc = fastenc.load(distill, cache=False, backend="torch")
    out = tmp_path / "saved"

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("fastenc.weights.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        fastenc.save(enc, out)
    assert list(out.iterdir()) == []  # nothing half-written, no temporary left behind


def test_load_needs_checkpoint_or_random_init():
    with pytest.raises(ConfigError, match="pass either a checkpoint"):
        fastenc.load()
