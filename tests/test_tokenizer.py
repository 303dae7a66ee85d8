"""fastenc.tokenizer: parity with transformers' T5TokenizerFast, folder resolution, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTok
from tokenizers.models import BPE

from fastenc.errors import ConfigError, InputError
from fastenc.tokenizer import TokenBatch, Tokenizer
from helpers import PROMPTS, make_t5_spiece_model, make_t5_tokenizer_json

EXTRA = [
    "  leading and trailing spaces  ",
    "Zebra with ÄÖ and 中文 characters",
    "numbers 1234 and punctuation!?;:",
    "a" * 40,
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("t5tok")
    make_t5_tokenizer_json(directory)
    return directory


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.T5TokenizerFast.from_pretrained(str(tok_dir))


def _clip_like(directory: Path) -> None:
    """A BPE tokenizer.json, standing in for a CLIP tokenizer in a diffusers pipeline folder."""
    directory.mkdir(parents=True, exist_ok=True)
    HFTok(BPE(vocab={"a": 0, "b": 1, "<unk>": 2}, merges=[], unk_token="<unk>")).save(str(directory / "tokenizer.json"))


# ---- parity with T5TokenizerFast -------------------------------------------------------


@pytest.mark.parametrize("max_length", [3, 8, 16, 77, 120])
@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_matches_t5_tokenizer_fast(tok: Tokenizer, hf, max_length: int, padding: str) -> None:
    prompts = PROMPTS + EXTRA
    got = tok(prompts, max_length=max_length, padding=padding)
    ref = hf(prompts, padding=padding, max_length=max_length, truncation=True, return_tensors="pt")
    assert got.input_ids.dtype == torch.long and got.attention_mask.dtype == torch.long
    assert torch.equal(got.input_ids, ref.input_ids)
    assert torch.equal(got.attention_mask, ref.attention_mask)
    lengths = [len(hf(p).input_ids) for p in prompts]  # untruncated, with </s>
    expected = [i for i, n in enumerate(lengths) if n > max_length]
    assert got.truncated == expected and got.num_truncated == len(expected)


@pytest.mark.parametrize(
    "target, length", [("flux-dev", 512), ("flux-schnell", 256), ("sd3", 256), ("pixart-alpha", 120)]
)
def test_target_lengths(tok: Tokenizer, hf, target: str, length: int) -> None:
    got = tok(PROMPTS, target=target)
    ref = hf(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    assert got.input_ids.shape == (len(PROMPTS), length)
    assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.attention_mask, ref.attention_mask)
    assert got.num_truncated == 0


def test_truncation_keeps_eos_and_warns(tok: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        batch = tok(PROMPTS, max_length=16)
    assert batch.num_truncated >= 1 and len(PROMPTS) - 1 in batch.truncated
    for i in batch.truncated:
        assert batch.input_ids[i, -1].item() == tok.eos_token_id
        assert batch.attention_mask[i].sum().item() == 16
    assert f"{batch.num_truncated} of {len(PROMPTS)} prompts" in caplog.text
    # short prompt: tokens, then </s>, then padding with mask 0
    row, mask = batch.input_ids[0], batch.attention_mask[0]
    n = int(mask.sum())
    assert row[n - 1].item() == tok.eos_token_id and (row[n:] == tok.pad_token_id).all() and (mask[n:] == 0).all()


def test_no_warning_without_truncation(tok: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        batch = tok(PROMPTS[:2], target="pixart-alpha")
    assert batch.num_truncated == 0 and batch.truncated == [] and "truncated" not in caplog.text


def test_longest_padding_width(tok: Tokenizer) -> None:
    short = tok(["a cat", "a dog"], padding="longest")
    assert short.input_ids.shape[1] == int(short.attention_mask.sum(1).max()) < 512
    capped = tok(PROMPTS, max_length=16, padding="longest")
    assert capped.input_ids.shape == (len(PROMPTS), 16)


def test_single_string_and_batch_type(tok: Tokenizer) -> None:
    batch = tok("a cat", max_length=8)
    assert isinstance(batch, TokenBatch) and len(batch) == 1 and batch.input_ids.shape == (1, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.num_truncated = 3  # type: ignore[misc]


def test_properties_decode_and_save(tok: Tokenizer, hf, tmp_path: Path) -> None:
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert tok.vocab_size == len(hf)
    batch = tok(["a cat", "a dog on the beach"], max_length=16)
    assert tok.decode(batch.input_ids[0]) == "a cat"
    assert tok.decode(batch.input_ids) == ["a cat", "a dog on the beach"]
    assert tok.decode(batch.input_ids[0], skip_special_tokens=False).startswith("a cat</s>")
    saved = tok.save(tmp_path / "out")
    assert saved == tmp_path / "out" / "tokenizer.json"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["tokenizer.json"]  # no temp file left
    again = Tokenizer.from_pretrained(tmp_path / "out")
    assert torch.equal(again(PROMPTS, max_length=16).input_ids, tok(PROMPTS, max_length=16).input_ids)


# ---- input validation ------------------------------------------------------------------


def test_bad_prompts(tok: Tokenizer) -> None:
    with pytest.raises(InputError, match="^prompts is empty$"):
        tok([])
    with pytest.raises(InputError, match=r"prompts\[1\] is int, expected str"):
        tok(["a cat", 3])  # type: ignore[list-item]
    with pytest.raises(InputError, match=r"prompts\[0\] is NoneType"):
        tok([None])  # type: ignore[list-item]


def test_bad_options(tok: Tokenizer) -> None:
    with pytest.raises(ConfigError, match="unknown target 'flux-pro'"):
        tok("a cat", target="flux-pro")
    with pytest.raises(ConfigError, match="padding"):
        tok("a cat", padding="do_not_pad")
    with pytest.raises(ConfigError, match="max_length"):
        tok("a cat", max_length=0)


# ---- resolution --------------------------------------------------------------------------


def test_flux_pipeline_folder(tmp_path: Path, tok: Tokenizer) -> None:
    _clip_like(tmp_path / "tokenizer")
    make_t5_tokenizer_json(tmp_path / "tokenizer_2")
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    assert torch.equal(loaded(PROMPTS, max_length=16).input_ids, tok(PROMPTS, max_length=16).input_ids)


def test_sd3_pipeline_folder_skips_clip(tmp_path: Path, tok: Tokenizer) -> None:
    _clip_like(tmp_path / "tokenizer")
    _clip_like(tmp_path / "tokenizer_2")  # SD3: CLIP-G
    make_t5_tokenizer_json(tmp_path / "tokenizer_3")
    for loaded in (Tokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path, subfolder="tokenizer_3")):
        assert loaded.vocab_size == tok.vocab_size
    with pytest.raises(ConfigError, match="not T5 SentencePiece"):
        Tokenizer.from_pretrained(tmp_path, subfolder="tokenizer_2")


def test_direct_file_path(tok_dir: Path, tok: Tokenizer) -> None:
    loaded = Tokenizer.from_pretrained(tok_dir / "tokenizer.json")
    assert torch.equal(loaded("a cat").input_ids, tok("a cat").input_ids)


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ConfigError, match="no T5 tokenizer.json or spiece.model") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer_2") in str(info.value)
    with pytest.raises(ConfigError, match="no T5 tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path, subfolder="tokenizer")


def test_spiece_model_folder(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    model = make_t5_spiece_model(tmp_path / "pixart" / "tokenizer")
    loaded = Tokenizer.from_pretrained(tmp_path / "pixart")  # PixArt layout: tokenizer/spiece.model
    ref = spm.SentencePieceProcessor(model_file=str(model))
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
    for prompt in PROMPTS + EXTRA[:1]:
        got = loaded(prompt, max_length=512, padding="longest").input_ids[0].tolist()
        assert got == ref.encode(prompt) + [1], prompt
    renamed = tmp_path / "other.model"
    shutil.copyfile(model, renamed)
    assert Tokenizer.from_pretrained(renamed)("a cat").input_ids.tolist() == loaded("a cat").input_ids.tolist()


def test_spiece_without_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "spiece.model").write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match="spiece.model but no tokenizer.json.*transformers"):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(ConfigError, match="does not exist") as info:
        Tokenizer.from_pretrained(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        Tokenizer.from_pretrained("./relative/missing")


def test_hub_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # so the id cannot resolve to a local folder
    with pytest.raises(ConfigError) as info:
        Tokenizer.from_pretrained("black-forest-labs/FLUX.1-dev")
    message = str(info.value)
    assert "'black-forest-labs/FLUX.1-dev'" in message
    assert "pass a local folder that contains tokenizer.json" in message


def test_hub_download_picks_t5_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    hub = tmp_path / "hub"
    _clip_like(hub / "tokenizer")
    _clip_like(hub / "tokenizer_2")
    make_t5_tokenizer_json(hub / "tokenizer_3")
    calls: list[str | None] = []

    def fake_download(repo_id: str, filename: str, *, subfolder: str | None = None, **_: object) -> str:
        assert repo_id == "org/sd3-like" and filename == "tokenizer.json"
        calls.append(subfolder)
        path = hub / (subfolder or "") / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{path} not found")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.chdir(tmp_path)
    loaded = Tokenizer.from_pretrained("org/sd3-like")
    assert calls == [None, "tokenizer_2", "tokenizer_3"]
    assert torch.equal(loaded(PROMPTS, max_length=16).input_ids, tok(PROMPTS, max_length=16).input_ids)


def test_helper_is_t5_shaped(tok_dir: Path) -> None:
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    assert data["model"]["type"] == "Unigram" and data["model"]["unk_id"] == 2
    assert [v[0] for v in data["model"]["vocab"][:3]] == ["<pad>", "</s>", "<unk>"]
    assert 100 <= len(data["model"]["vocab"]) <= 500
