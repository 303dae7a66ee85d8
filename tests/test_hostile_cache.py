"""Hostile embedding-cache situations: new weights or another tokenizer at the same path, damaged disk
entries, memory bounded in bytes, clear() inside a checkpoint folder, unwritable folders, the umask."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.cache import DEFAULT_MAX_BYTES, EmbeddingCache, clear_disk, default_disk_dir, disk_usage, key
from fastenc.errors import ConfigError
from fastenc.tokenizer import Tokenizer
from helpers import make_t5_tokenizer_json
from tiny_checkpoint import write_checkpoint

PROMPT = "a red fox in the snow"


@pytest.fixture()
def ck(tmp_path) -> Path:
    directory = write_checkpoint(tmp_path / "ck", seed=0)
    make_t5_tokenizer_json(directory)
    return directory


def _encode(enc):
    return enc.encode([PROMPT], target="pixart-alpha").embeds[0]


def _direct(enc):
    batch = enc.tokenizer([PROMPT], target="pixart-alpha")
    with torch.no_grad():
        return enc(batch.input_ids, batch.attention_mask)[0]


def _entry(seed: int, length: int = 8, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(length, dim, generator=g), torch.ones(length, dtype=torch.long)


# ---------------------------------------------------------------------------- the key


def test_new_weights_at_the_same_path_miss(ck, tmp_path):
    cache = EmbeddingCache(disk_dir=tmp_path / "store")
    old = _encode(fastenc.load(ck, backend="torch", cache=cache))
    write_checkpoint(ck, seed=1)  # same path, same shapes, new values
    new_enc = fastenc.load(ck, backend="torch", cache=cache)
    new = _encode(new_enc)
    assert cache.stats.hits == 0 and cache.stats.misses == 2
    assert not torch.allclose(new, old)
    torch.testing.assert_close(new, _direct(new_enc))
    fresh = EmbeddingCache(disk_dir=tmp_path / "store")  # the disk store misses too
    _encode(fastenc.load(ck, backend="torch", cache=fresh))
    assert fresh.stats.disk_hits == 1  # the entry the new weights wrote, not the old one
    torch.testing.assert_close(fresh.get(next(iter(fresh._data)))[0], new)


def test_another_tokenizer_misses(ck, tmp_path):
    small = make_t5_tokenizer_json(tmp_path / "tok-small", vocab_size=120).parent
    cache = EmbeddingCache()
    a = fastenc.load(ck, backend="torch", cache=cache)
    b = fastenc.load(ck, backend="torch", cache=cache, tokenizer=small)
    assert a.fingerprint != b.fingerprint
    first, second = _encode(a), _encode(b)
    assert cache.stats.hits == 0
    torch.testing.assert_close(second, _direct(b))
    assert not torch.allclose(first, second)
    # identity is the content, not the object: the same tokenizer loaded again hits
    again = fastenc.load(ck, backend="torch", cache=cache, tokenizer=Tokenizer.from_pretrained(small))
    assert again.fingerprint == b.fingerprint
    _encode(again)
    assert cache.stats.hits == 1


def test_the_same_content_elsewhere_hits(ck, tmp_path):
    cache = EmbeddingCache()
    _encode(fastenc.load(ck, backend="torch", cache=cache))
    copy = Path(shutil.copytree(ck, tmp_path / "copy"))  # copy2 keeps mtimes: the same content
    _encode(fastenc.load(copy, backend="torch", cache=cache))
    assert cache.stats.hits == 1
    assert fastenc.load(ck, backend="torch", dtype="fp16", cache=cache).fingerprint != \
        fastenc.load(ck, backend="torch", cache=cache).fingerprint


# ---------------------------------------------------------------------------- disk entries


@pytest.mark.parametrize("where, reason", [("data", "checksum mismatch (damaged or altered bytes)"),
                                           ("header", "")])
def test_damaged_disk_entry_is_dropped_with_a_warning(tmp_path, caplog, where, reason):
    k = key("fp", "pixart-alpha", "float32", PROMPT)
    EmbeddingCache(disk_dir=tmp_path).put(k, *_entry(0))
    (file,) = tmp_path.iterdir()
    data = bytearray(file.read_bytes())
    data[-5 if where == "data" else 20] ^= 0x01  # one flipped bit
    file.write_bytes(bytes(data))
    reader = EmbeddingCache(disk_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        assert reader.get(k) is None
    (record,) = [r for r in caplog.records if "embedding cache file" in r.getMessage()]
    assert record.getMessage().startswith(f"ignoring unreadable embedding cache file {file} (")
    assert record.getMessage().endswith(f"{reason}); deleted")
    assert not file.exists() and reader.stats.misses == 1
    reader.put(k, *_entry(0))
    assert torch.equal(EmbeddingCache(disk_dir=tmp_path).get(k)[0], _entry(0)[0])


def test_disk_entries_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        EmbeddingCache(disk_dir=tmp_path / "store").put(key("fp", "sd3", "float32", "a"), *_entry(0))
        (file,) = (tmp_path / "store").iterdir()
        assert stat.S_IMODE(file.stat().st_mode) == 0o640
        tok = make_t5_tokenizer_json(tmp_path / "tok").parent
        saved = Tokenizer.from_pretrained(tok).save(tmp_path / "saved")
        assert stat.S_IMODE(saved.stat().st_mode) == 0o640
        written = fastenc.save(fastenc.load(write_checkpoint(tmp_path / "ck"), backend="torch", cache=False),
                               tmp_path / "saved-ck")
        for name in ("model.safetensors", "config.json"):  # safetensors recreates its file 0600 itself
            assert stat.S_IMODE((written / name).stat().st_mode) == 0o640, name
        os.umask(0o022)
        EmbeddingCache(disk_dir=tmp_path / "store2").put(key("fp", "sd3", "float32", "a"), *_entry(0))
        (file,) = (tmp_path / "store2").iterdir()
        assert stat.S_IMODE(file.stat().st_mode) == 0o644
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------- memory in bytes


def test_memory_is_bounded_in_bytes():
    size = sum(t.nbytes for t in _entry(0))  # 8x6 fp32 + 8 int64 = 256 bytes
    cache = EmbeddingCache(max_bytes=3 * size)
    keys = [key("fp", "sd3", "float32", str(i)) for i in range(5)]
    for i, k in enumerate(keys):
        cache.put(k, *_entry(i))
    assert len(cache) == 3 and cache.nbytes == 3 * size
    assert keys[0] not in cache and keys[1] not in cache and keys[4] in cache
    cache.put(keys[2], *_entry(2))  # replacing an entry does not count it twice
    assert cache.nbytes == 3 * size
    assert EmbeddingCache().max_bytes == DEFAULT_MAX_BYTES == 1 << 30
    with pytest.raises(ConfigError, match=r"^max_bytes must be a non-negative integer, got -1$"):
        EmbeddingCache(max_bytes=-1)


def test_an_entry_larger_than_memory_stays_on_disk_only(tmp_path):
    cache = EmbeddingCache(max_bytes=100, disk_dir=tmp_path)
    k = key("fp", "sd3", "float32", "big")
    cache.put(k, *_entry(0))  # 256 bytes > 100
    assert len(cache) == 0 and cache.nbytes == 0
    got = cache.get(k)
    assert got is not None and torch.equal(got[0], _entry(0)[0]) and cache.stats.disk_hits == 1
    assert len(cache) == 0


def test_max_entries_still_bounds_the_count():
    cache = EmbeddingCache(max_entries=1)
    cache.put(key("f", "sd3", "float32", "a"), *_entry(0))
    cache.put(key("f", "sd3", "float32", "b"), *_entry(1))
    assert len(cache) == 1 and key("f", "sd3", "float32", "b") in cache


# ---------------------------------------------------------------------------- clear, folders


def test_clear_inside_a_checkpoint_folder_deletes_only_cache_files(ck):
    before = sorted(p.name for p in ck.iterdir())
    cache = EmbeddingCache(disk_dir=ck)
    enc = fastenc.load(ck, backend="torch", cache=cache)
    enc.encode(["a cat", "a dog"], target="sd3")
    (ck / ".tmp-abc12_xy.safetensors").write_bytes(b"killed write")  # leftover of a killed process
    (ck / ".tmp-notes.txt").write_text("mine")
    (ck / ("0" * 64 + ".safetensors")).symlink_to(ck / "model.safetensors")  # a link named like an entry
    assert disk_usage(ck)[0] == 3
    cache.clear(disk=True)
    after = sorted(p.name for p in ck.iterdir())
    assert after == sorted(before + [".tmp-notes.txt", "0" * 64 + ".safetensors"])
    assert (ck / "model.safetensors").stat().st_size > 1000
    assert fastenc.load(ck, backend="torch", cache=False).config.d_model == 16
    assert clear_disk(ck) == 0 and disk_usage(ck) == (0, 0)


def test_default_disk_dir_is_what_fastenc_cache_reports(tmp_path, monkeypatch):
    from fastenc.caches import cache_dirs

    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "root"))
    assert default_disk_dir() == tmp_path / "root" / "embeddings"
    assert {c.name: c.path for c in cache_dirs()}["embeddings"] == default_disk_dir()
    EmbeddingCache(disk_dir=default_disk_dir()).put(key("f", "sd3", "float32", "a"), *_entry(0))
    assert disk_usage() == (1, next(default_disk_dir().iterdir()).stat().st_size)
    assert clear_disk() == 1 and disk_usage() == (0, 0)


def test_unwritable_folder_degrades_to_memory_with_one_warning(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        cache = EmbeddingCache(disk_dir=blocker / "cache")
        for i in range(3):
            cache.put(key("f", "sd3", "float32", str(i)), *_entry(i))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"embedding cache folder {blocker / 'cache'} is not writable")
    assert warnings[0].endswith("; caching in memory only")
    assert cache.disk_dir is None and len(cache) == 3


def test_folder_lost_after_start_degrades_once(tmp_path, caplog):
    store = tmp_path / "store"
    cache = EmbeddingCache(disk_dir=store)
    store.rmdir()
    store.write_text("now a file")
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        for i in range(3):
            cache.put(key("f", "sd3", "float32", str(i)), *_entry(i))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is not writable" in warnings[0].getMessage()
    assert len(cache) == 3 and store.read_text() == "now a file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
