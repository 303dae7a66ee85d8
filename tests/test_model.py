"""The model against transformers' T5 (the numerical reference)."""

import pytest
import torch

import fastenc
from fastenc.config import SIZES
from fastenc.model import T5Encoder
from reference import TINY, Reference, cos_per_token, rel_err, write_distillt5


def _ids(cfg, B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
    ids[:, -1] = 1
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = Reference(TINY)
    path = write_distillt5(ref, TINY, tmp_path_factory.mktemp("tiny") / "ck")
    return ref, fastenc.load(path, cache=False, backend="torch")


@pytest.mark.parametrize("B,L", [(1, 1), (3, 7), (2, 77), (1, 300)])
@pytest.mark.parametrize("masked", [False, True])
def test_tiny_parity(tiny, B, L, masked):
    ref, enc = tiny
    ids = _ids(TINY, B, L)
    mask = None
    if masked:
        mask = torch.ones_like(ids)
        mask[-1, max(1, L // 2):] = 0
    with torch.no_grad():
        out, want = enc(ids, mask), ref(ids, mask)
    assert out.shape == (B, L, TINY.projection_dim)
    assert rel_err(out, want) <= 1e-5


def test_base_shape_parity(tmp_path):
    cfg = SIZES["base"]
    ref = Reference(cfg, seed=1)
    enc = fastenc.load(write_distillt5(ref, cfg, tmp_path / "base"), cache=False, backend="torch")
    assert enc.config.d_model == 768 and enc.config.num_layers == 12 and enc.config.projection_dim == 4096
    ids = _ids(cfg, 2, 64)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.no_grad():
        out, want = enc(ids, mask), ref(ids, mask)
    assert out.shape == (2, 64, 4096)
    assert rel_err(out, want) <= 1e-5


def test_padding_invariance(tiny):
    _, enc = tiny
    ids = _ids(TINY, 1, 9)
    with torch.no_grad():
        alone = enc(ids, torch.ones_like(ids))[0]  # [9, P]
        for pad_to in (12, 40):
            batch = torch.zeros(3, pad_to, dtype=torch.long)
            mask = torch.zeros_like(batch)
            batch[0, :9], mask[0, :9] = ids[0], 1
            batch[1:] = _ids(TINY, 2, pad_to, seed=pad_to)
            mask[1:] = 1
            out = enc(batch, mask)[0, :9]
            assert (out - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_padding_changes_output_without_mask(tiny):
    """Flux passes no mask: padding then takes part in attention (the test above could not pass vacuously)."""
    _, enc = tiny
    ids = _ids(TINY, 1, 9)
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        assert (enc(padded)[0, :9] - enc(ids)[0]).abs().max() > 1e-4


def test_teacher_has_no_projector():
    with torch.device("meta"):
        model = T5Encoder(SIZES["xxl"])
    assert model.projector is None and SIZES["xxl"].output_dim == 4096
    n = sum(p.numel() for p in model.parameters())
    assert 4.7e9 < n < 4.8e9  # 4.76 B encoder parameters


def test_fp16_no_overflow(tmp_path):
    """Blow the residual stream past 65504: fp16 must stay finite and close to fp32."""
    ref = Reference(TINY)
    with torch.no_grad():
        for block in ref.encoder.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(30000.0)
    path = write_distillt5(ref, TINY, tmp_path / "ck")
    ids = _ids(TINY, 2, 33)
    with torch.no_grad():
        hidden = ref.encoder(input_ids=ids, output_hidden_states=True).hidden_states  # per-block residuals
        assert max(float(h.abs().max()) for h in hidden[1:-1]) > 65504  # really past the fp16 range
        want = fastenc.load(path, cache=False, backend="torch")(ids)
        half = fastenc.load(path, dtype="fp16", cache=False, backend="torch")
        assert half.model.blocks[0].ffn.wo.weight.dtype == torch.float32
        assert half.model.blocks[0].ffn.wi.weight.dtype == torch.float16
        got = half(ids)
    assert got.dtype == torch.float16
    assert torch.isfinite(got).all()
    assert cos_per_token(got, want).min() > 0.999


def test_bf16_close_to_fp32(tiny, tmp_path):
    ref, enc = tiny
    path = write_distillt5(ref, TINY, tmp_path / "ck")
    bf16 = fastenc.load(path, dtype="bf16", cache=False, backend="torch")
    ids = _ids(TINY, 2, 20)
    with torch.no_grad():
        assert cos_per_token(bf16(ids), enc(ids)).min() > 0.99


def test_random_init_says_so():
    enc = fastenc.load(size="small", random_init=True, cache=False, backend="torch")
    assert "RANDOM-INIT" in repr(enc)
    ids = _ids(enc.config, 1, 8)
    with torch.no_grad():
        out = enc(ids)
    assert out.shape == (1, 8, 4096) and torch.isfinite(out).all() and out.std() > 0
