"""train.loop: step-following through tiny Flux / PixArt-α transformers, the embedding baseline,
the teacher cache, exact resume, the fastenc-format checkpoint, collapse probe, image grids, CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import fastenc
from fastenc.errors import CheckpointError, ConfigError
from test_train_support import PROMPTS, TEXT_DIM, fresh_accelerate_state, world  # noqa: F401 (fixtures)
from test_train_support import live_and_cached
from train import cache_teacher
from train.__main__ import main as train_main
from train.config import TrainConfig
from train.loop import Trainer
from train.teacher_cache import TeacherCache

FIXED = PROMPTS[:2]


def trainer(world, out: Path, kind: str = "flux", fixed: bool = False, **sections) -> Trainer:
    raw = world.config(out, kind, **sections)
    if fixed:  # one component of two prompts: every batch is the same pair
        path = out.parent / f"{out.name}-fixed.txt"
        path.write_text("\n".join(FIXED) + "\n")
        raw["data"]["components"] = {"fixed": {"paths": [str(path)]}}
    return Trainer(TrainConfig.from_dict(raw))


def metrics(out: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_flux_training_reduces_loss_and_writes_a_loadable_student(world, tmp_path):
    out = tmp_path / "flux"
    tr = trainer(world, out, fixed=True, run={"max_steps": 32},
                 dit={"gradient_checkpointing": True}, optim={"lr": 1e-3, "warmup_steps": 2})
    dit = tr.dit.transformer
    assert dit.is_gradient_checkpointing and not any(p.requires_grad for p in dit.parameters())
    dit_before = {k: v.clone() for k, v in dit.state_dict().items()}
    before = tr.fixed_batch_loss(FIXED)
    result = tr.fit()
    after = tr.fixed_batch_loss(FIXED)
    assert result.step == 32 and len(result.losses) == 32
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in dit_before.items())  # the DiT stays frozen
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 33)) and [r["t_index"] for r in rows[:4]] == [0, 1, 2, 3]
    assert all(len(r["guidance"]) == 2 and set(r["guidance"]) <= {2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0} for r in rows)
    lrs = [r["lr"] for r in rows]  # 2 warm-up steps, then linear decay towards 0 at step 32
    assert lrs[:4] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 * 29 / 30]) and lrs[-1] == pytest.approx(1e-3 / 30)

    # the written student loads with fastenc.load and computes what the trained module computes
    module = tr.acc.unwrap_model(tr.student).eval()
    ids = tr.tokenizer(["a cat on a chair", "a robot"], max_length=16).input_ids
    loaded = fastenc.load(out / "student", backend="torch")
    assert loaded.config.projection_dim == TEXT_DIM and loaded.tokenizer is not None
    with torch.no_grad():
        assert torch.equal(loaded(ids), module(ids))
    emb = loaded.encode(["a cat on a chair"], target="flux-schnell").embeds
    assert emb.shape == (1, 256, TEXT_DIM)
    ckpt = fastenc.load(out / "checkpoints" / "step-00000032" / "student", backend="torch")
    with torch.no_grad():
        assert torch.equal(ckpt(ids), module(ids))


def test_pixart_training_reduces_loss(world, tmp_path):
    tr = trainer(world, tmp_path / "pixart", kind="pixart", fixed=True, run={"max_steps": 32}, optim={"lr": 2e-3})
    assert tr.cfg.masked and tr.dit.learned_sigma
    before = tr.fixed_batch_loss(FIXED)
    tr.fit()
    after = tr.fixed_batch_loss(FIXED)
    assert after < 0.8 * before, (before, after)
    assert all(set(r["guidance"]) <= {5.0 + 0.5 * i for i in range(11)} for r in metrics(tmp_path / "pixart"))


@pytest.mark.parametrize("kind", ["flux", "pixart"])
def test_latent_trajectory_follows_the_teacher(world, tmp_path, kind):
    """Each step's new latent is the scheduler step on the TEACHER's prediction, not the student's."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tr = trainer(world, tmp_path / kind, kind=kind, run={"max_steps": 20}, dit={"num_inference_steps": 20})
    records = []
    tr.on_step.append(records.append)
    tr.fit()
    assert [r.index for r in records] == list(range(20))
    if kind == "flux":  # the pipeline's schedule: sigmas linspace(1, 1/N, N) shifted by mu(image_seq_len)
        ref = FlowMatchEulerDiscreteScheduler.from_pretrained(str(world.flux / "scheduler"))
        seq = records[0].latents_in.shape[1]
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=calculate_shift(seq, 256, 4096, 0.5, 1.15))
    else:
        ref = DPMSolverMultistepScheduler.from_pretrained(str(world.pixart / "scheduler"))
        ref.set_timesteps(20)
        ref.set_begin_index(0)
    assert torch.equal(torch.stack([r.t for r in records]).cpu(), ref.timesteps)
    for i, rec in enumerate(records):
        expected = ref.step(rec.teacher_pred, rec.t, rec.latents_in, return_dict=False)[0]
        assert torch.equal(rec.latents_out, expected)
        assert not torch.allclose(rec.student_pred, rec.teacher_pred)
        if i:
            assert torch.equal(rec.latents_in, records[i - 1].latents_out)


def test_embedding_baseline_via_cli(world, tmp_path, capsys):
    """--loss embedding: one optimizer step per batch on MSE(student, teacher embeddings); no DiT needed."""
    raw = world.config(tmp_path / "emb", run={"max_steps": 1}, dit={"path": ""})
    cfg_file = tmp_path / "emb.json"
    cfg_file.write_text(json.dumps(raw))
    assert train_main(["--config", str(cfg_file), "--print-config", "--loss", "embedding"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["loss"] == "embedding"

    # with dit.path set the DiT is not loaded (its width comes from config.json); without it, from the teacher
    with_dit = world.config(tmp_path / "emb", run={"loss": "embedding", "max_steps": 30})
    tr = Trainer(TrainConfig.from_dict(with_dit))
    assert tr.dit is None and tr.steps_per_batch == 1 and tr.text_dim == TEXT_DIM
    probe = PROMPTS[:4]
    before = tr.fixed_batch_loss(probe)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    code = train_main(["--config", str(cfg_file), "--loss", "embedding", "--max-steps", "30", "--lr", "3e-3",
                       "--output-dir", str(tmp_path / "emb")])
    assert code == 0 and "student:" in capsys.readouterr().out
    rows = metrics(tmp_path / "emb")
    assert len(rows) == 30 and "t_index" not in rows[0]
    after_model = fastenc.load(tmp_path / "emb" / "student", backend="torch")
    tr.acc.unwrap_model(tr.student).load_state_dict(after_model.model.state_dict())
    assert tr.fixed_batch_loss(probe) < 0.9 * before


def test_cli_reports_bad_input(world, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(world.config(tmp_path / "o", data={"components": {"x": {"paths": [str(tmp_path / "no.txt")]}}})))
    assert train_main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error:") and "no.txt: file not found" in err
    assert train_main(["--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: config file not found" in capsys.readouterr().err
    cfg = TrainConfig.from_dict(world.config(tmp_path / "o", run={"resume": str(tmp_path / "nowhere")}))
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        Trainer(cfg).fit()


def test_teacher_cache_matches_live_teacher_and_needs_no_teacher(world, tmp_path, caplog):
    cache = tmp_path / "cache"
    raw = world.config(tmp_path / "live", teacher={"path": str(world.teacher), "dtype": "fp32",
                                                                   "cache": str(cache)})
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps(raw))
    assert cache_teacher.main(["--config", str(cfg_file), "--dtype", "fp32", "--shard-size", "4"]) == 0
    index = json.loads((cache / "index.json").read_text())
    assert index["meta"]["dim"] == TEXT_DIM and index["meta"]["pooled_dim"] == 16 and index["meta"]["max_length"] == 16
    assert len(index["shards"]) > 1 and index["count"] == len(TeacherCache(cache))
    with caplog.at_level(logging.INFO, logger="fastenc.train"):
        assert cache_teacher.main(["--config", str(cfg_file)]) == 0  # nothing to add
    assert "already holds all" in caplog.text

    # live teacher (same settings, no cache); cache only: no teacher path, and a CLIP folder that does not
    # exist (pooled vectors come from the cache)
    live, tr = live_and_cached(raw, tmp_path / "cached", clip_path=str(tmp_path / "no-clip"))
    assert tr.teacher._live is None and tr.teacher.clip is None
    assert tr.result.losses == live

    # a prompt the cache lacks, with no teacher to encode it: refused before training, naming it
    from accelerate.state import AcceleratorState

    extra = tmp_path / "extra.txt"
    extra.write_text("a prompt nobody cached\n")
    cached_raw = json.loads(json.dumps(raw))
    cached_raw["teacher"]["path"] = None
    cached_raw["dit"]["clip_path"] = str(tmp_path / "no-clip")
    cached_raw["data"]["components"]["extra"] = {"paths": [str(extra)]}
    AcceleratorState._reset_state(True)
    with pytest.raises(ConfigError, match="lacks 1 of the training prompts .*'a prompt nobody cached'"):
        Trainer(TrainConfig.from_dict(cached_raw))
    # extending the cache encodes only the new prompt
    raw["data"]["components"]["extra"] = {"paths": [str(extra)]}
    cfg_file.write_text(json.dumps(raw))
    AcceleratorState._reset_state(True)
    assert cache_teacher.main(["--config", str(cfg_file), "--dtype", "fp32"]) == 0
    grown = TeacherCache(cache)
    assert "a prompt nobody cached" in grown and len(grown) == index["count"] + 1 and grown.generation == 1
    # a cache built for other settings is refused
    raw["dit"]["max_length"] = 24
    AcceleratorState._reset_state(True)
    with pytest.raises(ConfigError, match="max_length: cache 16, training 24"):
        Trainer(TrainConfig.from_dict({**raw, "teacher": {**raw["teacher"], "path": None}}))


def test_resume_matches_an_uninterrupted_run(world, tmp_path):
    """bf16 autocast, dropout and EMA on: stopping at step 8 and resuming gives the same losses and weights."""
    common = {"run": {"max_steps": 12, "save_every": 4, "keep_checkpoints": 2, "mixed_precision": "bf16"},
              "optim": {"ema_decay": 0.9, "warmup_steps": 3}}
    whole = trainer(world, tmp_path / "whole", **common).fit()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    part = tmp_path / "part"
    first = trainer(world, part, run={**common["run"], "stop_after_steps": 8}, optim=common["optim"]).fit()
    assert first.step == 8 and first.student_dir is None
    assert (part / "checkpoints" / "step-00000008" / "student" / "model.safetensors").is_file()
    AcceleratorState._reset_state(True)
    second = trainer(world, part, run={**common["run"], "resume": "auto"}, optim=common["optim"]).fit()
    assert second.step == 12
    assert [r["loss"] for r in metrics(part)] == [r["loss"] for r in metrics(tmp_path / "whole")] == whole.losses
    for name in ("student", "student-ema"):
        a, b = fastenc.load(tmp_path / "whole" / name, backend="torch").model, fastenc.load(part / name, backend="torch").model
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    kept = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert kept == ["step-00000008", "step-00000012"]  # keep_checkpoints=2, no temporary folders left
    # nothing pickled: every file is JSON or safetensors (a safetensors header is 8 bytes of length + JSON)
    files = [f for f in (part / "checkpoints").rglob("*") if f.is_file()]
    assert {f.suffix for f in files} == {".json", ".safetensors"}
    for f in files:
        head = f.read_bytes()[:16]
        assert not head.startswith((b"\x80", b"PK")), f  # pickle protocol 2+ / torch.save's zip
        if f.suffix == ".safetensors":
            assert head[8:9] == b"{", f
    names = {f.relative_to(part / "checkpoints" / "step-00000008").as_posix() for f in files
             if f.is_relative_to(part / "checkpoints" / "step-00000008")}
    assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "trainer.safetensors", "trainer.json",
            "rng-0.json", "rng-0.safetensors", "trainer_state.json", "student/model.safetensors",
            "student-ema/model.safetensors"} <= names


def test_resume_never_unpickles(world, tmp_path, monkeypatch):
    """A checkpoint is read without pickle: torch.load and pickle.load are never called, and a leftover
    temporary folder of a killed save is removed by the next save."""
    import pickle

    out = tmp_path / "run"
    common = {"run": {"max_steps": 4, "save_every": 2, "keep_checkpoints": 1}}
    trainer(world, out, run={**common["run"], "stop_after_steps": 2}).fit()
    stale = out / "checkpoints" / ".step-00000001.tmp"
    stale.mkdir()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)

    def refuse(*args, **kwargs):
        raise AssertionError("resume must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    resumed = trainer(world, out, run={**common["run"], "resume": "auto"}).fit()
    assert resumed.step == 4 and not stale.exists()


def test_collapse_probe_flags_a_collapsed_student(world, tmp_path, caplog):
    tr = trainer(world, tmp_path / "probe", run={"max_steps": 4})
    distinct = tr.diagnose()
    assert distinct["num_collapsed_pairs"] == 0 and distinct["groups"] == []
    module = tr.acc.unwrap_model(tr.student)
    with torch.no_grad():  # every token embeds to one vector: all probes collapse onto one another
        module.embed.weight.copy_(module.embed.weight[5].expand_as(module.embed.weight))
    with caplog.at_level(logging.WARNING, logger="fastenc.train"):
        collapsed = tr.diagnose()
    assert collapsed["num_collapsed_pairs"] == 10 and collapsed["num_collapsed_probes"] == 5
    assert collapsed["groups"] == [["A rat", "A cat", "A man", "A monkey", "A woman"]]
    assert "mode collapse at step 0" in caplog.text
    assert metrics(tmp_path / "probe", "collapse")[-1]["num_collapsed_pairs"] == 10


def test_collapse_report_counts_pairs_and_respects_the_teacher():
    from train.diagnostics import collapse_report

    probes = ["A rat", "A cat", "A man", "A monkey", "A woman"]
    base = torch.eye(5, 8)
    student = torch.stack([base[0], base[0], base[0], base[3], base[3]]) + 1e-4 * torch.randn(5, 8)
    rep = collapse_report(student, probes, 0.99)
    assert rep.num_collapsed_pairs == 4 and sorted(map(sorted, rep.groups)) == [
        ["A cat", "A man", "A rat"], ["A monkey", "A woman"]]
    teacher = student.clone()  # the teacher itself does not separate monkey and woman: not the student's fault
    teacher[:3] = base[:3]
    rep = collapse_report(student, probes, 0.99, teacher)
    assert rep.num_collapsed_pairs == 3 and rep.groups == [["A rat", "A cat", "A man"]]


def test_pooled_clip_matches_the_pipeline_and_zeros_is_explicit(world, tmp_path, caplog):
    from transformers import AutoTokenizer, CLIPTextModel

    tr = trainer(world, tmp_path / "clip", run={"max_steps": 4})
    pooled = tr.teacher_cond(FIXED).pooled
    clip = CLIPTextModel.from_pretrained(str(world.flux / "text_encoder"))
    ids = AutoTokenizer.from_pretrained(str(world.flux / "tokenizer"))(
        FIXED, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(pooled, clip(ids).pooler_output) and pooled.abs().sum() > 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    with caplog.at_level(logging.WARNING, logger="fastenc.train"):
        zeros = trainer(world, tmp_path / "zeros", run={"max_steps": 4}, dit={"pooled": "zeros",
                                                                               "clip_path": str(tmp_path / "none")})
    assert torch.equal(zeros.teacher_cond(FIXED).pooled, torch.zeros(2, 16)) and "pooled=zeros" in caplog.text


def test_image_grid_teacher_vs_student(world, tmp_path):
    from PIL import Image

    out = tmp_path / "img"
    tr = trainer(world, out, run={"max_steps": 4, "image_every": 4}, dit={"vae_subfolder": "vae"})
    tr.fit()
    with Image.open(out / "images" / "step-00000004.png") as im:
        assert im.size == (2 * 34 + 2, 2 * 34 + 2)  # 2 prompts x (teacher, student) rows of 32 px, 2 px gaps
    tr.vae = None  # latent preview: 4x4 latents scaled to 128 px
    with Image.open(tr.write_images()) as im:
        grid = np.asarray(im)
    assert grid.shape == (2 * 130 + 2, 2 * 130 + 2, 3)


def test_tensorboard_scalars_or_a_clear_error(world, tmp_path):
    import importlib.util

    out = tmp_path / "tb"
    raw = world.config(out, run={"max_steps": 4, "log_with": ["tensorboard"]})
    if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        with pytest.raises(ConfigError, match="needs the tensorboard package"):
            Trainer(TrainConfig.from_dict(raw))
        return
    Trainer(TrainConfig.from_dict(raw)).fit()
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_student_from_plain_t5_keeps_its_encoder_and_gains_a_seeded_projector(world, tmp_path):
    from train.student import load_student

    raw = world.config(Path("/unused"))
    cfg = TrainConfig.from_dict(raw)
    student = load_student(cfg, TEXT_DIM)
    again = load_student(cfg, TEXT_DIM)
    plain = fastenc.load(world.student, backend="torch").model  # transformers layout: encoder only
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(student.hidden_states(ids), plain.hidden_states(ids))
    assert student.config.projection_dim == TEXT_DIM and student.training
    assert all(p.requires_grad for p in student.parameters())
    assert torch.equal(student.projector.fc1.weight, again.projector.fc1.weight)  # seeded by run.seed
    other = load_student(TrainConfig.from_dict({**raw, "run": {**raw["run"], "seed": 1}}), TEXT_DIM)
    assert not torch.equal(student.projector.fc1.weight, other.projector.fc1.weight)
    with pytest.raises(ConfigError, match="projector width 32 != the DiT's text width 64"):
        trained = tmp_path / "student-with-projector"
        fastenc.save(student, trained)
        load_student(TrainConfig.from_dict({**raw, "student": {"init": str(trained)}}), 64)


def test_embedding_loss_masks_padding_only_when_the_pipeline_does():
    from train.loop import embedding_loss

    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.allclose(embedding_loss(s, t, None), ((s - t) ** 2).mean())
    picked = torch.cat([(s - t)[0, :3], (s - t)[1]])  # the 8 real tokens
    assert torch.allclose(embedding_loss(s, t, mask), (picked ** 2).mean())
