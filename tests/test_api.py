"""Encoder.encode, the embedding cache in use, and the CLI.

Every load names its backend (``auto`` picks ``cpu`` on CPUs with native bf16 and ``torch`` elsewhere);
what must hold for both runs for both: the ``cpu`` backend runs on any x86 CPU when asked for."""

import pytest
import torch
from safetensors.torch import load_file

import fastenc
from fastenc.cache import EmbeddingCache
from fastenc.cli import main
from fastenc.errors import ConfigError, InputError
from fastenc.tokenizer import Tokenizer
from helpers import PROMPTS, make_t5_tokenizer_json
from reference import TINY, Reference, write_distillt5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = write_distillt5(Reference(TINY), TINY, tmp_path_factory.mktemp("api") / "ck")
    make_t5_tokenizer_json(d)  # tokenizer.json beside the weights is found automatically
    return d


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fastenc-cache"))  # cpu int8 plans


@pytest.fixture(params=["torch", "cpu"])
def backend(request) -> str:
    return request.param


@pytest.fixture()
def enc(ckpt, backend):
    return fastenc.load(ckpt, backend=backend)


def test_encode_matches_forward(enc):
    out = enc.encode(PROMPTS[:3], target="pixart-alpha")
    assert out.embeds.shape == (3, 120, TINY.projection_dim) and out.mask.shape == (3, 120)
    batch = enc.tokenizer(PROMPTS[:3], target="pixart-alpha")
    with torch.no_grad():
        want = enc(batch.input_ids, batch.attention_mask)  # PixArt passes the mask
    torch.testing.assert_close(out.embeds, want)
    assert torch.equal(out.mask, batch.attention_mask)


def test_flux_target_encodes_padding_like_the_pipeline(enc):
    out = enc.encode(["a cat"], target="flux-schnell")
    ids = enc.tokenizer(["a cat"], target="flux-schnell").input_ids
    with torch.no_grad():
        torch.testing.assert_close(out.embeds, enc(ids))  # Flux gives T5 no mask
        assert not torch.allclose(out.embeds, enc(ids, (ids != 0).long()))


def test_repeated_prompts_come_from_cache(enc):
    first = enc.encode(["a red fox", "a blue bird"], target="sd3")
    before = enc.cache.stats
    second = enc.encode(["a blue bird", "a red fox", "a new prompt"], target="sd3")
    after = enc.cache.stats
    assert after.hits - before.hits == 2 and after.misses - before.misses == 1
    torch.testing.assert_close(second.embeds[0], first.embeds[1])
    torch.testing.assert_close(second.embeds[1], first.embeds[0])
    # another target is another cache key
    enc.encode(["a red fox"], target="pixart-alpha")
    assert enc.cache.stats.hits == after.hits


def test_disk_cache_survives_a_new_encoder(ckpt, backend, tmp_path):
    a = fastenc.load(ckpt, backend=backend, cache=EmbeddingCache(disk_dir=tmp_path / "cache"))
    want = a.encode(["a lighthouse at dusk"], target="sd3").embeds
    b = fastenc.load(ckpt, backend=backend, cache=EmbeddingCache(disk_dir=tmp_path / "cache"))
    got = b.encode(["a lighthouse at dusk"], target="sd3").embeds
    assert b.cache.stats.disk_hits == 1
    torch.testing.assert_close(got, want)


def test_bad_prompts(enc):
    with pytest.raises(InputError, match="^prompts is empty$"):
        enc.encode([])
    with pytest.raises(InputError, match=r"^prompts\[1\] is int, expected str$"):
        enc.encode(["ok", 3])
    with pytest.raises(ConfigError, match="unknown target 'sdxl'"):
        enc.encode(["ok"], target="sdxl")


def test_bad_tensors(enc):
    with pytest.raises(InputError, match="2-D tensor"):
        enc(torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="out of range"):
        enc(torch.tensor([[1, 10**6]]))
    with pytest.raises(InputError, match="attention_mask shape"):
        enc(torch.tensor([[1, 2]]), torch.ones(1, 3))
    with pytest.raises(InputError, match="integer token ids"):
        enc(torch.ones(1, 3))


def test_no_tokenizer_message(ckpt, tmp_path):
    enc = fastenc.load(size="small", random_init=True, backend="torch")
    with pytest.raises(ConfigError, match="no tokenizer: pass tokenizer="):
        enc.encode("a prompt")


def test_unknown_backend_and_dtype(ckpt):
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'"):
        fastenc.load(ckpt, backend="tensorflow")
    with pytest.raises(ConfigError, match="unknown dtype 'int4'"):
        fastenc.load(ckpt, dtype="int4")


def test_save_keeps_tokenizer(enc, ckpt, backend, tmp_path):
    d = fastenc.save(enc, tmp_path / "saved")
    again = fastenc.load(d, backend=backend)
    assert isinstance(again.tokenizer, Tokenizer)
    got, first = again.encode(["a cat"]).embeds, enc.encode(["a cat"]).embeds
    if backend == "cpu":
        # the saved folder is another checkpoint, so the reload plans again: where int8 candidates run (VNNI,
        # AMX) the two searches may time another candidate fastest, each within the floor of fp32
        cos = torch.nn.functional.cosine_similarity(got.float(), first.float(), dim=-1)  # [1, L]
        assert float(cos.min()) >= 0.998
    else:
        torch.testing.assert_close(got, first)
    # the weights written are the checkpoint's (fp32), whichever backend ran: the reference reproduces exactly
    want = fastenc.load(ckpt, backend="torch").encode(["a cat"]).embeds
    assert torch.equal(fastenc.load(d, backend="torch").encode(["a cat"]).embeds, want)


def test_cli_encode(ckpt, backend, tmp_path):
    out = tmp_path / "out.safetensors"
    assert main(["encode", "--checkpoint", str(ckpt), "--backend", backend, "a red fox", "a blue bird", "--target",
                 "sd3", "-o", str(out)]) == 0
    tensors = load_file(out)
    assert tensors["text_embeddings"].shape == (2, 256, TINY.projection_dim)
    want = fastenc.load(ckpt, backend=backend).encode(["a red fox", "a blue bird"], target="sd3").embeds
    torch.testing.assert_close(tensors["text_embeddings"], want.float())


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main(["encode", "--checkpoint", str(tmp_path / "missing"), "x", "-o", str(tmp_path / "o.st")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc: error: ") and "missing: no such file or directory" in err
    assert err.count("\n") == 1 and not (tmp_path / "o.st").exists()


def test_cli_info(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for word in ("torch", "onnxruntime", "tensorrt", "gpu", "backend triton"):
        assert word in text
