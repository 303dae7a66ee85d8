"""fastenc.cache: LRU behaviour, the on-disk store, corrupt files."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from fastenc.cache import CacheStats, EmbeddingCache, key
from fastenc.errors import ConfigError, InputError


def _entry(seed: int, length: int = 8, dim: int = 6, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(length, dtype=torch.long)
    mask[: 3 + seed % 4] = 1
    return torch.randn(length, dim, generator=g).to(dtype), mask


def test_key_normalises_dtype() -> None:
    assert key("fp", "flux-dev", torch.bfloat16, "a cat") == key("fp", "flux-dev", "bfloat16", "a cat")
    assert key("fp", "flux-dev", "torch.float16", "a") == ("fp", "flux-dev", "float16", "a")
    assert key("fp", "flux-dev", "bfloat16", "a") != key("fp", "sd3", "bfloat16", "a")
    assert EmbeddingCache.key is key or EmbeddingCache.key("f", "t", "d", "p") == key("f", "t", "d", "p")


def test_lru_eviction_and_stats() -> None:
    cache = EmbeddingCache(max_entries=2)
    ka, kb, kc = (key("fp", "flux-dev", "float32", p) for p in ("a", "b", "c"))
    cache.put(ka, *_entry(0))
    cache.put(kb, *_entry(1))
    assert cache.get(ka) is not None  # touch a: b becomes least recently used
    cache.put(kc, *_entry(2))
    assert len(cache) == 2 and ka in cache and kc in cache and kb not in cache
    assert cache.get(kb) is None
    embeds, mask = cache.get(kc)  # type: ignore[misc]
    assert torch.equal(embeds, _entry(2)[0]) and torch.equal(mask, _entry(2)[1])
    assert cache.stats == CacheStats(hits=2, misses=1, disk_hits=0)
    cache.clear()
    assert len(cache) == 0 and cache.stats == CacheStats(0, 0, 0) and cache.get(ka) is None


def test_put_copies_to_cpu_and_validates() -> None:
    cache = EmbeddingCache()
    k = key("fp", "flux-dev", "float32", "a")
    embeds, mask = _entry(0)
    original = embeds.clone()
    cache.put(k, embeds, mask)
    embeds.add_(1.0)  # caller edits its tensor in place afterwards
    got, _ = cache.get(k, device="cpu")  # type: ignore[misc]
    assert got.device.type == "cpu" and torch.equal(got, original)
    with pytest.raises(InputError, match="embeds"):
        cache.put(k, torch.zeros(2, 8, 6), torch.ones(8))
    with pytest.raises(InputError):
        cache.put(k, torch.zeros(8, 6), torch.ones(7))
    with pytest.raises(ConfigError):
        EmbeddingCache(max_entries=-1)


def test_disk_round_trip(tmp_path: Path) -> None:
    k = key("fingerprint-1", "pixart-alpha", torch.bfloat16, "a red fox — 狐")
    embeds, mask = _entry(3, dtype=torch.bfloat16)
    EmbeddingCache(disk_dir=tmp_path).put(k, embeds, mask)
    digest = hashlib.sha256(json.dumps(list(k), ensure_ascii=False).encode()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [f"{digest}.safetensors"]  # no temp files left behind

    fresh = EmbeddingCache(disk_dir=tmp_path)  # e.g. a new process
    assert len(fresh) == 0
    got = fresh.get(k)
    assert got is not None
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], embeds) and torch.equal(got[1], mask)
    assert fresh.stats == CacheStats(hits=1, misses=0, disk_hits=1) and len(fresh) == 1
    assert fresh.get(key("fingerprint-2", "pixart-alpha", torch.bfloat16, "a red fox — 狐")) is None
    fresh.clear(disk=True)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_disk_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    k = key("fp", "flux-dev", "float32", "a cat")
    writer = EmbeddingCache(disk_dir=tmp_path)
    writer.put(k, *_entry(0))
    (file,) = tmp_path.iterdir()
    file.write_bytes(file.read_bytes()[:40])  # truncated write from a crashed process
    reader = EmbeddingCache(disk_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        assert reader.get(k) is None
    assert "ignoring unreadable embedding cache file" in caplog.text and str(file) in caplog.text
    assert reader.stats.misses == 1
    reader.put(k, *_entry(5))  # recomputed value overwrites the corrupt file
    again = EmbeddingCache(disk_dir=tmp_path).get(k)
    assert again is not None and torch.equal(again[0], _entry(5)[0])


def test_disk_file_for_another_key_is_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ka, kb = key("fp", "flux-dev", "float32", "a"), key("fp", "flux-dev", "float32", "b")
    cache = EmbeddingCache(disk_dir=tmp_path)
    cache.put(ka, *_entry(0))
    (file_a,) = tmp_path.iterdir()
    cache.put(kb, *_entry(1))
    file_b = next(p for p in tmp_path.iterdir() if p != file_a)
    file_b.write_bytes(file_a.read_bytes())  # b's file now holds a's entry
    with caplog.at_level(logging.WARNING, logger="fastenc"):
        assert EmbeddingCache(disk_dir=tmp_path).get(kb) is None
    assert "does not match" in caplog.text
