"""Every target row against its diffusers pipeline, observed from the pipeline itself (tiny random components,
offline): ``encode(target=...)`` equals what the pipeline feeds its transformer, ``use_in_pipeline`` refuses a
width the transformer does not take, and the pipeline's latents are the same with fastenc in the T5 slot."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import fastenc
from fastenc.errors import ConfigError
from fastenc.integrations import T5Replacement, pipeline_target, use_in_pipeline
from fastenc.model import T5Encoder
from fastenc.targets import TARGETS, get_target
from helpers import make_t5_tokenizer_json
from reference import TINY, rel_err
from tiny_pipelines import BUILDERS, CALLS, WIDTH, t5_encoder, umt5_encoder, write_clip_tokenizer

#: Padding in every batch, an HTML entity and runs of whitespace (Wan cleans them), and an empty prompt.
PROMPTS = ["a cat &amp; a dog", "two dogs  playing   with a ball on the beach at sunset", ""]
DROP_IN = ("sd3.5", "pixart-sigma", "chroma", "wan", "ltx-video", "cogvideox", "mochi")  # served since umT5
SEQ = 12  # the max_sequence_length passed to the pipelines in the drop-in runs


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    make_t5_tokenizer_json(root / "tok")
    write_clip_tokenizer(root / "clip")
    t5_encoder().save_pretrained(root / "t5")  # the pipelines' own encoders, as a pipeline folder holds them
    umt5_encoder().save_pretrained(root / "umt5")
    fastenc.save(T5Encoder(TINY), root / "wide")  # projects to 64: no tiny transformer takes it
    return root


def _original(name: str):
    return umt5_encoder() if get_target(name).family == "umt5" else t5_encoder()


def _fastenc(dirs, name: str) -> fastenc.Encoder:
    folder = dirs / ("umt5" if get_target(name).family == "umt5" else "t5")
    return fastenc.load(folder, tokenizer=dirs / "tok", backend="torch", cache=False)


def _pipe(dirs, name: str, **kw):
    return BUILDERS[name](_original(name), dirs / "tok", dirs / "clip", **kw)


def _fed(pipe, prompts, **kwargs) -> torch.Tensor:
    """The text embeddings the pipeline hands its transformer (first step of a call without guidance)."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        pipe(prompts, num_inference_steps=2, guidance_scale=1.0, output_type="latent", **kwargs)
    finally:
        hook.remove()
    return seen[0]


def _call_kwargs(name: str) -> dict:
    return dict(CALLS.get(name, dict(height=16, width=16)))


@pytest.mark.parametrize("name", list(TARGETS))
def test_row_is_what_the_pipeline_does(dirs, name):
    row, pipe = TARGETS[name], _pipe(dirs, name)
    served = pipeline_target(pipe)  # flux-schnell and sd3.5 run their family's pipeline: same row but the name
    assert dataclasses.replace(served, name=row.name, max_length=row.max_length) == row
    assert isinstance(getattr(pipe, row.encoder_slot), torch.nn.Module) and getattr(pipe, row.tokenizer_slot)
    assert getattr(pipe.transformer.config, row.width_field) == WIDTH
    default = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    if name == "flux-schnell":  # FluxPipeline's default is dev's; schnell is run at 256 (its model card)
        assert (row.max_length, default) == (256, TARGETS["flux-dev"].max_length)
    else:
        assert row.max_length == default
    with torch.no_grad():
        fed = _fed(pipe, PROMPTS, max_sequence_length=row.max_length, **_call_kwargs(name))
    fed = fed[:, -row.max_length:]  # SD3 puts CLIP's tokens first
    enc = _fastenc(dirs, name)
    got = enc.encode(PROMPTS, target=name)
    assert got.embeds.shape == fed.shape == (len(PROMPTS), row.max_length, WIDTH)
    assert rel_err(got.embeds, fed) <= 1e-5
    assert 0 < int(got.mask[1].sum()) < row.max_length  # padding is there: masking and zeroing both matter
    # each field decides: the row with any one of them changed gives another tensor
    for field, other in (("masked", not row.masked), ("zero_padding", not row.zero_padding),
                         ("clean", None if row.clean else "wan")):
        changed = enc.encode(PROMPTS, target=dataclasses.replace(row, **{field: other})).embeds
        assert rel_err(changed, fed) > 1e-3, field


@pytest.mark.parametrize("name", list(TARGETS))
def test_wrong_width_is_refused(dirs, name):
    pipe = _pipe(dirs, name)
    row = TARGETS[name]
    before = getattr(pipe, row.encoder_slot)
    wide = fastenc.load(dirs / "wide", backend="torch", cache=False)
    with pytest.raises(ConfigError) as info:
        use_in_pipeline(pipe, wide)
    assert str(info.value) == (f"the fastenc encoder projects to 64 dims but {type(pipe).__name__}.transformer.config."
                               f"{row.width_field} is {WIDTH}; use a checkpoint whose projection dim is {WIDTH}")
    assert getattr(pipe, row.encoder_slot) is before


def _same_latents(dirs, name: str, pipe, **call) -> None:
    """The pipeline's latents with its own encoder, then with fastenc's copy of it in the slot: equal."""
    def run():
        with torch.no_grad():
            out = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0))
        return out.frames if hasattr(out, "frames") else out.images

    want = run()
    use_in_pipeline(pipe, _fastenc(dirs, name))
    adapter = getattr(pipe, TARGETS[name].encoder_slot)
    assert isinstance(adapter, T5Replacement)
    shapes = []
    adapter.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    got = run()
    assert shapes and set(shapes) == {(2, call["max_sequence_length"])}  # prompts and negatives, at that length
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5
    return got


@pytest.mark.parametrize("name", DROP_IN)
def test_same_latents_with_fastenc_in_the_slot(dirs, name):
    """Two prompts, two outputs per prompt, negative prompts, guidance and the pipeline's own
    max_sequence_length: the latents are those of the encoder fastenc replaces."""
    kw = {"text_length": SEQ} if name == "cogvideox" else {}  # CogVideoX learns one position per text token
    pipe = _pipe(dirs, name, **kw)
    per_prompt = next(k for k in ("num_videos_per_prompt", "num_images_per_prompt")
                      if k in inspect.signature(type(pipe).__call__).parameters)
    got = _same_latents(dirs, name, pipe, prompt=PROMPTS[:2], negative_prompt=["blurry", "a cat"], guidance_scale=4.0,
                        num_inference_steps=2, max_sequence_length=SEQ, **{per_prompt: 2}, **_call_kwargs(name))
    assert got.shape[0] == (2 if name == "cogvideox" else 4)  # CogVideoXPipeline makes one video per prompt itself


def test_mochi_zeroed_empty_negative_prompt(dirs):
    """force_zeros_for_empty_prompt: Mochi encodes an empty negative prompt as all-<pad> ids under an all-zero
    mask; fastenc's copy gives the latents T5 gives there too."""
    pipe = _pipe(dirs, "mochi")
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    _same_latents(dirs, "mochi", pipe, prompt=PROMPTS[:2], negative_prompt="", guidance_scale=4.0,
                  num_inference_steps=2, max_sequence_length=SEQ, **_call_kwargs("mochi"))


def test_a_slot_holding_another_text_model_is_not_taken_for_t5(dirs):
    """LTX-2's pipelines are LTX* too but hold Gemma: a row whose slot holds another model type does not serve."""
    from tiny_pipelines import tiny_clip

    pipe = BUILDERS["ltx-video"](tiny_clip(False, 32, 32), dirs / "tok", dirs / "clip")
    assert pipeline_target(pipe) is None
    with pytest.raises(ConfigError) as info:
        use_in_pipeline(pipe, _fastenc(dirs, "ltx-video"))
    assert str(info.value).startswith("cannot tell which component of LTXPipeline is its T5 text encoder (known: ")
    assert isinstance(pipe.text_encoder, torch.nn.Module) and not isinstance(pipe.text_encoder, T5Replacement)


def test_target_rows_and_lengths_are_checked(dirs):
    enc = _fastenc(dirs, "ltx-video")
    with pytest.raises(ConfigError) as info:
        enc.encode("a cat", target="wan2.1")
    assert str(info.value) == f"unknown target 'wan2.1'; choose one of {', '.join(TARGETS)}"
    with pytest.raises(ConfigError, match=r"^max_length must be a positive integer, got 0$"):
        enc.encode("a cat", target="ltx-video", max_length=0)
    with pytest.raises(ConfigError, match=r"^Target 'mine': clean must be one of wan or None, got 'ftfy'$"):
        dataclasses.replace(TARGETS["wan"], name="mine", clean="ftfy")
    short = enc.encode(PROMPTS, target="ltx-video", max_length=SEQ)
    assert short.embeds.shape == (len(PROMPTS), SEQ, WIDTH)
    own = dataclasses.replace(TARGETS["ltx-video"], name="mine", max_length=SEQ)  # a row of one's own
    torch.testing.assert_close(enc.encode(PROMPTS, target=own).embeds, short.embeds, rtol=0, atol=0)
