"""fastenc.save is lossless on every CPU: whatever backend ran (the ``cpu`` backend casts the weights it was
loaded with to bf16), the saved tensors are the checkpoint's (or the random init's) bit for bit; it refuses
with one error when that cannot be done (checkpoint changed on disk, weights edited after load, an exported
graph). Each case names its backend: ``auto`` picks ``cpu`` on CPUs with native bf16 and ``torch`` elsewhere,
and the ``cpu`` backend runs on any x86 CPU when asked for."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastenc
from fastenc.api import _build_random
from fastenc.config import SIZES
from fastenc.errors import CheckpointError, ConfigError
from fastenc.weights import key_map
from tiny_checkpoint import MICRO, write_checkpoint

BACKENDS = ["torch", "cpu"]
SEED = 3
CPU_WHY = ("the encoder's weights were loaded as float32 and are bfloat16 now (the cpu backend computes in bf16)")


@pytest.fixture(autouse=True)
def _micro_size_and_plan_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(SIZES, "micro", MICRO)  # random_init=True, size="micro": a tiny random student
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))  # cpu backend int8 plans


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("save") / "ck")  # DistillT5 layout: fused on load


@pytest.fixture()
def ck(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ck"))


def _ids() -> torch.Tensor:
    return torch.randint(2, MICRO.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def _checkpoint_tensors(ck: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under fastenc's names (parts concatenated as the loader fuses them)."""
    raw = load_file(ck / "model.safetensors")
    return {ours: torch.cat([raw[t] for t in theirs]) for ours, theirs in key_map(MICRO, "distillt5", "encoder.").items()}


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in _build_random(MICRO, torch.device("cpu"), torch.float32, seed).named_parameters()}


def _load(kind: str, ck: Path, backend: str) -> fastenc.Encoder:
    dtype = "bf16" if backend == "cpu" else None  # the cpu backend's bf16 plan (cast in place) on every CPU
    if kind == "checkpoint":
        return fastenc.load(ck, backend=backend, dtype=dtype, cache=False)
    return fastenc.load(size="micro", random_init=True, seed=SEED, backend=backend, dtype=dtype, cache=False)


def _assert_same_tensors(saved: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(saved) == set(want)
    for name, tensor in want.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["checkpoint", "random-init"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_save_writes_the_loaded_weights_bit_for_bit(kind, backend, ck, tmp_path):
    enc = _load(kind, ck, backend)
    assert enc.backend == backend
    assert enc.dtype == (torch.bfloat16 if backend == "cpu" else torch.float32)  # cpu: cast in place to bf16
    if kind == "random-init":
        assert enc.random_init and enc.seed == SEED
    out = fastenc.save(enc, tmp_path / "saved")
    want = _checkpoint_tensors(ck) if kind == "checkpoint" else _random_tensors(SEED)
    _assert_same_tensors(load_file(out / "model.safetensors"), want)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    # reloaded with the torch reference: the original encoder's outputs, exactly
    reference = _load(kind, ck, "torch")
    again = fastenc.load(out, backend="torch", cache=False)
    with torch.no_grad():
        assert torch.equal(again(_ids()), reference(_ids()))
    if backend == "cpu":  # and the encoder that was saved still runs its fast path on the same bf16 weights
        assert enc.backend == "cpu" and enc.model.embed.weight.dtype == torch.bfloat16
        twice = fastenc.load(out, backend="cpu", dtype="bf16", cache=False)
        for (n, p), q in zip(enc.model.named_parameters(), twice.model.parameters()):
            assert torch.equal(p, q), n


def test_auto_backend_save_is_lossless_on_this_cpu(ck, tmp_path):
    """What the issue saw: the default backend (``cpu`` on AMX / AVX512-BF16, ``torch`` elsewhere)."""
    enc = fastenc.load(ck, cache=False)
    out = fastenc.save(enc, tmp_path / "saved")
    _assert_same_tensors(load_file(out / "model.safetensors"), _checkpoint_tensors(ck))


def test_torch_backend_saves_what_it_holds(ck, tmp_path):
    """Weights still in the dtype they were loaded in are saved as they are, edits included (fine-tuning)."""
    enc = _load("checkpoint", ck, "torch")
    with torch.no_grad():
        enc.model.blocks[0].ffn.wo.weight.mul_(2)
    saved = load_file(fastenc.save(enc, tmp_path / "tuned") / "model.safetensors")
    _assert_same_tensors(saved, {n: p.detach() for n, p in enc.model.named_parameters()})
    # loaded in bf16 on purpose: saved in bf16, as asked
    half = fastenc.load(ck, backend="torch", dtype="bf16", cache=False)
    out = fastenc.save(half, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _assert_same_tensors(load_file(out / "model.safetensors"), {n: p.detach() for n, p in half.model.named_parameters()})


def test_a_cast_after_load_is_undone_by_save(ck, tmp_path):
    """A pipeline's .to(bf16) (or the caller's) rounds the weights; save writes them as loaded."""
    enc = _load("checkpoint", ck, "torch")
    enc.to(torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    out = fastenc.save(enc, tmp_path / "saved")
    _assert_same_tensors(load_file(out / "model.safetensors"), _checkpoint_tensors(ck))
    half = _load("checkpoint", ck, "torch").to(torch.float16)  # fp16 keeps wo in fp32: still one cast
    _assert_same_tensors(load_file(fastenc.save(half, tmp_path / "fp16") / "model.safetensors"), _checkpoint_tensors(ck))
    enc.to(torch.float16)  # fp32 -> bf16 -> fp16 rounds twice: not the loaded weights cast, so refused
    with pytest.raises(ConfigError, match=r"\(embed\.weight is not the checkpoint's .* cast to float16: edited, or "
                                          r"rounded through another dtype\); the encoder's weights were loaded as "
                                          r"float32 and are float16 now, so "):
        fastenc.save(enc, tmp_path / "twice")


def test_the_plain_module_is_saved_as_it_is(ck, tmp_path):
    """``fastenc.save(encoder.model)``: the way to write the bf16 weights themselves."""
    enc = _load("checkpoint", ck, "cpu")
    out = fastenc.save(enc.model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _assert_same_tensors(load_file(out / "model.safetensors"), {n: p.detach() for n, p in enc.model.named_parameters()})


# ---------------------------------------------------------------------------- refusals


def test_save_refuses_when_the_checkpoint_changed_on_disk(ck, tmp_path):
    enc = _load("checkpoint", ck, "cpu")
    write_checkpoint(ck, seed=1)  # new weights at the same path
    weights_file = ck / "model.safetensors"
    st = weights_file.stat()
    os.utime(weights_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    with pytest.raises(CheckpointError) as info:
        fastenc.save(enc, tmp_path / "saved")
    assert str(info.value) == (
        f"fastenc.save: {weights_file} changed since the encoder was loaded from {ck.resolve()}; {CPU_WHY}, so saving "
        "them losslessly reads the checkpoint's tensors again and they are not the ones loaded any more. Load the "
        "checkpoint again and save that encoder, or write the weights as they are now with "
        "fastenc.save(encoder.model, directory)")
    assert not (tmp_path / "saved").exists()
    weights_file.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"fastenc.save: {weights_file} was removed since the encoder "
                                                        f"was loaded from {ck.resolve()}; ")):
        fastenc.save(enc, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("kind", ["checkpoint", "random-init"])
def test_save_refuses_weights_edited_after_load(kind, ck, tmp_path):
    enc = _load(kind, ck, "cpu")
    with torch.no_grad():
        enc.model.blocks[1].ffn.wo.weight[0, 0] += 1  # fine-tuning, in bf16
    what = f"the checkpoint's ({ck.resolve()})" if kind == "checkpoint" else f"the random init's (seed {SEED})"
    with pytest.raises(ConfigError) as info:
        fastenc.save(enc, tmp_path / "saved")
    assert str(info.value) == (
        f"fastenc.save: the encoder's weights changed after load (blocks.1.ffn.wo.weight is not {what} cast to "
        f"bfloat16: edited, or rounded through another dtype); {CPU_WHY}, so saving them losslessly would write the "
        "weights as loaded, not these. Write the weights as they are with fastenc.save(encoder.model, directory), "
        "or load with backend='torch' (weights kept as loaded) to edit and save them")
    assert not (tmp_path / "saved").exists()
    enc.model.embed.weight.data[3, 1] = 7.0  # through .data: no version bump, still seen
    enc.model.blocks[1].ffn.wo.weight.data.copy_(_load(kind, ck, "cpu").model.blocks[1].ffn.wo.weight)
    with pytest.raises(ConfigError, match=r"\(embed\.weight is not "):
        fastenc.save(enc, tmp_path / "saved")


def test_save_refuses_an_exported_graph(ck, tmp_path):
    pytest.importorskip("onnxruntime")
    from fastenc.exporters.pipeline import ExportRequest, export

    result = export(ExportRequest(out=tmp_path / "export", checkpoint=str(ck), max_batch=2, max_seq=16, verify=False))
    enc = fastenc.load(result.directory, backend="onnxruntime", cache=False)
    with pytest.raises(ConfigError) as info:
        fastenc.save(enc, tmp_path / "saved")
    assert str(info.value) == (
        f"fastenc.save: this encoder runs the exported onnxruntime artifact {enc.model.artifact}, which holds no "
        "weights fastenc can save; save the encoder it was exported from (fastenc.load(CHECKPOINT, "
        "backend='torch')), or copy the export folder itself")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(ConfigError, match="^fastenc.save takes a fastenc.Encoder or T5Encoder, got str$"):
        fastenc.save("not an encoder", tmp_path / "saved")
