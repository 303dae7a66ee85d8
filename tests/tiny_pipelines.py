"""Tiny random diffusers pipelines, one per target, built offline around a given T5 / umT5 encoder.

``BUILDERS[target](encoder, tokenizer_dir, clip_dir)`` returns the pipeline of that target with the encoder
in its T5 slot; every transformer takes text of width :data:`WIDTH` (the encoders' ``d_model``). ``CALLS``
gives the keyword arguments of a few-step, tiny-resolution call of each (``output_type="latent"``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MochiPipeline,
    MochiTransformer3DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

from reference import TINY, hf_config

WIDTH = 32  # d_model of the tiny encoders = the text width of every tiny transformer
ENCODER = TINY.replace(projection_dim=None)  # a T5 of width WIDTH, as the pipelines hold it


def t5_encoder(seed: int = 0):
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(hf_config(ENCODER)).eval()


def umt5_encoder(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = hf_config(ENCODER).to_dict()
    cfg.pop("model_type", None)
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**{**cfg, "use_cache": False})).eval()


def write_clip_tokenizer(directory: Path) -> None:
    """A tiny CLIP BPE vocabulary: every character alone and word-final, plus a few merges."""
    directory.mkdir(parents=True)
    chars = string.ascii_lowercase + string.digits + ".,'!?-"
    merges = [("a", "t</w>"), ("c", "at</w>"), ("t", "h"), ("th", "e</w>"), ("o", "n</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges)]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77,
                                                                 "tokenizer_class": "CLIPTokenizer"}))


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06,
                         scaling_factor=1.5)


def tiny_clip(with_projection: bool, hidden: int, projection: int):
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, projection_dim=projection, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def flux_transformer(joint_dim: int = WIDTH, controlnet: bool = False):
    cls = FluxControlNetModel if controlnet else FluxTransformer2DModel
    return cls(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=joint_dim, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def flux(t5, tok: Path, clip: Path):
    torch.manual_seed(0)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(1),
                        text_encoder=tiny_clip(False, 32, 32), tokenizer=CLIPTokenizer.from_pretrained(clip),
                        text_encoder_2=t5, tokenizer_2=T5TokenizerFast.from_pretrained(tok),
                        transformer=flux_transformer())


def sd3(t5, tok: Path, clip: Path):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=WIDTH,
                                        caption_projection_dim=32, pooled_projection_dim=32, out_channels=4)
    clip_tok = CLIPTokenizer.from_pretrained(clip)
    return StableDiffusion3Pipeline(  # two CLIPs of width 16 fill the 32-wide joint space exactly
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4),
        text_encoder=tiny_clip(True, 16, 16), tokenizer=clip_tok, text_encoder_2=tiny_clip(True, 16, 16),
        tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=T5TokenizerFast.from_pretrained(tok))


def pixart(cls, t5, tok: Path, *, sample_size: int = 8, caption_channels: int = WIDTH):
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=caption_channels, norm_num_groups=1)
    return cls(tokenizer=T5TokenizerFast.from_pretrained(tok), text_encoder=t5, vae=tiny_vae(4),
               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def chroma(t5, tok: Path, clip: Path):
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=WIDTH,
                                           axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
                                           approximator_layers=1, approximator_num_channels=16)
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(1), text_encoder=t5,
                          tokenizer=T5TokenizerFast.from_pretrained(tok), transformer=transformer)


def wan(t5, tok: Path, clip: Path):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=WIDTH, freq_dim=256, ffn_dim=32,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    return WanPipeline(tokenizer=T5TokenizerFast.from_pretrained(tok), text_encoder=t5, vae=vae,
                       transformer=transformer, scheduler=UniPCMultistepScheduler(flow_shift=3.0))


def ltx(t5, tok: Path, clip: Path):
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=1, caption_channels=WIDTH)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5,
                       tokenizer=T5TokenizerFast.from_pretrained(tok), transformer=transformer)


def cogvideox(t5, tok: Path, clip: Path, text_length: int = 226):
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(  # learned text positions: one per token of max_sequence_length
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=WIDTH, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=text_length)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    return CogVideoXPipeline(tokenizer=T5TokenizerFast.from_pretrained(tok), text_encoder=t5, vae=vae,
                             transformer=transformer, scheduler=CogVideoXDDIMScheduler())


def mochi(t5, tok: Path, clip: Path):
    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                          pooled_projection_dim=16, in_channels=12, out_channels=None,
                                          qk_norm="rms_norm", text_embed_dim=WIDTH, time_embed_dim=4,
                                          activation_fn="swiglu", max_sequence_length=16)
    vae = AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                             decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1))
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5,
                         tokenizer=T5TokenizerFast.from_pretrained(tok), transformer=transformer)


#: target -> pipeline builder (the target's own pipeline class; flux-schnell and sd3.5 share their family's).
BUILDERS = {
    "flux-dev": flux, "flux-schnell": flux, "sd3": sd3, "sd3.5": sd3,
    "pixart-alpha": lambda t5, tok, clip: pixart(PixArtAlphaPipeline, t5, tok),
    "pixart-sigma": lambda t5, tok, clip: pixart(PixArtSigmaPipeline, t5, tok), "chroma": chroma, "wan": wan, "ltx-video": ltx,
    "cogvideox": cogvideox, "mochi": mochi,
}
_VIDEO = dict(height=16, width=16, num_frames=9)
#: target -> keyword arguments of a tiny call (resolution, frames, steps; no prompts).
CALLS = {
    "sd3.5": dict(height=16, width=16),
    "pixart-alpha": dict(height=16, width=16, use_resolution_binning=False, clean_caption=False),
    "pixart-sigma": dict(height=16, width=16, use_resolution_binning=False, clean_caption=False),
    "chroma": dict(height=16, width=16),
    "wan": _VIDEO,
    "ltx-video": dict(height=32, width=32, num_frames=9),
    "cogvideox": dict(height=16, width=16, num_frames=8),
    "mochi": dict(height=16, width=16, num_frames=7),
}
