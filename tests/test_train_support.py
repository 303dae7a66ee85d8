"""Tiny, offline training worlds for the ``train`` tests: tokenizer, student, teacher, DiT pipelines.

Everything is random and small (a few thousand parameters) and written to disk in the layouts the
trainer reads in real use: a transformers-layout student (no projector) with its tokenizer, a
fastenc-layout teacher, and diffusers pipeline folders for Flux (transformer, scheduler, CLIP
text encoder + tokenizer, T5 tokenizer_2, optional VAE), PixArt-α (transformer, scheduler, tokenizer),
Wan (transformer, UniPC scheduler, a umT5 text_encoder, tokenizer) and LTX-Video (transformer,
scheduler, tokenizer), plus a transformers-layout umT5 student.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastenc
from fastenc.config import EncoderConfig
from fastenc.model import T5Encoder
from helpers import make_t5_tokenizer_json
from reference import hf_config

STUDENT_CFG = EncoderConfig(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=512, num_buckets=8,
                            max_distance=20, projection_dim=None, name="tiny-student")
TEACHER_CFG = EncoderConfig(d_model=32, d_ff=48, num_layers=1, num_heads=2, d_kv=8, vocab_size=512, num_buckets=8,
                            max_distance=20, projection_dim=None, name="tiny-teacher")
TEXT_DIM = TEACHER_CFG.d_model  # the DiTs' text width = the teacher's output width = the student's projector
POOLED_DIM = 16
PROMPTS = ["a photo of a cat sitting on a red chair", "a dog playing with a ball on the beach",
           "an astronaut riding a horse on the moon", "a red fox sitting in the snow",
           "a castle on a hill surrounded by mountains", "a robot reading a book in a library"]
TEXT_PROMPTS = ["A sculptor waving a poster stating 'user'.", "text that says hello world written on a white sign",
                "a bear holding a sign reading 'honey'."]


@dataclass
class World:
    root: Path
    tokenizer: Path
    student: Path  # transformers layout, no projector, tokenizer beside it
    teacher: Path  # fastenc layout, projection_dim=None
    flux: Path
    pixart: Path
    data: dict  # data.components section
    wan: Path | None = None  # text_encoder/ holds a umT5 teacher of width TEXT_DIM
    ltx: Path | None = None
    umt5_student: Path | None = None  # transformers UMT5EncoderModel layout, no projector, tokenizer beside it

    def config(self, out: Path, kind: str = "flux", **sections) -> dict:
        """A raw config dict for a fast CPU run; ``sections`` update per section (e.g. run={...})."""
        cfg = {
            "student": {"init": str(self.student)},
            "teacher": {"path": str(self.teacher), "dtype": "fp32"},
            "dit": {"kind": kind, "path": str(getattr(self, kind)), "dtype": "fp32", "num_inference_steps": 4,
                    "resolution": 32, "max_length": 16, "gradient_checkpointing": False, **VIDEO.get(kind, {})},
            "optim": {"lr": 1e-3},
            "data": {"components": json.loads(json.dumps(self.data)), "batch_size": 2},
            "run": {"output_dir": str(out), "mixed_precision": "no", "log_every": 1000, "diagnostic_every": 0,
                    "save_every": 1000, "max_steps": 8},
        }
        for section, values in sections.items():
            cfg.setdefault(section, {}).update(values)
        return cfg


#: Video kinds' world settings: two latent frames of 4 x 4 (Wan) and 2 x 2 (LTX-Video, 32 px per latent pixel).
VIDEO = {"wan": {"num_frames": 5}, "ltx": {"num_frames": 9, "resolution": 64}}


def random_encoder(cfg: EncoderConfig, seed: int) -> T5Encoder:
    torch.manual_seed(seed)
    model = T5Encoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(sample_size=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                    in_channels=4, out_channels=8, caption_channels=TEXT_DIM, cross_attention_dim=16,
                                    patch_size=2, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                                    use_additional_conditions=False)


def tiny_wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=1,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def tiny_ltx(seed: int = 0):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                      num_layers=1, caption_channels=TEXT_DIM, qk_norm="rms_norm_across_heads")


def tiny_umt5(d_model: int, num_layers: int, seed: int):
    """A transformers ``UMT5EncoderModel``: one relative-attention-bias table per layer (each made distinct)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=512, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=num_layers, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False))
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
    return model.eval()


def tiny_video_vae(kind: str, seed: int = 0):
    """Wan's ``AutoencoderKLWan`` (8 px, 4 frames per latent) or LTX-Video's ``AutoencoderKLLTXVideo`` (4 px and
    4 frames per latent), a few thousand parameters each."""
    from diffusers import AutoencoderKLLTXVideo, AutoencoderKLWan

    torch.manual_seed(seed)
    if kind == "wan":
        return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                latents_std=[2.0, 1.5, 1.0, 0.5])
    return AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 4, 4, 4),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=2, sample_size=32, scaling_factor=0.3611,
                         shift_factor=0.1159)


def tiny_clip(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=512, hidden_size=POOLED_DIM, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=POOLED_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=0))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)


def write_prompt_files(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "quality.jsonl").write_text("".join(json.dumps({"TEXT": p, "aesthetic": 6.6}) + "\n" for p in PROMPTS[:4]))
    sem = root / "compbench"
    sem.mkdir(exist_ok=True)
    (sem / "color_train.txt").write_text("\n".join(PROMPTS[2:]) + "\n")
    (root / "commontext.json").write_text(json.dumps([{"prompt": p} for p in TEXT_PROMPTS]))
    return {
        "quality": {"paths": [str(root / "quality.jsonl")], "field": "TEXT"},
        "semantic": {"paths": [str(sem / "*_train.txt")]},
        "text": {"paths": [str(root / "commontext.json")]},
    }


def build_world(root: Path, *, vae: bool = False) -> World:
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    from transformers import T5EncoderModel

    from train.dit import FLUX_SCHEDULER, LTX_SCHEDULER, WAN_SCHEDULER

    root.mkdir(parents=True, exist_ok=True)
    tok = root / "tokenizer"
    make_t5_tokenizer_json(tok)

    torch.manual_seed(1)
    student = root / "student-t5"
    T5EncoderModel(hf_config(STUDENT_CFG)).save_pretrained(str(student))
    _copy_tokenizer(tok, student)

    teacher = root / "teacher"
    fastenc.save(random_encoder(TEACHER_CFG, seed=2), teacher)

    flux = root / "flux"
    tiny_flux().save_pretrained(str(flux / "transformer"))
    FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER).save_pretrained(str(flux / "scheduler"))
    tiny_clip().save_pretrained(str(flux / "text_encoder"))
    _copy_tokenizer(tok, flux / "tokenizer")
    _copy_tokenizer(tok, flux / "tokenizer_2")
    if vae:
        tiny_vae().save_pretrained(str(flux / "vae"))

    pixart = root / "pixart"
    tiny_pixart().save_pretrained(str(pixart / "transformer"))
    DPMSolverMultistepScheduler().save_pretrained(str(pixart / "scheduler"))
    _copy_tokenizer(tok, pixart / "tokenizer")

    wan = root / "wan"
    tiny_wan().save_pretrained(str(wan / "transformer"))
    UniPCMultistepScheduler.from_config(WAN_SCHEDULER).save_pretrained(str(wan / "scheduler"))
    tiny_umt5(TEXT_DIM, 2, seed=3).save_pretrained(str(wan / "text_encoder"))
    _copy_tokenizer(tok, wan / "tokenizer")

    ltx = root / "ltx"
    tiny_ltx().save_pretrained(str(ltx / "transformer"))
    FlowMatchEulerDiscreteScheduler.from_config(LTX_SCHEDULER).save_pretrained(str(ltx / "scheduler"))
    _copy_tokenizer(tok, ltx / "tokenizer")

    umt5_student = root / "student-umt5"
    tiny_umt5(STUDENT_CFG.d_model, 2, seed=4).save_pretrained(str(umt5_student))
    _copy_tokenizer(tok, umt5_student)

    data = write_prompt_files(root / "prompts")
    return World(root, tok, student, teacher, flux, pixart, data, wan, ltx, umt5_student)


def live_and_cached(raw: dict, out: Path, **dit) -> tuple[list[float], object]:
    """``raw`` (a config with teacher.path and teacher.cache) trained twice: with the live teacher (no cache),
    and from the cache alone (no teacher.path; ``dit`` updates that run's dit section). Returns the live run's
    losses and the fitted cache-only trainer (its losses in ``.result``)."""
    from accelerate.state import AcceleratorState

    from train.config import TrainConfig
    from train.loop import Trainer

    live_raw = json.loads(json.dumps(raw))
    live_raw["teacher"]["cache"] = None
    live = Trainer(TrainConfig.from_dict(live_raw)).fit().losses
    AcceleratorState._reset_state(True)
    cached_raw = json.loads(json.dumps(raw))
    cached_raw["teacher"]["path"] = None
    cached_raw["dit"].update(dit)
    cached_raw["run"]["output_dir"] = str(out)
    tr = Trainer(TrainConfig.from_dict(cached_raw))
    tr.result = tr.fit()
    return live, tr


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate's process state is a singleton: each test builds its own Accelerator. The tiny models
    run several times faster on one thread than on two contended ones; the thread count is restored."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def test_world_layouts_load(world):
    """The tiny world's pieces load the way the trainer loads them."""
    teacher = fastenc.load(world.teacher)
    assert teacher.config.projection_dim is None and teacher.config.output_dim == TEXT_DIM
    student = fastenc.load(world.student)  # transformers layout: no projector
    assert student.config.projection_dim is None and student.tokenizer is not None
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(world.flux), subfolder="vae")
    img = vae.decode(torch.randn(1, 4, 4, 4)).sample
    assert img.shape == (1, 3, 32, 32)


_WORLDS: list[World] = []


@pytest.fixture
def world(tmp_path_factory) -> World:
    """One tiny world per test session (built on first use, under a second); tests must not modify it."""
    if not _WORLDS:
        _WORLDS.append(build_world(tmp_path_factory.mktemp("world"), vae=True))
    return _WORLDS[0]
