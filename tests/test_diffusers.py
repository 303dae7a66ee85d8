"""fastenc encoders inside real, unmodified diffusers pipelines (tiny random components, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetPipeline, FluxPipeline, FluxTransformer2DModel, PixArtAlphaPipeline
from safetensors.torch import load_file
from transformers import T5EncoderModel, T5TokenizerFast

import fastenc
from fastenc.errors import ConfigError, InputError
from fastenc.integrations import T5Replacement, find_t5_slot, use_in_pipeline
from fastenc.model import T5Encoder
from helpers import make_t5_tokenizer_json
from reference import TINY, hf_config
import tiny_pipelines
from tiny_pipelines import flux_transformer as _flux_transformer, write_clip_tokenizer as _write_clip_tokenizer

DIM = 32  # joint_attention_dim / caption_channels of the tiny transformers = the encoder's projection dim
SEQ = 16  # max_sequence_length used for T5 in every pipeline here
CFG = TINY.replace(projection_dim=DIM)
IMAGE = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=SEQ, output_type="np")


# ---- components ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers")
    make_t5_tokenizer_json(root / "t5_tokenizer")
    _write_clip_tokenizer(root / "clip_tokenizer")
    torch.manual_seed(0)
    fastenc.save(T5Encoder(CFG), root / "encoder")
    fastenc.save(T5Encoder(TINY), root / "encoder_64")  # projection dim 64: does not fit the tiny DiTs
    return {"root": root, "t5": root / "t5_tokenizer", "clip": root / "clip_tokenizer",
            "encoder": root / "encoder", "encoder_64": root / "encoder_64"}


@pytest.fixture
def encoder(dirs) -> fastenc.Encoder:
    return fastenc.load(dirs["encoder"], device="cpu", cache=False, backend="torch")


@pytest.fixture
def t5_tokenizer(dirs) -> T5TokenizerFast:
    return T5TokenizerFast.from_pretrained(dirs["t5"])


def _t5():
    """A real transformers T5 (width DIM) in the slot first, as a loaded pipeline would have it."""
    return T5EncoderModel(hf_config(CFG)).eval()


def make_flux(dirs, controlnet_dim: int | None = None):
    pipe = tiny_pipelines.flux(_t5(), dirs["t5"], dirs["clip"])
    if controlnet_dim is None:
        return pipe
    return FluxControlNetPipeline(**pipe.components, controlnet=_flux_transformer(controlnet_dim, controlnet=True))


def make_pixart(dirs, caption_channels: int = DIM):
    return tiny_pipelines.pixart(PixArtAlphaPipeline, _t5(), dirs["t5"], sample_size=32,
                                 caption_channels=caption_channels)


def make_sd3(dirs):
    return tiny_pipelines.sd3(_t5(), dirs["t5"], dirs["clip"])


# ---- helpers ---------------------------------------------------------------------------


def capture(module: torch.nn.Module, name: str = "encoder_hidden_states") -> list[torch.Tensor]:
    """Record the text embeddings a denoiser receives on each call."""
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs[name].detach().clone()),
                                     with_kwargs=True)
    return seen


def direct(encoder, tokenizer, prompt: str, *, masked: bool = False, length: int = SEQ) -> torch.Tensor:
    """The encoder run on the pipeline tokenizer's ids, outside the pipeline: [1, L, P]."""
    batch = tokenizer([prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(batch.input_ids, batch.attention_mask if masked else None)


def generate(pipe, prompt: str, seed: int = 0, **kwargs) -> np.ndarray:
    image = pipe(prompt, generator=torch.Generator().manual_seed(seed), **IMAGE, **kwargs).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    return image


# ---- Flux ------------------------------------------------------------------------------


def test_flux_uses_fastenc_embeddings(dirs, encoder, t5_tokenizer):
    pipe = make_flux(dirs)
    assert find_t5_slot(pipe) == ("text_encoder_2", "tokenizer_2")
    assert use_in_pipeline(pipe, encoder) is pipe
    adapter = pipe.text_encoder_2
    assert isinstance(adapter, T5Replacement) and adapter.encoder is encoder
    assert pipe.config.text_encoder_2 == ("fastenc.integrations.text_encoder", "T5Replacement")
    assert pipe.components["text_encoder_2"] is adapter and pipe.tokenizer_2 is not None  # tokenizer stays

    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt("a cat", prompt_2=None, max_sequence_length=SEQ)
    assert embeds.shape == (1, SEQ, DIM) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, direct(encoder, t5_tokenizer, "a cat"), rtol=0, atol=0)

    seen = capture(pipe.transformer)
    cat = generate(pipe, "a cat")
    assert len(seen) == 2  # two denoising steps, both conditioned on fastenc's embeddings
    for hidden in seen:
        torch.testing.assert_close(hidden, direct(encoder, t5_tokenizer, "a cat"), rtol=0, atol=0)
    fox = generate(pipe, "a red fox in the snow")
    assert not torch.equal(seen[-1], seen[0]) and np.abs(cat - fox).max() > 1e-4
    np.testing.assert_array_equal(generate(pipe, "a cat"), cat)  # deterministic given the seed


def test_flux_controlnet(dirs, encoder, t5_tokenizer):
    pipe = make_flux(dirs, controlnet_dim=DIM)
    use_in_pipeline(pipe, encoder)
    to_controlnet, to_transformer = capture(pipe.controlnet), capture(pipe.transformer)
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    image = generate(pipe, "a dog on the beach", control_image=control, controlnet_conditioning_scale=0.7)
    expected = direct(encoder, t5_tokenizer, "a dog on the beach")
    assert len(to_controlnet) == len(to_transformer) == 2
    for hidden in to_controlnet + to_transformer:
        torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    other = generate(pipe, "a castle on a hill", control_image=control, controlnet_conditioning_scale=0.7)
    assert np.abs(image - other).max() > 1e-4


def _flux_lora(transformer: FluxTransformer2DModel, rank: int = 4) -> dict[str, torch.Tensor]:
    """peft-format LoRA for the attention projections of every block of the tiny Flux transformer."""
    gen = torch.Generator().manual_seed(2)
    state = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")):
            out_f, in_f = module.weight.shape
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.5
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.5
    assert len(state) >= 12
    return state


def test_flux_with_lora(dirs, encoder, t5_tokenizer):
    pipe = make_flux(dirs)
    use_in_pipeline(pipe, encoder)
    plain = generate(pipe, "a cat")
    pipe.load_lora_weights(_flux_lora(pipe.transformer), adapter_name="tiny")
    assert pipe.get_active_adapters() == ["tiny"]
    assert isinstance(pipe.text_encoder_2, T5Replacement)  # LoRA loading left the T5 slot alone
    seen = capture(pipe.transformer)
    with_lora = generate(pipe, "a cat")
    half = generate(pipe, "a cat", joint_attention_kwargs={"scale": 0.5})  # also scales text-encoder LoRA layers
    assert np.abs(with_lora - plain).max() > 1e-4 and np.abs(half - with_lora).max() > 1e-5
    for hidden in seen:
        torch.testing.assert_close(hidden, direct(encoder, t5_tokenizer, "a cat"), rtol=0, atol=0)


def test_flux_model_cpu_offload(dirs, encoder):
    pipe = make_flux(dirs)
    use_in_pipeline(pipe, encoder)
    reference = generate(pipe, "a cat")
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks; the default device needs an accelerator
    adapter = pipe.text_encoder_2
    assert hasattr(adapter, "_hf_hook") and pipe._execution_device.type == "cpu"
    np.testing.assert_allclose(generate(pipe, "a cat"), reference, atol=1e-6)
    pipe.maybe_free_model_hooks()


def test_from_pretrained_with_component_and_save_round_trip(dirs, encoder, t5_tokenizer, tmp_path):
    make_flux(dirs).save_pretrained(tmp_path / "flux")  # an ordinary pipeline folder with a T5EncoderModel
    adapter = T5Replacement(encoder)
    pipe = FluxPipeline.from_pretrained(tmp_path / "flux", text_encoder_2=adapter)
    assert pipe.text_encoder_2 is adapter
    expected = direct(encoder, t5_tokenizer, "a cat")
    with torch.no_grad():
        torch.testing.assert_close(pipe.encode_prompt("a cat", None, max_sequence_length=SEQ)[0], expected)

    pipe.save_pretrained(tmp_path / "fast")
    index = json.loads((tmp_path / "fast" / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["fastenc.integrations.text_encoder", "T5Replacement"]
    assert (tmp_path / "fast" / "text_encoder_2" / "model.safetensors").is_file()
    again = FluxPipeline.from_pretrained(tmp_path / "fast")
    assert isinstance(again.text_encoder_2, T5Replacement)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_prompt("a cat", None, max_sequence_length=SEQ)[0], expected,
                                   rtol=0, atol=0)
    bf16 = FluxPipeline.from_pretrained(tmp_path / "fast", dtype=torch.bfloat16)
    assert bf16.text_encoder_2.dtype == torch.bfloat16 == bf16.transformer.dtype
    # loading without T5 at all, then filling the empty slot
    bare = FluxPipeline.from_pretrained(tmp_path / "flux", text_encoder_2=None)
    assert bare.text_encoder_2 is None
    use_in_pipeline(bare, encoder)
    with torch.no_grad():
        torch.testing.assert_close(bare.encode_prompt("a cat", None, max_sequence_length=SEQ)[0], expected,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_save_pretrained_writes_the_checkpoints_weights(dirs, backend, t5_tokenizer, tmp_path, monkeypatch):
    """pipe.save_pretrained goes through fastenc.save: the encoder's weights as loaded, bit for bit, whether the
    cpu backend computes in bf16 or a bf16 pipeline cast a torch encoder to bf16."""
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(dirs["root"] / "cache"))
    dtype = "bf16" if backend == "cpu" else None  # the cpu backend's bf16 plan on every CPU
    enc = fastenc.load(dirs["encoder"], device="cpu", cache=False, backend=backend, dtype=dtype)
    pipe = make_flux(dirs).to(torch.bfloat16)
    use_in_pipeline(pipe, enc)
    assert enc.dtype == torch.bfloat16 and enc.backend == backend  # rounded, one way or the other
    pipe.save_pretrained(tmp_path / "fast")
    saved = load_file(tmp_path / "fast" / "text_encoder_2" / "model.safetensors")
    original = load_file(dirs["encoder"] / "model.safetensors")
    assert set(saved) == set(original)
    for name, tensor in original.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], tensor), name
    reference = fastenc.load(dirs["encoder"], device="cpu", cache=False, backend="torch")
    again = FluxPipeline.from_pretrained(tmp_path / "fast")  # fp32: the torch reference, as loaded before
    with torch.no_grad():
        torch.testing.assert_close(again.encode_prompt("a cat", None, max_sequence_length=SEQ)[0],
                                   direct(reference, t5_tokenizer, "a cat"), rtol=0, atol=0)
    with torch.no_grad():
        enc.model.embed.weight[5] += 1  # edited after load: refused, not saved stale
    with pytest.raises(ConfigError, match=r"^fastenc.save: the encoder's weights changed after load \(embed.weight "):
        pipe.save_pretrained(tmp_path / "edited")


def test_dtype_follows_the_pipeline(dirs, encoder, t5_tokenizer):
    pipe = make_flux(dirs)
    use_in_pipeline(pipe, encoder)
    fp32 = direct(encoder, t5_tokenizer, "a cat")
    pipe.to(torch.bfloat16)
    assert pipe.text_encoder_2.dtype == torch.bfloat16
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat", None, max_sequence_length=SEQ)[0]
    assert embeds.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(embeds.float(), fp32, dim=-1).min() > 0.99
    pipe.to(torch.float16, silence_dtype_warnings=True)
    assert pipe.text_encoder_2.dtype == torch.float16
    assert encoder.model.blocks[0].ffn.wo.weight.dtype == torch.float32  # T5 overflows fp16 there
    # an fp32 encoder joining a bf16 pipeline is cast to the transformer's dtype
    pipe = make_flux(dirs).to(torch.bfloat16)
    use_in_pipeline(pipe, fastenc.load(dirs["encoder"], device="cpu", cache=False, backend="torch"))
    assert pipe.text_encoder_2.dtype == torch.bfloat16


# ---- PixArt-alpha ------------------------------------------------------------------------


def test_pixart_passes_the_mask(dirs, encoder, t5_tokenizer):
    pipe = make_pixart(dirs)
    assert find_t5_slot(pipe) == ("text_encoder", "tokenizer")
    use_in_pipeline(pipe, encoder)
    kwargs = dict(do_classifier_free_guidance=False, clean_caption=False)
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt("a cat", max_sequence_length=SEQ, **kwargs)
        long_embeds, long_mask, _, _ = pipe.encode_prompt("a cat", max_sequence_length=SEQ + 8, **kwargs)
    batch = t5_tokenizer(["a cat"], padding="max_length", max_length=SEQ, return_tensors="pt")
    assert torch.equal(mask, batch.attention_mask)
    torch.testing.assert_close(embeds, direct(encoder, t5_tokenizer, "a cat", masked=True), rtol=0, atol=0)
    n = int(mask.sum())
    assert 1 < n < SEQ
    # with the mask passed, more padding leaves the real tokens' embeddings unchanged; without it they move
    torch.testing.assert_close(long_embeds[:, :n], embeds[:, :n], rtol=1e-5, atol=1e-5)
    unmasked = direct(encoder, t5_tokenizer, "a cat")
    assert (unmasked[:, :n] - embeds[:, :n]).abs().max() > 1e-3

    seen = capture(pipe.transformer)
    kw = dict(use_resolution_binning=False, clean_caption=False, guidance_scale=4.5)
    cat = generate(pipe, "a cat", **kw)
    uncond, cond = seen[0].unbind(0)  # classifier-free guidance batches [negative "", prompt]
    torch.testing.assert_close(cond, embeds[0], rtol=0, atol=0)
    torch.testing.assert_close(uncond, direct(encoder, t5_tokenizer, "", masked=True)[0], rtol=0, atol=0)
    assert np.abs(generate(pipe, "a red fox in the snow", **kw) - cat).max() > 1e-4


# ---- Stable Diffusion 3 ------------------------------------------------------------------


def test_sd3_uses_fastenc_embeddings(dirs, encoder, t5_tokenizer):
    pipe = make_sd3(dirs)
    assert find_t5_slot(pipe) == ("text_encoder_3", "tokenizer_3")
    use_in_pipeline(pipe, encoder)
    clip_len = pipe.tokenizer_max_length
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=False,
                                    max_sequence_length=SEQ)[0]
    assert embeds.shape == (1, clip_len + SEQ, DIM)
    torch.testing.assert_close(embeds[:, clip_len:], direct(encoder, t5_tokenizer, "a cat"), rtol=0, atol=0)

    seen = capture(pipe.transformer)
    cat = generate(pipe, "a cat", guidance_scale=5.0)
    torch.testing.assert_close(seen[0][1:, clip_len:], direct(encoder, t5_tokenizer, "a cat"), rtol=0, atol=0)
    assert np.abs(generate(pipe, "a bowl of fruit", guidance_scale=5.0) - cat).max() > 1e-4


# ---- errors and the adapter's own contract -----------------------------------------------


@pytest.mark.parametrize("case", ["flux", "pixart", "controlnet"])
def test_projection_dim_mismatch_names_both_numbers(dirs, case):
    if case == "flux":
        pipe, encoder, where = make_flux(dirs), fastenc.load(dirs["encoder_64"], cache=False, backend="torch"), "joint_attention_dim"
        dims = ("64", "32")
    elif case == "pixart":
        pipe, encoder, where = make_pixart(dirs), fastenc.load(dirs["encoder_64"], cache=False, backend="torch"), "caption_channels"
        dims = ("64", "32")
    else:  # the transformer fits, its controlnet does not
        pipe, encoder, where = make_flux(dirs, controlnet_dim=48), fastenc.load(dirs["encoder"], cache=False, backend="torch"), \
            "controlnet.config.joint_attention_dim"
        dims = ("32", "48")
    slot, _ = find_t5_slot(pipe)
    before = getattr(pipe, slot)
    with pytest.raises(ConfigError, match=where) as info:
        use_in_pipeline(pipe, encoder)
    assert all(d in str(info.value) for d in dims)
    assert getattr(pipe, slot) is before  # nothing changed


def test_other_errors(dirs, encoder):
    pipe = make_flux(dirs)
    with pytest.raises(ConfigError, match="text_encoder_9"):
        use_in_pipeline(pipe, encoder, slot="text_encoder_9")
    small_vocab = fastenc.load(fastenc.save(T5Encoder(CFG.replace(vocab_size=64)), dirs["root"] / "v64"), cache=False, backend="torch")
    with pytest.raises(ConfigError, match=r"tokenizer_2 has \d+ tokens .* vocab_size is 64"):
        use_in_pipeline(pipe, small_vocab)
    pipe.tokenizer_2 = None
    with pytest.raises(ConfigError, match="tokenizer_2 is None"):
        use_in_pipeline(pipe, encoder)
    with pytest.raises(ConfigError, match="fastenc.Encoder"):
        T5Replacement(encoder.model)


def test_adapter_contract(encoder):
    adapter = T5Replacement(encoder)
    ids = torch.tensor([[5, 9, 13, 1, 0, 0]], dtype=torch.int32)
    out = adapter(ids, output_hidden_states=False)
    assert out[0] is out.last_hidden_state and out[0].shape == (1, 6, DIM)
    torch.testing.assert_close(adapter(ids, return_dict=False)[0], out[0], rtol=0, atol=0)
    assert adapter.device == encoder.device and adapter.dtype == encoder.dtype and adapter.config.hidden_size == DIM
    with pytest.raises(InputError, match="output_hidden_states"):
        adapter(ids, output_hidden_states=True)
    with pytest.raises(InputError, match="out of range"):
        adapter(torch.tensor([[CFG.vocab_size]]))


# ---- where the encoder computes: the cpu fast path in an fp32 pipeline, pinned encoders ----------


@pytest.fixture
def fast_path_encoder(dirs, monkeypatch, tmp_path) -> fastenc.Encoder:
    """What ``fastenc.load(path)`` gives on a CPU with native bf16: the ``cpu`` backend, here with the
    op-table plan that runs int8 GEMMs (the planner's timing is replaced so that one wins: the pipeline
    must see the op table). The CPU feature checks are forced on so the default is taken on any x86 CPU."""
    import fastenc.backends as backends
    from fastenc.backends import cpu_plan

    monkeypatch.setattr(backends, "cpu_fast_path", lambda: (True, "forced for this test"))
    monkeypatch.setattr(cpu_plan.fcpu, "native_int8_mm", lambda: True)  # int8 op-table candidates on any CPU
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "cache"))  # no plan another test cached
    real = cpu_plan.time_round_robin

    def int8_first(runners, shapes, cfg, *args, **kwargs):
        times = real(runners, shapes, cfg, 1)
        return {c: {k: (0.001 if c.int8 and c.engine == "eager" else 1e3 + v) for k, v in t.items()}
                for c, t in times.items()}

    monkeypatch.setattr(cpu_plan, "time_round_robin", int8_first)
    monkeypatch.setattr(cpu_plan, "fidelity", lambda outs, refs, inputs: (0.99999, 0.9999))  # all pass the floor
    enc = fastenc.load(dirs["encoder"], cache=False)
    assert enc.backend == "cpu" and enc.dtype == torch.bfloat16 and enc.model.ops.num_int8 > 0
    return enc


def test_cpu_fast_path_in_an_fp32_pipeline_reports_what_it_computes(dirs, fast_path_encoder, t5_tokenizer, caplog):
    enc = fast_path_encoder
    planned = len(enc.model.int8_plan.weights)
    assert enc.model.ops.num_int8 == planned
    pipe = make_flux(dirs)  # fp32 transformer
    with caplog.at_level("INFO", logger="fastenc"):
        use_in_pipeline(pipe, enc)
    adapter = pipe.text_encoder_2
    # the encoder keeps its fast path and says so; the pipeline gets the fp32 it expects
    assert enc.backend == "cpu" and enc.dtype == torch.bfloat16 and enc.model.embed.weight.dtype == torch.bfloat16
    assert adapter.dtype == torch.float32 and adapter.compute_dtype == torch.bfloat16
    assert "kept the cpu backend" in caplog.text and "computes in bfloat16" in caplog.text
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat", None, max_sequence_length=SEQ)[0]
    assert embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, direct(enc, t5_tokenizer, "a cat").float(), rtol=0, atol=0)
    generate(pipe, "a cat")
    pipe.to(torch.float32)  # an explicit request changes nothing either
    assert enc.dtype == torch.bfloat16 and enc.backend == "cpu"
    assert enc.model.ops.num_int8 == planned  # the int8 plan never silently fell back to float GEMMs
    torch.testing.assert_close(direct(enc, t5_tokenizer, "a cat").float(), embeds, rtol=0, atol=0)


def test_pinned_encoder_stays_put_across_pipeline_moves(dirs, fast_path_encoder, t5_tokenizer):
    """The text encoder off the accelerator, on purpose: pipe.to / offload hooks leave it on the CPU with its
    op table; embeddings come back on the ids' device in the pipeline's dtype. (On this CPU-only machine the
    pipeline's "GPU" side is the CPU too; tests/test_device_follow.py runs the CUDA case on a GPU.)"""
    enc = fast_path_encoder
    pipe = make_flux(dirs)
    use_in_pipeline(pipe, enc, pin_device="cpu")
    adapter = pipe.text_encoder_2
    placed = (enc.device, enc.backend, enc.dtype, enc.model.ops)
    reference = generate(pipe, "a cat")
    expected = direct(enc, t5_tokenizer, "a cat")  # [1, L, P] bf16
    pipe.to("cpu")
    pipe.to(torch.bfloat16)
    assert (enc.device, enc.backend, enc.dtype, enc.model.ops) == placed
    assert adapter.dtype == torch.bfloat16 and adapter.device == torch.device("cpu")
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat", None, max_sequence_length=SEQ)[0]
    assert embeds.dtype == torch.bfloat16
    torch.testing.assert_close(embeds, expected.to(torch.bfloat16), rtol=0, atol=0)
    pipe.to(torch.float32)
    adapter.half()
    assert (enc.device, enc.backend, enc.dtype, enc.model.ops) == placed
    adapter.float()
    reference = generate(pipe, "a cat")  # the DiT and VAE went through bf16 and back: weights rounded
    pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(generate(pipe, "a cat"), reference, atol=1e-6)
    assert (enc.device, enc.backend, enc.dtype, enc.model.ops) == placed
    pipe.maybe_free_model_hooks()
    with pytest.raises(ConfigError, match="keep_on/pin_device must be a device"):
        T5Replacement(enc, keep_on="gpu-please")
    loaded = T5Replacement.from_pretrained(dirs["encoder"], keep_on="cpu", backend="torch")
    loaded.to("meta")  # a pinned adapter reports the pipeline's device; its encoder does not move
    assert loaded.device.type == "meta" and loaded.encoder.device.type == "cpu"
    loaded.pin(None)
    loaded.to("meta")  # where accelerate's sequential offload leaves weights: one clear error, not a meta copy
    with pytest.raises(ConfigError, match="enable_model_cpu_offload"):
        loaded(torch.tensor([[5, 9, 1]]))
