"""umT5 (Wan's text encoder): transformers ``UMT5EncoderModel`` checkpoints, one relative-attention-bias
table per layer (``EncoderConfig.per_layer_bias``), read, run on every backend and saved by fastenc."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fastenc
from fastenc.config import EncoderConfig
from fastenc.errors import CheckpointError, ConfigError

IDS = torch.tensor([[5, 17, 300, 42, 9, 1, 250, 3], [7, 7, 7, 1, 0, 0, 0, 0], [11, 2, 1, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


def _umt5_config(**kw):
    import transformers

    fields = dict(vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                  dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    fields.update(kw)
    return transformers.UMT5Config(**fields)


def _hf_model(seed: int = 0, **kw):
    import transformers

    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(_umt5_config(**kw)).eval()
    with torch.no_grad():  # every table distinct and large enough to matter
        for block in model.encoder.block:
            block.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def hf():
    return _hf_model()


@pytest.fixture(scope="module")
def folder(hf, tmp_path_factory):
    directory = tmp_path_factory.mktemp("umt5") / "umt5"
    hf.save_pretrained(directory, safe_serialization=True)
    return directory


def _want(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state


def _max_abs(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("masked", [False, True])
def test_parity_with_transformers(hf, folder, masked):
    enc = fastenc.load(folder, backend="torch", cache=False)
    assert enc.config.per_layer_bias and enc.config.projection_dim is None and enc.config.num_layers == 3
    mask = MASK if masked else None
    with torch.no_grad():
        got = enc(IDS, mask)
    want = _want(hf, IDS, mask)
    assert got.shape == want.shape == (*IDS.shape, 32)
    real = MASK.bool() if masked else torch.ones_like(MASK, dtype=torch.bool)
    assert _max_abs(got[real], want[real]) <= 1e-5


def test_every_layer_uses_its_own_table(folder):
    enc = fastenc.load(folder, backend="torch", cache=False)
    names = {n for n, _ in enc.model.named_parameters()}
    assert {f"blocks.{i}.rel_bias.weight" for i in range(3)} <= names and "rel_bias.weight" not in names
    with torch.no_grad():
        before = enc(IDS, MASK)
        enc.model.blocks[2].rel_bias.weight.add_(torch.randn(8, 4))  # only the last layer's table
        assert _max_abs(enc(IDS, MASK), before) > 1e-3


def test_diffusers_text_encoder_subfolder_and_sharded(hf, tmp_path):
    root = tmp_path / "wan-pipeline"
    hf.save_pretrained(root / "text_encoder", safe_serialization=True, max_shard_size="20KB")
    assert (root / "text_encoder" / "model.safetensors.index.json").is_file()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                       "text_encoder": ["transformers", "UMT5EncoderModel"]}))
    enc = fastenc.load(root, subfolder="text_encoder", backend="torch", cache=False)
    with torch.no_grad():
        got = enc(IDS)
    assert _max_abs(got, _want(hf, IDS, None)) <= 1e-5


def test_fastenc_save_round_trips(hf, folder, tmp_path):
    enc = fastenc.load(folder, backend="torch", cache=False)
    out = fastenc.save(enc, tmp_path / "saved")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "umt5" and cfg["architectures"] == ["UMT5EncoderModel"]
    back = fastenc.load(out, backend="torch", cache=False)
    assert back.config == enc.config
    with torch.no_grad():
        assert torch.equal(back(IDS, MASK), enc(IDS, MASK))
    # transformers reads fastenc's config.json as a umT5 config
    import transformers

    assert isinstance(transformers.AutoConfig.from_pretrained(out), transformers.UMT5Config)


def test_config_round_trip_and_t5_unchanged():
    import transformers

    cfg = EncoderConfig.from_hf_dict(_umt5_config().to_dict())
    assert cfg.per_layer_bias and cfg.vocab_size == 512
    assert EncoderConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    wan = EncoderConfig.from_hf_dict(_umt5_config(vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64,
                                                  num_heads=64, num_layers=24, relative_attention_num_buckets=32,
                                                  relative_attention_max_distance=128).to_dict())
    assert wan.per_layer_bias and wan.vocab_size == 256384
    t5 = EncoderConfig.from_hf_dict(transformers.T5Config(d_model=32, d_ff=48, num_layers=2, num_heads=4).to_dict())
    assert not t5.per_layer_bias and t5.to_hf_dict()["model_type"] == "t5"
    mt5 = EncoderConfig.from_hf_dict(transformers.MT5Config(d_model=32, d_ff=48, num_layers=2, num_heads=4).to_dict())
    assert not mt5.per_layer_bias and mt5.vocab_size == 250112
    assert t5.num_parameters + 1 * 32 * 4 == t5.replace(per_layer_bias=True).num_parameters
    from fastenc.model import T5Encoder

    with torch.device("meta"):
        names = [n for n, _ in T5Encoder(t5.replace(projection_dim=None)).named_parameters()]
    assert names[:2] == ["embed.weight", "rel_bias.weight"] and not any(".rel_bias." in n for n in names)


def test_checkpoint_without_config_infers_per_layer_bias(hf, folder, tmp_path):
    single = tmp_path / "bare" / "umt5.safetensors"
    single.parent.mkdir()
    single.write_bytes((folder / "model.safetensors").read_bytes())
    enc = fastenc.load(single, backend="torch", cache=False)
    assert enc.config.per_layer_bias
    with torch.no_grad():
        got = enc(IDS, MASK)
    # max_distance (20) is not in the shapes: without config.json the default (128) applies
    assert enc.config.max_distance == 128 and got.shape == (*IDS.shape, 32)


@pytest.mark.parametrize("model_type", ["bert", "mt5x", 7])
def test_unsupported_model_type_is_one_error(folder, tmp_path, model_type):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as info:
        fastenc.load(bad, backend="torch", cache=False)
    assert str(info.value) == (f"{bad / 'config.json'}: model_type {model_type!r} is not a model fastenc reads; "
                               "supported model types: t5, mt5, umt5")


def test_another_models_checkpoint_says_its_model_type(tmp_path):
    from safetensors.torch import save_file

    bert = tmp_path / "bert"
    bert.mkdir()
    save_file({"embeddings.word_embeddings.weight": torch.zeros(8, 4),
               "encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)}, str(bert / "model.safetensors"))
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 4}))
    with pytest.raises(CheckpointError) as info:
        fastenc.load(bert, backend="torch", cache=False)
    assert str(info.value) == (f"{bert / 'config.json'}: model_type 'bert' is not a model fastenc reads; "
                               "supported model types: t5, mt5, umt5")


def test_umt5_weights_under_a_t5_config_say_so(folder, tmp_path):
    bad = tmp_path / "t5cfg"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "t5"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected key .*block\.1\..*relative_attention_bias.* \(\+1 more\) "
                                              r"for a 3-layer T5 config; .*model_type 'umt5'"):
        fastenc.load(bad, backend="torch", cache=False)


def test_cpu_backend(hf, folder):
    enc = fastenc.load(folder, backend="cpu", cache=False)
    assert enc.backend == "cpu"
    with torch.no_grad():
        got = enc(IDS, MASK)
    want = _want(hf, IDS, MASK)
    cos = F.cosine_similarity(got.float(), want, dim=-1)[MASK.bool()]
    assert float(cos.min()) >= 0.999, float(cos.min())


def test_triton_ops_take_each_layers_table(folder, monkeypatch):
    """The triton op table builds its bias object from the table it is given: one per layer here."""
    pytest.importorskip("triton")
    from fastenc.kernels import TritonOps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref = fastenc.load(folder, backend="torch", device=device, dtype="fp32", cache=False)
    enc = fastenc.load(folder, backend="triton", device=device, dtype="fp32", cache=False)
    assert isinstance(enc.model.ops, TritonOps)
    ids, mask = IDS.to(device), MASK.to(device)
    with torch.no_grad():
        got, want = enc(ids, mask), ref(ids, mask)
    real = mask.bool()
    assert _max_abs(got[real], want[real]) <= 1e-4


@pytest.fixture(scope="module")
def exported_umt5(folder, tmp_path_factory):
    """One export of the umT5 folder with both graphs: ONNX and an AOTInductor CPU package."""
    pytest.importorskip("onnxruntime")
    from fastenc.exporters.pipeline import ExportRequest, export

    out = tmp_path_factory.mktemp("umt5-export") / "export"
    return export(ExportRequest(out=out, checkpoint=str(folder), max_batch=4, max_seq=16, target="pixart-alpha",
                                aoti=True))


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_exported_graph_parity(hf, exported_umt5, backend):
    """Each exported graph computes every layer's own bias table: transformers' umT5 within 1e-4 (fp32)."""
    rows = {r.backend: r for r in exported_umt5.report.rows}
    assert rows[backend].status == "pass", rows[backend]
    enc = fastenc.load(exported_umt5.directory, backend=backend, cache=False)
    assert enc.backend == backend and enc.config.per_layer_bias
    for ids, mask in ((IDS, MASK), (IDS[:1, :5], None)):
        with torch.no_grad():
            got = enc(ids, mask)
        want = _want(hf, ids, mask)
        real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
        assert _max_abs(got[real], want[real]) <= 1e-4


def test_cpu_backend_never_quantises_the_per_layer_bias_tables():
    """The bias tables are read by lookup, not multiplied: no int8 plan (not even int8='all') names them."""
    from fastenc.backends import cpu as fcpu
    from fastenc.model import T5Encoder

    from reference import TINY

    model = T5Encoder(TINY.replace(per_layer_bias=True))
    names = fcpu.linear_weight_names(model)
    assert names and not [n for n in names if "rel_bias" in n]
