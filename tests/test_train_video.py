"""train: step-following distillation through tiny Wan and LTX-Video transformers (5-D latents, their
schedulers and guidance), trajectories equal to the pipelines' own, umT5 students, and the video kinds'
config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.errors import ConfigError
from test_train_support import PROMPTS, TEXT_DIM, fresh_accelerate_state, world  # noqa: F401 (fixtures)
from test_train_support import live_and_cached
from train.__main__ import main as train_main
from train.config import KINDS, TrainConfig
from train.loop import Trainer

FIXED = PROMPTS[:2]


def video_config(world, out: Path, kind: str, fixed: bool = False, **sections) -> dict:
    """Wan distils a umT5 student from the pipeline's own umT5 text encoder; LTX-Video a T5 student."""
    if kind == "wan":
        sections = {"student": {"init": str(world.umt5_student)},
                    "teacher": {"path": str(world.wan), "subfolder": "text_encoder", "dtype": "fp32"}, **sections}
    raw = world.config(out, kind, **sections)
    if fixed:  # one component of two prompts: every batch is the same pair
        path = out.parent / f"{out.name}-fixed.txt"
        path.write_text("\n".join(FIXED) + "\n")
        raw["data"]["components"] = {"fixed": {"paths": [str(path)]}}
    return raw


def trainer(world, out: Path, kind: str, fixed: bool = False, **sections) -> Trainer:
    return Trainer(TrainConfig.from_dict(video_config(world, out, kind, fixed, **sections)))


@pytest.mark.parametrize("kind", ["wan", "ltx"])
def test_video_training_reduces_loss_and_writes_a_loadable_student(world, tmp_path, kind):
    out = tmp_path / kind
    tr = trainer(world, out, kind, fixed=True, run={"max_steps": 32, "save_every": 32}, optim={"lr": 3e-3})
    dit = tr.dit.transformer
    assert type(dit).__name__ == {"wan": "WanTransformer3DModel", "ltx": "LTXVideoTransformer3DModel"}[kind]
    assert not any(p.requires_grad for p in dit.parameters()) and tr.text_dim == TEXT_DIM
    traj = tr.dit.start(2, 32 if kind == "wan" else 64, torch.Generator().manual_seed(0))
    # Wan: [B, C, F, h, w] with 2 latent frames of 4 x 4; LTX-Video: packed [B, F*h*w, C]
    assert traj.latents.shape == ((2, 4, 2, 4, 4) if kind == "wan" else (2, 8, 8))
    dit_before = {k: v.clone() for k, v in dit.state_dict().items()}
    before = tr.fixed_batch_loss(FIXED)
    result = tr.fit()
    after = tr.fixed_batch_loss(FIXED)
    assert result.step == 32 and after < 0.8 * before, (before, after)
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in dit_before.items())  # the DiT stays frozen
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    guidance = {g for r in rows if r["kind"] == "train" for g in r["guidance"]}
    assert guidance <= set(KINDS[kind].guidance) and len(guidance) > 1

    module = tr.acc.unwrap_model(tr.student).eval()
    assert module.config.projection_dim == TEXT_DIM and module.config.per_layer_bias == (kind == "wan")
    loaded = fastenc.load(out / "student", backend="torch")
    ids = tr.tokenizer(["a cat on a chair", "a robot"], max_length=16).input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids), module(ids))
    # a preview grid: 2 prompts x (teacher, student) rows of the first latent frame
    from PIL import Image

    with Image.open(tr.write_images()) as im:
        assert im.size[0] == im.size[1] > 2 * 64


@pytest.mark.parametrize("kind, expand", [("wan", False), ("wan", True), ("ltx", False)])
def test_training_trajectory_is_the_pipelines_own_with_the_teachers_embeddings(world, tmp_path, kind, expand):
    """With one guidance value, the latents training walks through are those the diffusers pipeline computes
    from the same noise with the teacher's embeddings (its schedule, guidance, packing, timesteps — per token
    for a Wan 2.2 pipeline that expands them): the trajectory follows the teacher, and the student is trained
    on exactly the inputs it will see."""
    import shutil

    from diffusers import LTXPipeline, WanPipeline

    g, steps = 4.5 if kind == "wan" else 3.0, 4
    dit = {"guidance": [g]}
    if expand:
        dit["path"] = str(shutil.copytree(world.wan, tmp_path / "wan22"))
        (tmp_path / "wan22" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                                         "expand_timesteps": True}))
    tr = trainer(world, tmp_path / kind, kind, run={"max_steps": steps}, dit=dit)
    assert getattr(tr.dit, "expand_timesteps", False) == expand
    records, batches = [], []
    tr.on_step.append(records.append)
    teacher_cond = tr.teacher_cond
    tr.teacher_cond = lambda prompts: batches.append(list(prompts)) or teacher_cond(prompts)
    tr.fit()
    assert [r.index for r in records] == list(range(steps)) and len(batches) == 1
    assert all(not torch.allclose(r.student_pred, r.teacher_pred) for r in records)

    cond = teacher_cond(batches[0])
    seen = []

    def keep(pipe, i, t, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    kwargs = dict(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.neg_embeds, latents=records[0].latents_in,
                  num_inference_steps=steps, guidance_scale=g, output_type="latent", callback_on_step_end=keep)
    sched = type(tr.dit.scheduler_template).from_config(tr.dit.scheduler_template.config)
    if kind == "wan":
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched, transformer=tr.dit.transformer,
                           expand_timesteps=expand)
        pipe(height=32, width=32, num_frames=5, **kwargs)
    else:
        pipe = LTXPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched, transformer=tr.dit.transformer)
        pipe(height=64, width=64, num_frames=9, prompt_attention_mask=cond.mask,
             negative_prompt_attention_mask=cond.neg_mask, **kwargs)
    assert len(seen) == steps
    for rec, want in zip(records, seen):
        torch.testing.assert_close(rec.latents_out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[-1], records[0].latents_in)


@pytest.mark.parametrize("kind", ["wan", "ltx"])
def test_grids_decode_the_first_frame_as_the_pipeline_does(world, tmp_path, kind):
    """With the pipeline's VAE (its class read from vae/config.json) a grid shows the first frame of the video
    the pipeline itself would decode from the same latents."""
    import shutil

    from diffusers import LTXPipeline, WanPipeline
    from test_train_support import tiny_video_vae

    from train.images import sample

    folder = Path(shutil.copytree(getattr(world, kind), tmp_path / f"{kind}-vae"))
    tiny_video_vae(kind).save_pretrained(str(folder / "vae"))
    size, frames = 32, 5
    dit = {"path": str(folder), "vae_subfolder": "vae", "resolution": size, "num_frames": frames}
    if kind == "ltx":  # the tiny LTX VAE: 4 px and 4 frames per latent
        dit.update(vae_scale_factor=4, vae_temporal_factor=4)
    tr = trainer(world, tmp_path / kind, kind, run={"max_steps": 1, "image_every": 1}, dit=dit)
    assert type(tr.vae).__name__ == {"wan": "AutoencoderKLWan", "ltx": "AutoencoderKLLTXVideo"}[kind]
    g, prompts = KINDS[kind].guidance[0], FIXED
    cond = tr.teacher_cond(prompts)
    noise = tr.dit.start(len(prompts), size, torch.Generator().manual_seed(7)).latents
    traj, lat = sample(tr.dit, cond, resolution=size, seed=7, guidance=g)
    ours = (tr.dit.decode(traj, lat, tr.vae).float() / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]
    pipe_cls = WanPipeline if kind == "wan" else LTXPipeline
    pipe = pipe_cls(tokenizer=None, text_encoder=None, vae=tr.vae, transformer=tr.dit.transformer,
                    scheduler=type(tr.dit.scheduler_template).from_config(tr.dit.scheduler_template.config))
    extra = {"prompt_attention_mask": cond.mask, "negative_prompt_attention_mask": cond.neg_mask} if kind == "ltx" else {}
    video = pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.neg_embeds, latents=noise, height=size,
                 width=size, num_frames=frames, num_inference_steps=4, guidance_scale=g, output_type="pt",
                 return_dict=False, **extra)[0]  # [B, F, 3, H, W] in [0, 1]
    assert ours.shape == (2, 3, size, size) and video.shape[:3] == (2, frames, 3)
    torch.testing.assert_close(ours, video[:, 0].float(), rtol=1e-4, atol=1e-4)
    assert float(ours.std()) > 0


def test_wan_zeroes_embeddings_past_each_prompt_ltx_passes_them_whole(world, tmp_path):
    """Wan's pipeline zeroes the umT5 output past each prompt's length (for the teacher's and the student's
    embeddings alike); LTX-Video hands T5's output on unchanged and gives the mask to its transformer."""
    short = ["a red fox", "a cat on a chair"]
    wan = trainer(world, tmp_path / "wan", "wan", run={"max_steps": 1})
    batch = wan.tokenizer(short, max_length=16)
    assert wan.cfg.masked and not bool(batch.attention_mask.all())
    for cond in (wan.teacher_cond(short), wan.student_cond(batch.input_ids, batch.attention_mask, None)):
        pad = cond.mask == 0
        assert torch.count_nonzero(cond.embeds[pad]) == 0 and torch.count_nonzero(cond.embeds[~pad]) > 0
        assert torch.count_nonzero(cond.neg_embeds[cond.neg_mask == 0]) == 0
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    ltx = trainer(world, tmp_path / "ltx", "ltx", run={"max_steps": 1})
    cond = ltx.teacher_cond(short)
    assert not ltx.cfg.masked and torch.count_nonzero(cond.embeds[cond.mask == 0]) > 0


@pytest.mark.parametrize("init", ["umt5_student", "student"])
def test_student_from_umt5_or_t5_gains_a_projector_of_the_dits_width(world, init):
    """A plain umT5 or T5 checkpoint keeps its encoder (umT5: every layer's own bias table) under a fresh
    projector whose width is the DiT's text width — whatever that width is."""
    from train.student import load_student

    raw = video_config(world, Path("/unused"), "wan", student={"init": str(getattr(world, init))})
    student = load_student(TrainConfig.from_dict(raw), 48)
    plain = fastenc.load(getattr(world, init), backend="torch").model
    assert plain.config.projection_dim is None and plain.config.per_layer_bias == (init == "umt5_student")
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(student.hidden_states(ids), plain.hidden_states(ids))
        assert student(ids).shape == (2, 9, 48)
    assert student.config.projection_dim == 48 and student.config.per_layer_bias == plain.config.per_layer_bias


@pytest.mark.parametrize("kind, sets, message", [
    ("wan", ["dit.pooled=clip"], "--set: dit.pooled='clip': Wan has no pooled text input; use auto or none"),
    ("ltx", ["dit.pooled=zeros"], "--set: dit.pooled='zeros': LTX-Video has no pooled text input"),
    ("wan", ["dit.num_frames=6"], "--set: dit.num_frames=6: Wan needs 1 + a multiple of its VAE's temporal factor 4 "
                                  "(dit.vae_temporal_factor; e.g. 5 or 9 frames)"),
    ("ltx", ["dit.vae_temporal_factor=3"], "--set: dit.num_frames=9: LTX-Video needs 1 + a multiple of its VAE's "
                                           "temporal factor 3"),
    ("flux", ["dit.num_frames=5"], "--set: dit.num_frames=5: Flux is an image model; frames apply to the video "
                                   "kinds (wan, ltx)"),
    ("wan", ["dit.num_frames=0"], "--set: dit.num_frames=0: must be an integer in 1..100000"),
    ("ltx", ["dit.frame_rate=0"], "--set: dit.frame_rate=0.0: must be a finite number > 0"),
    ("wan", ["dit.target=wan-2"], "--set: dit.target='wan-2': choose one of "),
    ("wan", ["dit.kind=video"], "--set: dit.kind='video': choose one of flux, pixart, wan, ltx"),
])
def test_video_settings_are_checked_at_the_boundary(world, tmp_path, capsys, kind, sets, message):
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps(video_config(world, tmp_path / "o", kind)))
    args = ["--config", str(cfg_file)]
    for item in sets:
        args += ["--set", item]
    assert train_main(args + ["--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error: ") and message in err and err.count("\n") == 1, err


def test_a_transformer_of_another_kind_or_a_two_expert_wan_is_refused(world, tmp_path, capsys):
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps(video_config(world, tmp_path / "o", "wan", dit={"path": str(world.ltx)})))
    assert train_main(["--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert ("holds a LTXVideoTransformer3DModel (dit.kind=ltx runs it); dit.kind=wan needs a WanTransformer3DModel"
            in err) and err.count("\n") == 1
    import shutil

    two = tmp_path / "wan22"
    shutil.copytree(world.wan, two)
    (two / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    with pytest.raises(ConfigError, match="two-expert Wan pipeline"):
        trainer(world, tmp_path / "o2", "wan", dit={"path": str(two)})


@pytest.mark.parametrize("name, kind, length, masked", [("wan-base.toml", "wan", 512, True),
                                                        ("ltx-base.toml", "ltx", 128, False)])
def test_shipped_video_configs_validate(name, kind, length, masked):
    from train.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "train" / "configs" / name)
    assert cfg.dit.kind == kind and cfg.max_length() == length and cfg.masked == masked and cfg.negative
    assert cfg.pooled == "none" and (cfg.num_frames - 1) % cfg.vae_temporal_factor == 0
    assert cfg.guidance == list(KINDS[kind].guidance)


def test_wan_prompts_are_cleaned_as_the_pipeline_cleans_them(world, tmp_path):
    """Wan's pipeline runs ``prompt_clean`` (HTML entities, runs of whitespace) before tokenising; so do the
    trainer's student and teacher. LTX-Video tokenises the prompt as written."""
    raw, clean = ["a cat &amp; a   dog  "], ["a cat & a dog"]
    wan = trainer(world, tmp_path / "wan", "wan", run={"max_steps": 1})
    assert torch.equal(wan.tokenize(raw)[0], wan.tokenize(clean)[0])
    assert torch.equal(wan.teacher_cond(raw).embeds, wan.teacher_cond(clean).embeds)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    ltx = trainer(world, tmp_path / "ltx", "ltx", run={"max_steps": 1})
    assert not torch.equal(ltx.tokenize(raw)[0], ltx.tokenize(clean)[0])


@pytest.mark.parametrize("kind", ["wan", "ltx"])
def test_teacher_cache_serves_video_kinds_like_the_live_teacher(world, tmp_path, kind):
    """The cache holds what the kind needs (the negative prompt too: both kinds guide against it, though only
    Wan masks its encoder), and training from it alone repeats the live teacher's losses."""
    from accelerate.state import AcceleratorState

    from train import cache_teacher
    from train.teacher_cache import TeacherCache

    cache = tmp_path / "cache"
    raw = video_config(world, tmp_path / "live", kind, run={"max_steps": 4},
                       teacher={"cache": str(cache), "dtype": "fp32"})
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps(raw))
    assert cache_teacher.main(["--config", str(cfg_file), "--dtype", "fp32"]) == 0
    held = TeacherCache(cache)
    assert "" in held and held.meta.masked == (kind == "wan") and held.meta.dim == TEXT_DIM
    live, tr = live_and_cached(raw, tmp_path / "cached")
    assert tr.result.losses == live and tr.teacher._live is None
    # the embedding baseline reads the DiT's text width from its config.json without loading it
    AcceleratorState._reset_state(True)
    emb_raw = json.loads(json.dumps(raw))
    emb_raw["teacher"]["path"] = None
    emb_raw["run"].update(loss="embedding", output_dir=str(tmp_path / "emb"))
    emb = Trainer(TrainConfig.from_dict(emb_raw))
    assert emb.dit is None and emb.text_dim == TEXT_DIM
