"""A damaged teacher cache is checked like any artifact when it is opened: shard names stay inside the
cache folder, each shard has the size the index records and is a complete safetensors file of the index's
shapes, and every index row lies inside its shard. Each failure is one CheckpointError naming the file (and
the row); ``python -m train`` and ``python -m train.cache_teacher`` say it in one line, exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastenc.errors import CheckpointError
from test_hostile_training import config_file, fresh_state, one_line
from test_train_support import TEXT_DIM, fresh_accelerate_state, world  # noqa: F401 (fixtures)
from train.__main__ import main as train_main
from train.teacher_cache import INDEX_NAME, CacheMeta, TeacherCache, prompt_key, write_index, write_shards

REBUILD = "; rebuild it with `python -m train.cache_teacher --force`"
L, D = 4, 8
META = CacheMeta(target="flux-dev", max_length=L, masked=False, tokenizer="t", teacher="t", dim=D,
                 pooled_dim=None, dtype="float32")
PROMPTS = [f"prompt {i}" for i in range(6)]
SHARD0 = "shard-g000-r000-00000.safetensors"
SHARD1 = "shard-g000-r000-00001.safetensors"


def encode(chunk):
    n = len(chunk)
    return torch.randn(n, L, D), torch.ones(n, L, dtype=torch.long), None


def build(folder: Path) -> Path:
    """Six prompts in two shards of three rows."""
    entries = write_shards(folder, PROMPTS, encode, meta=META, batch_size=3, shard_size=3, prefix="shard-g000-r000")
    write_index(folder, META, entries)
    return folder


def edit_index(folder: Path, change) -> Path:
    path = folder / INDEX_NAME
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))
    return path


def test_an_intact_cache_opens_and_records_shard_sizes(tmp_path):
    folder = build(tmp_path / "cache")
    index = json.loads((folder / INDEX_NAME).read_text())
    assert index["sizes"] == {s: (folder / s).stat().st_size for s in (SHARD0, SHARD1)}
    cache = TeacherCache(folder)
    embeds, mask, pooled = cache.get(PROMPTS[2:4])
    assert embeds.shape == (2, L, D) and mask.shape == (2, L) and pooled is None


def test_a_truncated_shard_names_the_file_and_both_sizes(tmp_path):
    folder = build(tmp_path / "cache")
    shard = folder / SHARD1
    size = shard.stat().st_size
    os.truncate(shard, size - 10)
    with pytest.raises(CheckpointError) as info:
        TeacherCache(folder)
    assert str(info.value) == (f"{shard}: {size - 10} bytes, index.json records {size} (truncated or rewritten "
                               f"since the cache was built){REBUILD}")


def test_a_truncated_shard_of_an_index_without_sizes_fails_its_safetensors_check(tmp_path):
    folder = build(tmp_path / "cache")
    edit_index(folder, lambda index: index.pop("sizes"))  # an index written before sizes were recorded
    shard = folder / SHARD0
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(CheckpointError) as info:
        TeacherCache(folder)
    assert str(info.value).startswith(f"{shard}: not a readable safetensors file (")


def test_index_rows_past_a_shards_end_name_the_row_and_the_shard(tmp_path):
    folder = build(tmp_path / "cache")
    key = prompt_key(PROMPTS[4])
    index = edit_index(folder, lambda index: index["entries"].__setitem__(key, [SHARD1, 7]))
    with pytest.raises(CheckpointError) as info:
        TeacherCache(folder)
    assert str(info.value) == f"{index}: entries['{key}']: row 7 is past the end of {SHARD1} (3 rows){REBUILD}"


def test_a_shard_rewritten_with_fewer_rows_is_caught_by_its_shape(tmp_path):
    folder = build(tmp_path / "cache")
    shard = folder / SHARD1
    save_file({"embeds": torch.zeros(3, L, D + 1), "mask": torch.ones(3, L, dtype=torch.uint8)}, str(shard))
    edit_index(folder, lambda index: index["sizes"].__setitem__(SHARD1, shard.stat().st_size))
    with pytest.raises(CheckpointError) as info:
        TeacherCache(folder)
    assert str(info.value) == f"{shard}: embeds is [3, {L}, {D + 1}], the cache index says [3, {L}, {D}]{REBUILD}"


@pytest.mark.parametrize("name", ["../elsewhere/shard.safetensors", "/etc/passwd", "..", "sub/x.safetensors",
                                  "index.json", 7])
def test_a_shard_named_outside_the_cache_folder_is_refused_before_it_is_read(tmp_path, name):
    folder = build(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"embeds": torch.zeros(3, L, D), "mask": torch.ones(3, L, dtype=torch.uint8)},
              str(elsewhere / "shard.safetensors"))
    key = prompt_key(PROMPTS[0])

    def point_outside(index):
        index["shards"].append(name)
        index["entries"][key] = [name, 0]

    index = edit_index(folder, point_outside)
    with pytest.raises(CheckpointError) as info:
        TeacherCache(folder)
    assert str(info.value) == (f"{index}: shard {name!r} is not a .safetensors file name inside the cache folder "
                               "(paths and '..' are refused)")


@pytest.mark.parametrize("change, message", [
    (lambda i: i["entries"].__setitem__(prompt_key("prompt 0"), [SHARD0, -1]),
     f"entries['{prompt_key('prompt 0')}'] = ['{SHARD0}', -1] is not [shard, row]"),
    (lambda i: i["entries"].__setitem__(prompt_key("prompt 0"), "x"),
     f"entries['{prompt_key('prompt 0')}'] = 'x' is not [shard, row]"),
    (lambda i: i["entries"].__setitem__(prompt_key("prompt 0"), ["other.safetensors", 0]),
     f"entries['{prompt_key('prompt 0')}'] names shard 'other.safetensors', which 'shards' does not list"),
    (lambda i: i.__setitem__("count", 60), "lists 6 prompts but records count 60 (a damaged or hand-edited index)"),
    (lambda i: i.__setitem__("shards", "x"),
     "malformed teacher cache index ('shards' must be a list, 'sizes' and 'entries' objects)"),
])
def test_malformed_index_rows_name_the_index_and_the_row(tmp_path, change, message):
    folder = build(tmp_path / "cache")
    index = edit_index(folder, change)
    with pytest.raises(CheckpointError) as info:
        TeacherCache(folder)
    assert str(info.value) == f"{index}: {message}{REBUILD}"


def test_a_garbage_index_and_a_shard_that_is_a_folder(tmp_path):
    folder = build(tmp_path / "cache")
    (folder / SHARD0).unlink()
    (folder / SHARD0).mkdir()
    with pytest.raises(CheckpointError) as info:
        TeacherCache(folder)
    assert str(info.value) == f"{folder / SHARD0}: is a folder, not a teacher cache shard{REBUILD}"
    (folder / INDEX_NAME).write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match=r"index.json: not valid JSON \(RecursionError"):
        TeacherCache(folder)


def test_a_shard_damaged_under_a_running_trainer_names_the_file_and_row(tmp_path):
    folder = build(tmp_path / "cache")
    cache = TeacherCache(folder)
    (folder / SHARD1).write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError) as info:
        cache.get([PROMPTS[4]])
    assert str(info.value).startswith(f"{folder / SHARD1}: row 1 is unreadable (")
    assert str(info.value).endswith(REBUILD)


def test_training_and_cache_teacher_say_it_in_one_line_before_loading_models(world, tmp_path, capsys):
    from train import cache_teacher

    cache = tmp_path / "cache"
    cfg, _ = config_file(world, tmp_path, teacher={"path": str(world.teacher), "dtype": "fp32", "cache": str(cache)})
    assert cache_teacher.main(["--config", cfg, "--dtype", "fp32", "--shard-size", "4"]) == 0
    capsys.readouterr()
    index = json.loads((cache / INDEX_NAME).read_text())
    shard = cache / index["shards"][-1]
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    fresh_state()
    expected = (f"{shard}: {size // 2} bytes, index.json records {size} (truncated or rewritten since the cache "
                f"was built){REBUILD}")
    assert train_main(["--config", cfg]) == 2
    assert one_line(capsys) == f"train: error: {expected}"
    fresh_state()
    assert cache_teacher.main(["--config", cfg]) == 2
    assert one_line(capsys) == f"train.cache_teacher: error: {expected}"
    assert TEXT_DIM == index["meta"]["dim"]


def test_force_deletes_only_the_caches_own_files(tmp_path):
    from train.teacher_cache import clear

    folder = build(tmp_path / "cache")
    (folder / ".part-g001-r000.json").write_text("{}")  # an interrupted run's leftover
    (folder / "notes.txt").write_text("mine")
    (folder / "shard-g000-r000-00009.safetensors.bak").write_text("mine")
    (folder / "shard-g009-r000-00000.safetensors").mkdir()  # a folder with a shard's name: never deleted
    outside = tmp_path / "outside.safetensors"
    outside.write_text("mine")
    (folder / "shard-g008-r000-00000.safetensors").symlink_to(outside)
    assert clear(folder) == 5  # index.json, two shards, the part file, the link (not its target)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "shard-g000-r000-00009.safetensors.bak",
                                                        "shard-g009-r000-00000.safetensors"]
    assert outside.read_text() == "mine"
