"""Tiny, offline training worlds for the ``train`` tests: tokenizer, student, teacher, DiT pipelines.

Everything is random and small (a few thousand parameters) and written to disk in the layouts the
trainer reads in real use: a transformers-layout student (no projector) with its tokenizer, a
fastenc-layout teacher, and diffusers pipeline folders for Flux (transformer, scheduler, CLIP
text encoder + tokenizer, T5 tokenizer_2, optional VAE) and PixArt-α (transformer, scheduler, tokenizer).
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

    def config(self, out: Path, kind: str = "flux", **sections) -> dict:
        """A raw config dict for a fast CPU run; ``sections`` update per section (e.g. run={...})."""
        cfg = {
            "student": {"init": str(self.student)},
            "teacher": {"path": str(self.teacher), "dtype": "fp32"},
            "dit": {"kind": kind, "path": str(self.flux if kind == "flux" else self.pixart), "dtype": "fp32",
                    "num_inference_steps": 4, "resolution": 32, "max_length": 16, "gradient_checkpointing": False},
            "optim": {"lr": 1e-3},
            "data": {"components": json.loads(json.dumps(self.data)), "batch_size": 2},
            "run": {"output_dir": str(out), "mixed_precision": "no", "log_every": 1000, "diagnostic_every": 0,
                    "save_every": 1000, "max_steps": 8},
        }
        for section, values in sections.items():
            cfg.setdefault(section, {}).update(values)
        return cfg


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
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import T5EncoderModel

    from train.dit import FLUX_SCHEDULER

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

    data = write_prompt_files(root / "prompts")
    return World(root, tok, student, teacher, flux, pixart, data)


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
